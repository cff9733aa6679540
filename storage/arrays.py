"""``jacobians.zarr``: the exact Jacobians of a run, and the activations they multiply.

- ``grad`` [target, prompt, layer, feature]: ∂pre_target/∂f_feature of every upstream SAE feature at
  each prompt's position; NaN where not computed (layers at or above the target's own). One chunk per
  target row: the batch that computes a target owns its chunk, so writers never share one.
- ``activation`` [prompt, layer, feature]: the upstream activations f at each prompt's position. They
  are the same for every target, so they are stored once (one chunk per prompt), by one batch, the
  ``activation_writer`` in the attributes (``pathflow.pathways.activation_writer``).
- ``attribution = −grad ⊙ activation`` (the predicted effect of ablating a feature) is not stored: it
  is a product of two stored arrays; ``attribution(group, rows)`` forms it for the rows asked for.

Zarr v3, with ``dimension_names`` and 1-D coordinate arrays ``target`` (names "L{layer}-{id}"),
``prompt``, ``layer`` and ``feature``, so ``xarray.open_zarr(path)`` opens it labelled. Values are
float32; with ``keepbits`` set, each is rounded to that many mantissa bits (numcodecs ``BitRound``,
relative error ≤ 2^-(keepbits+1)) before Blosc (bit-shuffle + Zstd), which then stores the zeroed bits
almost for free; the arrays stay plain float32 with core Zarr v3 codecs that any reader opens.
``keepbits=None`` is lossless.
Attributes: ``targets``, ``prompts``, ``layers``, ``positions`` (the token position of each prompt
the rows are at), ``keepbits``, ``activation_writer``.
"""

from __future__ import annotations

import warnings

import numpy as np
import zarr
from numcodecs import BitRound
from zarr.codecs import BloscCodec

ARRAYS = ("grad", "activation")
# Blosc (a core Zarr v3 codec) with bit-shuffle: after kept-bits rounding the zeroed low bits line up and
# cost almost nothing (on the demo's gradients: 1.56 bytes a value at keepbits 7, against 2.10 with plain
# Zstd and 3.6 lossless). After bit-shuffle, LZ4 packs as well as Zstd level 5 (a real-shape row: 1.52
# against 1.49 bytes a value) at a quarter of the time (3 against 12 ms a row).
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4)
DIMS = {"grad": ("target", "prompt", "layer", "feature"), "activation": ("prompt", "layer", "feature")}


def create_jacobians(store, targets: list[str], prompts: list[str], n_layers: int, d_sae: int,
                     positions: dict[str, int] | None = None, keepbits: int | None = None,
                     writer: str | None = None) -> zarr.Group:
    """Create the arrays of a run once, before any writer starts (an existing group with the same
    labels is opened as it is, so a resumed run keeps what it wrote)."""
    shape = {"grad": (len(targets), len(prompts), n_layers, d_sae), "activation": (len(prompts), n_layers, d_sae)}
    group = zarr.open_group(store, mode="a", zarr_format=3)
    if all(name in group for name in ARRAYS):
        if group.attrs.get("targets") != targets or any(group[n].shape != shape[n] for n in ARRAYS):
            raise ValueError(f"jacobians.zarr exists with other targets or shape than {shape['grad']}")
        return group
    for name, chunks in (("grad", (1, len(prompts), n_layers, d_sae)), ("activation", (1, n_layers, d_sae))):
        group.create_array(name, shape=shape[name], chunks=chunks, dtype="float32", fill_value=np.nan,
                           compressors=[COMPRESSOR], dimension_names=DIMS[name], overwrite=True)
    for name, values in (("target", np.array(targets, dtype=str)), ("prompt", np.array(prompts, dtype=str)),
                         ("layer", np.arange(n_layers, dtype=np.int32)), ("feature", np.arange(d_sae, dtype=np.int32))):
        coord = group.create_array(name, shape=values.shape, dtype=values.dtype if values.dtype.kind != "U" else str,
                                   dimension_names=(name,), overwrite=True)
        coord[:] = values
    group.attrs.update({"targets": targets, "prompts": prompts, "layers": list(range(n_layers)),
                        "dims": list(DIMS["grad"]), "positions": positions or {}, "keepbits": keepbits,
                        "activation_writer": writer})
    with warnings.catch_warnings():  # consolidated metadata is outside the v3 spec; readers that lack it
        warnings.simplefilter("ignore")  # read the arrays' own metadata, which is all there
        zarr.consolidate_metadata(store)
    return group


