"""The ESM++ runtime: routed linears that add the chosen task's low-rank expert to a static model.

``attach(model, experts)`` replaces each routed linear (``nn.Linear`` or transformers ``Conv1D``) of
``model`` in place by a :class:`RoutedLinear` that runs the original module and adds
``x · (B_t A_t)ᵀ (+ δb_t)``.  The expert ``t`` is chosen per sample:

* ``route`` (default): the layer input is mean-pooled over tokens (padding masked with the
  ``attention_mask`` the model was called with, or the tokens :meth:`Router.routing_mask` names: a decoder
  routes each sequence from its prompt, never from the answer it is scored on), compared by cosine similarity
  with the task
  prototypes, and the top-1 expert is added (the authors' rule; every layer decides on its own).
  ``rule="auto"`` (default) uses a layer's linear router instead where the experts carry one
  (:mod:`submerge.routing.routers`: Gaussian / trained), ``"cosine"`` always the prototypes.
  ``top_k > 1``: the k most similar experts, weighted by a softmax of their similarities / ``temperature``.
  ``global_routing=True``: the first routed layer of a forward pass decides for all later ones.
  ``per_token=True``: every token is routed on its own layer input instead of the pooled sequence (in a
  decoder a position sees only its past, so the decision is causal, as in generation).
* ``oracle``: the task ids given with :meth:`Router.oracle` (one per sample, or one for all).
* ``base``: no expert (the static merge).

Everything is batched over samples (gathered expert factors, one einsum); inputs are batch-first
``[batch, tokens, d_in]`` or ``[batch, d_in]``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from submerge.errors import ConfigError
from submerge.routing.experts import ExpertSet, LayerExperts

MODES = ("route", "oracle", "base")
RULES = ("auto", "cosine", "linear")  # auto: each layer's linear router where it has one, else cosine


class RoutingState:
    """Shared by a model's routed layers: mode, the current forward's mask, oracle ids, records."""

    def __init__(self, n_tasks: int, mode: str = "route", top_k: int = 1, temperature: float = 0.05,
                 global_routing: bool = False, rule: str = "auto", per_token: bool = False):
        self.n_tasks = n_tasks
        self.per_token = False
        self.set(mode=mode, top_k=top_k, temperature=temperature, global_routing=global_routing, rule=rule,
                 per_token=per_token)
        self.mask: Optional[torch.Tensor] = None
        self.route_mask: Optional[torch.Tensor] = None  # tokens to pool for routing, when not the attention mask
        self.task_ids: Optional[torch.Tensor] = None
        self.decision: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # global routing, this forward
        self.records: Optional[dict[str, list[torch.Tensor]]] = None

    def set(self, *, mode: Optional[str] = None, top_k: Optional[int] = None, temperature: Optional[float] = None,
            global_routing: Optional[bool] = None, rule: Optional[str] = None,
            per_token: Optional[bool] = None) -> None:
        if rule is not None:
            if rule not in RULES:
                raise ConfigError(f"routing rule {rule!r}: use one of {list(RULES)}")
            self.rule = rule
        if mode is not None:
            if mode not in MODES:
                raise ConfigError(f"routing mode {mode!r}: use one of {list(MODES)}")
            self.mode = mode
        if top_k is not None:
            if not 1 <= top_k <= self.n_tasks:
                raise ConfigError(f"top_k must be in [1, {self.n_tasks}], got {top_k}")
            self.top_k = int(top_k)
        if temperature is not None:
            if temperature <= 0:
                raise ConfigError(f"temperature must be > 0, got {temperature}")
            self.temperature = float(temperature)
        if global_routing is not None:
            self.global_routing = bool(global_routing)
        if per_token is not None:
            self.per_token = bool(per_token)
        if self.per_token and self.global_routing:
            raise ConfigError("per-token routing and global routing exclude each other")


def pool_tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of ``x [B, L, d]`` (``[B, d]`` passes through), padding excluded when ``mask
    [B, L]`` matches."""
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ValueError(f"routed layer input must be [batch, tokens, d] or [batch, d], got {list(x.shape)}")
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)
    return x.mean(1)


