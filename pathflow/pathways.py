"""Step 3 for many targets: batches grouped by layer, phases A (Jacobians), B (top-k), C (replay).

Every target shares the study's prompts, so each prompt's prefix keys/values are computed once
(``PrefixCache``) and every batch only pushes the token at the target position through the
layers. A batch is the targets of one layer; it halves on out-of-memory (``batching``).
This module returns arrays and records; writing them is the caller's (``storage``) business.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .batching import check_memory, chunks, peak_memory, reset_peak, run_with_backoff
from .jacobian import jacobians
from .model import PrefixCache
from .replay import faithfulness, judge, replay_rows
from .topk import top_candidates

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Targets of one layer processed together: ``name`` is what the UI shows (``L12-batch3``)."""

    name: str
    layer: int
    targets: list[dict]  # step-1 records with "feature", "layer", "feature_id" and "index" (row in the arrays)


def batch_name(layer: int, j: int) -> str:
    return f"L{layer}-batch{j}"


def activation_writer(targets: list[dict]) -> str:
    """The batch that stores the upstream activations (the same for every target): the first of the
    deepest layer, whose upstream layers are every layer any target reads."""
    return batch_name(max(t["layer"] for t in targets), 0)


def plan_batches(targets: list[dict], batch_size: int) -> list[Batch]:
    """Group targets by layer (ascending) and cut each layer into batches of ``batch_size``."""
    by_layer: dict[int, list[dict]] = {}
    for t in targets:
        by_layer.setdefault(t["layer"], []).append(t)
    out = []
    for layer in sorted(by_layer):
        for j, part in enumerate(chunks(by_layer[layer], batch_size)):
            out.append(Batch(name=batch_name(layer, j), layer=layer, targets=list(part)))
    return out