def open_jacobians(store, mode: str = "r+") -> zarr.Group:
    return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)


def _round(x: np.ndarray, bits: int | None) -> np.ndarray:
    """``x`` as float32 with ``bits`` mantissa bits kept (None: as it is)."""
    if bits is None:
        return x
    x = np.ascontiguousarray(x, dtype=np.float32)
    return BitRound(keepbits=bits).encode(x).view(np.float32).reshape(x.shape)  # encode gives the int32 bits


def _rounded(group: zarr.Group, x: np.ndarray) -> np.ndarray:
    return _round(x, group.attrs.get("keepbits"))


def write_rows(group: zarr.Group, rows: list[int], grad: np.ndarray, valid_layers: int | None = None) -> None:
    """Write whole target rows (= whole chunks): grad [len(rows), prompt, L, feature], L ≤ the array's
    layers (phase A holds only the layers below the target's). Only the layers below ``valid_layers``
    (the rows' target layer; default L) are rounded and stored; the rest of each row is NaN.
    Rounded a (row, prompt) piece at a time: a piece's copies (a few MB) are reused from the heap, where
    a whole batch's (up to 130 MB each, several per rounding) were mapped fresh from the OS every batch."""
    n_layers = group["grad"].shape[2]
    valid = min(grad.shape[2] if valid_layers is None else valid_layers, grad.shape[2], n_layers)
    out = np.empty((*grad.shape[:2], n_layers, grad.shape[3]), np.float32)  # each value written once
    out[:, :, valid:] = np.nan
    for i in range(grad.shape[0]):
        for p in range(grad.shape[1]):
            out[i, p, :valid] = _rounded(group, grad[i, p, :valid])
    grad = out
    # one call, so Zarr encodes the rows' chunks concurrently; a batch's rows are usually consecutive,
    # and a slice is Zarr's fast path
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        group["grad"][rows[0]:rows[0] + len(rows)] = grad
    else:
        group["grad"].set_orthogonal_selection((np.asarray(rows),), grad)


def write_activation(group: zarr.Group, activation: np.ndarray) -> None:
    """Write the upstream activations [prompt, n_up, feature] (layers 0..n_up-1), whole chunks."""
    full = np.full(group["activation"].shape, np.nan, np.float32)
    full[:, : activation.shape[1]] = activation
    group["activation"][:] = _rounded(group, full)


def chunk_keys(group: zarr.Group, rows: list[int], activation: bool = False) -> list[str]:
    """The chunk files (relative to the group) that ``write_rows(rows)`` — and, with ``activation``,
    ``write_activation`` — wrote: a batch's marker hashes them, so a resume can tell a damaged or
    deleted chunk from a good one."""
    keys = []
    for name, indices in (("grad", rows), ("activation", range(group["activation"].shape[0]) if activation else [])):
        arr = group[name]
        keys += [f"{name}/{arr.metadata.encode_chunk_key((i, *([0] * (arr.ndim - 1))))}" for i in indices]
    return keys


def attribution(group: zarr.Group, rows=slice(None)) -> np.ndarray:
    """−grad ⊙ activation for target ``rows`` (an index, slice or list): [rows, prompt, layer, feature]."""
    grad = group["grad"].get_orthogonal_selection((rows,)) if isinstance(rows, list) else group["grad"][rows]
    return -grad * group["activation"][:]


