"""The feature panel of circuit-tracer's page: one file per feature in a run's graphs.

circuit-tracer's page shows, for the node under the mouse, a feature file (``frontend/feature_models.Model``):
its top activating contexts, the tokens it promotes and suppresses, an activation histogram. pathflow
writes those files from what a run measured, beside the graphs (``integrated/graphs/features/{n}.json``,
``n`` the node's Cantor-paired ``feature``), and ``pathflow graphs`` points the page at them:

- examples: the study's top activations from step 4 (prompts and logged responses), where the feature
  is a study feature; and the feature's activation at every token of each graphed prompt;
- top/bottom logits: the logit lens of its decoder direction (step 4's ``writes``);
- histogram and quantiles: of its active (> 0) tokens, over step 4's texts where it has them, else over
  the prompts.
"""

from __future__ import annotations

import torch

from .graphs import GRAPHS_DIR, cantor

FEATURES_DIR = f"{GRAPHS_DIR}/features"
BINS = 24


def feature_path(layer: int, feature: int) -> str:
    return f"{FEATURES_DIR}/{cantor(layer, feature)}.json"


def prompt_entries(activations: dict[tuple, float],
                   wanted: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[list[int], list[float]]]:
    """{(layer, feature): (positions, activations)} of the ``wanted`` features among one prompt's active
    entries (``PromptState.activations``: {("f", layer, position, feature): activation})."""
    out: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
    for (_, layer, pos, feat), value in activations.items():
        if (layer, feat) in wanted:
            ps, vs = out.setdefault((layer, feat), ([], []))
            ps.append(pos)
            vs.append(value)
    return out


def _example(tokens: list[str], acts: list[float]) -> dict:
    top = max(range(len(acts)), key=lambda i: acts[i]) if acts else 0
    return {"tokens": tokens, "tokens_acts_list": acts, "train_token_ind": top, "is_repeated_datapoint": False}


def _histogram(values: list[float]) -> tuple[list[float], float]:
    """(counts [BINS] from 0 to the maximum, the maximum) of active values."""
    if not values:
        return [0.0] * BINS, 0.0
    t = torch.tensor(values, dtype=torch.float64)
    top = float(t.max())
    return torch.histc(t, bins=BINS, min=0.0, max=top).tolist(), top


def _quantiles(counts: list[float], top: float) -> list[float]:
    """The activation at each percentile 1..100 of the active tokens, read off the histogram's bin edges
    (the page places a node's activation among them)."""
    total = sum(counts)
    if not total:
        return []
    cum, out, b = 0.0, [], 0
    for q in range(1, 101):
        while b < len(counts) - 1 and cum + counts[b] < total * q / 100:
            cum += counts[b]
            b += 1
        out.append(top * (b + 1) / len(counts))
    return out


def feature_file(layer: int, feature: int, transcoder_id: str, prompts: dict[str, tuple[list[str], list[int],
                 list[float]]], writes: dict, study: dict | None = None) -> dict:
    """One feature's file in circuit-tracer's ``feature_models.Model``.

    prompts: {prompt name: (its tokens, the positions where the feature is active, its activations there)}
    writes:  step 4's ``writes`` ({promoted, suppressed: [{token, value}]})
    study:   step 4's record of a study feature ({reads, histogram}), or None
    """
    quantiles = []
    if study and study.get("reads"):
        quantiles.append({"quantile_name": "Top activations in the study's prompts and logged responses",
                          "examples": [_example([t["token"] for t in m["tokens"]], [t["value"] for t in m["tokens"]])
                                       for m in study["reads"]]})
    seen: list[float] = []
    for name, (tokens, positions, values) in prompts.items():
        acts = [0.0] * len(tokens)
        for p, v in zip(positions, values):
            acts[p] = v
        seen += values
        quantiles.append({"quantile_name": f"Every token of the prompt “{name}”", "examples": [_example(tokens, acts)]})
    if study and study.get("histogram", {}).get("n_tokens"):
        h = study["histogram"]
        counts, top = [float(c) for c in h["counts"]], float(h["edges"][-1])
        frequency = h["n_active"] / h["n_tokens"]
    else:
        counts, top = _histogram(seen)
        n = sum(len(tokens) for tokens, _, _ in prompts.values())
        frequency = len(seen) / n if n else 0.0
    quantile_values = _quantiles(counts, top)
    return {"transcoder_id": transcoder_id, "index": cantor(layer, feature), "examples_quantiles": quantiles,
            "top_logits": [t["token"] for t in writes.get("promoted", [])],
            "bottom_logits": [t["token"] for t in writes.get("suppressed", [])],
            "act_min": 0.0, "act_max": max([top] + seen), "quantile_values": quantile_values, "histogram": counts,
            "activation_frequency": frequency}