class RoutedLinear(nn.Module):
    """A linear layer plus per-task low-rank experts chosen per sample."""

    def __init__(self, base: nn.Module, experts: LayerExperts, state: RoutingState, name: str = ""):
        super().__init__()
        self.base = base
        self.layer_name = name
        self.state = state
        ref = next(base.parameters())
        self.register_buffer("B", experts.B.to(ref.device, ref.dtype))
        self.register_buffer("A", experts.A.to(ref.device, ref.dtype))
        self.register_buffer("prototypes", F.normalize(experts.prototypes.float(), dim=-1).to(ref.device))
        self.register_buffer("bias_delta", None if experts.bias is None else experts.bias.to(ref.device, ref.dtype))
        self.register_buffer("router_w", None if experts.router_w is None else experts.router_w.float().to(ref.device))
        self.register_buffer("router_b", None if experts.router_b is None else experts.router_b.float().to(ref.device))

    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: expert indices ``[B, k]`` and weights ``[B, k]`` (per token, ``[B, L, k]``, when routing
        per token)."""
        st = self.state
        n = x.shape[0]
        if st.mode == "oracle":
            if st.task_ids is None:
                raise ConfigError("oracle routing needs task ids: use `with router.oracle(ids): model(...)`")
            ids = st.task_ids.to(x.device).long().view(-1)
            if ids.numel() == 1:  # one task for every sample, whatever the batch size
                ids = ids.expand(n)
            if ids.numel() != n:
                raise ConfigError(f"oracle routing: {ids.numel()} task ids for a batch of {n}")
            return ids[:, None], torch.ones(n, 1, dtype=x.dtype, device=x.device)
        if st.global_routing and st.decision is not None:
            return st.decision
        per_token = st.per_token and x.dim() == 3
        pooled = x.float() if per_token else pool_tokens(x, st.route_mask if st.route_mask is not None
                                                         else st.mask).float()
        if st.rule != "cosine" and self.router_w is not None:
            sims = pooled @ self.router_w.T + self.router_b  # a linear router's scores [B, (L,) T]
        elif st.rule == "linear":
            raise ConfigError(f"routed layer {self.layer_name}: rule 'linear' but the experts have no router here "
                              f"(submerge.routing.routers.gaussian_router / train_router)")
        else:
            sims = F.normalize(pooled, dim=-1) @ self.prototypes.T  # cosine to the prototypes [B, (L,) T]
        if st.top_k == 1:
            idx = sims.argmax(-1, keepdim=True)
            w = torch.ones_like(idx, dtype=x.dtype)
        else:
            top, idx = sims.topk(st.top_k, dim=-1)
            w = torch.softmax(top / st.temperature, dim=-1).to(x.dtype)
        if st.global_routing:
            st.decision = (idx, w)
        return idx, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        st = self.state
        if st.mode == "base":
            return y
        idx, w = self.choose(x)
        if idx.dim() == 3:
            return y + self._per_token(x, idx, w).to(y.dtype)
        if st.records is not None:
            st.records.setdefault(self.layer_name, []).append(idx[:, 0].detach().cpu())
        xs = x if x.dim() == 3 else x.unsqueeze(1)
        a, b = self.A[idx], self.B[idx]  # [B, k, r, d_in], [B, k, d_out, r]
        h = torch.einsum("bld,bkrd->bklr", xs.to(a.dtype), a)
        out = torch.einsum("bklr,bkor,bk->blo", h, b, w.to(a.dtype))
        if self.bias_delta is not None:
            out = out + torch.einsum("bko,bk->bo", self.bias_delta[idx], w.to(a.dtype)).unsqueeze(1)
        if x.dim() == 2:
            out = out.squeeze(1)
        return y + out.to(y.dtype)

    def _per_token(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Every token's own experts: all tasks' rank-r projections of the token (cheap: T·r per token), weighted
        by the token's routing weights ``[B, L, T]``."""
        st = self.state
        if st.records is not None:  # the top-1 choice of every token the routing mask (else attention) keeps
            keep = st.route_mask if st.route_mask is not None else st.mask
            top = idx[..., 0]
            chosen = top[keep.bool()] if keep is not None and tuple(keep.shape) == tuple(top.shape) else top.reshape(-1)
            st.records.setdefault(self.layer_name, []).append(chosen.detach().cpu())
        weights = torch.zeros(*idx.shape[:2], self.A.shape[0], dtype=self.A.dtype, device=x.device)
        weights.scatter_(-1, idx, w.to(self.A.dtype))
        h = torch.einsum("bld,trd->bltr", x.to(self.A.dtype), self.A)
        out = torch.einsum("bltr,tor,blt->blo", h, self.B, weights)
        if self.bias_delta is not None:
            out = out + torch.einsum("to,blt->blo", self.bias_delta, weights)
        return out

    def extra_repr(self) -> str:
        t, d_out, r = self.B.shape
        return f"tasks={t}, rank={r}, d_out={d_out}, d_in={self.A.shape[-1]}"


