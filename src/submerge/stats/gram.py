"""Gram (calibration) statistics: what each linear layer sees on a few task inputs.

Data-based merges (ESM, RegMean, ESM++) need, per task and per linear layer, the
uncentred input second moment ``G = XᵀX`` (d_in x d_in), the token count and the
mean input.  Since the output shift of an update is ``ΔO = X ΔWᵀ``, the PCA of
``ΔO`` is the eigendecomposition of ``ΔW G ΔWᵀ``: no activation is ever stored.

* :func:`collect_stats` runs any ``nn.Module`` on an iterable of batches with
  forward pre-hooks on its ``nn.Linear`` (and transformers ``Conv1D``) layers,
  accumulating ``G`` in float64 over batches and tokens, padding masked.
  Layers fed the very same input tensor (q/k/v, gate/up) share one entry.
* :meth:`CalibrationStats.save` writes ``stats.safetensors`` + ``manifest.json``;
  :func:`load_stats` reopens it lazily, one layer at a time, so the statistics of
  a large model never need to fit in RAM when merging.
* :func:`calibrate_model_dir` is what ``submerge calibrate`` runs: a local Hugging
  Face folder, a text / JSONL / tensor file of inputs, N examples.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from submerge.errors import CheckpointError, ConfigError
from submerge.io.ledger import one_run
from submerge.io.pretrained import load_pretrained
from submerge.stats.folder import _is_pos_int, model_fingerprint, open_folder, save_folder
from submerge.stats.inputs import (
    check_model_run,
    check_token_ids,
    effective_max_length,
    read_inputs,
    tensor_batches,
    text_batches,
)

log = logging.getLogger("submerge")

FORMAT = "submerge-calibration/1"
STATS_FILE = "stats.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass
class LayerStats:
    """Input statistics of one linear layer.

    ``gram`` = Σ x xᵀ over the counted tokens (float64, d_in x d_in, *not* divided by
    ``count``), ``mean`` = the mean input (the ESM++ prototype), ``layout`` = how the
    layer stores its weight: ``"out_in"`` (nn.Linear, y = x Wᵀ) or ``"in_out"`` (Conv1D).
    """

    gram: torch.Tensor
    mean: torch.Tensor
    count: int
    layout: str = "out_in"

    @property
    def d_in(self) -> int:
        return self.gram.shape[0]

    def weight_as_out_in(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.layout == "in_out" else w


def pack_symmetric(g: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A symmetric ``[n, n]`` matrix in about half the memory: with ``k = ceil(n/2)`` (one zero row and column
    padded when n is odd), the lower triangle of the top-left ``k x k`` block and the upper triangle of the
    bottom-right one interleaved in one ``[k+1, k]`` array (as LAPACK's rectangular full packed format), and
    the off-diagonal block as is.  :func:`unpack_symmetric` rebuilds it exactly with block copies (no scatter)."""
    n = g.shape[0]
    k = (n + 1) // 2
    if 2 * k != n:
        g = torch.nn.functional.pad(g, (0, 1, 0, 1))
    a11, a22 = g[:k, :k], g[k:, k:]
    below = torch.arange(k)[None, :] < torch.arange(k + 1)[:, None]  # row i, column j < i
    rect = torch.where(below, torch.cat([a11.new_zeros(1, k), a11]), torch.cat([a22, a22.new_zeros(1, k)]))
    return n, rect, g[k:, :k].clone()


def unpack_symmetric(n: int, rect: torch.Tensor, a21: torch.Tensor) -> torch.Tensor:
    """The ``[n, n]`` matrix :func:`pack_symmetric` packed (a new tensor)."""
    k = a21.shape[1]
    out = torch.empty(2 * k, 2 * k, dtype=rect.dtype, device=rect.device)
    lower = torch.ones(k, k, dtype=torch.bool, device=rect.device).tril_()
    a11, a22 = rect[1:], rect[:-1]
    out[:k, :k] = torch.where(lower, a11, a11.T)
    out[k:, k:] = torch.where(lower.T, a22, a22.T)
    out[k:, :k] = a21
    out[:k, k:] = a21.T
    return out[:n, :n] if 2 * k != n else out


class PackedLayerStats(LayerStats):
    """:class:`LayerStats` whose Gram, exactly symmetric, is held packed (:func:`pack_symmetric`): half the
    memory (8 tasks' statistics of MiniLM held 1.0 GB in float64); ``gram`` unpacks it on each access (9 ms
    for 1536 x 1536)."""

    def __init__(self, st: LayerStats):
        self._packed = pack_symmetric(st.gram)
        self.mean, self.count, self.layout = st.mean, st.count, st.layout

    @property
    def gram(self) -> torch.Tensor:  # type: ignore[override]
        return unpack_symmetric(*self._packed)

    @property
    def d_in(self) -> int:
        return self._packed[0]