# -- graphs.zarr: every position's node weights, sparse over the active SAE entries ----------
# Dense over positions this would be ~120× jacobians.zarr; only the entries active on the prompt are kept,
# with their (layer, position, feature) as coordinates of a ``node`` dimension.

GRAPH_DIMS = {"weight": ("target", "node"), "gradient": ("target", "node"), "error": ("target", "layer", "position"),
              "embedding": ("target", "position"), "decision_weight": ("node",),
              "decision_error": ("layer", "position"), "decision_embedding": ("position",),
              "activation": ("node",), "node_layer": ("node",), "node_position": ("node",),
              "node_feature": ("node",), "replayed": ("node",),
              "value": ("target",)}


def write_prompt_graph(store, prompt: str, targets: list[str], arrays: dict[str, np.ndarray],
                       attrs: dict, keepbits: int | None = None) -> zarr.Group:
    """One prompt's group of ``graphs.zarr``, written whole by the one task that computes it:
    ``arrays`` by the names of ``GRAPH_DIMS`` (a weight is −(the output's change when the node is
    ablated): measured by replay where ``replayed``, else the attribution method's estimate; 0 where a
    target cannot depend on a node)."""
    root = zarr.open_group(store, mode="a", zarr_format=3)
    group = root.create_group(prompt, overwrite=True)
    for name, x in arrays.items():
        x = np.asarray(x)
        if x.dtype.kind == "f":  # the targets' own values stay exact: a contrast subtracts them
            x = _round(np.asarray(x, dtype=np.float32), None if name == "value" else keepbits)
        a = group.create_array(name, shape=x.shape, dtype=x.dtype, compressors=[COMPRESSOR],
                               dimension_names=GRAPH_DIMS[name], overwrite=True)
        a[...] = x
    t = group.create_array("target", shape=(len(targets),), dtype=str, dimension_names=("target",), overwrite=True)
    t[:] = np.array(targets, dtype=str)
    group.attrs.update({**attrs, "targets": targets, "keepbits": keepbits})
    return group


def node_attribution(group: zarr.Group, target: str, layer: int, position: int) -> dict[int, float]:
    """pathflow's first-order attribution (−activation × gradient, as step 3's) of ``target`` from every
    active feature of ``layer`` at ``position``: {feature id: attribution}. (``weight`` holds the
    attribution method's best estimate, measured where ``replayed``.)"""
    row = list(group.attrs["targets"]).index(target)
    sel = (group["node_layer"][:] == layer) & (group["node_position"][:] == position)
    name = "gradient" if "gradient" in group else "weight"
    return {int(f): -float(w) for f, w in zip(group["node_feature"][:][sel], group[name][row][sel])}


# -- contrast.zarr: the study's contrast sums, by target direction -------------------------------

CONTRAST_DIMS = {"heatmap": ("direction", "layer", "span"), "feature_difference": ("direction", "layer", "feature"),
                 "feature_targets": ("direction", "layer", "feature"), "target_span": ("target", "span"),
                 "target_difference": ("target",)}


def write_contrast(store, arrays: dict[str, np.ndarray], labels: dict[str, list], attrs: dict) -> zarr.Group:
    """``integrated/contrast/contrast.zarr``: ``arrays`` by the names of ``CONTRAST_DIMS``, each dimension's
    labels (``labels[dim]``: directions, layers — "embeddings" then L0…, span names, targets) in the
    attributes."""
    root = zarr.open_group(store, mode="w", zarr_format=3)
    for name, x in arrays.items():
        x = np.asarray(x)
        a = root.create_array(name, shape=x.shape, dtype=x.dtype, compressors=[COMPRESSOR],
                              dimension_names=CONTRAST_DIMS[name])
        a[...] = x
        a.attrs["labels"] = {d: labels[d] for d in CONTRAST_DIMS[name] if d in labels and d != "feature"}
    root.attrs.update({**attrs, "labels": labels})
    return root