def _resolve_modules(model: nn.Module, layer_names: Sequence[str]) -> dict[str, tuple[str, nn.Module]]:
    """Each expert layer's module in ``model``: the same path, or the unique dotted-suffix match either
    way (experts from ``bert.encoder...`` on a bare ``BertModel`` and vice versa)."""
    modules = dict(model.named_modules())
    out = {}
    for name in layer_names:
        if name in modules:
            out[name] = (name, modules[name])
            continue
        hits = [m for m in modules if m and (m.endswith("." + name) or name.endswith("." + m))]
        if len(hits) != 1:
            raise ConfigError(f"expert layer {name!r}: {'no' if not hits else 'several'} matching module(s) in "
                              f"{type(model).__name__}{'' if not hits else ': ' + ', '.join(hits[:3])}")
        out[name] = (hits[0], modules[hits[0]])
    return out


class Router:
    """Controls the routed layers attached to one model (see :func:`attach`)."""

    def __init__(self, model: nn.Module, experts: ExpertSet, state: RoutingState,
                 layers: dict[str, RoutedLinear], hook):
        self.model, self.experts, self.state, self.layers = model, experts, state, layers
        self._hook = hook

    @property
    def tasks(self) -> list[str]:
        return self.experts.tasks

    def set(self, **kw) -> None:
        """Change ``mode``, ``top_k``, ``temperature``, ``global_routing``, ``rule`` or ``per_token``."""
        self.state.set(**kw)

    @contextlib.contextmanager
    def oracle(self, task_ids: Union[torch.Tensor, Sequence[int], int]) -> Iterator[None]:
        """Route every sample of the forward passes inside to its given task's expert (one id per
        sample, or a single id for all samples of any batch)."""
        ids = torch.as_tensor(task_ids).long().view(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.state.n_tasks):
            raise ConfigError(f"task ids must be in [0, {self.state.n_tasks}), got {ids.tolist()[:8]}")
        old_mode, old_ids = self.state.mode, self.state.task_ids
        self.state.mode, self.state.task_ids = "oracle", ids
        try:
            yield
        finally:
            self.state.mode, self.state.task_ids = old_mode, old_ids

    @contextlib.contextmanager
    def routing_mask(self, mask: torch.Tensor) -> Iterator[None]:
        """Pool only the tokens ``mask [batch, tokens]`` marks (e.g. a prompt, not the answer after it) to route
        the forward passes inside; the attention mask still masks attention."""
        old = self.state.route_mask
        self.state.route_mask = mask
        try:
            yield
        finally:
            self.state.route_mask = old

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        old = self.state.mode
        self.state.set(mode=mode)
        try:
            yield
        finally:
            self.state.mode = old

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Collect each routed layer's top-1 choice per sample: ``{layer: [LongTensor [B], ...]}``."""
        self.state.records = rec = {}
        try:
            yield rec
        finally:
            self.state.records = None

    def detach(self) -> nn.Module:
        """Put the original linears back and remove the hook; returns the model."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base)
        self._hook.remove()
        self.layers = {}
        if getattr(self.model, "submerge_router", None) is self:
            del self.model.submerge_router
        return self.model


def attach(model: nn.Module, experts: ExpertSet, *, mode: str = "route", top_k: int = 1,
           temperature: float = 0.05, global_routing: bool = False, rule: str = "auto",
           per_token: bool = False) -> Router:
    """Wrap ``model``'s routed linears in place; returns the :class:`Router` (also ``model.submerge_router``).

    The model keeps its call signature; an ``attention_mask`` keyword (or a second positional
    tensor of matching shape is *not* guessed) is read by a forward pre-hook for padding-aware pooling."""
    if getattr(model, "submerge_router", None) is not None:
        raise ConfigError("this model already has ESM++ experts attached; call router.detach() first")
    state = RoutingState(len(experts.tasks), mode, top_k, temperature, global_routing, rule, per_token)
    targets = _resolve_modules(model, list(experts.layers))
    layers: dict[str, RoutedLinear] = {}
    for key, (path, module) in targets.items():
        e = experts.layers[key]
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2:
            raise ConfigError(f"expert layer {key!r}: module {path} ({type(module).__name__}) has no 2-D weight")
        d_out, d_in = (w.shape if e.layout == "out_in" else w.shape[::-1])
        if (d_out, d_in) != (e.B.shape[1], e.A.shape[2]):
            raise ConfigError(f"expert layer {key!r}: experts are {e.B.shape[1]}x{e.A.shape[2]} (out x in), "
                              f"module {path} is {d_out}x{d_in}")
        layer = RoutedLinear(module, e, state, key)
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers[path] = layer

    def pre_hook(_module, args, kwargs):
        state.mask = kwargs.get("attention_mask")
        state.decision = None
        return None

    hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    router = Router(model, experts, state, layers, hook)
    model.submerge_router = router
    return router