def compact(st: LayerStats) -> LayerStats:
    """``st`` with its Gram packed when it is exactly symmetric (as ``x.T @ x`` accumulates here), else as is."""
    g = st.gram
    return PackedLayerStats(st) if g.shape[0] > 2 and torch.equal(g, g.T) else st


def _linear_layout(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style layer
        return "in_out"
    return None


def linear_modules(model: nn.Module, pattern: Optional[str] = None) -> dict[str, nn.Module]:
    """The model's linear layers (name -> module), optionally filtered by a regex on the name."""
    rx = re.compile(pattern) if pattern else None
    return {n: m for n, m in model.named_modules()
            if _linear_layout(m) is not None and (rx is None or rx.search(n))}


class CalibrationStats:
    """Per-layer statistics of one model on one task's inputs (in memory)."""

    kind = "calibration"

    def __init__(self, layers: dict[str, LayerStats], aliases: Optional[dict[str, str]] = None,
                 info: Optional[dict] = None):
        self.layers = layers
        self.aliases = dict(aliases or {})  # layer -> the layer whose (identical) input it shares
        self.info = dict(info or {})

    def names(self) -> list[str]:
        return list(self.layers) + list(self.aliases)

    def get(self, layer: str) -> Optional[LayerStats]:
        layer = self.aliases.get(layer, layer)
        return self.layers.get(layer)

    def lookup(self, tensor_name: str) -> Optional[LayerStats]:
        """The stats of the layer owning a weight tensor (matched on the module path suffix)."""
        key = match_layer(tensor_name, self.names())
        return self.get(key) if key is not None else None

    def save(self, path: Union[str, Path], overwrite: bool = False, inputs: Sequence[Any] = ()) -> Path:
        """Write ``stats.safetensors`` + ``manifest.json`` into folder ``path`` (atomically; ``inputs``:
        paths this folder must not replace or contain, see :func:`submerge.io.atomic_folder`)."""
        tensors = {}
        for name, st in self.layers.items():
            tensors[f"{name}.gram"] = st.gram
            tensors[f"{name}.mean"] = st.mean
        manifest = {
            "format": FORMAT,
            **self.info,
            "layers": {n: {"d_in": st.d_in, "count": st.count, "layout": st.layout} for n, st in self.layers.items()},
            "aliases": self.aliases,
        }
        return save_folder(path, tensors, STATS_FILE, MANIFEST_FILE, manifest, "calibration", overwrite, inputs)


class StatsReader(CalibrationStats):
    """Saved statistics, opened lazily: each layer is read from disk when asked for."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        mpath = self.path / MANIFEST_FILE
        manifest, self._file = open_folder(self.path, STATS_FILE, MANIFEST_FILE, FORMAT, "calibration",
                                           "submerge calibrate")
        layers, aliases = manifest.get("layers"), manifest.get("aliases", {})
        if not (isinstance(layers, dict) and all(
                isinstance(m, dict) and _is_pos_int(m.get("d_in")) and _is_pos_int(m.get("count"))
                and m.get("layout", "out_in") in ("out_in", "in_out") for m in layers.values())):
            raise CheckpointError(f"{mpath}: corrupt manifest ('layers' must map each layer to d_in, count "
                                  f"and layout); recreate it with `submerge calibrate`")
        if not (isinstance(aliases, dict) and all(isinstance(v, str) and v in layers for v in aliases.values())):
            raise CheckpointError(f"{mpath}: corrupt manifest ('aliases' must name recorded layers)")
        self._meta = layers
        keys = set(self._file.keys())
        lost = [n for n in layers if f"{n}.gram" not in keys or f"{n}.mean" not in keys]
        if lost:
            raise CheckpointError(f"{self.path / STATS_FILE} lacks the statistics of {len(lost)} layer(s) its "
                                  f"manifest lists, e.g. {lost[0]}; recreate it with `submerge calibrate`")
        info = {k: v for k, v in manifest.items() if k not in ("layers", "aliases", "format")}
        super().__init__({}, aliases, info)

    def names(self) -> list[str]:
        return list(self._meta) + list(self.aliases)

    def meta_for(self, tensor_name: str) -> Optional[dict]:
        """Manifest entry (d_in, count, layout) of the layer owning a tensor, without reading data."""
        key = match_layer(tensor_name, self.names())
        if key is None:
            return None
        return self._meta.get(self.aliases.get(key, key))

    def get(self, layer: str) -> Optional[LayerStats]:
        layer = self.aliases.get(layer, layer)
        meta = self._meta.get(layer)
        if meta is None:
            return None
        gram, mean = self._file.get_tensor(f"{layer}.gram"), self._file.get_tensor(f"{layer}.mean")
        d = int(meta["d_in"])
        if tuple(gram.shape) != (d, d) or tuple(mean.shape) != (d,) or not gram.is_floating_point():
            raise CheckpointError(f"{self.path / STATS_FILE}: layer {layer} has a {list(gram.shape)} Gram and a "
                                  f"{list(mean.shape)} mean, but its manifest says d_in = {d} (corrupt folder)")
        return LayerStats(gram, mean, int(meta["count"]), meta.get("layout", "out_in"))


def match_layer(tensor_name: str, layers: Sequence[str]) -> Optional[str]:
    """The layer a weight tensor belongs to: the longest layer name that is a dotted suffix of the
    tensor's module path (so ``bert.encoder.layer.0.attention.self.query.weight`` finds
    ``encoder.layer.0.attention.self.query``), or the other way round (stats taken on a wrapper)."""
    module = tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name
    if module in layers:
        return module
    best = None
    for layer in layers:
        if module.endswith("." + layer) or layer.endswith("." + module):
            if best is None or len(layer) > len(best):
                best = layer
    return best


# ------------------------------------------------------------------------------ collection
class _Accumulator:
    def __init__(self, d_in: int, layout: str, device: torch.device):
        self.gram = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.count = 0
        self.layout = layout

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.gram.addmm_(x.T, x)
        self.sum += x.sum(0)
        self.count += x.shape[0]


class _HeadReached(Exception):
    """Raised by the output head's hook once its input is counted: the rest of the forward is not needed."""


