"""The YAML merge configuration: mergekit-compatible.

A mergekit YAML for a method both tools have runs unchanged.  What mergekit ignores (keys it does not know,
such as a top-level ``name:``; parameters the method does not read) is ignored here too, with a warning that
is printed and recorded in the model card (``--strict`` makes each one an error).  A key or parameter that is
a likely misspelling of one the config or method does use stays an error, with a suggestion: mergekit would
ignore it silently.

Parameter values (``parameters:`` at the top level, per slice, or per model) may be

* a scalar: ``density: 0.5``;
* a list of numbers, a gradient interpolated over the layers of a slice
  (``t = layer / (n_layers - 1)``; tensors outside the layer stack use t = 0);
* a list of ``{filter: SUBSTRING, value: ...}`` rules, the first whose filter is a
  substring of the tensor name winning (a rule without filter matches everything).

Precedence, highest first: the model's own parameters, the slice's, the global ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from submerge.errors import ConfigError, suggest

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(_Strict):
    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]
Parameters = Optional[dict[str, ParameterSetting]]


class InputModel(_Strict):
    model: str
    parameters: Parameters = None
    calibration: Optional[str] = None  # a `submerge calibrate` folder (data-based methods: esm, regmean)


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: Optional[str] = None
    parameters: Parameters = None


class TokenSource(_Strict):
    """Where one token's embedding row comes from: ``{kind: zero}`` or
    ``{kind: model_token, model: M, token: "x"}`` / ``{..., token_id: N}`` (a row of model M)."""

    kind: str
    model: Optional[str] = None
    token: Optional[str] = None
    token_id: Optional[int] = None

    def model_post_init(self, __context: Any) -> None:
        if self.kind == "zero":
            if self.model is not None or self.token is not None or self.token_id is not None:
                raise ConfigError("tokenizer.tokens: a {kind: zero} source takes no model, token or token_id")
        elif self.kind == "model_token":
            if self.model is None:
                raise ConfigError("tokenizer.tokens: a {kind: model_token} source needs 'model'")
            if (self.token is None) == (self.token_id is None):
                raise ConfigError("tokenizer.tokens: a {kind: model_token} source needs exactly one of "
                                  "'token' or 'token_id'")
            if self.token_id is not None and self.token_id < 0:
                raise ConfigError(f"tokenizer.tokens: token_id must be >= 0, got {self.token_id}")
        else:
            raise ConfigError(f"tokenizer.tokens: unknown source kind {self.kind!r}"
                              f"{suggest(self.kind, ['zero', 'model_token'])}; use 'zero' or 'model_token'")


class TokenSetting(_Strict):
    """A token of the output vocabulary: its row's source (a model, or a TokenSource) and ``force``
    (use that source in every model, even those that have the token)."""

    source: Union[str, TokenSource, None] = None
    force: bool = False


def token_source_model(setting: TokenSetting) -> Optional[str]:
    """The model a token's row comes from (None: zero or the default rule)."""
    src = setting.source
    return src if isinstance(src, str) else (src.model if src is not None else None)


class TokenizerConfig(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary and how rows of tokens missing from
    some inputs are filled."""

    source: str = "union"  # "union", "base" or a model
    tokens: Optional[dict[str, TokenSetting]] = None
    pad_to_multiple_of: Optional[int] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and not 1 <= v <= 1 << 20:
            raise ValueError(f"pad_to_multiple_of must be in 1..{1 << 20}, got {v}")
        return v


CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "mistral", "alpaca")  # templates in submerge.engine.vocab.CHAT_TEMPLATES
DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                  "float": "float32", "fp64": "float64", "double": "float64"}


class LinesConfig(_Strict):
    """LiNeS post-processing (``submerge.methods.lines``): block ℓ's update scaled by alpha + beta·ℓ/(L−1)."""

    beta: float
    alpha: Union[float, str] = "auto"

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: Union[float, str]) -> Union[float, str]:
        if isinstance(v, str) and v != "auto":
            raise ValueError(f"alpha must be a number or 'auto', got {v!r}")
        return v


class SurgeryConfig(_Strict):
    """Representation Surgery trained for the merge and written beside it (``submerge.routing.surgery``):
    ``inputs`` maps every merged model (as written under ``models``) to a file of its task's unlabeled inputs."""

    inputs: dict[str, str]
    rank: int = 16
    steps: int = 500
    lr: float = 1e-3
    n: int = 256
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0
    field: Optional[str] = None

    def model_post_init(self, __context: Any) -> None:
        for key in ("rank", "n", "max_length", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"surgery: {key} must be a positive integer, got {getattr(self, key)}")
        if self.steps < 0 or self.seed < 0:
            raise ConfigError("surgery: steps and seed must not be negative")
        if not self.lr > 0:
            raise ConfigError(f"surgery: lr must be positive, got {self.lr}")


