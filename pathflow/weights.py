"""Preflight of the model's and the SAEs' files: cheap checks before any server starts or work begins.

What would otherwise fail minutes into a run ("SafetensorError", "mat1 and mat2 shapes cannot be
multiplied", a ZeroDivisionError, NaN in every output) is one ``PathflowError`` naming the file
and the fix:

- each safetensors file's header: parseable, its tensors inside the file (a truncated download is
  caught here), the shapes the SAE's ``hyperparams.json`` and the model's ``config.json`` imply;
- every tensor finite, streamed one tensor at a time (cached per file while it is unchanged);
- ``hyperparams.json``: ``d_model`` the model's width, ``dataset_average_activation_norm.in`` > 0
  and finite, a finite threshold.

Hub ids (folders that are not on this machine) are left to the loaders.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from .compute_thread import on_compute_thread
from .errors import PathflowError
from .readers import reject_constant

MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_FINITE: dict[tuple, bool] = {}  # (path, size, mtime_ns, inode) -> checked


def read_header(path: Path) -> dict[str, dict]:
    """The tensors of a safetensors file, {name: {"dtype", "shape", "data_offsets"}}, checked against
    the file's size. Raises PathflowError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise PathflowError(f"{path} is not a safetensors file ({size} bytes): download it again")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise PathflowError(f"{path} is not a safetensors file, or is truncated (its header claims {n} "
                                    f"bytes of {size}): download it again")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise PathflowError(f"{path} is not a safetensors file (its header is not JSON): download it again") from None
    except OSError as e:
        raise PathflowError(f"{path} cannot be read: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise PathflowError(f"{path} is not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    end = 0
    for name, t in header.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not isinstance(t.get("shape"), list)):
            raise PathflowError(f"{path}: tensor {name!r} has a malformed header entry: download it again")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise PathflowError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}: "
                            "download it again")
    return header


@on_compute_thread  # torch's parallel reductions: on the thread the run's model work uses
def check_finite(path: Path) -> None:
    """Every tensor of ``path`` finite (one tensor in memory at a time; remembered while the file is
    unchanged)."""
    import torch
    from safetensors import safe_open

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _FINITE:
        return
    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise PathflowError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values: the file is "
                                        "damaged; download it again")
    except PathflowError:
        raise
    except Exception as e:  # safetensors' own error for a damaged file
        raise PathflowError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e}): download it "
                            "again") from None
    _FINITE[key] = True


def _json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh, parse_constant=reject_constant)
    except FileNotFoundError:
        raise PathflowError(f"{what} {path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PathflowError(f"{what} {path} is not valid JSON ({e})") from None
    except OSError as e:
        raise PathflowError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise PathflowError(f"{what} {path} is not a JSON object")
    return data


def check_model(folder: Path) -> dict:
    """A local model folder: config.json there and consistent with its weights, every weight finite.
    Returns the config."""
    if not folder.is_dir():
        raise PathflowError(f"model folder {folder} not found: fix model.name_or_path (relative paths are relative "
                            "to the config file)")
    config = _json(folder / "config.json", "the model's config")
    hidden, layers, vocab = (config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
    for key, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("vocab_size", vocab)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise PathflowError(f"{folder / 'config.json'}: {key} is {v!r}, not a positive integer")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PathflowError(f"model folder {folder} has no *.safetensors weights (pathflow loads no pickled "
                            "weights)")
    headers = {f: read_header(f) for f in files}
    seen_layers = set()
    for f, header in headers.items():
        for name, t in header.items():
            parts = name.split(".")
            if "layers" in parts and parts.index("layers") + 1 < len(parts):
                idx = parts[parts.index("layers") + 1]
                if idx.isdigit():
                    seen_layers.add(int(idx))
            if name.endswith("embed_tokens.weight") and t["shape"] != [vocab, hidden]:
                raise PathflowError(f"{f}: {name} is {t['shape']}, but config.json says vocab_size {vocab} × "
                                    f"hidden_size {hidden}: the config does not belong to these weights")
    if seen_layers and seen_layers != set(range(layers)):
        raise PathflowError(f"model folder {folder}: config.json says num_hidden_layers {layers}, the weights hold "
                            f"layers {min(seen_layers)}..{max(seen_layers)} ({len(seen_layers)}): the config does "
                            "not belong to these weights")
    for f in files:
        check_finite(f)
    return config


def check_sae_folder(folder: Path, layer: int, d_model: int | None) -> None:
    """One LlamaScope-format SAE folder: hyperparams.json sane, its weights the shapes it says, finite."""
    from .sae import HYPERPARAMS, WEIGHTS

    if not folder.is_dir():
        raise PathflowError(f"no SAE for layer {layer} at {folder}: fix sae.root / sae.pattern, or download that "
                            "layer")
    hp = _json(folder / HYPERPARAMS, f"the layer-{layer} SAE's hyperparams")
    d_sae, hp_d_model = hp.get("d_sae"), hp.get("d_model")
    for key, v in (("d_sae", d_sae), ("d_model", hp_d_model)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise PathflowError(f"{folder / HYPERPARAMS}: {key} is {v!r}, not a positive integer")
    if d_model is not None and hp_d_model != d_model:
        raise PathflowError(f"the layer-{layer} SAE at {folder} reads d_model {hp_d_model}, the model's width is "
                            f"{d_model}: these SAEs belong to another model")
    if hp.get("norm_activation", "dataset-wise") == "dataset-wise":
        norm = (hp.get("dataset_average_activation_norm") or {}).get("in")
        if not isinstance(norm, (int, float)) or isinstance(norm, bool) or not math.isfinite(norm) or norm <= 0:
            raise PathflowError(f"{folder / HYPERPARAMS}: dataset_average_activation_norm.in is {norm!r}; it must "
                                "be a finite number > 0 (the input scale divides by it)")
    theta = hp.get("jump_relu_threshold", 0.0)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta):
        raise PathflowError(f"{folder / HYPERPARAMS}: jump_relu_threshold is {theta!r}, not a finite number")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise PathflowError(f"the layer-{layer} SAE has no weights at {weights}: download it again")
    header = read_header(weights)
    want = {"encoder.weight": [d_sae, hp_d_model], "decoder.weight": [hp_d_model, d_sae], "encoder.bias": [d_sae]}
    for name, shape in want.items():
        got = header.get(name, {}).get("shape")
        if got is None:
            raise PathflowError(f"{weights} has no {name!r}: not a LlamaScope-format SAE")
        if got != shape:
            raise PathflowError(f"{weights}: {name} is {got}, hyperparams.json implies {shape}: the files do not "
                                "belong together")
    check_finite(weights)


def check_files(cfg, layers: list[int] | None = None) -> None:
    """The model folder (when local) and the SAEs of ``layers`` (default: every layer of the model),
    each failure a PathflowError naming the file."""
    from .sae import layer_location

    name = cfg.model.name_or_path
    d_model = n_layers = None
    if os.path.isdir(name):
        config = check_model(Path(name))
        d_model, n_layers = config["hidden_size"], config["num_hidden_layers"]
    root = cfg.sae.root
    if "{layer}" in root or not os.path.isdir(root):
        if root.startswith((".", "/", "~")) and "{layer}" not in root:
            raise PathflowError(f"SAE folder {root} not found: fix sae.root")
        return  # a hub repo: checked when fetched
    if layers is None:
        layers = list(range(n_layers)) if n_layers else []
    for layer in layers:
        if n_layers is not None and layer >= n_layers:
            continue
        check_sae_folder(Path(layer_location(root, cfg.sae.pattern, layer)), layer, d_model)
