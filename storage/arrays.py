"""``jacobians.zarr``: arrays ``grad`` and ``attribution`` of shape [target, prompt, layer, d_sae].

float32, NaN where not computed (layers at or above a target's own layer), Zstd-compressed.
One chunk per target row: the writer of a target owns its chunk, so writers never share one.
Attributes: ``targets`` ("L{layer}-{id}"), ``prompts``, ``layers`` and ``positions`` (the token
position of each prompt that targets and upstream features are taken at).
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

ARRAYS = ("grad", "attribution")


def create_jacobians(store, targets: list[str], prompts: list[str], n_layers: int, d_sae: int,
                     positions: dict[str, int] | None = None) -> zarr.Group:
    """Create the Jacobian arrays of a run once, before any writer starts (an existing group with
    the same labels is opened as it is, so a resumed run keeps what it wrote)."""
    shape = (len(targets), len(prompts), n_layers, d_sae)
    group = zarr.open_group(store, mode="a", zarr_format=3)
    if all(name in group for name in ARRAYS):
        if group.attrs.get("targets") != targets or any(group[n].shape != shape for n in ARRAYS):
            raise ValueError(f"jacobians.zarr exists with other targets or shape than {shape}")
        return group
    for name in ARRAYS:
        group.create_array(name, shape=shape, chunks=(1, len(prompts), n_layers, d_sae), dtype="float32",
                           fill_value=np.nan, compressors=[ZstdCodec(level=3)], overwrite=True)
    group.attrs.update({"targets": targets, "prompts": prompts, "layers": list(range(n_layers)),
                        "dims": ["target", "prompt", "layer", "d_sae"],
                        "positions": positions or {}})  # the token position of each prompt the rows are at
    return group


def open_jacobians(store) -> zarr.Group:
    return zarr.open_group(store, mode="r+", zarr_format=3)


def write_rows(group: zarr.Group, rows: list[int], grad: np.ndarray, attribution: np.ndarray) -> None:
    """Write whole target rows (= whole chunks): grad, attribution [len(rows), prompt, layer, d_sae]."""
    for i, row in enumerate(rows):
        group["grad"][row] = grad[i]
        group["attribution"][row] = attribution[i]
