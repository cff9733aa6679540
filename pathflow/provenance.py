"""What produced a run: versions, the resolved config and its hash, model/SAE/input hashes."""

from __future__ import annotations

import platform
from pathlib import Path

from . import __version__
from .config import Config
from .readers import expand
from .sae import layer_location, sae_file_hash
from .study import file_sha256, sha256_of

MODEL_FILES = ("*.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _model_hashes(name_or_path: str) -> dict[str, str] | None:
    """sha256 of a local model folder's weights, config and tokenizer files (None for a hub id: its
    revision identifies it)."""
    p = Path(name_or_path)
    if not p.is_dir():
        return None
    files = sorted({f for pattern in MODEL_FILES for f in p.glob(pattern) if f.is_file()})
    return {f.name: sha256_of(str(f)) for f in files}


def _hyperparams_hash(cfg: Config, layer: int) -> str | None:
    from .sae import HYPERPARAMS

    path = Path(layer_location(cfg.sae.root, cfg.sae.pattern, layer)) / HYPERPARAMS
    return sha256_of(str(path)) if path.is_file() else None


def _study_inputs(cfg: Config) -> list[str]:
    specs = cfg.study.checkpoints + cfg.study.response_logs + cfg.study.revalidation
    inputs = [str(p) for p in expand(specs) if p.is_file()]
    return inputs + [p for p in (cfg.study.summary_csv, cfg.study.prompts) if p]


def changed_inputs(manifest: dict, cfg: Config) -> list[str]:
    """What a run's manifest recorded of its inputs and what is there now, compared: one line per
    study file, model file or SAE that changed, appeared or went (empty: a resume may go on)."""
    changes = []
    then = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
    now = file_sha256(_study_inputs(cfg))
    for path in sorted(set(then) | set(now)):
        if path not in now:
            changes.append(f"study file {path} is gone")
        elif path not in then:
            changes.append(f"study file {path} is new")
        elif then[path] != now[path]:
            changes.append(f"study file {path} changed")
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if isinstance(model.get("sha256"), dict):
        current = _model_hashes(cfg.model.name_or_path) or {}
        for name, digest in sorted(model["sha256"].items()):
            if current.get(name) != digest:
                where = Path(cfg.model.name_or_path) / name
                changes.append(f"model file {where} {'is gone' if name not in current else 'changed'}")
    sae = manifest.get("sae") if isinstance(manifest.get("sae"), dict) else {}
    layers = sae.get("layers") if isinstance(sae.get("layers"), dict) else {}
    for layer, rec in sorted(layers.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        if not isinstance(rec, dict) or not str(layer).isdigit():
            continue
        for key, now_hash in (("sha256", sae_file_hash(cfg.sae.root, cfg.sae.pattern, int(layer))),
                              ("hyperparams_sha256", _hyperparams_hash(cfg, int(layer)))):
            if key in rec and rec[key] != now_hash:
                what = "weights" if key == "sha256" else "hyperparams.json"
                changes.append(f"the layer-{layer} SAE's {what} at {rec.get('location')} changed")
    return changes


def sae_provenance(cfg: Config, layers: list[int] | None = None) -> dict:
    """The SAE release and, for ``layers``, each layer's file location and hash."""
    sae = {"root": cfg.sae.root, "pattern": cfg.sae.pattern, "revision": cfg.sae.revision, "layers": {}}
    for layer in layers or []:
        sae["layers"][str(layer)] = {"location": layer_location(cfg.sae.root, cfg.sae.pattern, layer),
                                     "sha256": sae_file_hash(cfg.sae.root, cfg.sae.pattern, layer),
                                     "hyperparams_sha256": _hyperparams_hash(cfg, layer)}
    return sae


def provenance(cfg: Config, layers: list[int] | None = None) -> dict:
    import torch
    import transformers

    inputs = _study_inputs(cfg)
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


