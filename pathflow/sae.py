"""LlamaScope residual-stream SAEs: loading and the exact math (DESIGN §3).

A LlamaScope SAE ``L{n}R`` reads ``blocks.{n}.hook_resid_post``, the output of decoder
layer ``n``. With ``s = sqrt(d_model) / avg_norm_in``::

    pre   = (s·x) @ W_E + b_E          W_E = encoder.weight.T   [d_model, d_sae]
    f     = pre · [pre > θ]
    x̂     = (f @ W_D + b_D) / s       W_D = decoder.weight.T   [d_sae, d_model]

θ is ``jump_relu_threshold · s`` ("jumprelu", as SAELens loads it), 0 ("zero", what the
study used) or a number given in the config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open

from .errors import PathflowError

log = logging.getLogger(__name__)

WEIGHTS = "checkpoints/final.safetensors"
HYPERPARAMS = "hyperparams.json"
Threshold = Union[str, float]


class SAELoadError(PathflowError, RuntimeError):
    """An SAE that cannot be found or read; the message names the path."""


@dataclass
class SAE:
    """One layer's SAE, weights in the file's own layout.

    W_enc: [d_sae, d_model] (``encoder.weight``)   b_enc: [d_sae]
    W_dec: [d_model, d_sae] (``decoder.weight``)   b_dec: [d_model]
    """

    layer: int
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    scale: float  # s = sqrt(d_model) / avg_norm_in
    theta: float  # gate threshold on the pre-activation, in the SAE's own units
    hyperparams: dict = field(default_factory=dict)
    source: str = ""

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[0]

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> pre-activations [..., d_sae]."""
        return (self.scale * x) @ self.W_enc.T + self.b_enc

    def gate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.theta)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> feature activations f [..., d_sae]."""
        return self.gate(self.pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., d_sae] -> reconstruction x̂ [..., d_model], in the model's units."""
        return (f @ self.W_dec.T + self.b_dec) / self.scale

    def decoder_direction(self, feature: int) -> torch.Tensor:
        """∂x̂/∂f_feature = W_D[feature] / s  [d_model]: what one unit of the feature writes."""
        return self.W_dec[:, feature] / self.scale

    def to(self, device=None, dtype=None) -> SAE:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=dtype))
        return self


def scale_from_hyperparams(hp: dict) -> float:
    d_model = hp["d_model"]
    norm = hp.get("norm_activation", "dataset-wise")
    if norm != "dataset-wise":
        # 'token-wise'/'none' have no fixed scale; LlamaScope residual SAEs are dataset-wise.
        raise SAELoadError(f"norm_activation={norm!r} is not supported (only 'dataset-wise')")
    avg = hp.get("dataset_average_activation_norm") or {}
    if "in" not in avg:
        raise SAELoadError("hyperparams lack dataset_average_activation_norm.in")
    return math.sqrt(d_model) / float(avg["in"])


def theta_from(hp: dict, threshold: Threshold, scale: float) -> float:
    if threshold == "jumprelu":
        return float(hp.get("jump_relu_threshold", 0.0)) * scale
    if threshold == "zero":
        return 0.0
    try:
        return float(threshold)
    except (TypeError, ValueError):
        raise SAELoadError(f"sae.threshold must be 'jumprelu', 'zero' or a number, got {threshold!r}") from None


def layer_location(root: str, pattern: str, layer: int) -> str:
    """Where layer ``layer``'s SAE lives: ``{root}/{pattern}`` with ``{layer}`` filled in."""
    root = root.format(layer=layer)
    sub = pattern.format(layer=layer) if pattern else ""
    return f"{root.rstrip('/')}/{sub}" if sub and sub != "." else root


def _local_dir(root: str, pattern: str, layer: int, revision: str | None) -> Path:
    """A local folder holding hyperparams.json and checkpoints/; downloads from the hub if needed."""
    loc = layer_location(root, pattern, layer)
    if os.path.isdir(root.format(layer=layer)) or root.startswith((".", "/")):
        path = Path(loc)
        if not path.is_dir():
            raise SAELoadError(f"SAE folder for layer {layer} not found: {path}")
        return path
    # hub repo id: root is the repo, pattern the folder inside it
    from huggingface_hub import snapshot_download

    repo = root.format(layer=layer)
    sub = pattern.format(layer=layer) if pattern and pattern != "." else ""
    allow = [f"{sub}/{HYPERPARAMS}", f"{sub}/{WEIGHTS}"] if sub else [HYPERPARAMS, WEIGHTS]
    try:
        snap = snapshot_download(repo_id=repo, revision=revision, allow_patterns=allow)
    except Exception as e:  # network, auth, offline mode: say which repo and how to fix
        raise SAELoadError(
            f"cannot fetch SAE layer {layer} from hub repo {repo!r} ({type(e).__name__}: {e}); "
            "download it first or point sae.root at a local folder"
        ) from None
    return Path(snap) / sub if sub else Path(snap)