def _mask_of(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        return m if isinstance(m, torch.Tensor) else None
    return None


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    layers: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    total: Optional[int] = None,
    info: Optional[dict] = None,
) -> CalibrationStats:
    """Run ``model`` on ``batches`` and return the input statistics of its linear layers.

    A batch is a dict of keyword arguments (its ``attention_mask``, if any, selects the
    tokens counted: padding is left out), a tuple of positional arguments, or one tensor.
    ``layers`` is an optional regex on module names.  Layers whose input is the same tensor
    as an earlier layer's in the same forward (q/k/v, gate/up) are recorded as aliases.
    The forward of a model with an output head (``get_output_embeddings``, a language model's
    ``lm_head``) stops once the head's input is counted: what the model returns is never used.
    """
    mods = linear_modules(model, layers)
    if not mods:
        raise ConfigError("the model has no nn.Linear / Conv1D layers" + (f" matching {layers!r}" if layers else ""))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    acc: dict[str, _Accumulator] = {}
    aliases: dict[str, str] = {}
    current: dict[str, Any] = {"mask": None, "first": True, "seen": {}}
    # the output head (a causal LM's lm_head) runs last: once its input is counted, the forward stops, so the
    # logits ([batch, tokens, vocabulary], 1.9 GB for 32 chats of 310 tokens, 49k words) are never computed
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    last = next((n for n, m in mods.items() if m is head), None) if isinstance(head, nn.Module) else None

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            if name in aliases or not args:
                return
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return
            if current["first"]:
                # an input seen before is the very same values while that tensor lives (its storage cannot be
                # reused meanwhile); a weak reference tells, without keeping every layer's input alive
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
                seen = current["seen"].get(key)
                if seen is not None and seen[0]() is not None:
                    aliases[name] = seen[1]
                    return
                current["seen"][key] = (weakref.ref(x), name)
            mask = current["mask"]
            if mask is not None and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]
            a = acc.get(name)
            if a is None:
                a = acc[name] = _Accumulator(x.shape[-1], _linear_layout(module), x.device)
            a.add(x)
            if name == last:
                raise _HeadReached
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    was_training = model.training
    model.eval()
    n_batches, t0 = 0, time.perf_counter()
    try:
        for batch in tqdm(batches, desc="calibrate", total=total, disable=not progress, unit="batch"):
            batch = _to(batch, dev)
            current["mask"] = _mask_of(batch)
            try:
                _call(model, batch)
            except _HeadReached:
                pass
            if current["first"]:
                current["first"], current["seen"] = False, {}
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ConfigError("calibration got no batches")
    out = {}
    for name, a in acc.items():
        if a.count == 0:
            continue
        out[name] = compact(LayerStats(a.gram.cpu(), (a.sum / a.count).cpu(), a.count, a.layout))
        a.gram = None
    meta = {"batches": n_batches, "seconds": round(time.perf_counter() - t0, 3),
            "tokens": max((s.count for s in out.values()), default=0)}
    meta.update(info or {})
    return CalibrationStats(out, {k: v for k, v in aliases.items() if v in out}, meta)


