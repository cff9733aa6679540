"""Layer indexing and hook facts of DESIGN §3, on a real transformers LLaMA."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pathflow.model import decoder_layers, layer_hidden, replace_hidden, resid_hooks, resid_post, run


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


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
