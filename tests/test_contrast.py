"""The contrast of the two prompts (issue 20): the alignment on the study's real prompts, the per-target
numbers against a hand-worked example, and a planted case where one earlier-token difference drives the
target: the contrast ranks its span and feature first and cross-prompt patching moves the target by the
predicted amount. Measurements are checked against forwards written here."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pathflow.config import ReplayConfig
from pathflow.contrast import (
    PromptRow,
    StudyContrast,
    align,
    contrast_run,
    cross_patch,
    swap_spans,
    target_contrast,
    token_lines,
)

from .test_token_views import SHARED_DATA, llama3_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


# -- alignment ---------------------------------------------------------------------------------


def test_token_lines_end_after_a_newline_token():
    toks = ["<s>", "Round", " 1", ":\n", "Bet", "\n\n", "Choice", ": "]
    assert token_lines(toks) == [(0, 4), (4, 6), (6, 8)]
    assert token_lines(toks, first_alone=True) == [(0, 1), (1, 4), (4, 6), (6, 8)]
    # a blank line joins the line before it (a tokenizer that splits "\n\n")
    assert token_lines(["a", "\n", "\n", "b"]) == [(0, 3), (3, 4)]
    assert token_lines(["<s>", "\n", "b"], first_alone=True) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real study data not present at {SHARED_DATA}")
def test_alignment_of_the_real_prompts():
    tok, _ = llama3_tokenizer()
    prompts = json.loads((SHARED_DATA / "prompts.json").read_text())
    ids = {p: tok(prompts[p]).input_ids for p in ("risky", "safe")}
    toks = {p: [tok.decode([i]) for i in ids[p]] for p in ids}
    al = align(("risky", "safe"), (toks["risky"], toks["safe"]), (ids["risky"], ids["safe"]), first_alone=True)
    # the spans cover each prompt in order, and their texts are the prompt again
    for p in ("risky", "safe"):
        sides = [s[p] for s in al.spans if s[p]]
        assert [x["start"] for x in sides] == [0] + [x["end"] for x in sides[:-1]] and sides[-1]["end"] == len(ids[p])
        assert "".join(x["text"] for x in sides[1:]) == prompts[p]
    by_name = {s["name"]: s for s in al.spans}
    r2 = by_name["Round 2"]
    assert r2["differs"] and r2["risky"]["text"] == "Round 2: Bet $100, Loss, Balance $30\n"
    assert r2["safe"]["text"] == "Round 2: Bet $10, Loss, Balance $120\n"
    assert [toks["risky"][q] for q in r2["risky"]["changed"]] == ["100", "30"]
    assert by_name["Round 3"]["differs"] and by_name["Current balance"]["differs"]
    assert by_name["1) Bet (choose $5-$100)"]["differs"]
    differing = {s["name"] for s in al.spans if s["differs"]}
    assert differing == {"Round 2", "Round 3", "Current balance", "1) Bet (choose $5-$100)"}
    assert not by_name["This slot machine may have hidden patte…"]["differs"]
    # pairs: monotone; equal tokens except inside a changed run; the last tokens paired (the targets' position)
    pairs = al.pairs
    assert np.all(np.diff(pairs, axis=0) > 0)
    for qa, qb in pairs:
        ch = qa in r2["risky"]["changed"] or any(qa in s["risky"]["changed"] for s in al.spans if s["risky"])
        assert ids["risky"][qa] == ids["safe"][qb] or ch
    assert tuple(pairs[-1]) == (len(ids["risky"]) - 1, len(ids["safe"]) - 1)
    # " (choose" exists only on risky: unpaired there
    unpaired = al.to_json()["unpaired"]["risky"]
    assert "".join(toks["risky"][q] for q in unpaired) == " (choose5-$100)\n"
    assert al.span_of["risky"][len(ids["risky"]) - 1] == al.span_of["safe"][len(ids["safe"]) - 1]


# -- one target's numbers by hand ----------------------------------------------------------------


def test_target_contrast_by_hand():
    # prompt a: 3 tokens in 2 lines, b: the same text but token 1 differs; layers 0, 1; d_sae 10
    al = align(("a", "b"), (["x", "y\n", "z"], ["x", "w\n", "z"]), ([1, 2, 3], [1, 4, 3]))
    assert [s["differs"] for s in al.spans] == [True, False] and al.pairs.tolist() == [[0, 0], [1, 1], [2, 2]]
    row_a = PromptRow(node_layer=np.array([0, 0, 1]), node_position=np.array([0, 1, 2]),
                      node_feature=np.array([5, 5, 7]), weight=np.array([1.0, 2.0, 0.5]),
                      error=np.array([[0.1, 0.0, 0.0], [0.0, 0.0, 0.2]]), error_layers=np.array([0, 1]),
                      embedding=np.array([0.0, 0.3, 0.0]), value=4.0)
    row_b = PromptRow(node_layer=np.array([0, 1]), node_position=np.array([0, 2]), node_feature=np.array([5, 7]),
                      weight=np.array([1.5, -0.5]), error=np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.1]]),
                      error_layers=np.array([0, 1]), embedding=np.array([0.0, 0.1, 0.0]), value=1.0)
    rec = target_contrast(al, {"a": row_a, "b": row_b}, d_sae=10, n_layers=2, layer=2, top=5)
    assert rec["difference"] == 3.0
    f = {x["feature"]: x for x in rec["features"]}
    assert f["L0-5"]["difference"] == pytest.approx(3.0 - 1.5) and f["L1-7"]["difference"] == pytest.approx(1.0)
    assert rec["features"][0]["feature"] == "L0-5" and f["L0-5"]["share"] == pytest.approx(0.5)
    assert {s["span"]: s["difference"] for s in f["L0-5"]["spans"]} == pytest.approx({0: 1.5})
    # cuts: embeddings, layer 0, layer 1.  span 0 = positions 0, 1; span 1 = position 2
    #   embeddings: span 0 = 0.3 − 0.1 = 0.2;                       span 1 = 0
    #   layer 0:    span 0 = (1 + 2 + 0.1) − 1.5 = 1.6;             span 1 = 0
    #   layer 1:    span 0 = 0;                                     span 1 = (0.5 + 0.2) − (−0.5 + 0.1) = 1.1
    s = {x["span"]: x for x in rec["spans"]}
    assert s[0]["difference"] == pytest.approx((0.2 + 1.6) / 3) and s[1]["difference"] == pytest.approx(1.1 / 3)
    assert s[0]["embeddings"] == pytest.approx(0.2 / 3) and s[1]["errors"] == pytest.approx(0.1 / 3)
    assert rec["spans"][0]["span"] == 0
    heat = rec["_arrays"]["layer_span"]
    assert heat == pytest.approx(np.array([[0.2, 0.0], [1.6, 0.0], [0.0, 1.1]]))
    study = StudyContrast(n_layers=2, d_sae=10, n_spans=2)
    study.add("risky", rec)
    study.add("risky", rec)
    out = study.summary(al)["risky"]
    assert out["n_targets"] == 2 and out["feeds_most"][0]["n_targets"] == 2
    assert out["most_weight"][0]["feature"] == "L0-5" and out["most_weight"][0]["difference"] == pytest.approx(3.0)
    assert out["spans"][0]["difference"] == pytest.approx(2 * 1.8 / 3)


# -- the planted case ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    """The planted massive feature (L0-0 at position q) on 'risky' only; 'safe' differs there and at one
    more token, a near-synonym (its embedding close to the risky token's: "$120" vs "$130"). Each prompt's
    weights are the graph step's (``output_weights``)."""
    from planted import planted_case

    from pathflow.graphs import output_weights, sparse_arrays

    model, saes, ids, target, node = planted_case()
    q = node[2]
    safe = ids.clone()
    safe[0, q] = 9
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # token 3 is unused by the prompt: the synonym of the one at position 13
        emb[3] = emb[int(ids[0, 13])] + 0.05 * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(1)) \
            / emb.shape[1] ** 0.5
    safe[0, 13] = 3
    prompts = {"risky": ids, "safe": safe}
    groups, toks = {}, {}
    for p, x in prompts.items():
        state, _, _, dense, _, _ = output_weights(model, saes, x, [target], 1, 2, "norm", 50, 8)
        groups[p] = sparse_arrays(state, dense)
        toks[p] = [f"w{int(i)}" + ("\n" if j % 4 == 3 else " ") for j, i in enumerate(x[0])]
    al = align(("risky", "safe"), (toks["risky"], toks["safe"]), (ids[0].tolist(), safe[0].tolist()))
    return model, saes, prompts, target, node, groups, al


