"""Layer indexing and hook facts of DESIGN §3, on a real transformers LLaMA."""

import pytest
import torch

from pathflow.model import decoder_layers, layer_hidden, replace_hidden, resid_hooks, resid_post, run

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]])


def test_resid_post_is_the_layer_output_including_the_last(tiny):
    with torch.no_grad():
        hs = tiny(input_ids=IDS, output_hidden_states=True).hidden_states
    ours = resid_post(tiny, IDS, [0, 1, 2])
    for n in (0, 1):  # hidden_states[n+1] is the output of layer n ...
        assert torch.allclose(ours[n], hs[n + 1], atol=1e-6)
    # ... except for the last layer, where transformers stores the final-norm output
    assert not torch.allclose(ours[2], hs[3], atol=1e-3)
    assert torch.allclose(tiny.model.norm(ours[2]), hs[3], atol=1e-5)


def test_early_stop_leaves_earlier_layers_identical(tiny):
    full = resid_post(tiny, IDS, [0, 1, 2])
    part = resid_post(tiny, IDS, [1])
    assert torch.equal(full[1], part[1])


class TupleLayer(torch.nn.Module):
    """A decoder layer as transformers < 4.5x returned it: a tuple (hidden, ...)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *a, **kw):
        return (self.inner(*a, **kw), None)


def test_tuple_and_tensor_layer_outputs_agree(tiny):
    ref = resid_post(tiny, IDS, [0, 1])
    layers = decoder_layers(tiny)
    orig = list(layers)
    try:
        for i in range(len(layers)):
            layers[i] = TupleLayer(orig[i])
        # the model itself cannot consume tuples, so stop at the captured layer and read the hooks
        with torch.no_grad(), resid_hooks(tiny, capture={0}, stop_after=0) as hs:
            run(tiny, IDS)
        assert hs[0].shape == (2, 6, 32)  # whole batch, not row 0
        assert torch.allclose(hs[0], ref[0], atol=1e-6)
    finally:
        for i in range(len(layers)):
            layers[i] = orig[i]


def test_output_helpers_do_not_drop_batch_rows():
    t = torch.randn(2, 6, 8)
    assert layer_hidden(t) is t  # the old idiom output[0] would give t[0]: batch row 0
    assert layer_hidden((t, "cache")) is t
    new = torch.zeros_like(t)
    assert replace_hidden(t, new) is new
    out = replace_hidden((t, "cache"), new)
    assert isinstance(out, tuple) and out[0] is new and out[1] == "cache"


def test_edit_hook_changes_downstream_only(tiny):
    base = resid_post(tiny, IDS, [0, 1])
    delta = torch.randn(32)

    def edit(h):
        h = h.clone()
        h[:, -1] += delta
        return h

    with torch.no_grad(), resid_hooks(tiny, capture={0, 1}, edits={0: edit}, stop_after=1) as hs:
        run(tiny, IDS)
    assert torch.allclose(hs[0][:, -1], base[0][:, -1] + delta, atol=1e-6)
    # causal mask: an edit at the last position leaves every earlier position of later layers unchanged
    assert torch.allclose(hs[1][:, :-1], base[1][:, :-1], atol=1e-6)
    assert not torch.allclose(hs[1][:, -1], base[1][:, -1], atol=1e-4)


@pytest.mark.parametrize("p", [1, 3, 5])
def test_rows_against_the_shared_prefix_equal_the_full_forward(tiny, p):
    """run_last/run_from attend to one copy of the prefix for every row (no cache of rows × prefix):
    each row, edited at p, equals the whole prompt run with that edit; gradients flow the same."""
    from pathflow.model import prefix_cache, run_from, run_last

    ids = IDS[:1]
    prefix = prefix_cache(tiny, ids, p)
    delta = torch.randn(3, 32) * 0.3  # one edit per row at position p, layer 0

    def full(row):
        def edit(h):
            h = h.clone()
            h[:, p] += delta[row]
            return h
        with torch.no_grad(), resid_hooks(tiny, capture={0, 1, 2}, edits={0: edit}) as hs:
            run(tiny, ids)
        return hs

    for runner, extra in ((run_last, ()), (run_from, (ids,))):
        def at_p(h):
            return h + torch.nn.functional.pad(delta[:, None], (0, 0, 0, h.shape[1] - 1))
        with torch.enable_grad(), resid_hooks(tiny, capture={0, 1, 2}, edits={0: at_p},
                                              grad_from_embeddings=True) as hs:
            runner(tiny, prefix, *extra, 3)
            loss = (hs[2] ** 2).sum()
            g_ours = torch.autograd.grad(loss, hs["emb"])[0]
        assert tiny.config._attn_implementation != "pathflow_prefix"  # set back after the forward
        seen = hs[2].shape[1]
        assert seen == (1 if runner is run_last else ids.shape[1] - p)
        for row in range(3):
            ref = full(row)
            for layer in (0, 1, 2):
                assert torch.allclose(hs[layer][row], ref[layer][0, p:p + seen], atol=1e-5)
        # against autograd through the whole prompt, with the prefix held as data
        emb = tiny.get_input_embeddings()(ids[:, p:p + seen]).expand(3, -1, -1).clone().requires_grad_(True)
        with torch.enable_grad():
            out = torch.cat([tiny.get_input_embeddings()(ids[:, :p]).expand(3, -1, -1), emb], 1)
            with resid_hooks(tiny, capture={2}, edits={0: lambda h: h + torch.nn.functional.pad(
                    delta[:, None], (0, 0, p, h.shape[1] - p - 1))}) as hs2:
                tiny.model(inputs_embeds=out, use_cache=False)
            g_ref = torch.autograd.grad((hs2[2][:, p:p + seen] ** 2).sum(), emb)[0]
        assert torch.allclose(g_ours, g_ref, atol=1e-4, rtol=1e-4)
