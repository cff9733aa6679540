"""What the model-facing steps share: the model, its tokenizer, SAEs and the prompts' token ids.

Loaded once per process and kept (tasks of one flow run share it); SAEs load lazily, one
layer at a time, so a run touches only the layers its targets need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .config import Config
from .model import DTYPES, encode_prompt, load_model, n_layers
from .sae import SAE, load_sae
from .study import load_prompts

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: Config
    model: object
    tokenizer: object
    prompts: dict[str, str]
    prompt_ids: dict[str, torch.Tensor]  # name -> [1, seq]
    saes: dict[int, SAE] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return n_layers(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sae(self, layer: int) -> SAE:
        if layer not in self.saes:
            s = self.cfg.sae
            log.info("loading SAE layer %d from %s", layer, s.root)
            self.saes[layer] = load_sae(s.root, s.pattern, layer, s.threshold, revision=s.revision,
                                        device=self.device, dtype=DTYPES[self.cfg.model.dtype])
        return self.saes[layer]

    def saes_up_to(self, layer: int) -> dict[int, SAE]:
        """The target layer's SAE and every upstream one."""
        return {l: self.sae(l) for l in range(layer + 1)}


_CACHE: dict[str, Context] = {}


def get_context(cfg: Config) -> Context:
    """The process-wide context for this config's model, SAEs and prompts."""
    key = repr((cfg.model.model_dump(), cfg.sae.model_dump(), cfg.study.prompts))
    if key not in _CACHE:
        _CACHE.clear()  # one model per process: free the previous one first
        model, tok = load_model(cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype, cfg.model.device)
        prompts = load_prompts(cfg.study.prompts)
        device = next(model.parameters()).device
        ids = {k: encode_prompt(tok, v, device) for k, v in prompts.items()}
        _CACHE[key] = Context(cfg=cfg, model=model, tokenizer=tok, prompts=prompts, prompt_ids=ids)
    return _CACHE[key]
