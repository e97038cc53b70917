"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled inputs of every task.

Yang, Wang, Shen, Liu, Guo, Wang & Tao, "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024
(https://arxiv.org/abs/2310.02575), and the authors' code (task-wise / layer-wise AdaMerging, AdaMerging++).

Variant: ``θ(λ) = θ_0 + Σ_t λ_{t,p} τ_{t,p}`` with one coefficient per task (``task``-wise) or per task and
parameter tensor (``layer``-wise, the authors' "layer" = every parameter tensor), clamped to [0, 1] in the
forward pass as their code, initialised at 0.3; learned with Adam (lr 1e-3) by minimising the summed mean
Shannon entropy of every task's predictions on a batch of its *unlabeled* inputs per step (the paper: 500
steps, batch 16, test-time inputs; ``submerge bench`` uses validation inputs, never test).  AdaMerging++ (``ties``
on): each τ_t is first TIES-processed — trimmed to its top-``ties_density`` (0.2) magnitudes per tensor, then
only the entries whose sign agrees with the elected sign of the trimmed sum are kept — and the coefficients
are learned over those.

:func:`learn` runs the optimisation on any ``nn.Module`` (the caller gives each task's logits);
:class:`Coefficients` is the result (``save`` writes JSON, ``heatmap`` a PNG); the registered method
``adamerging`` merges with saved coefficients from a config::

    merge_method: adamerging
    base_model: ./base
    models: [{model: ./ft-a}, {model: ./ft-b}]
    parameters: {coefficients: ./adamerging.json}
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from submerge.errors import CheckpointError, ConfigError
from submerge.methods import kernels
from submerge.methods.registry import ModelPass, Param, TensorContext, register_method

GRANULARITIES = ("task", "layer")
COEFFICIENTS_FILE = "adamerging.json"  # the name `submerge tune` saves learned coefficients under, beside the model


@dataclass
class Coefficients:
    """Learned merging coefficients: ``values[t, p]`` for task ``tasks[t]`` and tensor ``names[p]``."""

    tasks: list[str]
    names: list[str]
    values: torch.Tensor  # [T, P], already clamped to [0, 1]
    granularity: str = "layer"
    ties_density: Optional[float] = None  # AdaMerging++: the TIES trim applied to the task vectors first
    history: list[float] = field(default_factory=list)  # the entropy loss per step
    info: dict = field(default_factory=dict)

    def of(self, name: str) -> list[float]:
        """Per task, the coefficient of tensor ``name``."""
        index = self.__dict__.get("_index")
        if index is None:
            index = self.__dict__["_index"] = {n: i for i, n in enumerate(self.names)}
        p = index.get(name)
        if p is None:
            raise CheckpointError(f"adamerging: the coefficients hold no entry for tensor {name}")
        return self.values[:, p].tolist()

    def to_json(self) -> dict:
        return {"method": "adamerging", "tasks": self.tasks, "names": self.names, "granularity": self.granularity,
                "ties_density": self.ties_density, "coefficients": self.values.tolist(),
                "loss_first_last": [self.history[0], self.history[-1]] if self.history else None, "info": self.info}

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = "coefficients") -> "Coefficients":
        """The inverse of :meth:`to_json` (checked: one row per task, one column per tensor)."""
        try:
            values = torch.tensor(raw["coefficients"], dtype=torch.float64)
            out = cls(list(raw["tasks"]), list(raw["names"]), values, raw.get("granularity", "layer"),
                      raw.get("ties_density"), info=raw.get("info") or {})
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"adamerging: {where} is not a coefficients file ({e})") from None
        if values.dim() != 2 or values.shape != (len(out.tasks), len(out.names)):
            raise ConfigError(f"adamerging: {where}: coefficients must be [tasks x tensors] = "
                              f"[{len(out.tasks)} x {len(out.names)}], got {list(values.shape)}")
        return out

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Coefficients":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"adamerging: coefficients file {path} does not exist (learn it with "
                              f"submerge.methods.adamerging.learn and save it)")
        try:
            raw = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"adamerging: {path} is not a coefficients file ({e})") from None
        return cls.from_json(raw, str(path))

    def heatmap(self, path: Union[str, Path], short_names: bool = True) -> Path:
        """The coefficients as a tasks x tensors heat map (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        v = self.values.float().numpy()
        fig, ax = plt.subplots(figsize=(min(24, 2 + 0.12 * v.shape[1]), 1.5 + 0.35 * v.shape[0]))
        im = ax.imshow(v, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(self.tasks)), self.tasks)
        step = max(1, len(self.names) // 40)
        labels = [n.replace("encoder.layer.", "L").replace(".weight", ".w") if short_names else n
                  for n in self.names]
        ax.set_xticks(range(0, len(self.names), step), labels[::step], rotation=90, fontsize=6)
        ax.set_title(f"AdaMerging{'++' if self.ties_density else ''} ({self.granularity}-wise) coefficients")
        fig.colorbar(im, ax=ax, fraction=0.02)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return Path(path)


def ties_task_vectors(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """AdaMerging++'s task vectors of one tensor (``[T, ...]``): each trimmed to its top-``density``
    magnitudes, then only the entries agreeing with the elected sign of the trimmed sum kept."""
    return deltas * ties_keep(deltas, density)


def ties_keep(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Which entries of each task vector ``deltas [T, ...]`` AdaMerging++ keeps (bool):
    ``ties_task_vectors(deltas, density) == deltas * ties_keep(deltas, density)``."""
    trimmed = kernels.trim_each(deltas, [density] * deltas.shape[0])
    return (trimmed * kernels.elect_sign(trimmed)) > 0