class MergeConfig(_Strict):
    """A merge: ``merge_method`` over ``models`` (or ``slices``), optionally with a ``base_model``."""

    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    base_model: Optional[str] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None  # a template name (chatml, llama3, mistral, alpaca), "auto" or a template
    lines: Optional[LinesConfig] = None  # LiNeS layer scaling of the merged update (task-vector methods)
    surgery: Optional[SurgeryConfig] = None  # Representation Surgery modules trained and written beside the merge
    _ignored: list[str] = PrivateAttr(default_factory=list)  # keys mergekit ignores, ignored here with a warning

    @property
    def ignored(self) -> list[str]:
        """What the config holds that mergekit ignores (and so does submerge): one warning each."""
        return self._ignored

    @field_validator("tokenizer_source")
    @classmethod
    def _legacy_model_prefix(cls, v: Optional[str]) -> Optional[str]:
        # older mergekit wrote a model as the tokenizer source with a "model:" prefix
        return v[len("model:"):].strip() if isinstance(v, str) and v.startswith("model:") else v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        v = _DTYPE_ALIASES.get(v, v)
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}{suggest(v, DTYPES)}; use one of {list(DTYPES)}")
        return v

    def model_post_init(self, __context: Any) -> None:
        t = self.chat_template
        if t is not None and t != "auto" and t not in CHAT_TEMPLATE_NAMES and (len(t) < 20 or "{" not in t):
            raise ConfigError(f"chat_template: {t!r} is neither a known name ({', '.join(CHAT_TEMPLATE_NAMES)}, "
                              f"auto){suggest(t, CHAT_TEMPLATE_NAMES)} nor a Jinja template")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ConfigError("give either 'tokenizer_source' or a 'tokenizer:' block, not both")
        if (self.models is None) == (self.slices is None):
            raise ConfigError("the config needs exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ConfigError("'models' is empty")
        if self.surgery is not None:
            if self.models is None:
                raise ConfigError("surgery: needs 'models' (one task per merged model), not 'slices'")
            merged = [m.model for m in self.models if m.model != self.base_model]
            missing = [m for m in merged if m not in self.surgery.inputs]
            extra = [k for k in self.surgery.inputs if k not in merged]
            if missing or extra:
                raise ConfigError("surgery.inputs must name every merged model once, as written under 'models'"
                                  + (f"; missing: {missing}" if missing else "")
                                  + (f"; not a merged model: {extra}" if extra else ""))
        if self.slices is not None:
            if not self.slices:
                raise ConfigError("'slices' is empty")
            for i, s in enumerate(self.slices):
                if not s.sources:
                    raise ConfigError(f"slices[{i}] has no sources")
                lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
                if len(lengths) != 1:
                    raise ConfigError(
                        f"slices[{i}]: every source must cover the same number of layers, got "
                        + ", ".join(f"{src.model} {list(src.layer_range)}" for src in s.sources)
                    )

    # ------------------------------------------------------------------ helpers
    @property
    def vocab_source(self) -> Optional[str]:
        """The output vocabulary's source ("union", "base" or a model), or None: no vocabulary merge."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def token_models(self) -> list[str]:
        """Models named only by the tokenizer block (token sources), besides the merged ones."""
        settings = (self.tokenizer.tokens or {}).values() if self.tokenizer else []
        return [m for m in map(token_source_model, settings) if m is not None]

    def referenced_models(self) -> list[str]:
        """Every model named in the config, in first-mention order (deterministic)."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


# Keys accepted at each level, for friendly "did you mean" messages before pydantic runs.
_KEYS = {
    "root": set(MergeConfig.model_fields),
    "model": set(InputModel.model_fields),
    "slice": set(OutputSlice.model_fields),
    "source": set(InputSlice.model_fields),
    "rule": set(ConditionalParameter.model_fields),
}
_UNSUPPORTED = {
    "modules": "multi-module ('modules:') configs are not supported yet; use 'models' or 'slices'",
    "residual_weight": "'residual_weight' is not supported",
}


def _check_keys(obj: Any, level: str, where: str, ignored: Optional[list[str]] = None) -> None:
    """Unknown keys of ``obj`` are removed from it and reported in ``ignored`` (mergekit ignores them), with a
    suggestion when one looks like a misspelled key; without ``ignored`` an unknown key is an error."""
    if not isinstance(obj, dict):
        return
    for key in list(obj):
        if key in _KEYS[level]:
            continue
        if key in _UNSUPPORTED:
            raise ConfigError(f"{where}: {_UNSUPPORTED[key]}")
        hint = suggest(str(key), _KEYS[level])
        if ignored is None:
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        ignored.append(f"{where}: unknown key '{key}'{hint}; ignored, as mergekit ignores it")
        del obj[key]


def with_hints(message: str, ignored: list[str]) -> str:
    """An error message followed by the ignored keys that look like misspellings (the likely cause)."""
    typos = [w for w in ignored if "(did you mean" in w]
    return message + (" (note: " + "; ".join(typos[:3]) + ")" if typos else "")


def _check_rules(params: Any, where: str, ignored: list[str]) -> None:
    if not isinstance(params, dict):
        return
    for name, setting in params.items():
        rules = setting if isinstance(setting, list) else [setting]
        for j, rule in enumerate(rules):
            if isinstance(rule, dict):
                _check_keys(rule, "rule", f"{where}.{name}[{j}]", ignored)


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []  # other types are reported by pydantic, with their location


def _precheck(raw: dict) -> tuple[dict, list[str]]:
    """Keys checked before pydantic runs (friendly messages): returns a copy of ``raw`` without the keys
    mergekit ignores, and a warning for each."""
    import copy

    raw = copy.deepcopy(raw)
    ignored: list[str] = []
    _check_keys(raw, "root", "config", ignored)
    _check_rules(raw.get("parameters"), "parameters", ignored)
    for i, m in enumerate(_list(raw.get("models"))):
        _check_keys(m, "model", f"models[{i}]", ignored)
        if isinstance(m, dict):
            _check_rules(m.get("parameters"), f"models[{i}].parameters", ignored)
    for i, s in enumerate(_list(raw.get("slices"))):
        _check_keys(s, "slice", f"slices[{i}]", ignored)
        if isinstance(s, dict):
            _check_rules(s.get("parameters"), f"slices[{i}].parameters", ignored)
            for j, src in enumerate(_list(s.get("sources"))):
                _check_keys(src, "source", f"slices[{i}].sources[{j}]", ignored)
                if isinstance(src, dict):
                    _check_rules(src.get("parameters"), f"slices[{i}].sources[{j}].parameters", ignored)
    return raw, ignored


def parse_config(raw: Any, source: str = "config") -> MergeConfig:
    """Validate a config given as a dict (e.g. parsed YAML)."""
    if isinstance(raw, MergeConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    if _depth(raw) > MAX_DEPTH:
        raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep")
    refuse_nul(raw, source)
    raw, ignored = _precheck(raw)
    try:
        cfg = MergeConfig.model_validate(raw)
        cfg._ignored = ignored
        return cfg
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msgs.append(f"{loc}: {err['msg']}")
        raise ConfigError(with_hints(f"{source}: invalid config: " + "; ".join(msgs[:8]), ignored)) from None
    except ConfigError as e:  # a check of the model's own (model_post_init)
        raise ConfigError(with_hints(str(e), ignored)) from None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (plain PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)

MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64


def refuse_nul(obj: Any, source: str) -> None:
    """No string of a config may hold a NUL character: every path, id and name is handed to the OS or a
    library that cannot take one (a traceback otherwise).  One line naming where it is."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        o, where = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                if isinstance(k, str) and "\0" in k:
                    raise ConfigError(f"{source}: a key under '{where or '/'}' holds a NUL character")
                stack.append((v, f"{where}.{k}" if where else str(k)))
        elif isinstance(o, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(o))
        elif isinstance(o, str) and "\0" in o:
            raise ConfigError(f"{source}: '{where}' holds a NUL character, which no path, id or name may hold")


def _depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of parsed YAML, iteratively (no recursion), stopping past ``limit``."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def load_yaml_text(text: str, source: str) -> Any:
    """Parse a YAML document strictly: safe types only, no duplicate keys, bounded nesting."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{source}: not valid YAML ({msg})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    if _depth(raw) > MAX_DEPTH:
        raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep")
    refuse_nul(raw, source)
    return raw


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML config file."""
    from submerge.io.files import read_config_text

    p = Path(path)
    return parse_config(load_yaml_text(read_config_text(p, limit=MAX_CONFIG_BYTES), str(p)), str(p))


def first_layer(params: Optional[dict]) -> Optional[dict]:
    """``params`` with each gradient (a list over the layers) at its first layer: what a method's parameter
    checks and its choice of statistics read, which hold at every layer alike."""
    if params is None:
        return None
    return {k: (v[0] if isinstance(v, (list, tuple)) and v else v) for k, v in params.items()}


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Any:
    """Resolve one setting for a tensor: filters by substring, gradients by layer position ``t``.

    Returns None when no filter rule matches (the next, lower-precedence scope is tried).
    """
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, ConditionalParameter) for e in setting):
        for rule in setting:
            if rule.filter is None or rule.filter == "*" or rule.filter in tensor_name:
                return evaluate_setting(rule.value, tensor_name, t)
        return None
    if any(isinstance(e, ConditionalParameter) for e in setting):
        raise ConfigError(f"a parameter list mixes filter rules and plain values: {setting!r}")
    numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
    if not numeric:
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]

