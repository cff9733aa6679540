"""Checks that run before any work: what would otherwise fail late, inside a flow, or silently.

Each raises a PathflowError whose one line says what to fix: a device this machine lacks, a
prompt longer than the model takes, a target position outside a prompt (never wrapped), an SAE
folder that is not there. Only metadata and the tokenizer are read, never weights.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from .config import Config
from .errors import PathflowError
from .model import load_tokenizer, resolve_device, resolve_position
from .study import _metadata, load_prompts

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _tokenizer(name_or_path: str, revision: str | None):
    return load_tokenizer(name_or_path, revision)


def max_positions(cfg: Config) -> int | None:
    """The model's context length from its config.json (local or cached), if known."""
    name = cfg.model.name_or_path
    meta = _metadata(Path(name) / "config.json", name, "config.json")
    v = meta.get("max_position_embeddings") if meta else None
    return v if isinstance(v, int) and v > 0 else None


def prompt_positions(cfg: Config, tokenizer=None) -> dict[str, dict]:
    """For each study prompt: its length in tokens, the target position ``gradients.position``
    resolves to, and the token there. {prompt: {"n_tokens", "position", "token"}}."""
    from .tokens import token_text

    tok = tokenizer or _tokenizer(cfg.model.name_or_path, cfg.model.revision)
    limit = cfg.study.max_prompt_tokens
    model_limit = max_positions(cfg)
    out = {}
    for name, text in load_prompts(cfg.study.prompts).items():
        ids = tok(text).input_ids
        n = len(ids)
        if n > limit:
            raise PathflowError(f"the '{name}' prompt of {cfg.study.prompts} is {n} tokens, more than "
                                f"study.max_prompt_tokens = {limit}")
        if model_limit is not None and n > model_limit:
            raise PathflowError(f"the '{name}' prompt of {cfg.study.prompts} is {n} tokens, more than the model's "
                                f"context of {model_limit}")
        p = resolve_position(cfg.gradients.position, n, f"the '{name}' prompt")
        out[name] = {"n_tokens": n, "position": p, "token": token_text(tok, ids[p])}
    return out


def check_saes(cfg: Config) -> None:
    """A local SAE root must hold the layer-0 SAE's hyperparams.json where ``sae.pattern`` says."""
    from .sae import HYPERPARAMS, layer_location

    root = cfg.sae.root
    if "{layer}" in root or not Path(root).is_dir():
        return  # a hub repo (or one repo per layer): checked when fetched
    where = Path(layer_location(root, cfg.sae.pattern, 0)) / HYPERPARAMS
    if not where.is_file():
        raise PathflowError(f"no SAE at {where.parent} (sae.root {root} with sae.pattern {cfg.sae.pattern!r}): "
                            "fix sae.pattern or sae.root")


def check_decision(cfg: Config) -> None:
    """The decision's two answers must each be one token of the model's tokenizer."""
    from .graphs import answer_id

    tok = _tokenizer(cfg.model.name_or_path, cfg.model.revision)
    answer_id(tok, cfg.decision.bet, "bet")
    answer_id(tok, cfg.decision.stop, "stop")


def check_model_location(cfg: Config) -> None:
    """A model given as a path (absolute, or relative to the config file) must be a folder there: a hub
    id looks different, and the hub's own error for a missing path ("Repo id must be in the form…")
    would name the wrong problem."""
    import os

    name = cfg.model.name_or_path
    looks_local = name.startswith(("/", ".", "~")) or os.path.exists(name)
    if looks_local and not os.path.isdir(name):
        raise PathflowError(f"model folder {name} not found: fix model.name_or_path (relative paths are relative to "
                            "the config file)")
    if looks_local:
        from .weights import _json

        _json(Path(name) / "config.json", "the model's config")  # present and a JSON object, or one error


def check_contrast(cfg: Config, prompts: dict) -> None:
    """``contrast.prompts`` set in the config must name two of the study's prompts (left at its default, a
    study without a 'risky' and a 'safe' prompt is simply not contrasted; the step says so)."""
    c = cfg.contrast
    if not c.enabled or "prompts" not in c.model_fields_set:
        return
    missing = [p for p in c.prompts if p not in prompts]
    if missing:
        raise PathflowError(f"contrast.prompts names {missing[0]!r}, which is not a prompt of {cfg.study.prompts} "
                            f"(its prompts: {', '.join(prompts) or 'none'}): name two of them")


def preflight(cfg: Config) -> dict[str, dict]:
    """Everything checkable before work starts; returns ``prompt_positions``."""
    resolve_device(cfg.model.device)
    check_model_location(cfg)
    check_saes(cfg)
    check_decision(cfg)
    positions = prompt_positions(cfg)
    check_contrast(cfg, positions)
    return positions
