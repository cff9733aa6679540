"""Step 3 at scale: batches by layer, OOM halving, cached replay interventions, concurrent writers."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

from pathflow.batching import SIMULATE_ENV, batch_size_for_attempt, run_with_backoff
from pathflow.config import ReplayConfig
from pathflow.jacobian import jacobians
from pathflow.pathways import phase_a, phase_b, phase_c, plan_batches, shard_batches
from pathflow.sae import SAEBank
from pathflow.topk import top_candidates
from storage.arrays import create_jacobians, open_jacobians, write_rows


def close(a, b, rel=1e-5):
    """Equal up to float32 rounding: a batched matmul may round differently from a single row."""
    a, b = np.nan_to_num(np.asarray(a)), np.nan_to_num(np.asarray(b))
    assert np.linalg.norm(a - b) <= rel * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)


def targets(specs):
    return [{"feature": f"L{l}-{i}", "layer": l, "feature_id": i, "index": n} for n, (l, i) in enumerate(specs)]


def test_plan_groups_by_layer():
    ts = targets([(3, 1), (1, 2), (3, 4), (3, 5), (1, 9)])
    plan = plan_batches(ts, 2)
    assert [(b.name, [t["feature"] for t in b.targets]) for b in plan] == [
        ("L1-batch0", ["L1-2", "L1-9"]), ("L3-batch0", ["L3-1", "L3-4"]), ("L3-batch1", ["L3-5"])]


def test_shards_balance_targets_and_cover_every_batch_once():
    # batches of 4, 4, 3, 2, 1 targets (L1..L5), largest first to the lightest shard:
    # L1 -> 0, L2 -> 1, L3 -> 0 (tie: the first), L4 -> 1 (4 < 7), L5 -> 1 (6 < 7): 7 targets each
    ts = targets([(1, i) for i in range(4)] + [(2, i) for i in range(4)] + [(3, i) for i in range(3)]
                 + [(4, i) for i in range(2)] + [(5, 0)])
    plan = plan_batches(ts, 4)
    groups = shard_batches(plan, 2)
    assert [[b.name for b in g] for g in groups] == [["L1-batch0", "L3-batch0"],
                                                     ["L2-batch0", "L4-batch0", "L5-batch0"]]
    assert [sum(len(b.targets) for b in g) for g in groups] == [7, 7]
    assert len(shard_batches(plan, 9)) == len(plan)  # never an empty shard
    assert [b.name for (b,) in shard_batches(plan, 9)] == [b.name for b in plan]
    with pytest.raises(ValueError, match="at least 1"):
        shard_batches(plan, 0)


def test_batched_phase_a_equals_unbatched(ctx):
    ts = targets([(3, 5), (3, 17), (3, 101), (3, 3), (3, 250)])
    (batch,) = plan_batches(ts, 8)
    bj = phase_a(ctx.model, ctx.saes, ctx.prefixes(), batch, ctx.device)
    assert bj.grad.shape == (5, 2, 3, ctx.sae(3).d_sae)  # the layers below the target's only
    for i, t in enumerate(ts):
        for p, prompt in enumerate(bj.prompts):
            one = jacobians(ctx.model, ctx.saes_up_to(3), ctx.prompt_ids[prompt], 3, [t["feature_id"]])
            close(bj.grad[i, p, :3], one.grad[0].numpy())
            close(bj.activation[p], one.activation.numpy())
    assert np.isfinite(bj.grad).all()
    assert bj.memory["bytes"] > 0


def test_oom_halving_gives_identical_results(ctx, monkeypatch):
    ts = targets([(2, i) for i in (4, 8, 15, 16, 23, 42, 77)])
    (batch,) = plan_batches(ts, 7)
    ref = phase_a(ctx.model, ctx.saes, ctx.prefixes(), batch, ctx.device)
    monkeypatch.setenv(SIMULATE_ENV, "2")
    got = phase_a(ctx.model, ctx.saes, ctx.prefixes(), batch, ctx.device)
    # 7 -> 3 + 4 -> (1 + 2) + (2 + 2), on each of the two prompts
    assert got.splits == [7, 3, 4] * 2
    assert np.array_equal(np.isnan(got.grad), np.isnan(ref.grad))
    close(got.grad, ref.grad)
    close(got.activation, ref.activation)
    monkeypatch.setenv(SIMULATE_ENV, "0")
    with pytest.raises(torch.OutOfMemoryError):  # down to one target and still out of memory: give up
        phase_a(ctx.model, ctx.saes, ctx.prefixes(), batch, ctx.device)


def test_backoff_only_on_oom():
    calls = []

    def boom(items):
        calls.append(len(items))
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        run_with_backoff(boom, list(range(8)))
    assert calls == [8]  # no retry for other errors

    def cuda_style(items):
        calls.append(len(items))
        if len(items) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sum(items)

    calls.clear()
    out = run_with_backoff(cuda_style, list(range(8)))
    assert [r for _, r in out] == [1, 5, 9, 13] and sum(r for _, r in out) == sum(range(8))
    assert [batch_size_for_attempt(32, a) for a in (1, 2, 3, 6, 7, 20)] == [32, 16, 8, 1, 1, 1]


def test_phase_b_and_c_ablate_and_steer(ctx):
    ts = targets([(3, 12), (3, 40)])
    (batch,) = plan_batches(ts, 4)
    bj = phase_a(ctx.model, ctx.saes, ctx.prefixes(), batch, ctx.device)
    cands = phase_b(bj, k=6, score="attribution", min_abs_gradient=0.0)
    for per_prompt in cands.values():
        for cs in per_prompt.values():
            assert [c["rank"] for c in cs] == list(range(1, 7))
            assert all(c["activation"] > 0 for c in cs)
            scores = [abs(c["attribution"]) for c in cs]
            assert scores == sorted(scores, reverse=True)
    tiny = ReplayConfig(scale=1e-3)
    res = phase_c(ctx.model, ctx.saes, ctx.prefixes(), batch, cands, tiny)
    for per_prompt in res.values():
        for r in per_prompt.values():
            assert r["faithfulness"]["sign_agreement"] == 1.0 and r["faithfulness"]["validated"]
            for c in r["candidates"]:
                assert c["intervention"] == "ablate"
                assert abs(c["actual_change"] - c["predicted_change"]) <= 1e-2 * abs(c["predicted_change"]) + 1e-6
    # off candidates (ranked by |gradient|) are steered: a small steer matches the gradient too
    off = phase_b(bj, k=5, score="gradient", min_abs_gradient=0.0)
    off = {f: {p: [c for c in cs if c["activation"] == 0] for p, cs in pp.items()} for f, pp in off.items()}
    assert any(cs for pp in off.values() for cs in pp.values())
    res = phase_c(ctx.model, ctx.saes, ctx.prefixes(), batch, off, ReplayConfig(steer_value=1e-3))
    for per_prompt in res.values():
        for r in per_prompt.values():
            for c in r["candidates"]:
                assert c["intervention"] == "steer" and c["new_activation"] == 1e-3
                assert c["predicted_change"] == pytest.approx(c["gradient"] * 1e-3)
                assert abs(c["actual_change"] - c["predicted_change"]) <= 2e-2 * abs(c["predicted_change"]) + 1e-7



def test_one_forward_replays_every_target_as_each_alone(ctx):
    """phase_c replays all the batch's targets on a prompt as rows of one forward, sharing a baseline
    row and with the decision's held rows joining at the target layer: each record equals replaying
    that target alone (``replay``, itself checked against full forwards), in one go or in pieces."""
    from pathflow.replay import replay

    ts = targets([(3, 12), (3, 40), (3, 77)])
    (batch,) = plan_batches(ts, 4)
    bj = phase_a(ctx.model, ctx.saes, ctx.prefixes(), batch, ctx.device)
    cands = phase_b(bj, k=5, score="attribution", min_abs_gradient=0.0)
    dec = (18, 19)
    together = phase_c(ctx.model, ctx.saes, ctx.prefixes(), batch, cands, ReplayConfig(), decision=dec)
    pieces = phase_c(ctx.model, ctx.saes, ctx.prefixes(), batch, cands, ReplayConfig(), backoff=False, max_rows=4,
                     decision=dec)
    for t in ts:
        for prompt, prefix in ctx.prefixes().items():
            base, alone = replay(ctx.model, ctx.saes, None, 3, t["feature_id"], cands[t["feature"]][prompt],
                                 prefix=prefix, decision=dec)
            for res in (together, pieces):
                r = res[t["feature"]][prompt]
                assert r["baseline_pre"] == pytest.approx(base, abs=1e-5)
                assert len(r["candidates"]) == len(alone) == 5
                for got, want in zip(r["candidates"], alone):
                    assert got["feature"] == want["feature"]
                    for key in ("actual_change", "actual_activation_change", "decision_change",
                                "decision_change_held"):
                        assert got[key] == pytest.approx(want[key], abs=1e-5), key


def test_sae_budget_streams_layers(demo_cfg, ctx):
    one = SAEBank.nbytes(ctx.sae(0))
    bank = SAEBank(demo_cfg.sae.root, demo_cfg.sae.pattern, demo_cfg.sae.threshold, budget_bytes=int(2.5 * one))
    (batch,) = plan_batches(targets([(3, 5), (3, 9)]), 2)
    ref = phase_a(ctx.model, ctx.saes, ctx.prefixes(), batch, ctx.device)
    got = phase_a(ctx.model, bank, ctx.prefixes(), batch, ctx.device)
    assert len(bank.resident()) <= 2 and bank.loads > 4  # layers were dropped and re-read
    np.testing.assert_array_equal(got.grad, ref.grad)


def _writer(path, rows):
    g = open_jacobians(path)
    for r in rows:
        write_rows(g, [r], np.full((1, 2, 3, 64), r, np.float32))


def test_concurrent_writers_never_lose_rows(tmp_path):
    path = str(tmp_path / "jacobians.zarr")
    n = 24
    create_jacobians(path, [f"L1-{i}" for i in range(n)], ["safe", "risky"], 3, 64)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, list(range(w, n, 4)))) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    g = open_jacobians(path)
    grad = g["grad"][:]
    for r in range(n):
        assert (grad[r] == r).all()
    # reopening with the same labels keeps the data (resume); other labels are refused
    create_jacobians(path, [f"L1-{i}" for i in range(n)], ["safe", "risky"], 3, 64)
    assert (open_jacobians(path)["grad"][5] == 5).all()
    with pytest.raises(ValueError, match="other targets"):
        create_jacobians(path, ["L1-0"], ["safe", "risky"], 3, 64)


def test_phase_b_ranks_each_prompt_among_its_own_active_features():
    """Step 3B finds each prompt's active features once for all the batch's targets: with prompts whose
    active features differ, every (target, prompt) ranking equals ``top_candidates`` on that pair alone."""
    from pathflow.pathways import Batch, BatchJacobians

    g = torch.Generator().manual_seed(5)
    k, layer, d = 3, 2, 400
    grad = torch.randn(k, 2, layer, d, generator=g).numpy()
    act = np.zeros((2, layer, d), np.float32)
    for p, half in ((0, slice(0, d // 2)), (1, slice(d // 2, d))):  # prompt 0 the first half's features, 1 the other
        on = torch.rand(layer, d // 2, generator=g) < 0.1
        act[p, :, half] = (torch.rand(layer, d // 2, generator=g) * on).numpy()
    batch = Batch("L2-batch0", layer, targets([(2, 7), (2, 8), (2, 9)]))
    bj = BatchJacobians(batch, ["risky", "safe"], grad, act, np.zeros((k, 2), np.float32), 0.0, {})
    got = phase_b(bj, k=5, score="attribution", min_abs_gradient=0.0)
    for i, t in enumerate(batch.targets):
        for p, prompt in enumerate(bj.prompts):
            want = top_candidates(torch.from_numpy(grad[i, p]), torch.from_numpy(act[p]), [0, 1], k=5)
            assert len(want) == 5 and got[t["feature"]][prompt] == want


def test_top_candidates_rank_as_a_brute_force_sort():
    """Step 3B against a plain sort over every (layer, feature): by |gradient × activation| among the active
    features whose |gradient| passes the floor, or by |gradient| among all; fewer than k when fewer qualify."""
    from pathflow.topk import top_candidates

    g = torch.Generator().manual_seed(3)
    grad = torch.randn(3, 500, generator=g)
    act = torch.where(torch.rand(3, 500, generator=g) < 0.02, torch.rand(3, 500, generator=g), torch.zeros(3, 500))
    layers = [4, 5, 6]
    every = [(li, f) for li in range(3) for f in range(500)]
    for score, floor in (("attribution", 0.0), ("attribution", 1.0), ("gradient", 0.5)):
        if score == "attribution":
            ok = [(li, f) for li, f in every if act[li, f] != 0 and abs(grad[li, f]) > floor]
            key = [abs(float(grad[li, f] * act[li, f])) for li, f in ok]
        else:
            ok = [(li, f) for li, f in every if abs(grad[li, f]) > floor]
            key = [abs(float(grad[li, f])) for li, f in ok]
        want = [ok[j] for j in sorted(range(len(ok)), key=lambda j: -key[j])]
        for k in (5, len(want) + 3):
            got = top_candidates(grad, act, layers, k=k, score=score, min_abs_gradient=floor)
            assert [(layers.index(c["layer"]), c["feature_id"]) for c in got] == want[:k]
            assert [c["rank"] for c in got] == list(range(1, len(got) + 1))
            for c in got:
                li = layers.index(c["layer"])
                assert c["attribution"] == pytest.approx(-float(grad[li, c["feature_id"]] * act[li, c["feature_id"]]))
                assert c["feature"] == f"L{c['layer']}-{c['feature_id']}"


def test_sub_batches_in_flight_are_sized_by_the_streams_the_context_sets(monkeypatch):
    """The first batch of a fresh process sizes its in-flight limit only once the context has set the streams
    (streams + 1), not from the unset default of one stream."""
    from pathflow import streams
    from tasks import pathways as task

    monkeypatch.setattr(streams, "_CONFIGURED", False)
    monkeypatch.setattr(streams, "_STREAMS", 1)
    monkeypatch.setattr(streams, "_THREADS", 1)
    monkeypatch.setattr(streams, "_DEFAULT_THREADS", 2)
    monkeypatch.setattr(task, "_IN_FLIGHT", None)
    loads = []
    monkeypatch.setattr(task, "get_context", lambda cfg: loads.append(cfg) or streams.configure(2, torch.device("cpu")))
    sem = task._in_flight("cfg")
    assert loads == ["cfg"] and streams.streams() == 2
    assert sem._initial_value == 3
    assert task._in_flight("cfg") is sem and loads == ["cfg"]  # loaded and sized once
