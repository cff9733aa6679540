"""The language model: loading through transformers, and hooks on the residual stream.

``resid_post`` of layer n (what LlamaScope SAE ``L{n}R`` reads) is the *output* of
``model.model.layers[n]``. We hook that output rather than use ``hidden_states[n+1]``:
for the last layer transformers puts the final-norm output there instead.
Decoder layers return a tensor in transformers ≥ 4.5x / 5.x and a tuple before; the hooks
handle both (``output[0]`` on a tensor would silently take batch row 0).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import PathflowError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(PathflowError, RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names it."""


class _StopForward(Exception):
    """Raised by a hook once the last layer we need has run: later layers are wasted work."""


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; a device this machine lacks is a PathflowError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= n:
            raise PathflowError(f"model.device is {device!r} but this machine has "
                                f"{f'{n} CUDA devices' if n else 'no CUDA device'}: use auto or cpu")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise PathflowError("model.device is 'mps' but MPS is not available here: use auto or cpu")
    return torch.device(device)


def _hub_kwargs(name_or_path: str, revision: str | None) -> dict:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return dict(revision=revision, local_files_only=offline or os.path.isdir(name_or_path), trust_remote_code=False)


def check_local_model(name_or_path: str) -> None:
    """A model given as a path (absolute, or ./ ../ ~) must be a folder: otherwise huggingface_hub would
    read it as a hub id and say only "Repo id must be in the form…"."""
    if os.path.isabs(name_or_path) or name_or_path.startswith(("./", "../", "~", ".\\")):
        path = os.path.expanduser(name_or_path)
        if not os.path.isdir(path):
            what = "it is a file, not a folder" if os.path.exists(path) else "no such folder"
            raise ModelLoadError(
                f"model folder not found: {path} ({what}; a relative model path in a config is relative to the "
                "config file's folder, so a config copied elsewhere needs its paths updated; a hub model is named "
                "owner/name, e.g. meta-llama/Llama-3.1-8B)")


def _load_error(name_or_path: str, e: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = " (HF_HUB_OFFLINE is set: the model must be in the local cache)" if offline else ""
    return ModelLoadError(f"cannot load model {name_or_path!r}{hint}: {e}")


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """The model's tokenizer alone (cheap: checks before any model work)."""
    from transformers import AutoTokenizer

    check_local_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **_hub_kwargs(name_or_path, revision))
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None


def load_model(name_or_path: str, revision: str | None = None, dtype: str = "float32", device: str = "auto"):
    """Load a causal LM and its tokenizer (local folder or hub id; offline-aware, no remote code).

    Returns (model, tokenizer); the model is in eval mode with frozen parameters.
    """
    from transformers import AutoModelForCausalLM

    target = resolve_device(device)
    tok = load_tokenizer(name_or_path, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype],
                                                     **_hub_kwargs(name_or_path, revision))
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    model.to(target).eval().requires_grad_(False)
    return model, tok


