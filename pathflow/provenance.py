"""What produced a run: versions, the resolved config and its hash, model/SAE/input hashes."""

from __future__ import annotations

import platform
from pathlib import Path

from . import __version__
from .config import Config
from .readers import expand
from .sae import layer_location, sae_file_hash
from .study import file_sha256


def _model_hashes(name_or_path: str) -> dict[str, str] | None:
    p = Path(name_or_path)
    if not p.is_dir():
        return None  # a hub id: its revision identifies it
    return {f.name: file_sha256([str(f)])[str(f)] for f in sorted(p.glob("*.safetensors"))}


def sae_provenance(cfg: Config, layers: list[int] | None = None) -> dict:
    """The SAE release and, for ``layers``, each layer's file location and hash."""
    sae = {"root": cfg.sae.root, "pattern": cfg.sae.pattern, "revision": cfg.sae.revision, "layers": {}}
    for layer in layers or []:
        sae["layers"][str(layer)] = {"location": layer_location(cfg.sae.root, cfg.sae.pattern, layer),
                                     "sha256": sae_file_hash(cfg.sae.root, cfg.sae.pattern, layer)}
    return sae


def provenance(cfg: Config, layers: list[int] | None = None) -> dict:
    import torch
    import transformers

    specs = cfg.study.checkpoints + cfg.study.response_logs + cfg.study.revalidation
    inputs = [str(p) for p in expand(specs) if p.is_file()]
    inputs += [p for p in (cfg.study.summary_csv, cfg.study.prompts) if p]
    sae = sae_provenance(cfg, layers)
    return {
        "pathflow_version": __version__,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.hash(),
        "model": {"name_or_path": cfg.model.name_or_path, "revision": cfg.model.revision,
                  "sha256": _model_hashes(cfg.model.name_or_path)},
        "sae": sae,
        "inputs": file_sha256(inputs),
    }


