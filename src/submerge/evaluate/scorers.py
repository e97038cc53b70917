"""Validation scorers of ``submerge tune``: how good a merged model is on one task.

A scorer turns a model (the task's architecture with the merged tensors loaded) into one number,
higher is better, plus details for the report:

* ``classification`` — accuracy on a JSONL file of ``{text, label}`` lines, each task scored with
  its *own* head taken from its expert, as the benchmark does: a transformers
  ``AutoModelForSequenceClassification`` expert brings its classifier (the tensors outside the
  model's ``base_model_prefix``); an expert folder holding ``submerge_head.safetensors`` (written by
  ``submerge bench-export``) brings a frozen sentence-embedding head (mean-pooled, L2-normalised
  embeddings · head rows).
* ``lm_loss`` — mean token negative log-likelihood of a causal LM (``AutoModelForCausalLM``) on a
  ``.txt`` (one text per line) or ``.jsonl`` file.  Its score is ``exp(-NLL)`` (1 / perplexity), so a
  task's normalised score is the expert's perplexity over the merge's.
* ``python: module:function`` — any scorer: ``function(model, task) -> float`` (higher is better),
  where ``model`` is the task's expert architecture (``model_class``, default ``AutoModel``) holding
  the merged tensors and ``task`` a :class:`TaskData` (name, data path, options, the candidate being
  scored, the expert folder, its tokenizer).

Scorers never see test data: ``tune`` is a validation tool.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from dataclasses import field as dc_field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from submerge.errors import ConfigError, quoted

HEAD_FILE = "submerge_head.safetensors"


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> Iterator[list[int]]:
    """Indices in order of token count, cut into batches of at most ``batch_size`` items and ``max_tokens``
    padded tokens: padding stays small (a batch padded to its longest text costs that length per item)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    s = 0
    while s < len(order):
        e = s + 1
        while e < len(order) and e - s < batch_size and (e - s + 1) * lengths[order[e]] <= max_tokens:
            e += 1
        yield order[s:e]
        s = e