def decoder_layers(model) -> nn.ModuleList:
    """``model.model.layers`` of a LLaMA-family causal LM."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelLoadError(f"{type(model).__name__} has no .model.layers: not a LLaMA-family decoder")
    return layers


def norm_reads(model) -> list[tuple[nn.Module, int]]:
    """The RMSNorms that read the residual stream, in forward order, each with the decoder layer it
    belongs to (the final norm: the layer count): ``[(input_layernorm, 0), (post_attention_layernorm, 0),
    …, (norm, n_layers)]``. An edit to layer l's output reaches the reads of layers > l."""
    layers = decoder_layers(model)
    out = []
    for k, layer in enumerate(layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if norm is None or not hasattr(norm, "weight"):
                raise ModelLoadError(f"{type(layer).__name__} has no {name} (an RMSNorm): attribution.method 'norm' "
                                     "needs a LLaMA-family decoder; use 'gradient'")
            out.append((norm, k))
    final = getattr(getattr(model, "model", model), "norm", None)
    if final is not None:
        out.append((final, len(layers)))
    return out


@contextmanager
def capture_norm_inputs(model, reads: list[tuple[nn.Module, int]], outputs: bool = False) -> Iterator[list]:
    """Store each read's input [batch, seq, d_model] (detached) — or, with ``outputs``, its output as
    computed (in the autograd graph) — in the yielded list, in ``reads``' order (None if it did not run)."""
    store: list = [None] * len(reads)
    handles = []
    owner = threading.get_ident()  # another thread's forward on the same model (a second stream) passes through

    def make(j: int):
        def hook(_mod, inp, out):
            if threading.get_ident() != owner:
                return None
            if out.dim() == 3:  # the forward's own call, not logit_difference's on one vector
                store[j] = out if outputs else inp[0].detach()

        return hook

    try:
        for j, (norm, _) in enumerate(reads):
            handles.append(norm.register_forward_hook(make(j)))
        yield store
    finally:
        for h in handles:
            h.remove()


def rms_eps(norm: nn.Module) -> float:
    """An RMSNorm's ε (``variance_epsilon`` in transformers' LLaMA, ``eps`` elsewhere)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def n_layers(model) -> int:
    return len(decoder_layers(model))


def layer_hidden(output) -> torch.Tensor:
    """The residual stream [batch, seq, d_model] from a decoder layer's output, tensor or tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden(output, hidden: torch.Tensor):
    """``output`` with its residual stream replaced, keeping the container type."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


Edit = Callable[[torch.Tensor], torch.Tensor]


def joining_rows(deltas: dict[int, torch.Tensor]) -> dict[int, Edit]:
    """Edits for replays whose rows join the forward at the layer of their own edit: the forward starts
    with row 0 alone (the unedited baseline), and after layer l the rows edited there are added as
    copies of row 0 with ``deltas[l]`` [m_l, d_model] added at the first position. Below its edit a row
    would only repeat row 0's work (a replay row differs from the baseline from its edit's layer on).

    Rows come out as [0, those of the lowest layer in ``deltas[l]``'s order, the next layer's, …]."""

    def join(d: torch.Tensor) -> Edit:
        def edit(h: torch.Tensor) -> torch.Tensor:  # h [rows, seq, d_model] -> [rows + m_l, seq, d_model]
            first = h[:1, :1] + d.to(h.dtype)[:, None, :]
            new = torch.cat([first, h[:1, 1:].expand(len(d), -1, -1)], 1) if h.shape[1] > 1 else first
            return torch.cat([h, new])

        return edit

    return {l: join(d) for l, d in deltas.items()}


@contextmanager
def resid_hooks(
    model,
    capture: set[int] = frozenset(),
    edits: dict[int, Edit] | None = None,
    stop_after: int | None = None,
    grad_from_embeddings: bool = False,
) -> Iterator[dict[int, torch.Tensor]]:
    """Hook ``resid_post`` of decoder layers, for forwards on the calling thread only (another thread's
    forward on the same model, a second stream, is not seen or changed).

    capture: layers whose output [batch, seq, d_model] is stored in the yielded dict (after edits);
    edits: layer -> fn(hidden) -> hidden, applied to that layer's output;
    stop_after: abort the forward once this layer has run (use with ``run``);
    grad_from_embeddings: make the embedding output a grad-requiring leaf (kept as ``store["emb"]``),
        so that the residual stream is differentiable while the parameters stay frozen.
    """
    edits = edits or {}
    store: dict[int, torch.Tensor] = {}
    handles = []
    layers = decoder_layers(model)
    owner = threading.get_ident()

    def make(n: int):
        def hook(_mod, _inp, output):
            if threading.get_ident() != owner:
                return None
            h = layer_hidden(output)
            changed = n in edits
            if changed:
                h = edits[n](h)
            if n in capture:
                store[n] = h
            if stop_after is not None and n == stop_after:
                raise _StopForward
            return replace_hidden(output, h) if changed else None

        return hook

    try:
        for n in sorted(set(capture) | set(edits) | ({stop_after} if stop_after is not None else set())):
            handles.append(layers[n].register_forward_hook(make(n)))
        if grad_from_embeddings:
            def leaf(_m, _i, out):
                if threading.get_ident() != owner:
                    return None
                store["emb"] = out.detach().requires_grad_(True)
                return store["emb"]

            handles.append(model.get_input_embeddings().register_forward_hook(leaf))
        yield store
    finally:
        for h in handles:
            h.remove()


def run(model, input_ids: torch.Tensor) -> None:
    """Forward ``input_ids`` [batch, seq]; a ``stop_after`` hook ends it early."""
    try:
        model.model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass


def run_masked(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Forward a right-padded batch [batch, seq]; a ``stop_after`` hook ends it early."""
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass


