"""What the model-facing steps share: the model, its tokenizer, SAEs and the prompts' token ids.

Loaded once per process and kept (tasks of one flow run share it); SAEs load lazily, one
layer at a time, so a run touches only the layers its targets need.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from . import streams
from .config import Config
from .model import DTYPES, PrefixCache, encode_prompt, load_model, n_layers, prefix_cache
from .sae import SAE, SAEBank
from .study import load_prompts

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: Config
    model: object
    tokenizer: object
    prompts: dict[str, str]
    prompt_ids: dict[str, torch.Tensor]  # name -> [1, seq]
    saes: SAEBank
    _prefixes: dict[str, PrefixCache] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return n_layers(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sae(self, layer: int) -> SAE:
        return self.saes[layer]

    def saes_up_to(self, layer: int) -> dict[int, SAE]:
        """The target layer's SAE and every upstream one, loaded now."""
        return {l: self.saes[l] for l in range(layer + 1)}

    def prefixes(self) -> dict[str, PrefixCache]:
        """Each prompt's keys/values before the target position, computed once per process."""
        for name, ids in self.prompt_ids.items():
            if name not in self._prefixes:
                self._prefixes[name] = prefix_cache(self.model, ids, self.cfg.gradients.position,
                                                    prompt=f"the '{name}' prompt")
        return self._prefixes


_CACHE: dict[str, Context] = {}
_LOCK = threading.Lock()  # tasks running in threads: load once, and never import transformers concurrently


def get_context(cfg: Config) -> Context:
    """The process-wide context for this config's model, SAEs and prompts."""
    key = repr((cfg.model.model_dump(), cfg.sae.model_dump(), cfg.study.prompts, cfg.gradients.position,
                cfg.gradients.sae_budget_gb))
    with _LOCK:
        return _CACHE[key] if key in _CACHE else _load(cfg, key)


def _load(cfg: Config, key: str) -> Context:
    _CACHE.clear()  # one model per process: free the previous one first
    model, tok = load_model(cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    prompts = load_prompts(cfg.study.prompts)
    device = next(model.parameters()).device
    streams.configure(cfg.model.streams, device)
    ids = {k: encode_prompt(tok, v, device) for k, v in prompts.items()}
    s, g = cfg.sae, cfg.gradients
    budget = int(g.sae_budget_gb * 2**30) if g.sae_budget_gb else None
    bank = SAEBank(s.root, s.pattern, s.threshold, revision=s.revision, device=device,
                   dtype=DTYPES[cfg.model.dtype], budget_bytes=budget)
    _CACHE[key] = Context(cfg=cfg, model=model, tokenizer=tok, prompts=prompts, prompt_ids=ids, saes=bank)
    return _CACHE[key]
