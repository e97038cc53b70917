"""Representation Surgery: a light per-task module that pulls the merged model's representation back to each
expert's, trained without labels.

Yang, Shen, Guo, Wang, Liu, Ma & Tao, "Representation Surgery for Multi-Task Model Merging", ICML 2024
(https://arxiv.org/abs/2402.02705).  Variant (the paper's): for task t, ``z' = z − ψ_t(z)`` with
``ψ_t(z) = W_u,t · ReLU(W_d,t · z)`` (rank ``r`` = 16, ``W_u`` initialised at zero so training starts from the
merge), trained by Adam (lr 1e-3) to minimise the L1 distance ``‖z' − z_t‖₁`` between the surgered merged
representation and expert t's representation on the same *unlabeled* inputs of task t.  Both representations
come from frozen models, so they are computed once and the training runs on the cached features.

Here ``z`` is the encoder's output hidden state, token by token (``last_hidden_state`` of a transformers
model; padding tokens excluded from training); whatever the head reads (a pooled sentence embedding, the first
token) is computed from the surgered states.  :class:`SurgerySet` saves beside a merge
(``surgery.safetensors`` + ``surgery.json``); :func:`attach_surgery` hooks a model so each forward pass applies
the module of the task given by ``with handle.task(t)`` (task id), or of the task whose prototype (the mean
merged representation of its training inputs) is nearest by cosine to each sample's mean state (``route``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from submerge.errors import CheckpointError, ConfigError
from submerge.io.ledger import one_run
from submerge.io.writer import save_tensors

SURGERY_FILE, SURGERY_INFO = "surgery.safetensors", "surgery.json"


MAX_LR = 10.0  # Adam's step size: beyond this every step overflows float32


def _refuse_existing(folder: Path) -> None:
    if (folder / SURGERY_FILE).exists() or (folder / SURGERY_INFO).exists():
        raise ConfigError(f"{folder} already has Representation Surgery modules ({SURGERY_FILE}); pass "
                          f"--overwrite to replace them")


@dataclass
class SurgerySet:
    """Per task: ``down [r, d]``, ``up [d, r]``; ``prototypes [T, d]`` for routing."""

    tasks: list[str]
    down: torch.Tensor  # [T, r, d]
    up: torch.Tensor  # [T, d, r]
    prototypes: torch.Tensor  # [T, d]
    info: dict = field(default_factory=dict)

    def correction(self, z: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``ψ_t(z)`` for ``z [N, ..., d]`` and one task index per leading row ``task [N]``."""
        d, u = self.down[task].to(z.dtype), self.up[task].to(z.dtype)  # [N, r, d], [N, d, r]
        shape = z.shape
        zz = z.reshape(shape[0], -1, shape[-1])
        h = torch.relu(torch.einsum("nld,nrd->nlr", zz, d))
        return torch.einsum("nlr,ndr->nld", h, u).reshape(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.prototypes))

    def save(self, folder: Union[str, Path], overwrite: bool = True) -> Path:
        """Write ``surgery.safetensors`` + ``surgery.json`` into ``folder`` (beside a merged model).  Each file
        is written under a temporary name and renamed, the manifest last, so a failure leaves either the old
        pair or none; ``overwrite=False`` refuses a folder that already has them.  Nothing else is touched."""
        from submerge.io.outdir import write_files_atomically

        folder = Path(folder)
        if not overwrite:
            _refuse_existing(folder)
        tensors = {"down": self.down.contiguous(), "up": self.up.contiguous(),
                   "prototypes": self.prototypes.contiguous()}
        manifest = json.dumps({"tasks": self.tasks, "rank": int(self.down.shape[1]), "dim": int(self.down.shape[2]),
                               "info": self.info}, indent=2) + "\n"
        write_files_atomically(folder, {SURGERY_FILE: lambda p: save_tensors(tensors, p, "surgery modules"),
                                        SURGERY_INFO: lambda p: p.write_text(manifest)})
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "SurgerySet":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / SURGERY_FILE).is_file() or not (folder / SURGERY_INFO).is_file():
            raise CheckpointError(f"{folder} holds no Representation Surgery modules ({SURGERY_FILE} + {SURGERY_INFO})")
        info = json.loads((folder / SURGERY_INFO).read_text())
        t = load_file(str(folder / SURGERY_FILE))
        out = cls(list(info["tasks"]), t["down"], t["up"], t["prototypes"], info.get("info") or {})
        if out.down.shape[0] != len(out.tasks) or out.up.shape[0] != len(out.tasks):
            raise CheckpointError(f"{folder}: {len(out.tasks)} tasks but modules for {out.down.shape[0]}")
        return out


