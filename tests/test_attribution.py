"""Attribution that ranks like ablation (issue 18): the 'norm' method against a brute-force
computation of the RMSNorms' exact response, replayed weights against independent ablation, and the
planted massive-activation node (benchmarks/planted.py) that the gradient misses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pathflow.graphs import (
    FlatNodes,
    Output,
    Target,
    node_weights,
    output_gradients,
    output_weights,
    prompt_graphs,
    prompt_state,
)
from pathflow.model import norm_reads

from .conftest import clean_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_attribution import exhaustive_ablation  # noqa: E402
from planted import planted_case  # noqa: E402

BET, STOP = 18, 19


def test_norm_method_is_the_exact_response_of_the_norms_at_the_node(ctx):
    """weight(norm) = weight(gradient) − Σ_reads ⟨ĝ, N(x+δ) − N(x) − J δ⟩, each read's module run on
    x + δ and its Jacobian-vector product taken by torch.func.jvp."""
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["safe"]
    n = ids.shape[1]
    state = prompt_state(ctx.model, saes, ids, norms=True)
    outs = [Output(layer=3, feature=443, pos=n - 1), Output(layer=2, feature=151, pos=n - 3)]
    lin = node_weights(state, saes, output_gradients(ctx.model, saes, ids, outs))
    g = output_gradients(ctx.model, saes, ids, outs, norms=True)
    exact = node_weights(state, saes, g)
    reads = norm_reads(ctx.model)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for l in (0, 1):
        pos, feat, val = state.acts[l]
        picks = torch.randint(len(pos), (3,), generator=gen).tolist() + [int(torch.argmax(val))]
        for e in picks:
            q, i, a = int(pos[e]), int(feat[e]), float(val[e])
            sae = saes[l]
            delta = -a * sae.W_dec[:, i] / sae.scale
            for r, o in enumerate(outs):
                if q > o.pos:
                    continue
                corr = 0.0
                for j, (m, k) in enumerate(reads):
                    if k <= l:
                        continue
                    x = state.reads[j, q]
                    _, jv = torch.func.jvp(m, (x,), (delta,))
                    corr += float((g.reads[r, j, q] * (m(x + delta) - m(x) - jv)).sum())
                want = float(lin.feature[l][r, e]) - corr
                assert float(exact.feature[l][r, e]) == pytest.approx(want, rel=2e-3, abs=1e-7)
                checked += 1
    assert checked >= 12
    # the decision runs through the final norm: its value is the model's logit difference either way
    dec = Output(layer=ctx.n_layers, pos=n - 1, bet=BET, stop=STOP)
    assert torch.allclose(output_gradients(ctx.model, saes, ids, [dec], norms=True).value,
                          output_gradients(ctx.model, saes, ids, [dec]).value, atol=1e-5)


def test_replayed_weights_are_the_measured_changes(ctx):
    """With replay_top, the strongest features' weights are −(their real change), as an independent
    ablation measures it; the estimate they were judged against is kept."""
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["risky"]
    n = ids.shape[1]
    targets = [Target("L3-443", 3, 443, n - 1), Target("L2-151", 2, 151, n - 1)]
    state, flat, _, dense, _, replayed = output_weights(ctx.model, saes, ids, targets, BET, STOP, "norm", 8, 8)
    idx = torch.nonzero(dense["replayed"]).flatten()
    assert 8 <= len(idx) <= 3 * 8
    keys = [flat.key(int(i)) for i in idx]
    acts = state.activations
    true = exhaustive_ablation(ctx.model, saes, ids, [(k[1], k[2], k[3], acts[k]) for k in keys], targets)
    for j, row in enumerate(dense["targets"]):
        assert torch.allclose(-row["weight"][idx], true[:, j], atol=1e-4)
    # the estimate before replay: the norm method's own weight on the same node
    _, _, _, plain, _, _ = output_weights(ctx.model, saes, ids, targets, BET, STOP, "norm", 0, 8)
    for k, i in zip(keys, idx.tolist()):
        assert replayed[k]["predicted"]["L3-443"] == pytest.approx(-float(plain["targets"][0]["weight"][i]), abs=1e-6)


def test_the_planted_root_cause_is_in_the_graph_linked_to_the_target():
    """A feature that dominates its token's norm, copied by attention to the target's token: its ablation
    is the target's largest change; the gradient ranks it far down; the default graph keeps it, linked."""
    model, saes, ids, target, node = planted_case()
    state = prompt_state(model, saes, ids)
    flat = FlatNodes(state)
    keys = [flat.key(i) for i in range(flat.m)]
    acts = state.activations
    true = exhaustive_ablation(model, saes, ids, [(k[1], k[2], k[3], acts[k]) for k in keys], [target])[:, 0]
    pi = keys.index(node)
    assert int((true.abs() > true[pi].abs()).sum()) == 0  # the planted node is the true top cause

    def rank(method):
        _, _, _, dense, _, _ = output_weights(model, saes, ids, [target], 1, 2, method, 0)
        w = dense["targets"][0]["weight"]
        return int((w.abs() > w[pi].abs()).sum())

    assert rank("gradient") > 50 and rank("norm") < 3
    _, graphs, _ = prompt_graphs(model, saes, ids, [target], 1, 2, method="norm", replay_top=50)
    g = graphs[0]
    assert node in g.nodes and (node, ("t",)) in g.edges
    assert -g.edges[(node, ("t",))] == pytest.approx(float(true[pi]), rel=1e-4)  # the measured change
    # by the gradient alone, its link to the target is a small fraction of its real effect
    _, graphs, _ = prompt_graphs(model, saes, ids, [target], 1, 2, method="gradient", replay_top=0)
    assert abs(graphs[0].edges.get((node, ("t",)), 0.0)) < 0.1 * abs(float(true[pi]))


