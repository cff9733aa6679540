"""Streams (pathflow/streams.py): independent batches on several threads give what one thread gives,
and two threads' forwards on one model do not see each other's hooks or attention."""

import threading
import time

import pytest
import torch

from pathflow import streams
from pathflow.graphs import Target, prompt_graphs
from pathflow.model import prefix_cache, resid_hooks, resid_post, run, run_last
from pathflow.tokens import feature_reads

from .conftest import assert_same_graphs

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]])
BET, STOP = 18, 19  # "1" and "2" in the demo tokenizer


@pytest.fixture
def n_streams():
    """Set the process's streams for one test (``configure`` caps them at the cores), then put them back."""
    before = streams.streams()

    def use(n: int) -> int:
        got = streams.configure(n, torch.device("cpu"))
        if n > 1 and got < 2:
            pytest.skip("one core: a single stream")
        return got

    yield use
    streams.configure(before, torch.device("cpu"))


def test_stream_map_keeps_the_items_order_and_runs_on_two_threads(n_streams):
    n_streams(2)
    seen = set()

    def square(x):
        seen.add(threading.get_ident())
        time.sleep(0.01 * (x % 3))  # items of different lengths: the streams finish out of order
        return x * x

    assert streams.stream_map(square, list(range(30))) == [x * x for x in range(30)]
    assert len(seen) == 2
    assert torch.get_num_threads() >= 1 and streams.stream_map(square, []) == []


def test_the_first_error_stops_the_streams_and_is_raised(n_streams):
    n_streams(2)
    done = []

    def work(x):
        if x == 3:
            raise ValueError("item 3 failed")
        time.sleep(0.005)
        done.append(x)
        return x

    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="item 3 failed"):
        streams.stream_map(work, list(range(400)))
    assert len(done) < 100  # the rest were not started
    assert torch.get_num_threads() == threads  # the caller's intra-op threads are back


def test_a_gpu_has_one_stream(n_streams):
    assert streams.configure(4, torch.device("meta")) == 1
    assert streams.default_streams(torch.device("cuda")) == 1


def test_hooks_see_only_the_forwards_of_their_own_thread(tiny):
    """While one thread holds an edit hook on the model, another thread's forward is the plain one."""
    plain = resid_post(tiny, IDS, [2])[2]
    registered, checked = threading.Event(), threading.Event()
    out = {}

    def edited():
        with torch.no_grad(), resid_hooks(tiny, capture={2}, edits={0: lambda h: h + 1.0}) as hs:
            registered.set()
            checked.wait(30)
            run(tiny, IDS)
            out["edited"] = hs[2]

    t = threading.Thread(target=edited)
    t.start()
    try:
        registered.wait(30)
        out["other"] = resid_post(tiny, IDS, [2])[2]  # the other thread's hooks are on the model now
    finally:
        checked.set()
        t.join()
    assert torch.equal(out["other"], plain)
    assert not torch.allclose(out["edited"], plain)  # and its own forward was edited


def test_a_prefix_forward_leaves_another_threads_forward_as_it_was(tiny):
    """A forward against a cached prefix (its own attention) in the middle of running on one thread: a
    plain forward on another thread meanwhile uses the model's own attention, unchanged."""
    plain = resid_post(tiny, IDS, [2])[2]
    prefix = prefix_cache(tiny, IDS[:1], 4)
    inside, go = threading.Event(), threading.Event()

    def hold(h):
        inside.set()
        go.wait(30)
        return h

    def prefixed():
        with torch.no_grad(), resid_hooks(tiny, edits={0: hold}):
            run_last(tiny, prefix, 2)

    t = threading.Thread(target=prefixed)
    t.start()
    try:
        assert inside.wait(30)
        other = resid_post(tiny, IDS, [2])[2]
    finally:
        go.set()
        t.join()
    assert torch.equal(other, plain)


def test_graphs_and_reads_on_two_streams_equal_one(ctx, n_streams):
    """The demo's graphs (backwards and replays in several batches) and feature reads (many batches of
    texts) on two streams: the same nodes, edges, replays and maxima as on one."""
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["safe"]
    p = ids.shape[1] - 1
    targets = [Target("L3-5", 3, 5, p), Target("L2-17", 2, 17, p), Target("L3-101", 3, 101, p)]
    texts = [*ctx.prompts.values(), "1\nBet $10", "2) Stop", "I will stop here.", "Bet $50 now", "2\n"]
    features = [(1, 3), (2, 17), (3, 5), (3, 101)]
    got = {}
    for n in (1, 2):
        n_streams(n)
        got[n] = (prompt_graphs(ctx.model, saes, ids, targets, BET, STOP, max_nodes=20, batch_size=2,
                                method="norm", replay_top=10),
                  feature_reads(ctx.model, ctx.saes, ctx.tokenizer, texts, features, top=5, batch_size=2,
                                token_budget=64))
    (_, one, dense1), reads1 = got[1]
    (_, two, dense2), reads2 = got[2]
    assert_same_graphs(one, two, dense1, dense2)
    assert reads1.keys() == reads2.keys()
    for f, r in reads1.items():
        assert [(m["text"], m["position"]) for m in r["maxima"]] == \
            [(m["text"], m["position"]) for m in reads2[f]["maxima"]]
        assert [m["value"] for m in reads2[f]["maxima"]] == pytest.approx([m["value"] for m in r["maxima"]], rel=1e-5)
        assert r["histogram"]["n_tokens"] == reads2[f]["histogram"]["n_tokens"]
        assert r["histogram"]["n_active"] == reads2[f]["histogram"]["n_active"]


def test_calls_on_streams_run_two_at_once_each_on_its_share_of_the_cores(n_streams):
    """``run_on_stream`` (the pathways step's sub-batches): two callers' calls run at the same time on
    stream threads of one intra-op thread each; an error comes back to its caller; with one stream the
    call runs on the compute thread."""
    n_streams(2)
    both = threading.Barrier(2, timeout=30)  # passes only if the two calls run at once

    def call(x):
        both.wait()
        return x, threading.current_thread().name, torch.get_num_threads()

    out = []
    callers = [threading.Thread(target=lambda x=x: out.append(streams.run_on_stream(call, x))) for x in (1, 2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert sorted(x for x, _, _ in out) == [1, 2]
    assert [(name[:16], threads) for _, name, threads in out] == [("pathflow-stream-", 1)] * 2, out
    assert len({name for _, name, _ in out}) == 2

    def fail():
        raise ValueError("in a stream")

    with pytest.raises(ValueError, match="in a stream"):
        streams.run_on_stream(fail)
    n_streams(1)
    assert streams.run_on_stream(lambda: threading.current_thread().name) == "pathflow-compute"


def test_new_streams_replace_the_old_stream_threads(n_streams, monkeypatch):
    """Streams configured again with another share of the cores start new stream threads; the old ones
    finish and stop (none left waiting for calls)."""
    monkeypatch.setattr(streams, "_DEFAULT_THREADS", 2)
    n_streams(2)
    assert streams.run_on_stream(torch.get_num_threads) == 1
    old = list(streams._SERVERS)
    monkeypatch.setattr(streams, "_DEFAULT_THREADS", 4)
    n_streams(2)
    assert streams.run_on_stream(torch.get_num_threads) == 2
    for t in old:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in old) and all(t.is_alive() for t in streams._SERVERS)