def _flat_tokens(states: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N, L, d]`` hidden states (or ``[N, d]``) as rows ``[M, d]``, padding dropped."""
    if states.dim() == 2:
        return states
    if mask is None:
        return states.reshape(-1, states.shape[-1])
    return states[mask.bool()]


@torch.no_grad()
def representations(model: nn.Module, batches: Sequence[Any], call: Optional[Callable[[nn.Module, Any], Any]] = None
                    ) -> torch.Tensor:
    """Token representations (padding dropped) of ``model`` over ``batches``: ``[M, d]`` (float32)."""
    call = call or (lambda m, b: m(**b).last_hidden_state)
    out = []
    for b in batches:
        states = call(model, b)
        out.append(_flat_tokens(states.float(), b.get("attention_mask") if isinstance(b, dict) else None))
    return torch.cat(out)


def fit_surgery(merged: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], *, tasks: Optional[Sequence[str]] = None,
                rank: int = 16, steps: int = 500, lr: float = 1e-3, batch: int = 1024, seed: int = 0,
                prototypes: Optional[torch.Tensor] = None) -> SurgerySet:
    """Train one module per task on cached representations: ``merged[t]`` (the merge's, ``[M_t, d]``) towards
    ``targets[t]`` (expert t's on the same inputs) by L1; minibatches of ``batch`` rows, Adam."""
    if len(merged) != len(targets) or not merged:
        raise ConfigError(f"surgery: {len(merged)} merged and {len(targets)} expert representation sets")
    d = merged[0].shape[-1]
    g = torch.Generator().manual_seed(seed)
    downs, ups, first_last = [], [], []
    for t, (z, y) in enumerate(zip(merged, targets)):
        if z.shape != y.shape:
            raise ConfigError(f"surgery: task {t}: merged representations {list(z.shape)} vs expert {list(y.shape)}")
        down = (torch.randn(rank, d, generator=g) / d ** 0.5).requires_grad_()
        up = torch.zeros(d, rank, requires_grad=True)
        opt = torch.optim.Adam([down, up], lr=lr)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, z.shape[0], (min(batch, z.shape[0]),), generator=g)
            zb, yb = z[idx], y[idx]
            pred = zb - torch.relu(zb @ down.T) @ up.T
            loss = (pred - yb).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        downs.append(down.detach())
        ups.append(up.detach())
        with torch.no_grad():
            before = float((z - y).abs().mean())
            after = float((z - torch.relu(z @ downs[-1].T) @ ups[-1].T - y).abs().mean())
        first_last.append([before, after])
    protos = prototypes if prototypes is not None else torch.stack([F.normalize(z.mean(0), dim=-1) for z in merged])
    return SurgerySet(list(tasks) if tasks is not None else [f"task{i}" for i in range(len(merged))],
                      torch.stack(downs), torch.stack(ups), protos,
                      {"rank": rank, "steps": steps, "lr": lr, "l1_before_after": first_last})


class SurgeryHandle:
    """Controls a model's surgery hook: ``task(t)`` (task id), ``route`` (prototypes), ``off``."""

    def __init__(self, model: nn.Module, surgery: SurgerySet, hook, mode: str):
        self.model, self.surgery, self._hook = model, surgery, hook
        self.mode, self.task_ids = mode, None
        self.routed: list[torch.Tensor] = []  # per forward in route mode: the chosen task per sample
        self.mask: Optional[torch.Tensor] = None  # routing_mask's: the tokens routing pools, instead of the input's

    @contextlib.contextmanager
    def routing_mask(self, mask: Optional[torch.Tensor]) -> Iterator[None]:
        """Route (``route`` mode) from the tokens where ``mask [batch, length]`` is 1 only: a chat model's prompt,
        not the gold answer a teacher-forced pass also reads (as :meth:`submerge.routing.Router.routing_mask`)."""
        old, self.mask = self.mask, mask
        try:
            yield
        finally:
            self.mask = old

    @contextlib.contextmanager
    def task(self, task_ids: Union[int, Sequence[int], torch.Tensor]) -> Iterator[None]:
        old = self.mode, self.task_ids
        self.mode, self.task_ids = "task", torch.as_tensor(task_ids).long().view(-1)
        if int(self.task_ids.min()) < 0 or int(self.task_ids.max()) >= len(self.surgery.tasks):
            raise ConfigError(f"surgery task ids must be in [0, {len(self.surgery.tasks)})")
        try:
            yield
        finally:
            self.mode, self.task_ids = old

    def detach(self) -> nn.Module:
        self._hook.remove()
        if getattr(self.model, "submerge_surgery", None) is self:
            del self.model.submerge_surgery
        return self.model


def representation_module(model: nn.Module) -> nn.Module:
    """The module whose output ``last_hidden_state`` is the representation surgery corrects: the base model of a
    transformers model with a task head (``model.base_model``: what ``AutoModel`` loads from the same folder),
    or, when that base model pools inside itself (BERT's pooler reads the first token of the encoder's output
    before the base model returns), its ``encoder`` — so the pooler and every head read the surgered states."""
    base = getattr(model, "base_model", None)
    base = base if isinstance(base, nn.Module) else model
    encoder = getattr(base, "encoder", None)
    if isinstance(encoder, nn.Module) and isinstance(getattr(base, "pooler", None), nn.Module):
        return encoder
    return base


def attach_surgery(model: nn.Module, surgery: SurgerySet, mode: str = "route") -> SurgeryHandle:
    """Apply ``surgery`` to the representation of ``model`` (see :func:`representation_module`: the encoder
    output of a base model or of a model with a task head) on every forward pass (``mode``: ``route`` by the
    prototypes, ``off``; the task id with ``handle.task(t)``).  Returns the handle (also
    ``model.submerge_surgery``)."""
    if mode not in ("route", "off"):
        raise ConfigError(f"surgery mode {mode!r}: use route or off (task ids: with handle.task(t))")
    if getattr(model, "submerge_surgery", None) is not None:
        raise ConfigError("this model already has surgery attached; call detach() first")
    state: dict = {}
    target = representation_module(model)

    def pre(_m, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # model(input_ids, attention_mask)
        state["mask"] = mask

    def post(_m, args, kwargs, output):
        if handle.mode == "off":
            return output
        h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
        n = h.shape[0]
        if handle.mode == "task":
            ids = handle.task_ids.expand(n) if handle.task_ids.numel() == 1 else handle.task_ids
            if ids.numel() != n:
                raise ConfigError(f"surgery: {ids.numel()} task ids for a batch of {n}")
        else:
            from submerge.routing.runtime import pool_tokens

            mask = handle.mask if handle.mask is not None else state.get("mask")
            pooled = F.normalize(pool_tokens(h.float(), mask), dim=-1)
            ids = (pooled @ surgery.prototypes.float().T).argmax(-1)
            handle.routed.append(ids.cpu())
        new = h - surgery.correction(h, ids.to(h.device))
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = new
            if isinstance(output, dict) or hasattr(output, "__setitem__"):
                output["last_hidden_state"] = new
            return output
        return new

    h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = target.register_forward_hook(post, with_kwargs=True)

    class _Both:
        def remove(self):
            h1.remove()
            h2.remove()

    handle = SurgeryHandle(model, surgery, _Both(), mode)
    model.submerge_surgery = handle
    return handle


@one_run
def fit_surgery_folders(merged_dir: Union[str, Path], experts: Sequence[tuple[str, Union[str, Path]]],
                        inputs: Sequence[Union[str, Path, Sequence[str]]], *, rank: int = 16, steps: int = 500,
                        lr: float = 1e-3, n: int = 256, max_length: int = 128, batch_size: int = 16, seed: int = 0,
                        field_name: Optional[str] = None, device: str = "cpu", overwrite: bool = False,
                        progress: bool = True) -> SurgerySet:
    """``submerge surgery``: train Representation Surgery for the merged model in ``merged_dir`` and save it
    there (``surgery.safetensors`` + ``surgery.json``; the model files are not touched).

    ``experts``: ``(task name, expert folder)`` pairs, in task-id order; ``inputs``: per task its *unlabeled*
    inputs (a .txt / .jsonl / .json file as ``submerge calibrate`` reads, or a list of texts), of which the first
    ``n`` of a seeded shuffle are used.  Representations are the base model's ``last_hidden_state``
    (``AutoModel``: a folder saved with a task head loads without it), what :func:`attach_surgery` corrects at run
    time.  Every folder and file is checked before any model is loaded."""
    import random

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from submerge.device import parse_device
    from submerge.io import Checkpoint
    from submerge.io.pretrained import load_pretrained
    from submerge.stats.inputs import effective_max_length, read_inputs, text_batches

    merged_dir = Path(merged_dir)
    if not experts:
        raise ConfigError("surgery needs at least one expert (--expert NAME=FOLDER)")
    if len(inputs) != len(experts):
        raise ConfigError(f"surgery: {len(experts)} experts but inputs for {len(inputs)} tasks")
    names = [name for name, _ in experts]
    if len(set(names)) != len(names):
        raise ConfigError(f"surgery: task names repeat: {names}")
    for key, value in (("rank", rank), ("steps", steps), ("n", n), ("max_length", max_length),
                       ("batch_size", batch_size)):
        if type(value) is not int or value < (0 if key == "steps" else 1):
            raise ConfigError(f"surgery: {key} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr <= MAX_LR):
        raise ConfigError(f"surgery: lr must be in (0, {MAX_LR:g}] (Adam's step size), got {lr!r}")
    dev = parse_device(device)
    folders = [merged_dir] + [Path(p) for _, p in experts]
    for f in folders:
        if not f.is_dir():
            raise CheckpointError(f"model folder {f} does not exist")
        Checkpoint(f, label=str(f)).close()  # containment and header checks, before transformers
    if not overwrite:  # before any model is loaded
        _refuse_existing(merged_dir)
    sizes = {}
    for f in folders:
        try:
            sizes[f] = getattr(load_pretrained(AutoConfig, f, quiet=True), "hidden_size", None)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f}/config.json: {str(e).splitlines()[0][:200]}") from None
    if len(set(sizes.values())) > 1:
        raise ConfigError("surgery: the models' hidden sizes differ: "
                          + ", ".join(f"{f} {v}" for f, v in sizes.items()))
    texts = []
    for (name, _), src in zip(experts, inputs):
        data = read_inputs(src, field_name) if isinstance(src, (str, Path)) else list(src)
        if isinstance(data, dict) or not data or not all(isinstance(t, str) for t in data):
            raise ConfigError(f"surgery: task {name}: inputs must be texts (.txt / .jsonl / .json), got {src}")
        order = list(range(len(data)))
        random.Random(seed).shuffle(order)
        texts.append([data[i] for i in order[:n]])
    try:
        tok = load_pretrained(AutoTokenizer, merged_dir, quiet=not progress)
    except CheckpointError:  # a merge written without tokenizer files: the first expert's (same vocabulary)
        tok = load_pretrained(AutoTokenizer, Path(experts[0][1]), quiet=not progress)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def batches_of(model: nn.Module, tt: list[str]) -> list[dict]:
        ml = effective_max_length(max_length, model.config)
        return [{k: v.to(dev) for k, v in b.items()} for b in text_batches(tt, tok, batch_size, ml)]

    model = load_pretrained(AutoModel, merged_dir, quiet=not progress).to(dev).eval()
    batches = [batches_of(model, tt) for tt in texts]
    merged = [representations(model, b).cpu() for b in batches]
    del model
    targets = []
    for (name, folder), b in zip(experts, batches):
        expert = load_pretrained(AutoModel, Path(folder), quiet=not progress).to(dev).eval()
        targets.append(representations(expert, b).cpu())
        del expert
    out = fit_surgery(merged, targets, tasks=names, rank=rank, steps=steps, lr=lr, seed=seed)
    out.info.update({"experts": {name: str(p) for name, p in experts}, "n_inputs": [len(t) for t in texts],
                     "max_length": max_length, "seed": seed,
                     "inputs": [str(src) if isinstance(src, (str, Path)) else "<python>" for src in inputs]})
    out.save(merged_dir, overwrite=overwrite)
    return out


def load_model(folder: Union[str, Path], model_class: Any = None, *, mode: str = "route", device: str = "cpu",
               **from_pretrained: Any) -> nn.Module:
    """A merged model saved with surgery modules beside it, loaded with them attached
    (``model.submerge_surgery``; ``with model.submerge_surgery.task(t)`` for a known task id).  ``model_class``
    defaults to the architecture in ``config.json`` (a classifier keeps its head), else ``AutoModel``."""
    import transformers

    from submerge.io.pretrained import load_pretrained

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    surgery = SurgerySet.load(folder)
    if model_class is None:
        arch = (getattr(load_pretrained(transformers.AutoConfig, folder, quiet=True), "architectures", None)
                or [None])[0]
        model_class = (getattr(transformers, arch, None) if isinstance(arch, str) else None) or transformers.AutoModel
    model = load_pretrained(model_class, folder, **from_pretrained).to(device).eval()
    surgery.down, surgery.up = surgery.down.to(device), surgery.up.to(device)
    surgery.prototypes = surgery.prototypes.to(device)
    attach_surgery(model, surgery, mode=mode)
    return model
