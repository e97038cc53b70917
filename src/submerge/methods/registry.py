"""The method registry: every merge method is registered once under its public name.

A method is a small pure function over the tensors of one parameter::

    @register_method(
        name="task_arithmetic",
        paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
        url="https://arxiv.org/abs/2212.04089",
        variant="...",
        params=[Param("weight", float, per_model=True), Param("lambda", float, default=1.0)],
        needs_base=True,
    )
    def task_arithmetic(ctx: TensorContext, **params) -> torch.Tensor: ...

The executor, not the method, handles I/O, dtypes, devices and streaming: the
function receives the inputs already in the compute dtype and on the compute
device.  Methods that need statistics over the whole model (a global top-k, an
SVD over all layers, calibration data) declare a ``prepare`` hook; the executor
calls it once with a :class:`ModelPass` that streams tensors on demand, and
passes whatever it returns to every per-tensor call as ``ctx.state``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from submerge.errors import ConfigError, suggest

_MISSING = object()


@dataclass(frozen=True)
class Param:
    """A method parameter.

    ``per_model`` parameters are given per input model (``weight``, ``density``);
    the others are global to the merge (``lambda``, ``normalize``).  ``choices``
    restricts string values; ``low``/``high`` bound numbers (inclusive).
    """

    name: str
    type: type
    default: Any = _MISSING
    per_model: bool = False
    help: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[tuple] = None

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def coerce(self, value: Any, where: str) -> Any:
        """Validate and convert one resolved scalar value (None stays None where it is the default)."""
        if value is None and self.default is None:
            return None
        t = self.type
        try:
            if t is bool:
                if isinstance(value, bool):
                    out = value
                elif isinstance(value, str) and value.lower() in ("true", "false"):
                    out = value.lower() == "true"
                elif isinstance(value, (int, float)) and value in (0, 1):
                    out = bool(value)
                else:
                    raise ValueError
            elif t is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            elif t is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
            else:
                out = t(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(
                f"parameter '{self.name}' at {where}: expected {t.__name__}, got {value!r}"
            ) from None
        if isinstance(out, float) and not math.isfinite(out):
            raise ConfigError(f"parameter '{self.name}' at {where}: must be finite, got {out}")
        if self.low is not None and out < self.low:
            raise ConfigError(f"parameter '{self.name}' at {where}: must be >= {self.low}, got {out}")
        if self.high is not None and out > self.high:
            raise ConfigError(f"parameter '{self.name}' at {where}: must be <= {self.high}, got {out}")
        if self.choices is not None and out not in self.choices:
            raise ConfigError(
                f"parameter '{self.name}' at {where}: must be one of {list(self.choices)}, "
                f"got {out!r}{suggest(str(out), map(str, self.choices))}"
            )
        return out

    def describe(self) -> str:
        scope = "per model" if self.per_model else "global"
        default = ("required" if self.required else "default: set by the preset/recipe" if self.default is None
                   else f"default {self.default!r}")
        return f"{self.name} ({self.type.__name__}, {scope}, {default})"


@dataclass
class TensorContext:
    """What a method sees for one output tensor.

    ``tensors`` are the non-base inputs in config order, ``base`` the base model's
    tensor (or None), all in the compute dtype on the compute device.
    ``generator`` is a per-tensor seeded RNG (reproducible whatever the order of
    execution), ``state`` what the method's ``prepare`` pass returned.
    """

    name: str
    tensors: list[torch.Tensor]
    base: Optional[torch.Tensor]
    generator: torch.Generator
    state: Any = None
    model_names: Sequence[str] = ()
    stats: Optional[Sequence[Any]] = None  # per model: calibration LayerStats of this tensor, or None
    staged: Any = None  # what the method's ``stage`` hook returned for these inputs (None: not staged)


class ModelPass:
    """Whole-model access for a method's ``prepare`` hook (streamed, one tensor at a time)."""

    def __init__(
        self,
        names: Sequence[str],
        read: Callable[[str], tuple[list[torch.Tensor], Optional[torch.Tensor]]],
        params: Callable[[str], dict],
        model_names: Sequence[str],
        stats: Optional[Callable[[str], Optional[Sequence[Any]]]] = None,
        scratch_dir: Optional[Any] = None,
    ):
        self.names = list(names)
        self._read = read
        self._params = params
        self.model_names = list(model_names)
        self._stats = stats
        self.scratch_dir = scratch_dir  # a folder for spilling results, removed after the merge; None = RAM

    def params_of(self, name: str) -> dict:
        """The bound parameters of tensor ``name`` (per-model ones as lists), without reading it."""
        return self._params(name)

    def stats(self, name: str) -> Optional[Sequence[Any]]:
        """Per model, the calibration statistics of the layer owning tensor ``name`` (None where absent)."""
        return self._stats(name) if self._stats is not None else None

    def __iter__(self) -> Iterator[tuple[str, list[torch.Tensor], Optional[torch.Tensor], dict]]:
        """Yield ``(name, tensors, base, params)`` for every floating-point output tensor."""
        for name in self.names:
            tensors, base = self._read(name)
            yield name, tensors, base, self._params(name)