def mean_pooled(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers: mean over the attention mask, L2-normalised."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def import_callable(spec: str, what: str = "python scorer", args: Sequence[str] = ("model", "task")) -> Callable:
    """``module:function`` (or ``path/to/file.py:function``, a path relative to the current folder: give it
    resolved) as a callable that can be called with ``args``, with a one-line error.  A file is read through
    the same checks as every input (a regular file; recorded as an input of the run)."""
    import inspect

    mod_name, _, fn_name = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not mod_name or not fn_name.isidentifier():
        raise ConfigError(f"{what} {spec!r}: write it as module:function (or path/to/file.py:function)")
    try:
        if mod_name.endswith(".py"):
            from submerge.io.files import checked_file

            p = Path(mod_name).expanduser()
            if not p.is_file():
                raise ConfigError(f"{what} {spec!r}: file {p} does not exist")
            checked_file(p, None, what)
            s = importlib.util.spec_from_file_location(f"submerge_user_{p.stem}", p)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
            origin = getattr(module, "__file__", None)
            if origin:
                from submerge.io.ledger import record

                record(origin)
    except ConfigError:
        raise
    except Exception as e:  # an ImportError, a CheckpointError, or the module raising while it imports
        raise ConfigError(f"{what} {spec!r}: cannot import {mod_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r}: {mod_name} has no function {fn_name!r}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {spec!r}: cannot read the signature of {fn_name}; wrap it in a Python "
                          f"function {fn_name}({', '.join(args)})") from None
    try:
        sig.bind(*args)
    except TypeError:
        raise ConfigError(f"{what} {spec!r}: {fn_name}{sig} cannot be called as {fn_name}({', '.join(args)})") \
            from None
    return fn


def read_jsonl(path: Path, fields: Sequence[str]) -> list[dict]:
    """The rows of a JSONL file, each checked to hold ``fields`` (one line naming the first bad row)."""
    from submerge.io.files import jsonl_values, read_user_text

    if not path.is_file():
        raise ConfigError(f"eval data {path} does not exist")
    rows = []
    for n, row in jsonl_values(read_user_text(path, "eval data"), path):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: expected a JSON object with field(s) {list(fields)}")
        for f in fields:
            if f not in row:
                raise ConfigError(f"{path}:{n}: no field {f!r} (fields: {sorted(row)[:8]}); "
                                  f"name the right one in the eval block")
        rows.append(row)
    if not rows:
        raise ConfigError(f"eval data {path} is empty")
    return rows


@dataclass
class TaskData:
    """What a scorer knows about its task (and what a ``python:`` scorer receives)."""

    name: str
    data: Path
    expert: Path
    scorer: str
    field: str = "text"
    label_field: str = "label"
    max_length: int = 128
    batch_size: int = 32
    n: Optional[int] = None
    model_class: str = "AutoModel"
    options: dict = dc_field(default_factory=dict)
    candidate: str = ""  # the candidate being scored (set by the sweep before each call)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        from submerge.io.pretrained import load_pretrained

        tok = load_pretrained(AutoTokenizer, self.expert, quiet=True)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        return tok

    def texts(self) -> list[str]:
        """The task's validation texts (.txt: one per line; .jsonl: ``field``), the first ``n``."""
        if self.data.suffix.lower() == ".jsonl":
            rows = read_jsonl(self.data, [self.field])
            bad = next((i for i, r in enumerate(rows) if not isinstance(r[self.field], str)), None)
            if bad is not None:
                raise ConfigError(f"{self.data}: field {self.field!r} of row {bad + 1} is not a string")
            out = [r[self.field] for r in rows]
        else:
            from submerge.stats.inputs import read_inputs

            out = read_inputs(self.data, self.field)
            if isinstance(out, dict):
                raise ConfigError(f"eval data {self.data}: give texts (.txt or .jsonl), not tensors")
        return out[: self.n] if self.n else out


class Scorer(ABC):
    """One task's scorer: ``model_class`` to build, ``own_tensors`` (the expert's tensors that replace the
    merged ones for this task, e.g. its classifier), ``score(model) -> (value, details)``."""

    model_class = "AutoModel"

    def __init__(self, task: TaskData):
        self.task = task

    def check(self) -> None:
        """Cheap checks before any model is loaded (data file and fields)."""

    def own_tensors(self, model: torch.nn.Module, expert_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    @abstractmethod
    def score(self, model: torch.nn.Module) -> tuple[float, dict]:
        """The task's score of ``model`` (higher is better) and details for the report."""


class ClassificationScorer(Scorer):
    """Accuracy with the task's own head (its classifier, or the benchmark's frozen embedding head)."""

    def __init__(self, task: TaskData):
        super().__init__(task)
        self.head_file = task.expert / HEAD_FILE
        self.embedding_head = self.head_file.is_file()
        self.model_class = "AutoModel" if self.embedding_head else "AutoModelForSequenceClassification"

    @cached_property
    def rows(self) -> tuple[list[str], list[Any]]:
        """The texts and raw labels of the data file (read once)."""
        t = self.task
        rows = read_jsonl(t.data, [t.field, t.label_field])
        if t.n:
            rows = rows[: t.n]
        bad = next((i for i, r in enumerate(rows) if not isinstance(r[t.field], str)), None)
        if bad is not None:
            raise ConfigError(f"{t.data}: field {t.field!r} of row {bad + 1} is not a string")
        return [r[t.field] for r in rows], [r[t.label_field] for r in rows]

    def check(self) -> None:
        self.labels  # the data file, its fields, and every label a class of the expert: before any model is loaded

    @cached_property
    def labels(self) -> list[int]:
        """Each row's class index (a label is a class index or one of the class names of the expert)."""
        _, raw = self.rows
        if self.embedding_head:
            names = json.loads(self.head_metadata.get("labels", "[]"))
            n = int(self.head.shape[0])
        else:
            from transformers import AutoConfig

            from submerge.io.pretrained import load_pretrained

            cfg = load_pretrained(AutoConfig, self.task.expert, quiet=True)
            n = int(cfg.num_labels)
            names = [cfg.id2label[i] for i in range(n)] if getattr(cfg, "id2label", None) else []
        index = {str(x): i for i, x in enumerate(names)}
        labels = []
        for i, y in enumerate(raw):
            if isinstance(y, str) and y in index:
                labels.append(index[y])
            elif type(y) is int and 0 <= y < n:
                labels.append(y)
            else:
                raise ConfigError(f"{self.task.data}: label {quoted(y)} of row {i + 1} is not a class of the expert "
                                  f"{self.task.expert} (an integer in 0..{n - 1} or one of {names[:8]})")
        return labels

    @cached_property
    def data(self) -> tuple[list[str], torch.Tensor, list[int]]:
        """Texts, label indices and token counts."""
        texts, _ = self.rows
        t = self.task
        lengths = [len(x) for x in t.tokenizer(texts, truncation=True, max_length=t.max_length)["input_ids"]]
        return texts, torch.tensor(self.labels), lengths

    @cached_property
    def head(self) -> torch.Tensor:
        from safetensors.torch import load_file

        from submerge.io.files import checked_file

        checked_file(self.head_file, self.task.expert, f"task {self.task.name}")
        return load_file(str(self.head_file))["weight"].float()

    @cached_property
    def head_metadata(self) -> dict:
        """The embedding head file's metadata (class names, the logit scale it was trained at)."""
        from safetensors import safe_open

        from submerge.io.files import checked_file

        checked_file(self.head_file, self.task.expert, f"task {self.task.name}")
        with safe_open(str(self.head_file), "pt") as f:
            return dict(f.metadata() or {})

    @cached_property
    def logit_scale(self) -> float:
        """An embedding head's softmax temperature (its file's ``logit_scale``, the scale it was trained at;
        1 when absent); a classifier's logits are used as they are."""
        if not self.embedding_head:
            return 1.0
        raw = self.head_metadata.get("logit_scale")
        try:
            return float(raw) if raw is not None else 1.0
        except ValueError:
            raise ConfigError(f"{self.head_file}: logit_scale {raw!r} is not a number") from None

    def task_logits(self, forward: Callable[..., Any], batch: dict) -> torch.Tensor:
        """The task's logits ``[n, C]`` of one tokenized batch, ``forward`` being the model (or a functional
        call of it): an embedding head's are ``logit_scale`` x cosine similarities."""
        if self.embedding_head:
            return self.logit_scale * mean_pooled(forward, batch) @ self.head.T
        return forward(**batch).logits

    def unlabeled_batches(self, batch_size: int) -> list[dict]:
        """The task's texts, tokenized in length-sorted batches of ``batch_size`` (labels unused)."""
        return [batch for _, batch in self._tokenized(batch_size)]

    def own_tensors(self, model, expert_state):
        if self.embedding_head:
            return {}
        prefix = getattr(model, "base_model_prefix", "") + "."
        return {k: v for k, v in expert_state.items() if not k.startswith(prefix)}

    def _tokenized(self, batch_size: int) -> list[tuple[list[int], dict]]:
        """The task's texts in length-sorted batches of at most ``batch_size``: (indices, tokenized batch)."""
        texts, _, lengths = self.data
        t = self.task
        return [(idx, dict(t.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=t.max_length, return_tensors="pt")))
                for idx in length_sorted_batches(lengths, batch_size, t.options.get("max_tokens", 2048))]

    @cached_property
    def batches(self) -> list[tuple[list[int], dict]]:
        """The tokenized batches (every candidate scores the same texts: tokenized once)."""
        return self._tokenized(self.task.batch_size)

    @torch.no_grad()
    def logits(self, model) -> torch.Tensor:
        """``[N, C]`` float logits of every example, in data order (an embedding head's are cosine similarities,
        unscaled)."""
        texts, _, _ = self.data
        out = None
        for idx, batch in self.batches:
            if self.embedding_head:
                z = mean_pooled(model, batch) @ self.head.T
            else:
                z = model(**batch).logits
            if out is None:
                out = torch.empty(len(texts), z.shape[-1])
            out[idx] = z.float()
        return out

    def score(self, model):
        _, labels, _ = self.data
        correct = (self.logits(model).argmax(-1) == labels).double()
        return float(correct.mean()), {"accuracy": float(correct.mean()), "n": len(labels)}


class LMLossScorer(Scorer):
    """Mean token NLL of a causal LM; score = exp(-NLL)."""

    model_class = "AutoModelForCausalLM"

    def check(self) -> None:
        self.task.texts()

    @cached_property
    def batches(self) -> list[dict]:
        t = self.task
        texts = t.texts()
        tok = t.tokenizer
        lengths = [len(x) for x in tok(texts, truncation=True, max_length=t.max_length)["input_ids"]]
        out = []
        for idx in length_sorted_batches(lengths, t.batch_size, t.options.get("max_tokens", 8192)):
            out.append(dict(tok([texts[i] for i in idx], padding=True, truncation=True, max_length=t.max_length,
                                return_tensors="pt")))
        return out

    @torch.no_grad()
    def nll(self, model) -> tuple[float, int]:
        """Mean next-token negative log-likelihood over the data, and the number of tokens scored."""
        total, count = 0.0, 0
        for batch in self.batches:
            logits = model(**batch).logits[:, :-1].float()
            target = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            total += float(nll[mask].double().sum())
            count += int(mask.sum())
        if count == 0:
            raise ConfigError(f"eval data {self.task.data}: no text has two tokens or more")
        return total / count, count

    def score(self, model):
        nll, count = self.nll(model)
        return math.exp(-nll), {"nll": nll, "perplexity": math.exp(nll), "tokens": count}


class PythonScorer(Scorer):
    """A user function ``fn(model, task) -> float`` (higher is better)."""

    def __init__(self, task: TaskData, spec: str):
        super().__init__(task)
        self.spec = spec
        self.model_class = task.model_class
        self.fn = import_callable(spec)

    def check(self) -> None:
        if not self.task.data.exists():
            raise ConfigError(f"eval data {self.task.data} does not exist")

    def score(self, model):
        value = self.fn(model, self.task)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{self.spec} returned {value!r}; a scorer returns a finite number (higher is better)")
        return float(value), {}