def pre_of(model, saes, x, target, edits=None):
    """The target's pre-activation on ``x`` [1, n], a forward written here (edits: {layer: fn(h)})."""
    from pathflow.model import resid_hooks, run

    with resid_hooks(model, capture={target.layer}, edits=edits or {}) as hs:
        run(model, x)
    sae = saes[target.layer]
    return float(sae.scale * hs[target.layer][0, target.pos] @ sae.W_enc[target.feature] + sae.b_enc[target.feature])


def test_planted_difference_comes_first_and_patching_confirms_it(planted):
    model, saes, prompts, target, node, groups, al = planted
    q = node[2]
    spec = {"feature": target.name, "layer": target.layer, "feature_id": target.feature, "direction": "risky"}
    (rec,), study = contrast_run(model, saes, al, prompts, groups, {p: [target.name] for p in prompts}, [spec],
                                 {p: target.pos for p in prompts}, (1, 2), ReplayConfig(), top=10, patch_top=3)
    y = {p: pre_of(model, saes, x, target) for p, x in prompts.items()}
    assert rec["difference"] == pytest.approx(y["risky"] - y["safe"], rel=1e-4)
    # the driving feature first
    assert rec["features"][0]["feature"] == "L0-0"
    assert rec["features"][0]["spans"][0]["span"] == al.span_of["risky"][q]
    # the driving span first: swapping its text carries the target's whole difference (the other span nothing)
    drivers = rec["swaps"]["safe_with_risky"]
    assert len(drivers) == 2 and drivers[0]["span"] == al.span_of["safe"][q]
    assert abs(drivers[0]["target"]) > 5 * abs(drivers[1]["target"])
    study_spans = study.summary(al)["risky"]
    assert study_spans["feeds_most"][0]["feature"] == "L0-0"
    # cross-prompt patching of that feature moves the target by the predicted amount, both ways
    pat = rec["patching"]
    out = pat["risky_with_safe"]["features"][0]
    assert out["feature"] == "L0-0" and out["validated"]
    assert out["actual"] == pytest.approx(out["predicted"], rel=0.02)
    into = pat["safe_with_risky"]["features"][0]
    assert into["feature"] == "L0-0" and into["sign_agrees"] and into["magnitude_agrees"] and into["validated"]
    # the measurement, by a forward written here: risky's L0-0 value set on safe at q
    sae0 = saes[0]
    f_r = float(sae0.encode(_layer0(model, prompts["risky"])[q])[0])
    f_s = float(sae0.encode(_layer0(model, prompts["safe"])[q])[0])

    def put(h):
        h = h.clone()
        h[0, q] += (f_r - f_s) * sae0.W_dec[:, 0] / sae0.scale
        return h

    assert into["actual"] == pytest.approx(pre_of(model, saes, prompts["safe"], target, {0: put}) - y["safe"],
                                           rel=1e-4, abs=1e-5)