@one_run
def calibrate_model_dir(
    model_dir: Union[str, Path],
    inputs: Union[str, Path, Sequence[str]],
    out_dir: Union[str, Path],
    *,
    n: int = 32,
    max_length: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    task: Optional[str] = None,
    layers: Optional[str] = None,
    source: str = "finetuned",
    field_name: Optional[str] = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> CalibrationStats:
    """``submerge calibrate``: statistics of a local Hugging Face model on ``n`` inputs of one task.

    The first ``n`` inputs of a shuffled (``seed``) copy are used.  ``source`` records which
    model the statistics come from ("finetuned" — the task's own model, as ESM — or "base").
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir)
    if source not in ("finetuned", "base"):
        raise ConfigError(f"source must be 'finetuned' or 'base', got {source!r}")
    in_paths = [inputs] if isinstance(inputs, (str, Path)) else []
    check_model_run(model_dir, out_dir, in_paths, overwrite, device, "calibration folder",
                    n=n, batch_size=batch_size, max_length=max_length)
    if layers is not None:
        try:
            re.compile(layers)
        except re.error as e:
            raise ConfigError(f"--layers: bad regex {layers!r} ({e})") from None
    data = read_inputs(inputs, field_name) if in_paths else list(inputs)
    if not isinstance(data, dict) and not data:
        raise ConfigError(f"no calibration inputs in {inputs}")
    model = load_pretrained(AutoModel, model_dir, quiet=not progress).to(device).eval()
    if isinstance(data, dict):
        check_token_ids(data["input_ids"], model, inputs)
        total = int(data["input_ids"].shape[0])
        count = min(n, total)
        batches = tensor_batches(data, count, batch_size)
    else:
        if not data:
            raise ConfigError(f"no calibration inputs in {inputs}")
        order = list(range(len(data)))
        random.Random(seed).shuffle(order)
        chosen = [data[i] for i in order[:n]]
        count = len(chosen)
        tok = load_pretrained(AutoTokenizer, model_dir, quiet=not progress)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        batches = text_batches(chosen, tok, batch_size, effective_max_length(max_length, model.config))
    if count < n:
        log.warning("only %d calibration inputs available (asked for %d)", count, n)
    info = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir), "task": task,
            "n_inputs": count, "max_length": max_length, "source": source, "seed": seed,
            "inputs": str(inputs) if isinstance(inputs, (str, Path)) else "<python>"}
    stats = collect_stats(model, batches, layers=layers, device=device, progress=progress,
                          total=(count + batch_size - 1) // batch_size, info=info)
    stats.save(out_dir, overwrite=overwrite, inputs=[model_dir, *in_paths])
    return stats


# ------------------------------------------------------------------------------ the essential subspace
def essential_subspace(dw: torch.Tensor, gram: torch.Tensor, count: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` principal directions ``E [d_out, rank]`` and eigenvalues ``λ [rank]`` (descending)
    of the uncentred feature-shift covariance ``ΔW G ΔWᵀ / (n − 1)`` (float64).

    ``d_out <= d_in``: eigh of the d_out x d_out matrix.  Otherwise: with ``M = ΔW G^½``,
    eigh of ``MᵀM`` (d_in x d_in) and ``E = M V / √λ`` — the same nonzero spectrum.
    Directions beyond the rank of ``ΔO`` come back as zero columns with λ = 0.
    """
    dw = dw.double()
    gram = gram.to(dw.device, torch.float64)  # statistics live on the CPU; the math where the weights are
    d_out, d_in = dw.shape
    rank = min(rank, d_out)
    denom = max(count - 1, 1)
    if d_out <= d_in:
        cov = dw @ gram @ dw.T
        lam, vec = torch.linalg.eigh((cov + cov.T) / 2)
        lam, vec = lam.flip(0)[:rank].clamp(min=0), vec.flip(1)[:, :rank]
        return vec, lam / denom
    w, q = torch.linalg.eigh((gram + gram.T) / 2)
    g_half = (q * w.clamp(min=0).sqrt()) @ q.T
    m = dw @ g_half
    lam, v = torch.linalg.eigh(m.T @ m)
    lam, v = lam.flip(0).clamp(min=0), v.flip(1)
    k = min(rank, d_in)
    lam, v = lam[:k], v[:, :k]
    tol = lam.max().clamp(min=1e-300) * (max(d_out, d_in) * torch.finfo(torch.float64).eps)
    ok = lam > tol
    e = torch.zeros(d_out, k, dtype=torch.float64, device=dw.device)
    e[:, ok] = (m @ v[:, ok]) / lam[ok].sqrt()
    lam = torch.where(ok, lam, torch.zeros_like(lam))
    if k < rank:  # rank(ΔO) <= d_in < requested rank: pad with zero directions
        e = torch.cat([e, e.new_zeros(d_out, rank - k)], 1)
        lam = torch.cat([lam, lam.new_zeros(rank - k)])
    return e, lam / denom