def shard_batches(batches: list[Batch], shards: int) -> list[list[Batch]]:
    """Deal batches to ``shards`` groups so each holds about as many targets (largest batch first
    to the lightest shard); a shard never gets none while another has two. Order within a shard
    follows the plan."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    n = min(shards, len(batches))
    order = {b.name: i for i, b in enumerate(batches)}
    groups: list[list[Batch]] = [[] for _ in range(n)]
    load = [0] * n
    for b in sorted(batches, key=lambda b: (-len(b.targets), order[b.name])):
        i = min(range(n), key=lambda j: (load[j], len(groups[j]), j))
        groups[i].append(b)
        load[i] += len(b.targets)
    return [sorted(g, key=lambda b: order[b.name]) for g in groups]


@dataclass
class BatchJacobians:
    """Phase A of one batch.

    grad:       [k, prompt, layer, d_sae] float32, the layers below the batch's (``write_rows`` stores
                NaN for the rest of a row's n_layers)
    activation: [prompt, n_up, d_sae]  upstream activations at the position (attribution = −grad ⊙ activation)
    """

    batch: Batch
    prompts: list[str]
    grad: np.ndarray
    activation: np.ndarray
    pre: np.ndarray  # [k, prompt]
    seconds: float
    memory: dict
    splits: list[int] = field(default_factory=list)


def _batched(fn, items, backoff: bool, splits: list[int]):
    """``fn`` over ``items``: halving on out-of-memory (``backoff``), or in one go (a caller such as a
    Prefect retry decides the size)."""
    if backoff:
        return run_with_backoff(fn, items, on_split=splits.append)
    check_memory(len(items))
    return [(items, fn(items))]


def phase_a(model, saes, prefixes: dict[str, PrefixCache], batch: Batch, device,
            backoff: bool = True) -> BatchJacobians:
    """Jacobians of a batch on every prompt; halves the batch on out-of-memory if ``backoff``."""
    t0 = time.perf_counter()
    reset_peak(device)
    layer, k = batch.layer, len(batch.targets)
    prompts = list(prefixes)
    d_sae = saes[layer].d_sae
    grad = np.empty((k, len(prompts), layer, d_sae), np.float32)  # every value filled below
    act = np.zeros((len(prompts), layer, d_sae), np.float32)
    pre = np.zeros((k, len(prompts)), np.float32)
    splits: list[int] = []
    for p, name in enumerate(prompts):
        def fn(sub, name=name):
            return jacobians(model, saes, None, layer, [t["feature_id"] for t in sub], prefix=prefixes[name])

        row = 0
        for sub, tj in _batched(fn, batch.targets, backoff, splits):
            n = len(sub)
            grad[row : row + n, p] = tj.grad.cpu().numpy()
            pre[row : row + n, p] = tj.pre.cpu().numpy()
            act[p] = tj.activation.cpu().numpy()
            row += n
    memory = peak_memory(device)
    log.info("%s: %d targets, %.3fs, peak %s %.1f MiB%s", batch.name, k, time.perf_counter() - t0, memory["kind"],
             memory["bytes"] / 2**20, f", split after OOM at {splits}" if splits else "")
    return BatchJacobians(batch, prompts, grad, act, pre, time.perf_counter() - t0, memory, splits)


def phase_b(bj: BatchJacobians, k: int, score: str, min_abs_gradient: float) -> dict[str, dict[str, list[dict]]]:
    """Top-k candidates per target and prompt: {feature: {prompt: [records]}}."""
    layer = bj.batch.layer
    acts = [torch.from_numpy(bj.activation[p]) for p in range(len(bj.prompts))]
    active = [torch.nonzero(a.flatten()).flatten() for a in acts]  # once per prompt, not per target
    out = {}
    for i, t in enumerate(bj.batch.targets):
        out[t["feature"]] = {
            prompt: top_candidates(torch.from_numpy(bj.grad[i, p]), acts[p], list(range(layer)), k, score,
                                   min_abs_gradient, active[p])
            for p, prompt in enumerate(bj.prompts)
        }
    return out


def phase_c(model, saes, prefixes: dict[str, PrefixCache], batch: Batch, candidates: dict, rc,
            backoff: bool = True, max_rows: int | None = None, decision: tuple[int, int] | None = None) -> dict:
    """Replay every candidate of every target of the batch: {feature: {prompt: {...}}}.

    ``rc``: the replay config (intervention, scale, steer_value, min_sign_agreement and ``judge``'s checks).
    The candidates of all the batch's targets on one prompt are rows of one forward (``replay_rows``),
    halved on out-of-memory with ``backoff``; without it, ``max_rows`` rows at a time (default: all).
    ``decision``: (bet, stop) token ids, for each candidate's change of the decision (``replay``).
    """
    features = [t["feature_id"] for t in batch.targets]
    out: dict = {t["feature"]: {} for t in batch.targets}
    for prompt in prefixes:
        rows = [(i, c) for i, t in enumerate(batch.targets) for c in candidates[t["feature"]].get(prompt, [])]

        def fn(sub, prompt=prompt):
            return replay_rows(model, saes, batch.layer, features, list(sub), prefixes[prompt], scale=rc.scale,
                               intervention=rc.intervention, steer_value=rc.steer_value, decision=decision)

        recs: list[list[dict]] = [[] for _ in features]
        base: list[float | None] = [None] * len(features)
        parts = [rows] if backoff or not max_rows else list(chunks(rows, max_rows))
        for part in parts if rows else []:
            for sub, (b, r) in _batched(fn, part, backoff, []):
                for (i, _), rec in zip(sub, r):
                    base[i] = b[i]
                    recs[i].append(rec)
        for i, t in enumerate(batch.targets):
            if prompt not in candidates[t["feature"]]:
                continue
            for r in recs[i]:
                r.update(judge(r["predicted_change"], r["actual_change"], base[i], rc))
            out[t["feature"]][prompt] = {"position": prefixes[prompt].position, "baseline_pre": base[i],
                                         "candidates": recs[i],
                                         "faithfulness": faithfulness(recs[i], rc.min_sign_agreement)}
    return out