def _layer0(model, x):
    from pathflow.model import resid_hooks, run

    with resid_hooks(model, capture={0}, stop_after=0) as hs:
        run(model, x)
    return hs[0][0]


def test_swaps_and_patches_match_forwards_written_here(planted):
    model, saes, prompts, target, node, _, al = planted
    tspec = [(target.layer, target.feature, target.pos - prompts["safe"].shape[1])]
    sw = swap_spans(model, saes, al, prompts, "safe", "risky", tspec, (1, 2))
    y_safe = pre_of(model, saes, prompts["safe"], target)
    for sid, v in sw.items():
        s = al.spans[sid]
        x = prompts["safe"].clone()
        x[0, s["safe"]["start"]:s["safe"]["end"]] = prompts["risky"][0, s["risky"]["start"]:s["risky"]["end"]]
        assert v["target"][0] == pytest.approx(pre_of(model, saes, x, target) - y_safe, rel=1e-4, abs=1e-5)
    # two rows of edits in one batch, each its own forward here
    rows = [[(0, 3, 5, 0.7)], [(0, 2, 1, -0.4), (1, 6, 9, 1.3)]]
    dt, _ = cross_patch(model, saes, prompts["safe"], rows, [(target.layer, target.feature, target.pos)], (1, 2))
    for r, edits in enumerate(rows):
        hooks = {}
        for l in {e[0] for e in edits}:
            mine = [e for e in edits if e[0] == l]

            def fn(h, mine=mine, l=l):
                h = h.clone()
                for _, qq, i, v in mine:
                    h[0, qq] += v * saes[l].W_dec[:, i] / saes[l].scale
                return h

            hooks[l] = fn
        assert dt[r, 0] == pytest.approx(pre_of(model, saes, prompts["safe"], target, hooks) - y_safe,
                                         rel=1e-4, abs=1e-5)


def test_contrast_config_refuses_one_prompt_twice():
    from pydantic import ValidationError

    from pathflow.config import Config

    with pytest.raises(ValidationError, match="twice"):
        Config.model_validate({"contrast": {"prompts": ["risky", "risky"]}})
    assert Config().contrast.prompts == ("risky", "safe")