class Sidecar(abc.ABC):
    """Extra output a method writes beside the merged model (ESM++ experts), built while streaming.

    The executor asks :meth:`wants` per output tensor, keeps a copy of the inputs for those, and after
    merging calls :meth:`add` with the merged tensor as it will be saved; :meth:`finish` writes the
    files into the (temporary) output folder and returns lines for the model card."""

    @abc.abstractmethod
    def wants(self, name: str) -> bool:
        """Whether :meth:`add` needs output tensor ``name`` (its inputs are then copied before merging)."""

    @abc.abstractmethod
    def add(self, name: str, merged: torch.Tensor, finetuned: list[torch.Tensor],
            stats: Optional[Sequence[Any]], *, base: Optional[torch.Tensor] = None,
            params: Optional[dict] = None) -> None:
        """Take one merged tensor (as saved), the fine-tuned inputs, their per-model statistics, the base's
        tensor and the tensor's bound parameters (per-model ones as lists)."""

    @abc.abstractmethod
    def finish(self, folder: Any, model_params: int, model_bytes: int) -> list[str]:
        """Write the side files into ``folder``; return notes for the model card."""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    func: Callable[..., torch.Tensor]
    pretty_name: str
    paper: str
    url: str
    variant: str
    params: tuple[Param, ...]
    needs_base: bool = False
    min_models: int = 1
    max_models: Optional[int] = None
    randomized: bool = False
    prepare: Optional[Callable[[ModelPass, dict], Any]] = None
    prepare_when: Optional[Callable[[dict], bool]] = None
    # the prepare pass in parts, for a merge spread over workers: prepare_part(mp, g) on a ModelPass over whole
    # layers (every tensor of a numbered block in one part; a tensor outside the stack anywhere), and
    # prepare_combine(parts, g) of the parts of any such partition equals prepare(mp, g) on the whole model
    prepare_part: Optional[Callable[[ModelPass, dict], Any]] = None
    prepare_combine: Optional[Callable[[list, dict], Any]] = None
    optional_base: bool = False  # a base_model, when given, is ctx.base (nuslerp, multislerp); else ctx.base is None
    base_as_input: bool = False  # a base_model, when given, is merged as one more input (mergekit's karcher)
    copy_when: Optional[Callable[[dict], bool]] = None  # per tensor (bound params): the output is input 0 unchanged
    scale_param: Optional[str] = None  # a global parameter the output is affine in (searched by search_alpha)
    needs_stats: bool = False  # needs per-model calibration statistics (``calibration:`` in the config)
    stats_kind: str = "calibration"  # which: "calibration" (Gram, submerge calibrate) or "fisher" (submerge fisher)
    stats_when: Optional[Callable[[dict], bool]] = None  # needs_stats only for these global parameters
    search: Optional[dict] = None  # how search_alpha explores scale_param: {"grid": [...]} or {"bounds": (a, b)}
    sidecar: Optional[Callable[[dict, Sequence[str]], Sidecar]] = None  # (global params, model names) -> Sidecar
    # per tensor, work that may run ahead on the reading thread while the previous tensor merges:
    # stage(tensors, base, bound params) may modify the inputs in place and returns ctx.staged (None: nothing
    # staged, the method does all the work); a method must give the same result with or without it
    stage: Optional[Callable[[list, Optional[torch.Tensor], dict], Any]] = None
    # the method never writes into ctx.tensors or ctx.base: in-memory merges (merge_state_dicts) then pass the
    # callers' tensors uncopied when they are in the compute dtype (default False: each input is copied)
    inputs_read_only: bool = False
    # how a benchmark or a tuning run evaluates the method (what it declares, so no caller dispatches on its name):
    # "static" (one merged model), "routed" (a static merge plus experts chosen per input: ESM++),
    # "task_id" (one model per task, needs the task id: TALL masks), "learned" (coefficients learned on unlabeled
    # inputs first: AdaMerging)
    evaluation: str = "static"
    builds_on: Optional[str] = None  # a method whose val-tuned merge this one starts from (ESM++: esm)
    per_task_params: tuple[str, ...] = ()  # per-model parameters chosen on each task's own validation split

    def __post_init__(self):
        if (self.prepare_part is None) != (self.prepare_combine is None):
            raise ValueError(f"{self.name}: prepare_part and prepare_combine come together")
        if self.evaluation not in ("static", "routed", "task_id", "learned"):
            raise ValueError(f"{self.name}: evaluation must be static, routed, task_id or learned")
        unknown = [p for p in self.per_task_params if p not in {q.name for q in self.params if q.per_model}]
        if unknown:
            raise ValueError(f"{self.name}: per_task_params {unknown} are not per-model parameters")

    @property
    def base_role(self) -> str:
        """What a configured base_model is to this method: 'required', 'optional' (the origin of the
        interpolation when given), 'input' (one more model merged) or 'ignored'."""
        return ("required" if self.needs_base else "optional" if self.optional_base
                else "input" if self.base_as_input else "ignored")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def bind(self, parameters: Optional[dict], model_parameters: Sequence[Optional[dict]]) -> dict:
        """Validate plain (already resolved) values: global ``parameters`` and one dict per model.

        Unknown names, per-model values for global parameters and missing required values
        raise a ConfigError; defaults fill the rest.  Returns the keyword arguments of the
        method (per-model parameters as lists).
        """
        parameters = dict(parameters or {})
        names = set(self.param_names)
        per_model = {p.name for p in self.params if p.per_model}
        for where, keys in [("parameters", parameters)] + [
            (f"model {i} parameters", m or {}) for i, m in enumerate(model_parameters)
        ]:
            for key in keys:
                if key not in names:
                    raise ConfigError(f"{where}: parameter '{key}' is not used by {self.name}"
                                      f"{suggest(key, names)}")
                if where != "parameters" and key not in per_model:
                    raise ConfigError(f"{where}: '{key}' applies to the whole merge, not per model")
        out: dict[str, Any] = {}
        for p in self.params:
            if p.per_model:
                values = []
                for i, m in enumerate(model_parameters):
                    v = (m or {}).get(p.name, parameters.get(p.name, p.default))
                    if v is _MISSING:
                        raise ConfigError(f"missing required parameter '{p.name}' of {self.name} for model {i}")
                    values.append(p.coerce(v, f"model {i}"))
                out[p.name] = values
            else:
                v = parameters.get(p.name, p.default)
                if v is _MISSING:
                    raise ConfigError(f"missing required parameter '{p.name}' of {self.name}")
                out[p.name] = p.coerce(v, "the merge")
        return out

    def uses_stats(self, global_params: dict) -> bool:
        """Whether a merge with these (bound) global parameters reads per-model statistics."""
        return self.needs_stats and (self.stats_when is None or bool(self.stats_when(global_params)))

    def needs_prepare(self, global_params: dict) -> bool:
        if self.prepare is None:
            return False
        return self.prepare_when is None or self.prepare_when(global_params)

    def __call__(self, ctx: TensorContext, **params: Any) -> torch.Tensor:
        return self.func(ctx, **params)


_REGISTRY: dict[str, MergeMethod] = {}


def register_method(*, name: str, params: Sequence[Param] = (), **spec: Any
                    ) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator registering a per-tensor merge function under ``name``: ``spec`` sets the other fields of
    :class:`MergeMethod` (``pretty_name``, ``paper``, ``url`` and ``variant`` are required; the rest have the
    defaults documented there; an unknown field is a TypeError at import).  ``min_models``/``max_models`` count
    the non-base models."""

    def wrap(func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        _REGISTRY[name] = MergeMethod(name=name, func=func, params=tuple(params), **spec)
        return func

    return wrap


def get_method(name: str) -> MergeMethod:
    """Look up a method by name; unknown names raise a ConfigError with a suggestion."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method '{name}'{suggest(name, _REGISTRY)}; "
            f"run `submerge methods` to list them"
        ) from None


def list_methods() -> list[MergeMethod]:
    return [ _REGISTRY[k] for k in sorted(_REGISTRY) ]
