"""``jacobians.zarr``: arrays ``grad`` and ``attribution`` of shape [target, prompt, layer, d_sae].

float32, NaN where not computed (layers at or above a target's own layer), Zstd-compressed.
One chunk per target row: the writer of a target owns its chunk, so writers never share one.
Attributes: ``targets`` ("L{layer}-{id}"), ``prompts`` and ``layers``.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

ARRAYS = ("grad", "attribution")


def create_jacobians(store, targets: list[str], prompts: list[str], n_layers: int, d_sae: int) -> zarr.Group:
    """Create (or open, if it already has the same shape) the Jacobian arrays of a run."""
    shape = (len(targets), len(prompts), n_layers, d_sae)
    group = zarr.open_group(store, mode="a", zarr_format=3)
    for name in ARRAYS:
        if name in group and group[name].shape == shape:
            continue
        group.create_array(name, shape=shape, chunks=(1, len(prompts), n_layers, d_sae), dtype="float32",
                           fill_value=np.nan, compressors=[ZstdCodec(level=3)], overwrite=True)
    group.attrs.update({"targets": targets, "prompts": prompts, "layers": list(range(n_layers)),
                        "dims": ["target", "prompt", "layer", "d_sae"]})
    return group


def write_target(group: zarr.Group, index: int, grad: np.ndarray, attribution: np.ndarray) -> None:
    """Write target ``index``'s whole chunk: grad, attribution [prompt, layer, d_sae]."""
    group["grad"][index] = grad
    group["attribution"][index] = attribution