def read_hyperparams(root: str, pattern: str, layer: int, revision: str | None = None) -> dict:
    folder = _local_dir(root, pattern, layer, revision)
    path = folder / HYPERPARAMS
    try:
        hp = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SAELoadError(f"missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAELoadError(f"{path} is not valid JSON: {e}") from None
    for key in ("d_model", "d_sae"):
        if key not in hp:
            raise SAELoadError(f"{path} lacks '{key}'")
    return hp


def load_sae(
    root: str,
    pattern: str,
    layer: int,
    threshold: Threshold = "zero",
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """Load LlamaScope SAE ``layer`` from a local folder or a hub repo (safetensors only)."""
    folder = _local_dir(root, pattern, layer, revision)
    hp = read_hyperparams(str(folder), "", layer)
    wpath = folder / WEIGHTS
    if not wpath.is_file():
        raise SAELoadError(f"missing SAE weights {wpath}")
    with safe_open(str(wpath), framework="pt", device=str(device) if str(device) != "auto" else "cpu") as fh:
        keys = set(fh.keys())
        need = {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}
        if not need <= keys:
            raise SAELoadError(f"{wpath} lacks tensors {sorted(need - keys)}")
        t = {k: fh.get_tensor(k).to(dtype) for k in need}
    d_model, d_sae = hp["d_model"], hp["d_sae"]
    if tuple(t["encoder.weight"].shape) != (d_sae, d_model) or tuple(t["decoder.weight"].shape) != (d_model, d_sae):
        raise SAELoadError(
            f"{wpath}: encoder.weight {tuple(t['encoder.weight'].shape)} / decoder.weight "
            f"{tuple(t['decoder.weight'].shape)} do not match d_model={d_model}, d_sae={d_sae}"
        )
    if not hp.get("use_decoder_bias", True):
        t["decoder.bias"] = torch.zeros_like(t["decoder.bias"])
    scale = scale_from_hyperparams(hp)
    return SAE(
        layer=layer,
        W_enc=t["encoder.weight"],
        b_enc=t["encoder.bias"],
        W_dec=t["decoder.weight"],
        b_dec=t["decoder.bias"],
        scale=scale,
        theta=theta_from(hp, threshold, scale),
        hyperparams=hp,
        source=str(folder),
    )


def sae_file_hash(root: str, pattern: str, layer: int) -> str | None:
    """sha256 of a local SAE's weights file (None for hub repos not yet cached)."""
    from .study import sha256_of

    path = Path(layer_location(root, pattern, layer)) / WEIGHTS
    return sha256_of(str(path)) if path.is_file() else None


class SAEBank:
    """Per-layer SAEs loaded on first use and kept least-recently-used under a memory budget.

    ``bank[layer]`` is an ``SAE``. With ``budget_bytes`` set, layers beyond the budget are
    dropped oldest first, so a pass over the upstream layers streams them through memory;
    with a budget at least ``n_layers × one SAE`` every layer loads once.
    """

    def __init__(self, root: str, pattern: str, threshold: Threshold = "zero", *, revision: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 budget_bytes: int | None = None) -> None:
        from collections import OrderedDict

        self.root, self.pattern, self.threshold, self.revision = root, pattern, threshold, revision
        self.device, self.dtype, self.budget_bytes = device, dtype, budget_bytes
        self._cache: OrderedDict[int, SAE] = OrderedDict()
        self._lock = threading.Lock()  # streams (``pathflow.streams``) ask at once: one load, one eviction at a time
        self.loads = 0  # how many times a layer was read from disk (for tests and logs)

    @staticmethod
    def nbytes(sae: SAE) -> int:
        return sum(t.numel() * t.element_size() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))

    def __getitem__(self, layer: int) -> SAE:
        with self._lock:
            return self._get(layer)

    def _get(self, layer: int) -> SAE:
        if layer in self._cache:
            self._cache.move_to_end(layer)
            return self._cache[layer]
        sae = load_sae(self.root, self.pattern, layer, self.threshold, revision=self.revision,
                       device=self.device, dtype=self.dtype)
        self.loads += 1
        self._cache[layer] = sae
        if self.budget_bytes is not None:
            while len(self._cache) > 1 and sum(map(self.nbytes, self._cache.values())) > self.budget_bytes:
                old, _ = self._cache.popitem(last=False)
                log.debug("SAE budget: dropped layer %d", old)
        return sae

    def resident(self) -> list[int]:
        return list(self._cache)