def test_bench_attribution_small(tmp_path):
    """CI's small run of the benchmark: the planted case, the gradient against the default method."""
    out = tmp_path / "att.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attribution.py"), "--planted",
                        "--replay-top", "0", "50", "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env=clean_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "norm+replay50" in p.stdout and "recall@25" in p.stdout
    assert res["gradient"]["missed_top10"] >= 1  # the planted node
    assert res["norm+replay50"]["missed_top10"] == 0
    assert res["norm+replay50"]["recall@10"] == 1.0 and res["norm+replay50"]["recall@25"] >= 0.95


def test_demo_whole_prompt_recall(demo_dir, tmp_path):
    """On the demo bundle the default method's whole-prompt recall@25 is ≥ 0.95 for every graphed target."""
    out = tmp_path / "att.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attribution.py"), "--demo", str(demo_dir),
                        "--targets", "3", "--methods", "norm", "--replay-top", "50", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, env=clean_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())["norm+replay50"]
    assert res["recall@25_worst"] >= 0.95 and res["recall@25_at_target_worst"] == 1.0


def test_validated_means_three_checks():
    from pathflow.config import ReplayConfig
    from pathflow.replay import judge, validated_sentence

    rc = ReplayConfig(noise_floor=0.1, max_ratio=2.0)
    keys = ("sign_agrees", "above_noise", "magnitude_agrees", "validated")
    cases = {(1.0, 0.6, 2.0): (True, True, True, True),      # 0.6 ≥ 0.1·2, within ×2
             (1.0, 0.4, 2.0): (True, True, False, False),    # ×2.5 apart
             (0.05, 0.05, 1.0): (True, False, True, False),  # below 10% of the target's value
             (-1.0, 1.0, -1.0): (False, True, True, False),  # the signs differ
             (1.0, 0.0, 1.0): (False, False, False, False)}  # nothing moved
    for (pred, actual, base), want in cases.items():
        got = judge(pred, actual, base, rc)
        assert tuple(got[k] for k in keys) == want, (pred, actual, base, got)
    assert "10%" in validated_sentence(rc) and "factor 2" in validated_sentence(rc)