def resid_post(model, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """resid_post of ``layers`` for ``input_ids`` [batch, seq] -> {layer: [batch, seq, d_model]}."""
    with torch.no_grad(), resid_hooks(model, capture=set(layers), stop_after=max(layers)) as store:
        run(model, input_ids)
    return dict(store)


def logit_difference(model, h_last: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """logit(a) − logit(b) from the last layer's residual stream [..., d_model] (final norm, unembedding),
    without the full vocabulary's logits."""
    inner = getattr(model, "model", model)
    w = model.get_output_embeddings().weight
    return inner.norm(h_last) @ (w[a] - w[b]).to(h_last.dtype)


def encode_prompt(tokenizer, text: str, device) -> torch.Tensor:
    """Token ids [1, seq] of a prompt, with the tokenizer's BOS as in the study's generation."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.to(device)


def unembed(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm weight [d_model], unembedding [vocab, d_model]) for a logit lens."""
    inner = getattr(model, "model", model)
    return inner.norm.weight, model.get_output_embeddings().weight


# -- the last position, against cached keys/values ------------------------------------------
# A change at position p cannot reach positions < p (causal mask), and the keys/values of
# positions < p do not depend on anything at p. So both the Jacobian at p and a replay at p
# need only the single token at p pushed through the layers, attending to the cached prefix.


def _cache_kwarg(model) -> str:
    """transformers ≥ 5.2x names the cache argument ``cache``; earlier ones ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


@dataclass
class PrefixCache:
    """Keys/values of positions [0, p) of one prompt: per layer (k, v), each [1, kv_heads, p, head_dim]."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    token: torch.Tensor  # [1, 1] the token id at p
    position: int  # p
    n_tokens: int = 0  # the prompt's length (p = n_tokens - 1: the target is at the last token)
    # SAE activations f_l at p, unedited: the same for every batch of targets, so encoded once per layer
    activations: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)


def resolve_position(position: int, seq: int, prompt: str = "the prompt") -> int:
    """The index of ``position`` in a sequence of ``seq`` tokens (negative counts from the end).

    Out of range is an error, never wrapped; position 0 (BOS) has nothing upstream of it.
    """
    if not -seq <= position < seq:
        raise PathflowError(f"gradients.position {position} is outside {prompt} ({seq} tokens: positions 0..{seq - 1} "
                            f"or -{seq}..-1)")
    p = position % seq
    if p == 0:
        raise PathflowError(f"gradients.position {position} is token 0 of {prompt} (its BOS): the target position "
                            "needs at least one token before it")
    return p


@torch.no_grad()
def prefix_cache(model, input_ids: torch.Tensor, position: int = -1, prompt: str = "the prompt") -> PrefixCache:
    """Run positions [0, p) of ``input_ids`` [1, seq] once and keep their keys/values."""
    from transformers import DynamicCache

    p = resolve_position(position, input_ids.shape[1], prompt)
    cache = DynamicCache(config=model.config)
    model.model(input_ids=input_ids[:, :p], use_cache=True, **{_cache_kwarg(model): cache})
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return PrefixCache(kv=kv, token=input_ids[:, p : p + 1], position=p, n_tokens=int(input_ids.shape[1]))


# The model's attention goes through an implementation of pathflow's, registered as "pathflow+<the
# model's own>": the model's own (sdpa, eager) unless a forward passes ``pathflow_prefix`` (attend to a
# shared prefix). A keyword per forward rather than a switch of the shared config for the forward's
# duration, so that two streams (``pathflow.streams``) can run both kinds of forward on one model at once.
_DISPATCH = "pathflow+"


def _dispatch(base: str):
    """The attention of implementation ``pathflow+base``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        if kwargs.get("pathflow_prefix") is not None:
            return _prefix_attention(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS.get_interface(base, _eager(module))(module, query, key, value,
                                                                            attention_mask, **kwargs)

    return attention


def _eager(module):
    """The model's own eager attention (transformers defines one per architecture, beside the module)."""
    return sys.modules[type(module).__module__].eager_attention_forward


_REGISTERED: set[str] = set()


def use_pathflow_attention(model) -> None:
    """Route ``model``'s attention through pathflow's (once; its own stays what every plain forward uses)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    base = config._attn_implementation or "eager"
    if base.startswith(_DISPATCH):
        return
    name = _DISPATCH + base
    if name not in _REGISTERED:
        AttentionInterface.register(name, _dispatch(base))
        # a prefix forward's own mask is never read (``_prefix_attention`` masks for itself); the rest is the model's
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
        _REGISTERED.add(name)
    config._attn_implementation = name


# The rows share one prompt's prefix. Rather than hand transformers a cache of ``rows`` copies of it
# (its update concatenates, copying rows × prefix keys/values in every layer), the forward runs without
# a cache and this attention reads the prefix's keys/values once for all rows: the rows are folded
# into the query dimension, so no tensor is ever expanded over rows.
def _prefix_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of the new tokens to [cached prefix; themselves (causal)].

    query [rows, heads, q, hd]; key/value [rows, kv_heads, q, hd] (the new tokens only);
    ``kwargs["pathflow_prefix"]``: per layer (k, v), each [1, kv_heads, p, hd]. Returns [rows, q, heads, hd].
    """
    pk, pv = kwargs["pathflow_prefix"][module.layer_idx]
    rows, heads, q, hd = query.shape
    kv = key.shape[1]
    g = heads // kv
    # [rows, kv, g*q, hd]: the g query heads that share a key/value head, side by side
    qg = query.reshape(rows, kv, g * q, hd)
    p = pk.shape[2]
    if p <= q:  # a short prefix (an early position's replay): its copies are cheap, one fused attention is not
        i = torch.arange(q, device=query.device)
        sees = (torch.arange(p + q, device=query.device)[None, :] <= p + i[:, None]).repeat(g, 1)  # [g*q, p+q]
        k_all = torch.cat([pk.to(key.dtype).expand(rows, -1, -1, -1), key], 2)
        v_all = torch.cat([pv.to(value.dtype).expand(rows, -1, -1, -1), value], 2)
        out = torch.nn.functional.scaled_dot_product_attention(qg, k_all, v_all, attn_mask=sees, scale=scaling)
        return out.reshape(rows, heads, q, hd).transpose(1, 2).contiguous(), None
    # prefix scores with the rows folded into the query dimension: [kv, rows*g*q, hd] @ [kv, hd, p]
    qf = qg.transpose(0, 1).reshape(kv, rows * g * q, hd)
    s_pre = torch.matmul(qf, pk[0].to(query.dtype).transpose(-1, -2)).reshape(kv, rows, g * q, -1).transpose(0, 1)
    s_new = torch.matmul(qg, key.transpose(-1, -2))  # [rows, kv, g*q, q]
    if q > 1:  # causal among the new tokens: query i sees new keys 0..i
        i = torch.arange(q, device=query.device)
        future = (i[None, :] > i[:, None]).repeat(g, 1)  # [g*q, q]
        s_new = s_new.masked_fill(future, float("-inf"))
    scores = torch.cat([s_pre, s_new], -1) * scaling  # [rows, kv, g*q, p+q]
    w = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
    w_pre, w_new = w[..., :p], w[..., p:]
    o_pre = torch.matmul(w_pre.transpose(0, 1).reshape(kv, rows * g * q, p), pv[0].to(query.dtype))
    out = o_pre.reshape(kv, rows, g * q, hd).transpose(0, 1) + torch.matmul(w_new, value)  # [rows, kv, g*q, hd]
    return out.reshape(rows, heads, q, hd).transpose(1, 2).contiguous(), None



def _forward_against(model, prefix: PrefixCache, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Forward ``input_ids`` [rows, q] at ``positions`` [rows, q], attending to the prefix shared by all rows."""
    use_pathflow_attention(model)
    try:
        model.model(input_ids=input_ids, position_ids=positions, use_cache=False, pathflow_prefix=prefix.kv)
    except _StopForward:
        pass


def run_last(model, prefix: PrefixCache, rows: int) -> None:
    """Forward ``rows`` copies of the token at p against the cached prefix (hooks see [rows, 1, d_model]).

    One position id for all rows, broadcast: an edit hook may add rows on the way (replay's held rows)."""
    pos = torch.full((1, 1), prefix.position, device=prefix.token.device, dtype=torch.long)
    _forward_against(model, prefix, prefix.token.expand(rows, 1), pos)


def run_from(model, prefix: PrefixCache, input_ids: torch.Tensor, rows: int) -> None:
    """Forward positions p.. of ``input_ids`` [1, n] as ``rows`` copies against the cached keys/values
    of [0, p) (hooks see [rows, n - p, d_model]): an edit at p reaches every later position."""
    p, n = prefix.position, input_ids.shape[1]
    pos = torch.arange(p, n, device=input_ids.device).expand(rows, -1)
    _forward_against(model, prefix, input_ids[:, p:].expand(rows, -1), pos)