def changed(theta0: torch.Tensor, thetas: Sequence[torch.Tensor]) -> bool:
    """Whether any expert's tensor differs from the base's (a shared tensor object does not)."""
    return any(t is not theta0 and not torch.equal(t, theta0) for t in thetas)


class TaskVectors:
    """One tensor's task vectors ``τ_t = θ_t − θ_0`` (times TIES' ``keep[t]`` for AdaMerging++), formed one at a
    time from the experts' own tensors instead of kept as a stacked copy (six of them are 3.2 GB for a 135M
    chat model): the merged tensor ``θ_0 + Σ_t c_t τ_t`` and the coefficients' gradient ``<G, τ_t>``."""

    def __init__(self, theta0: torch.Tensor, thetas: Sequence[torch.Tensor], keep: Optional[torch.Tensor]):
        self.theta0, self.thetas, self.keep = theta0, thetas, keep

    def _tau(self, t: int, scratch: torch.Tensor) -> torch.Tensor:
        torch.sub(self.thetas[t], self.theta0, out=scratch)
        return scratch.mul_(self.keep[t]) if self.keep is not None else scratch

    def merged(self, coef: Sequence[float], scratch: torch.Tensor) -> torch.Tensor:
        out = self.theta0.clone()
        for t, c in enumerate(coef):
            out.add_(self._tau(t, scratch), alpha=c)
        return out

    def dots(self, grad: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        g = grad.reshape(-1)
        return torch.stack([torch.vdot(self._tau(t, scratch).reshape(-1), g) for t in range(len(self.thetas))])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax of ``logits`` ``[N, C]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def learn(
    model: torch.nn.Module,
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    inputs: Sequence[Sequence[Any]],
    logits: Callable[[Callable[..., Any], int, Any], torch.Tensor],
    *,
    tasks: Optional[Sequence[str]] = None,
    names: Optional[Sequence[str]] = None,
    granularity: str = "layer",
    init: float = 0.3,
    steps: int = 500,
    lr: float = 1e-3,
    ties: bool = False,
    ties_density: float = 0.2,
    seed: int = 0,
    progress: bool = False,
    task_params: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
) -> Coefficients:
    """Learn AdaMerging coefficients on ``model`` (its architecture; its own weights are not used for the
    merged tensors).

    ``inputs[t]``: task t's unlabeled batches (anything ``logits`` takes); ``logits(forward, t, batch)`` returns
    task t's logits ``[N, C]``, calling ``forward(*args, **kwargs)`` — the model with the merged weights — e.g.
    ``head(forward(**batch).last_hidden_state[:, 0])``.  ``names``: the merged tensors (default: every
    floating tensor of ``base``; the others keep the model's values).  ``task_params[t]``: tensors that replace
    the merged (or the model's) ones in task t's forward passes — its own classifier when the tasks' heads are
    part of the model.  One batch per task per step, cycling through each task's batches in a seeded order."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"adamerging: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    n_tasks = len(experts)
    if n_tasks == 0 or len(inputs) != n_tasks:
        raise ConfigError(f"adamerging: need one list of unlabeled batches per expert ({n_tasks}), got {len(inputs)}")
    if task_params is not None and len(task_params) != n_tasks:
        raise ConfigError(f"adamerging: task_params needs one mapping per expert ({n_tasks}), got {len(task_params)}")
    empty = [i for i, b in enumerate(inputs) if len(b) == 0]
    if empty:
        raise ConfigError(f"adamerging: task(s) {empty} have no unlabeled inputs")
    names = list(names) if names is not None else [k for k, v in base.items() if v.is_floating_point()]
    for i, e in enumerate(experts):
        missing = [n for n in names if n not in e]
        if missing:
            raise CheckpointError(f"adamerging: expert {i} lacks tensor(s) {missing[:3]}")
    tasks = list(tasks) if tasks is not None else [f"task{i}" for i in range(n_tasks)]
    theta0 = {n: base[n].detach().float() for n in names}
    # per tensor: its task vectors, formed from the experts' tensors when used; tensors no expert changes (a LoRA
    # suite's embeddings and norms) stay at the base: their coefficients have zero gradient and keep their init
    vectors: dict[int, TaskVectors] = {}
    for p, n in enumerate(names):
        src = tuple(e[n].detach().float() for e in experts)
        if changed(theta0[n], src):
            keep = ties_keep(torch.stack([x - theta0[n] for x in src]), ties_density) if ties else None
            vectors[p] = TaskVectors(theta0[n], src, keep)
    scratch = {}  # one buffer per tensor shape, reused
    shape = (n_tasks, len(names)) if granularity == "layer" else (n_tasks, 1)
    raw = torch.full(shape, float(init), requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(b), generator=gen).tolist() for b in inputs]
    state = model.state_dict()
    # tensors kept at the model's values, less any tied to a merged one (a chat model's output head is its input
    # embedding: functional_call ties them back itself, and would refuse two values for one tensor)
    merged_storage = {state[n].data_ptr() for n in names if n in state}
    fixed = {k: v for k, v in state.items() if k not in theta0 and v.data_ptr() not in merged_storage}
    history: list[float] = []

    def buffer(x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in scratch:
            scratch[key] = torch.empty_like(x)
        return scratch[key]

    def column(p: int) -> int:
        return p if granularity == "layer" else 0

    from torch.func import functional_call

    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="adamerging", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            lam = raw.clamp(0.0, 1.0)
            coef = lam.detach().tolist()
            # the merged tensors, formed once per step as leaves: each task's backward pass adds its gradient
            # into them and frees its own graph (one graph for all tasks held every task's activations at once:
            # 20.6 GB peak for six skills of a 135M chat model); the coefficients' gradient then follows by the
            # chain rule, <sum over tasks of dL_task/dθ_p, τ_{t,p}>
            params = dict(fixed)
            for p, n in enumerate(names):
                v = vectors.get(p)
                params[n] = theta0[n] if v is None else \
                    v.merged([row[column(p)] for row in coef], buffer(v.theta0)).requires_grad_()
            loss = 0.0
            for t in range(n_tasks):
                own = {**params, **task_params[t]} if task_params is not None and task_params[t] else params

                def forward(*args: Any, _p: dict = own, **kwargs: Any) -> Any:
                    return functional_call(model, _p, args, kwargs)

                batch = inputs[t][orders[t][step % len(orders[t])]]
                loss_t = entropy(logits(forward, t, batch))
                loss_t.backward()
                loss += float(loss_t.detach())
                del own, forward, loss_t
            grad = torch.zeros_like(raw)
            with torch.no_grad():
                for p, v in vectors.items():
                    g = params[names[p]].grad
                    if g is not None:
                        grad[:, column(p)] += v.dots(g, buffer(v.theta0))
            del params
            lam.backward(grad)
            opt.step()
            history.append(loss)
            if not math.isfinite(history[-1]):
                raise ConfigError(f"adamerging: the entropy became {history[-1]} at step {step}; check the logits")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(entropy=f"{history[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    values = raw.detach().clamp(0.0, 1.0).double()
    if granularity == "task":
        values = values.expand(n_tasks, len(names)).clone()
    return Coefficients(tasks, names, values, granularity, ties_density if ties else None, history,
                        info={"init": init, "steps": steps, "lr": lr, "seed": seed,
                              "seconds": round(time.perf_counter() - t0, 2)})


def merge_with(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
               coef: Coefficients) -> dict[str, torch.Tensor]:
    """The merged state dict ``θ_0 + Σ_t λ_{t,p} τ_{t,p}`` (AdaMerging++ task vectors when learned so);
    tensors without a coefficient are the base's."""
    out = {k: v.clone() for k, v in base.items()}
    for p, n in enumerate(coef.names):
        if not changed(base[n], [e[n] for e in experts]):
            continue  # no task vector (a LoRA suite's embedding): the base, as learn() has it
        b = base[n].float()
        d = torch.stack([e[n].float() - b for e in experts])
        if coef.ties_density is not None:
            d = ties_task_vectors(d, coef.ties_density)
        out[n] = (b + torch.tensordot(coef.values[:, p].float(), d, dims=1)).to(base[n].dtype)
    return out


def _load_coefficients(mp: ModelPass, gparams: dict) -> Coefficients:
    coef = Coefficients.load(gparams["coefficients"])
    if len(mp.model_names) != len(coef.tasks):
        raise ConfigError(f"adamerging: {gparams['coefficients']} holds coefficients for {len(coef.tasks)} tasks "
                          f"({', '.join(coef.tasks)}), the config merges {len(mp.model_names)} models")
    missing = [n for n in mp.names if n not in set(coef.names)]
    if missing:
        raise ConfigError(f"adamerging: {gparams['coefficients']} has no coefficients for tensor(s) {missing[:3]} "
                          f"({len(missing)} in all); learn them over every merged tensor")
    return coef


@register_method(
    name="adamerging", pretty_name="AdaMerging (learned task-/layer-wise coefficients)",
    paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
    url="https://arxiv.org/abs/2310.02575",
    variant="theta = base + sum_t c[t, tensor] * tau_t with the coefficients of a file written by "
            "submerge.methods.adamerging.learn (entropy minimisation on unlabeled inputs, Adam lr 1e-3, init 0.3, "
            "clamp [0, 1], task- or layer-wise; AdaMerging++ = TIES-processed task vectors, top-20%, recorded in the "
            "file and applied here). Models in the file's task order. No defaults: 'coefficients' is required.",
    params=[Param("coefficients", str, help="JSON file of learned coefficients (Coefficients.save)")],
    needs_base=True, prepare=_load_coefficients, evaluation="learned",
)
def adamerging(ctx: TensorContext, coefficients: str) -> torch.Tensor:
    coef: Coefficients = ctx.state
    d = torch.stack([t - ctx.base for t in ctx.tensors])
    if coef.ties_density is not None:
        d = ties_task_vectors(d, coef.ties_density)
    c = torch.tensor(coef.of(ctx.name), dtype=d.dtype, device=d.device)
    return torch.tensordot(c, d, dims=1).add_(ctx.base)
