"""The one configuration model every entry point shares (CLI, flows, tasks, tests).

Loaded from YAML; unknown keys are errors that name the key. ``--store URL`` and the
``PATHFLOW_STORE`` environment variable override ``store.url`` (CLI wins over env).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import string
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import PathflowError
from .locations import check_store_url, redact

REAL_CONDITIONS = [
    "safe_baseline",
    "safe_with_safe_patch",
    "safe_with_risky_patch",
    "risky_baseline",
    "risky_with_safe_patch",
    "risky_with_risky_patch",
]


MAX_CONFIG_BYTES = 1 << 20


class ConfigError(PathflowError, ValueError):
    """A configuration that cannot be used; the message says what to fix."""


class _Strict(BaseModel):
    # NaN/inf are never a valid setting: every float key of every section is finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
FEATURE_NAME_RE = re.compile(r"L\d+-\d+")


class StudyConfig(_Strict):
    checkpoints: list[str] = Field(default_factory=list, description="files, folders or globs of checkpoint JSON")
    response_logs: list[str] = Field(default_factory=list, description="files, folders or globs of response logs")
    summary_csv: str | None = Field(None, description="the study's feature summary CSV (per-context deltas, "
                                    "classified_as): read where there are no checkpoints")
    conditions: list[str] = Field(default_factory=lambda: list(REAL_CONDITIONS),
                                  description="the response logs' condition names (the study's own vocabulary)")
    prompts: str | None = Field(None, description="prompts.json with the study's 'safe' and 'risky' prompts")
    revalidation: list[str] = Field(default_factory=list, description="revalidation JSONL files, folders or globs")
    min_trials: int = Field(30, ge=0, description="warn for a feature/condition with fewer logged trials")
    max_prompt_tokens: int = Field(4096, ge=2, description="a prompt longer than this (in tokens) is an error")

    @field_validator("checkpoints", "response_logs", "revalidation", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class ModelConfig(_Strict):
    name_or_path: str = Field("meta-llama/Llama-3.1-8B", description="a Hugging Face model id or a local folder "
                              "(relative to the config file when it starts with ./ or ../)")
    revision: str | None = Field(None, description="the hub revision (branch, tag or commit); null: main")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the weights' dtype in memory")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    streams: int | None = Field(None, ge=1, le=64, description="on a CPU, independent batches (graph backwards and "
                                "replays, token reads, pathways sub-batches) run on this many threads, the cores "
                                "split between them; null: 2 on a CPU with 2 or more cores. Always 1 on a GPU")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
        return v


class SAEConfig(_Strict):
    root: str = Field("fnlp/Llama3_1-8B-Base-LXR-8x", description="a local folder or a Hugging Face repo id of "
                      "LlamaScope-format SAEs; may hold {layer}")
    pattern: str = Field("Llama3_1-8B-Base-L{layer}R-8x", description="each layer's SAE folder under root, with "
                         "{layer}")
    threshold: Union[Literal["jumprelu", "zero"], float] = Field("zero", description="jumprelu, zero or a number "
                                                                  "(|value| ≤ 1e6)")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v):
        if isinstance(v, float) and abs(v) > 1e6:
            raise ValueError(f"{v!r} is out of range: a threshold is at most 1e6 in magnitude")
        return v
    revision: str | None = Field(None, description="the hub revision of the SAE repo; null: main")

    @field_validator("root", "pattern")
    @classmethod
    def _layer_field_only(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"{v!r} is not a valid pattern ({e}); write the layer as {{layer}}") from None
        bad = [f for f in fields if f != "layer"]
        if bad:
            raise ValueError(f"{v!r} has placeholder {{{bad[0]}}}; the only placeholder is {{layer}}")
        return v


class SelectionConfig(_Strict):
    top_per_layer: int = Field(50, ge=1, description="causal features traced per layer, the strongest first")
    rank_by: Literal["cohen_d", "effect_size"] = Field("cohen_d", description="what 'strongest' means: |cohen_d|, "
                                                       "or the effect size where the study has no cohen_d")
    layers: list[int] | None = Field(None, description="only these layers; null: every layer")
    direction: Literal["safe", "risky"] | None = Field(None, description="only features of this class; null: both")
    include: list[str] = Field(default_factory=list, description="features always selected (L{n}-{id})")
    exclude: list[str] = Field(default_factory=list, description="features never selected")
    features: list[str] | None = Field(None, description="trace only these features (L{n}-{id}), whatever their "
                                       "rank; each must be in the study's results")

    @field_validator("include", "exclude", "features")
    @classmethod
    def _feature_names(cls, v):
        bad = [f for f in v or [] if not FEATURE_NAME_RE.fullmatch(f)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a feature name of the form L{{layer}}-{{id}}, e.g. L3-142")
        return v


class GradientsConfig(_Strict):
    batch_size: int = Field(32, ge=1, description="targets per backward and replay pass; halves on out-of-memory")
    position: int = Field(-1, description="token position of the target (negative counts from the end)")
    sae_budget_gb: float | None = Field(None, gt=0, le=1e6, description="memory for resident SAEs (None: keep all)")
    keepbits: int | None = Field(7, ge=1, le=23, description="mantissa bits of float32 kept in jacobians.zarr "
                                 "(rounded, relative error ≤ 2^-(keepbits+1); 7 is bfloat16's precision); null: "
                                 "lossless. Rankings and replay use the exact values in memory, never the stored ones")


class TopkConfig(_Strict):
    k: int = Field(25, ge=1, description="upstream candidates kept per target and prompt, then replayed")
    score: Literal["attribution", "gradient"] = Field("attribution", description="rank candidates by "
                                                      "|activation × gradient| or by |gradient| alone")
    min_abs_gradient: float = Field(0.0, ge=0.0, le=1e9, description="drop candidates whose |gradient| is below "
                                    "this")


class ReplayConfig(_Strict):
    intervention: Literal["ablate", "steer"] = Field(
        "ablate", description="ablate: remove an active feature (an off one is steered); steer: set every "
        "candidate to steer_value")
    scale: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the activation removed by 'ablate'")
    steer_value: float = Field(1.0, ge=-1e6, le=1e6, description="activation a steered candidate is set to")
    min_sign_agreement: float = Field(0.7, ge=0.0, le=1.0, description="a target is validated at or above this")
    min_abs_change: float = Field(0.0, ge=0.0, le=1e9, description="a validated candidate's |actual change| is at "
                                  "least this (absolute; see noise_floor)")
    noise_floor: float = Field(0.01, ge=0.0, le=1e6, description="a validated candidate's |actual change| is at least "
                               "this fraction of the target's own |pre-activation| (smaller changes are noise)")
    max_ratio: float = Field(3.0, ge=1.0, le=1e9, description="a validated candidate's predicted and actual change "
                             "agree within this factor")


class AttributionConfig(_Strict):
    method: Literal["gradient", "norm"] = Field(
        "norm", description="how a node's effect is estimated before replay. gradient: activation × gradient "
        "(first order); norm: the same, with the RMSNorms at the node's own position responding exactly to "
        "its ablation (a feature that dominates its position's norm is not cancelled). Same backward")
    replay_top: int = Field(50, ge=0, le=100_000, description="whole-prompt graphs: replay (ablate) the strongest "
                            "this many features of each target and of the decision before pruning, and rank them "
                            "by their measured change; 0: rank by the estimate alone")


class TokensConfig(_Strict):
    top: int = Field(10, ge=1, description="tokens (and contexts) kept per view")
    window: int = Field(6, ge=0, description="tokens of context either side of an activation maximum")
    responses: int = Field(64, ge=0, description="logged responses per feature read for activation maxima")
    contrasts: list[tuple[str, str]] = Field(
        default_factory=lambda: [("safe_with_risky_patch", "safe_with_safe_patch"),
                                 ("risky_with_risky_patch", "risky_with_safe_patch")],
        description="(patched, baseline) condition pairs for the 'changes' view")
    alpha0: float = Field(100.0, ge=1e-6, le=1e9, description="strength of the Dirichlet prior of the log-odds")
    max_tokens: int = Field(512, ge=8, description="tokens of each logged response read for activation maxima "
                            "(longer ones are cut; the prompts are read whole)")
    batch_size: int = Field(64, ge=1, description="texts per forward when reading activations (a batch also stays "
                            "within 4,096 padded tokens)")


class DecisionConfig(_Strict):
    bet: str = Field("1", min_length=1, description="the answer that bets: the token after the prompts' 'Choice: '")
    stop: str = Field("2", min_length=1, description="the answer that stops; decision = logit(bet) − logit(stop) "
                      "at the last prompt position (each must be one token of the tokenizer)")
    replay: bool = Field(True, description="replay also measures each candidate's change of the decision, with the "
                         "target free and held at its baseline (the target at the last prompt token)")

    @model_validator(mode="after")
    def _two_answers(self):
        if self.bet == self.stop:
            raise ValueError(f"bet and stop are both {self.bet!r}: the decision logit(bet) − logit(stop) would "
                             "always be 0; give the two different answers")
        return self


class GraphsConfig(_Strict):
    max_targets: int | None = Field(32, ge=0, description="whole-prompt attribution graphs for this many of the "
                                    "selected features (the strongest first, both directions in turn); null: all. "
                                    "Each costs a backward over the whole prompt per kept node")
    node_threshold: float = Field(0.8, gt=0.0, le=1.0, description="keep the nodes making up this fraction of "
                                  "the influence on the outputs (circuit-tracer's default)")
    edge_threshold: float = Field(0.98, gt=0.0, le=1.0, description="keep the edges making up this fraction of "
                                  "the edge influence (circuit-tracer's default)")
    max_nodes: int = Field(200, ge=1, description="at most this many feature and error nodes per graph, the most "
                           "influential")
    batch_size: int = Field(16, ge=1, description="outputs per batched backward over the whole prompt (one forward, "
                            "a vmapped backward); replays take twice as many rows a forward")
    zero_bos: bool = Field(True, description="a prompt that opens with a special token (LLaMA's "
                           "<|begin_of_text|>) has no feature or error nodes there, as circuit-tracer's zero_bos: "
                           "that position sees only itself, so its features are the same for every prompt, and "
                           "LLaMA's massive activations there would fill the graphs with nodes that say nothing "
                           "about the prompt (and cost a whole-prompt replay each). Its token embedding stays a node")
    scan: str | None = Field(None, description="the SAE release the graphs name in circuit-tracer's 'scan' "
                             "(default: sae.root's last part and sae.pattern, e.g. "
                             "Llama-Scope/Llama3_1-8B-Base-LXR-8x)")


class ContrastConfig(_Strict):
    enabled: bool = Field(True, description="contrast the two prompts for every target graphed on both "
                          "(integrated/contrast/); the graphed targets are graphs.max_targets")
    prompts: tuple[str, str] = Field(("risky", "safe"), description="the two prompts, a then b: the contrast is "
                                     "a's weight minus b's")
    top: int = Field(20, ge=1, le=10_000, description="upstream features kept per target, by |a − b| weight")
    patch_top: int = Field(5, ge=0, le=1_000, description="cross-prompt patching: each target's strongest "
                           "differing features set to the other prompt's values, each alone and together")
    batch_size: int = Field(32, ge=1, description="patched prompts per forward")

    @model_validator(mode="after")
    def _two(self) -> ContrastConfig:
        if self.prompts[0] == self.prompts[1]:
            raise ValueError(f"contrast.prompts names {self.prompts[0]!r} twice: name the two prompts to compare")
        return self


NEURONPEDIA_LLAMASCOPE = "https://www.neuronpedia.org/llama3.1-8b/{layer}-llamascope-res-32k/{feature_id}"


class ReportConfig(_Strict):
    neuronpedia_url: str | None = Field(
        NEURONPEDIA_LLAMASCOPE, description="link from each feature's page to its page on Neuronpedia (or another "
        "feature browser): a URL template with {layer} and {feature_id}; null for none (SAEs it does not host)")

    @field_validator("neuronpedia_url")
    @classmethod
    def _url_template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL template")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"{v!r} is not a valid URL template ({e})") from None
        if fields - {"layer", "feature_id"}:
            raise ValueError(f"{v!r} has placeholder {{{sorted(fields - {'layer', 'feature_id'})[0]}}}; the "
                             "placeholders are {layer} and {feature_id}")
        return v


class StoreConfig(_Strict):
    url: str = Field("./pathflow-store", description="a folder or an s3:// / gs:// URL (no credentials in it)")

    @field_validator("url")
    @classmethod
    def _persistent(cls, v: str) -> str:
        return check_store_url(v, package=False)  # the package is checked where the store is opened


class Config(_Strict):
    study: StudyConfig = Field(default_factory=StudyConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    gradients: GradientsConfig = Field(default_factory=GradientsConfig)
    topk: TopkConfig = Field(default_factory=TopkConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)
    graphs: GraphsConfig = Field(default_factory=GraphsConfig)
    contrast: ContrastConfig = Field(default_factory=ContrastConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _known_conditions(self):
        if "contrasts" not in self.tokens.model_fields_set:
            return self  # the defaults name the real study's conditions; a study with its own names uses none
        known = set(self.study.conditions)
        for pair in self.tokens.contrasts:
            for c in pair:
                if c not in known:
                    close = difflib.get_close_matches(c, sorted(known), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else f" ({', '.join(sorted(known))})"
                    raise ValueError(f"tokens.contrasts names condition {c!r}, which is not in study.conditions{hint}")
        return self

    def hash(self) -> str:
        """sha256 of the canonical JSON of what determines the results: the resolved config without
        ``store`` (where results are kept changes nothing in them) and ``report`` (how they are shown)."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"store", "report"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _siblings(loc: tuple) -> list[str]:
    """The keys allowed beside the unknown key at ``loc`` (for a "did you mean")."""
    model = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _siblings(e["loc"]), n=1)
            lines.append(f"  unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "finite_number":
                msg = f"{e.get('input')!r} is not a finite number"
            lines.append(f"  {key}: {redact(msg)}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error: YAML would keep the
    last one silently, and a whole section could vanish."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise ConfigError(f"key {key!r} is written twice (lines {first} and {key_node.start_mark.line + 1}); "
                                  "YAML would silently keep only the last: keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def _resolve_paths(data: dict, base: Path) -> dict:
    """Relative local paths in a config file are relative to the file, not the cwd: the study's
    files and the store always; the model and SAE root when that path exists beside the file or
    starts with ``./`` or ``../`` (otherwise they are hub ids such as ``meta-llama/Llama-3.1-8B``)."""

    def fix(p):
        if not isinstance(p, str) or "://" in p or os.path.isabs(p) or p.startswith("~"):
            return os.path.expanduser(p) if isinstance(p, str) and p.startswith("~") else p
        return str((base / p).resolve())

    study = data.get("study")
    if isinstance(study, dict):
        for key in ("checkpoints", "response_logs", "revalidation"):
            v = study.get(key)
            if isinstance(v, str):
                study[key] = fix(v)
            elif isinstance(v, list):
                study[key] = [fix(x) for x in v]
        for key in ("summary_csv", "prompts"):
            if key in study:
                study[key] = fix(study[key])
    store = data.get("store")
    if isinstance(store, dict) and isinstance(store.get("url"), str) and store["url"].strip():
        store["url"] = fix(store["url"])
    for section, key in (("model", "name_or_path"), ("sae", "root")):
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            v = sec[key]
            if v.startswith(("./", "../", "~")) or v in (".", "..") or (base / v).exists():
                sec[key] = fix(v)
    return data


def load_config(path: str | os.PathLike | None = None, store: str | None = None) -> Config:
    """Read a YAML config (or defaults when ``path`` is None) and apply store overrides."""
    data: dict = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}" if not p.exists() else f"config {p} is not a file")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {p} is {p.stat().st_size} bytes: a config is at most {MAX_CONFIG_BYTES}")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except ConfigError as e:
            raise ConfigError(f"config {p}: {e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config {p} is not valid YAML: {e}") from None
        except RecursionError:
            raise ConfigError(f"config {p} is nested too deeply") from None
        except OSError as e:
            raise ConfigError(f"config {p} cannot be read: {e.strerror or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {p} must be a mapping of sections, got {type(data).__name__}")
        data = _resolve_paths(data, p.resolve().parent)
    env_store = os.environ.get("PATHFLOW_STORE")
    if store or env_store:
        data.setdefault("store", {})
        if not isinstance(data["store"], dict):
            raise ConfigError(f"config {source}: 'store' must be a mapping")
        data["store"]["url"] = store or env_store
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None

