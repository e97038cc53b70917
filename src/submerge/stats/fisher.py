"""Diagonal Fisher / Laplace precision of each expert: the posterior that posterior merging needs.

``F = E_x E_y [ (∇θ log p(y | x, θ))² ]`` per parameter, averaged over the inputs.  ``kind="true"``
takes ``y`` from the model's own predictive distribution (exact expectation over the classes:
one backward pass per class), ``kind="sampled"`` draws one ``y`` from it per input (an unbiased
estimate of the true Fisher at one backward pass, for many classes), ``kind="empirical"`` uses the
given label.  Per-example gradients
(a backward pass per example, as Matena & Raffel's Fisher merging does): a few hundred inputs
cost seconds on a small encoder.

Saved as ``fisher.safetensors`` (one tensor per parameter, the model's names) + ``fisher.json``
(format, model fingerprint, task, kind, number of examples) in a folder of its own, the same
conventions as ``submerge calibrate``; the methods ``fisher`` and ``posterior`` read it through the
config's ``calibration:`` entry (or ``stats=`` in the Python API), one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from submerge.errors import ConfigError
from submerge.io.ledger import one_run
from submerge.io.pretrained import load_pretrained
from submerge.stats.folder import model_fingerprint, open_folder, save_folder
from submerge.stats.inputs import check_model_run, effective_max_length, read_inputs

FORMAT = "submerge-fisher/1"
FISHER_FILE = "fisher.safetensors"
MANIFEST_FILE = "fisher.json"
KINDS = ("true", "sampled", "empirical")


class FisherStats:
    """Diagonal Fisher of one model: ``tensors[name]`` (float32, the parameter's shape), ``info``."""

    kind = "fisher"

    def __init__(self, tensors: dict[str, torch.Tensor], info: Optional[dict] = None):
        self.tensors = tensors
        self.info = dict(info or {})

    def names(self) -> list[str]:
        return list(self.tensors)

    def _get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def _shape(self, key: str) -> list[int]:
        return list(self.tensors[key].shape)

    def _key(self, name: str) -> Optional[str]:
        """The stored name of tensor ``name``: itself, or the unique one that is a dotted suffix of it
        (or it of them) — Fishers of a bare encoder match a checkpoint with a task head's prefix."""
        names = self.names()
        if name in names:
            return name
        hits = [k for k in names if k.endswith("." + name) or name.endswith("." + k)]
        return hits[0] if len(hits) == 1 else None

    def lookup(self, name: str) -> Optional[torch.Tensor]:
        key = self._key(name)
        return self._get(key) if key is not None else None

    def meta_for(self, name: str) -> Optional[dict]:
        key = self._key(name)
        return {"shape": self._shape(key)} if key is not None else None

    def save(self, path: Union[str, Path], overwrite: bool = False, inputs: Sequence[Any] = ()) -> Path:
        """Write ``fisher.safetensors`` + ``fisher.json`` into folder ``path`` (atomically; ``inputs``:
        paths this folder must not replace or contain, see :func:`submerge.io.atomic_folder`)."""
        return save_folder(path, self.tensors, FISHER_FILE, MANIFEST_FILE, {"format": FORMAT, **self.info}, "Fisher",
                           overwrite, inputs)


class FisherReader(FisherStats):
    """A saved Fisher folder, read one tensor at a time."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        manifest, self._file = open_folder(self.path, FISHER_FILE, MANIFEST_FILE, FORMAT, "Fisher", "submerge fisher")
        self._shapes = {k: list(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
        super().__init__({}, {k: v for k, v in manifest.items() if k != "format"})

    def names(self) -> list[str]:
        return list(self._shapes)

    def _get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def _shape(self, key: str) -> list[int]:
        return self._shapes[key]


def is_fisher_folder(path: Union[str, Path]) -> bool:
    return (Path(path) / MANIFEST_FILE).exists()


def fisher_diagonal(
    model: nn.Module,
    examples: Iterable[Any],
    log_probs: Callable[[nn.Module, Any], torch.Tensor],
    *,
    kind: str = "true",
    labels: Optional[Sequence[int]] = None,
    params: Optional[Sequence[str]] = None,
    progress: bool = True,
    total: Optional[int] = None,
    info: Optional[dict] = None,
    seed: int = 0,
) -> FisherStats:
    """Diagonal Fisher of ``model`` over ``examples`` (each one input, batch of 1).

    ``log_probs(model, example)`` returns the log-probabilities of the classes (``[C]`` or ``[1, C]``).
    ``kind="true"``: ``Σ_c p_c (∇ log p_c)²`` (no labels needed); ``"sampled"``: ``(∇ log p_y)²`` with
    ``y ~ p`` (seeded); ``"empirical"``: ``(∇ log p_y)²`` with ``labels``.  ``params``: names of the parameters to estimate (default: all that require grad,
    or all floating parameters if none do).  The model's requires_grad flags are restored after."""
    if kind not in KINDS:
        raise ConfigError(f"Fisher kind {kind!r}: use one of {list(KINDS)}")
    if kind == "empirical" and labels is None:
        raise ConfigError("the empirical Fisher needs labels (or use kind='true', which needs none)")
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad and p.is_floating_point()]
        params = chosen or [n for n, p in named.items() if p.is_floating_point()]
    unknown = [n for n in params if n not in named]
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown[:3]} for the Fisher of {type(model).__name__}")
    flags = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in params)
    targets = [named[n] for n in params]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in targets]
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n_ex = 0
    lookups = _row_sparse_lookups(model, targets)
    try:
        for i, ex in enumerate(tqdm(examples, total=total, disable=not progress, desc="fisher")):
            lp = log_probs(model, ex).reshape(-1)
            if kind == "empirical":
                outs, weights = [lp[_label_at(labels, i, lp.numel())]], [1.0]
            elif kind == "sampled":
                y = int(torch.multinomial(lp.detach().float().exp().cpu(), 1, generator=gen))
                outs, weights = [lp[y]], [1.0]
            else:
                p = lp.detach().exp()
                outs, weights = [lp[c] for c in range(lp.numel())], p.tolist()
            for j, (o, w) in enumerate(zip(outs, weights)):
                if w == 0.0:
                    continue
                grads = torch.autograd.grad(o, targets, retain_graph=j < len(outs) - 1, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is None:
                        continue
                    if g.is_sparse:
                        _add_rows_squared(a, g, w)
                    else:
                        a.addcmul_(g.float(), g.float(), value=w)
            n_ex += 1
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
        for module in lookups:
            module.sparse = False
        model.train(was_training)
    if n_ex == 0:
        raise ConfigError("no examples given for the Fisher")
    tensors = {n: a.div_(n_ex) for n, a in zip(params, acc)}
    return FisherStats(tensors, {"kind": kind, "n_examples": n_ex, **({"seed": seed} if kind == "sampled" else {}),
                                 **(info or {})})


def _row_sparse_lookups(model: nn.Module, targets: Sequence[torch.Tensor]) -> list[nn.Embedding]:
    """Switch the embedding tables among ``targets`` to sparse gradients for the duration of the Fisher (the
    caller switches them back).  One input touches a few rows of a table; its dense gradient (a 30k x 384 table
    zeroed, filled and squared per example) was a third of a BERT Fisher's time.  A table also used elsewhere
    (tied to an output layer) gets a dense gradient from autograd all the same and takes the dense path."""
    ids = {id(t) for t in targets}
    out = []
    for module in model.modules():
        if (isinstance(module, nn.Embedding) and id(module.weight) in ids and not module.sparse
                and not module.scale_grad_by_freq and module.max_norm is None):
            module.sparse = True
            out.append(module)
    return out


def _add_rows_squared(acc: torch.Tensor, g: torch.Tensor, w: float) -> None:
    """``acc += w · g²`` for a row-sparse (uncoalesced) embedding gradient, touching only its rows: the rows'
    gradients summed in the order of the lookups, as the dense embedding backward adds them (bit for bit the
    dense ``addcmul``; the other rows would add 0)."""
    rows, inverse = torch.unique(g._indices()[0], return_inverse=True)
    values = g._values().float()
    summed = values.new_zeros((rows.numel(),) + tuple(values.shape[1:])).index_add_(0, inverse, values)
    acc[rows] = acc[rows].addcmul_(summed, summed, value=w)


def _label_at(labels: Sequence[Any], i: int, n_classes: int) -> int:
    """Example ``i``'s label as a class index in [0, n_classes): never a negative (wrapping) index or a
    truncated float."""
    import operator

    if i >= len(labels):
        raise ConfigError(f"the empirical Fisher got {len(labels)} labels for more examples")
    y = labels[i]
    try:
        y = operator.index(y.item() if isinstance(y, torch.Tensor) and y.numel() == 1 else y)
    except TypeError:
        raise ConfigError(f"label {y!r} of example {i} is not an integer class index") from None
    if isinstance(labels[i], bool) or not 0 <= y < n_classes:
        raise ConfigError(f"label {labels[i]!r} of example {i} is not a class index in 0..{n_classes - 1}")
    return y


def _read_labelled(path: Path, field_name: Optional[str], label_field: Optional[str]) -> tuple[list[str], Optional[list]]:
    if label_field is None:
        data = read_inputs(path, field_name)
        if isinstance(data, dict):
            raise ConfigError(f"{path}: `submerge fisher` needs texts (.txt/.jsonl/.json), not tensors")
        return list(data), None
    if path.suffix.lower() != ".jsonl":
        raise ConfigError(f"--label-field needs a .jsonl file with a text and a label per line, got {path}")
    from submerge.io.files import jsonl_values, read_user_text

    texts, labels = [], []
    key = field_name or "text"
    for n, row in jsonl_values(read_user_text(path), path):
        if not isinstance(row, dict) or not isinstance(row.get(key), str) or label_field not in row:
            raise ConfigError(f"{path}:{n}: needs a string field {key!r} and a field {label_field!r}")
        texts.append(row[key])
        labels.append(row[label_field])
    return texts, labels


def _class_index(label: Any, config: Any, source: Path, i: int) -> int:
    """A label as a class index: an integer in [0, num_labels) or a name in the model's label2id."""
    n = int(getattr(config, "num_labels", 0) or 0)
    l2i = {str(k): v for k, v in (getattr(config, "label2id", None) or {}).items()}
    if isinstance(label, str) and label in l2i:
        return int(l2i[label])
    if type(label) is int and 0 <= label < n:
        return label
    raise ConfigError(f"{source}: label {label!r} of input {i + 1} is not a class of the model: use an integer "
                      f"in 0..{n - 1} or one of its label names {sorted(l2i)[:8]}")


@one_run
def fisher_model_dir(
    model_dir: Union[str, Path],
    inputs: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    n: int = 256,
    kind: str = "true",
    label_field: Optional[str] = None,
    field_name: Optional[str] = None,
    max_length: int = 128,
    seed: int = 0,
    task: Optional[str] = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> FisherStats:
    """``submerge fisher``: the diagonal Fisher of a local sequence-classification model on ``n`` inputs.

    ``kind="true"`` needs no labels; ``"empirical"`` reads ``label_field`` (a class index or a name in the
    model's ``label2id``) from a JSONL file.  For other models call :func:`fisher_diagonal` with your own
    ``log_probs``."""
    import os
    import random
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model_dir, inputs = Path(model_dir), Path(inputs)
    if kind not in KINDS:
        raise ConfigError(f"Fisher kind {kind!r}: use one of {list(KINDS)}")
    if kind == "empirical" and label_field is None:
        raise ConfigError("--kind empirical needs --label-field (the true Fisher needs no labels)")
    check_model_run(model_dir, out_dir, [inputs], overwrite, device, "Fisher folder", n=n, max_length=max_length)
    cfg = load_pretrained(AutoConfig, model_dir, quiet=not progress)
    archs = getattr(cfg, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"{model_dir} is a {archs or 'model without architectures'}; `submerge fisher` handles "
                          f"*ForSequenceClassification models (use submerge.stats.fisher.fisher_diagonal for others)")
    texts, labels = _read_labelled(inputs, field_name, label_field)
    if not texts:
        raise ConfigError(f"no inputs in {inputs}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    order = order[:n]
    if labels is not None:  # checked against the config before any weight is loaded
        labels = [_class_index(labels[i], cfg, inputs, i) for i in order]
    model = load_pretrained(AutoModelForSequenceClassification, model_dir, quiet=not progress).to(device)
    tok = load_pretrained(AutoTokenizer, model_dir, quiet=not progress)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    max_length = effective_max_length(max_length, cfg)
    examples = [{k: v.to(device) for k, v in tok(texts[i], truncation=True, max_length=max_length,
                                                   return_tensors="pt").items()} for i in order]
    t0 = time.perf_counter()
    stats = fisher_diagonal(model, examples, lambda m, ex: torch.log_softmax(m(**ex).logits.float(), -1),
                            kind=kind, labels=labels, params=[k for k, p in model.named_parameters()],
                            progress=progress, total=len(examples),
                            info={"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
                                  "task": task, "inputs": str(inputs), "seed": seed, "max_length": max_length})
    stats.info["seconds"] = round(time.perf_counter() - t0, 2)
    stats.save(out_dir, overwrite=overwrite, inputs=[model_dir, inputs])
    return stats
