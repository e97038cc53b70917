"""Merging vocabularies: the output tokenizer and the embedding/LM-head rows of every input re-indexed to it.

mergekit's ``tokenizer:`` block (and ``tokenizer_source``), with the same rules:

* ``source: base`` — the base model's vocabulary; ``source: <model>`` — that input's; ``source: union`` — the
  base's vocabulary, then every other token of the inputs (within each input's ``vocab_size``) appended: plain
  tokens first (ours in id order; mergekit's order of a hash map), then added tokens with their settings (the
  first input that adds a token decides them).  ``tokens:`` names tokens to add, and where their rows come from.
* Each input's token-indexed tensors (input and output embeddings, found from the architecture) are re-indexed to
  the output vocabulary before merging.  A token that some inputs lack gets, in those inputs, a default row:
  the configured source (``source: <model>``, ``{kind: zero}``, ``{kind: model_token, model, token|token_id}``);
  otherwise the base's row when the base is among the inputs and has the token; otherwise the mean of the rows of
  the inputs that have it (its only owner's row when one has it; zero when none).  ``force: true`` gives every
  input the configured row.  ``pad_to_multiple_of`` rounds the row count up; pad rows are each input's mean row.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from submerge.engine.config import TokenSetting, TokenSource, token_source_model
from submerge.errors import CheckpointError, ConfigError, suggest

log = logging.getLogger(__name__)

# Chat templates by name (our own wording of the widely used formats).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


def load_tokenizer(path: Path, label: str, required: bool):
    """The fast tokenizer of a model folder (None when it has none and ``required`` is false)."""
    import transformers

    from submerge.io.files import TOKENIZER_FILES

    if not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        if required:
            raise CheckpointError(f"model '{label}' ({path}) has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                                  f"...): the merged vocabulary starts from this model's tokenizer")
        return None
    from submerge.io.files import checked_folder

    checked_folder(Path(path), f"model '{label}'")  # containment: transformers opens the files by itself
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # transformers raises many kinds for a missing/broken tokenizer
        if required:
            raise CheckpointError(f"cannot load the tokenizer of model '{label}' ({path}): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return None


def resolve_chat_template(value: Optional[str], tokenizers: dict[str, Any]) -> Optional[str]:
    """A chat template from the config value: a name, ``auto`` (the most common among the inputs) or a
    template string (at least 20 characters with a ``{``)."""
    if not value:
        return None
    if value == "auto":
        found = []
        for tok in tokenizers.values():
            t = getattr(tok, "chat_template", None) if tok is not None else None
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        if not found:
            return None
        return max(dict.fromkeys(found), key=found.count)  # first of the most common
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"chat_template: {value!r} is neither a known name ({', '.join(CHAT_TEMPLATES)}, auto)"
                          f"{suggest(value, CHAT_TEMPLATES)} nor a Jinja template")
    return value


def vocabulary_tensors(config: Optional[dict], names: list[str]) -> dict[str, int]:
    """The token-indexed tensors of a checkpoint (name -> vocabulary axis): the weights and biases of the
    architecture's input and output embeddings, found by building it on the meta device; without a
    buildable architecture, the 2-D embedding/LM-head tensors by name."""
    found: dict[str, int] = {}
    if config and config.get("architectures"):
        try:
            import transformers

            cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items()
                                                       if k not in ("transformers_version",)})
            cls = getattr(transformers, config["architectures"][0])
            with torch.device("meta"):
                model = cls(cfg)
            ids = {}
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                for attr in ("weight", "bias"):
                    p = getattr(module, attr, None) if module is not None else None
                    if isinstance(p, torch.nn.Parameter):
                        ids[id(p)] = 0
            for name, p in model.named_parameters(remove_duplicate=False):
                if id(p) in ids and name in names:
                    found[name] = 0
            if found:
                return found
        except Exception as e:  # an architecture transformers does not know: fall back to names
            log.debug("vocabulary tensors from names (%s)", e)
    hints = ("embed_tokens.", "word_embeddings.", "wte.", "lm_head.", "embed_out.", "output.weight")
    return {n: 0 for n in names if any(h in n for h in hints) and "position" not in n and ".layers." not in n}


@dataclass
class VocabPlan:
    """The output vocabulary and, per input model, the original row of every output token (-1: missing)."""

    tokenizer: Any
    vocab: dict[str, int]
    size: int  # rows of the output tensors (len(vocab) padded)
    index: dict[str, torch.Tensor]  # model key -> LongTensor[len(vocab)]
    original: dict[str, dict[str, int]]
    settings: dict[str, TokenSetting]
    base: Optional[str]  # the configured base_model: its row is the default where it has the token
    tensors: dict[str, int] = field(default_factory=dict)  # token-indexed tensor names -> axis
    notes: list[str] = field(default_factory=list)

    def identity_for(self, key: str, rows: int) -> bool:
        idx = self.index[key]
        return (self.size == len(self.vocab) == rows and not self.settings
                and bool(torch.equal(idx, torch.arange(len(idx)))))

    def needs_models(self) -> set[str]:
        return {m for m in map(token_source_model, self.settings.values()) if m is not None}

    # ------------------------------------------------------------------ re-indexing
    def _configured_row(self, tok: str, setting: TokenSetting, tensors: dict[str, torch.Tensor],
                        name: str) -> Optional[torch.Tensor]:
        src = setting.source
        if src is None:
            return None
        if isinstance(src, TokenSource) and src.kind == "zero":
            return torch.zeros_like(next(iter(tensors.values()))[0])
        model = src if isinstance(src, str) else src.model
        if model not in tensors:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: tensor {name} of model '{model}' is not an input of "
                              f"this merge (token sources must be merged models)")
        t = tensors[model]
        if isinstance(src, str):
            row = int(self.index[model][self.vocab[tok]])
            if row < 0:
                raise ConfigError(f"tokenizer.tokens[{tok!r}]: model '{model}' has no token {tok!r}")
        else:
            row = src.token_id if src.token_id is not None else self.original[model].get(src.token, -1)
            if row < 0:
                raise ConfigError(f"tokenizer.tokens[{tok!r}]: model '{model}' has no token {src.token!r}")
            if row >= t.shape[0]:
                raise ConfigError(f"tokenizer.tokens[{tok!r}]: token_id {row} is out of range for model "
                                  f"'{model}' ({t.shape[0]} rows in {name})")
        return t[row]

    def permute(self, tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        """Re-index each model's token-indexed tensor (vocabulary axis 0) to the output vocabulary."""
        keys = list(tensors)
        V = len(self.vocab)
        idx = torch.stack([self.index[k] for k in keys])
        rows = torch.tensor([tensors[k].shape[0] for k in keys])[:, None]
        idx = torch.where(idx < rows, idx, torch.full_like(idx, -1))
        present = idx >= 0
        forced = torch.zeros(V, dtype=torch.bool)
        configured: dict[int, torch.Tensor] = {}
        for tok, s in self.settings.items():
            tid = self.vocab[tok]
            needed = s.force or not bool(present[:, tid].all())
            if not needed:
                continue
            row = self._configured_row(tok, s, tensors, name)
            if row is not None:
                configured[tid] = row
                forced[tid] = s.force
        need = forced | ~present.all(0)
        need_ids = need.nonzero().squeeze(1)
        first = tensors[keys[0]]
        shape = first.shape[1:]
        defaults = torch.zeros((len(need_ids), *shape), dtype=first.dtype, device=first.device)
        if len(need_ids):
            pres = present[:, need_ids]
            count = pres.sum(0)
            for i, k in enumerate(keys):  # mean of the rows of the models that have each token
                sel = pres[i].nonzero().squeeze(1)
                if len(sel):
                    defaults[sel] += tensors[k].index_select(0, idx[i, need_ids[sel]].to(first.device))
            defaults /= count.clamp(min=1).to(defaults.dtype).reshape((-1,) + (1,) * len(shape))
            if self.base in tensors:
                b = keys.index(self.base)
                sel = pres[b].nonzero().squeeze(1)
                if len(sel):
                    defaults[sel] = tensors[self.base].index_select(0, idx[b, need_ids[sel]].to(first.device))
            for j, tid in enumerate(need_ids.tolist()):
                if tid in configured:
                    defaults[j] = configured[tid]
        out = {}
        for i, k in enumerate(keys):
            t = tensors[k]
            new = torch.empty((self.size, *shape), dtype=t.dtype, device=t.device)
            new[:V] = t.index_select(0, idx[i].clamp(min=0).to(t.device))
            if len(need_ids):
                use = (~present[i, need_ids]) | forced[need_ids]
                sel = use.nonzero().squeeze(1)
                new[need_ids[sel].to(t.device)] = defaults[sel]
            if self.size > V:
                new[V:] = new[:V].mean(0)
            out[k] = new
        return out


def _vocab_rows(ckpt, vocab_names: dict[str, int]) -> int:
    """How many token rows a model really has: its config's vocab_size, at most its embedding's rows."""
    rows = [ckpt.tensors[n].shape[0] for n in vocab_names if n in ckpt.tensors]
    size = (ckpt.config or {}).get("vocab_size")
    if not isinstance(size, int) or size <= 0:
        size = max(rows) if rows else None
    if rows:
        size = min(size, min(rows))
    return size


def _union(base_tok, others: list[tuple[Any, int]]):
    """The base tokenizer extended with every other input's tokens (plain tokens in id order, then added
    tokens; the first input adding a token decides its settings)."""
    import transformers

    with tempfile.TemporaryDirectory() as d:  # a private copy of the base tokenizer
        base_tok.save_pretrained(d)
        out = transformers.AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in others:
        added_here = {info.content: (i, info) for i, info in tok.added_tokens_decoder.items()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in added_here and t not in base_vocab:
                plain.setdefault(t, None)
        for t, (i, info) in sorted(added_here.items(), key=lambda kv: kv[1][0]):
            if i < size:
                added.setdefault(t, info)
    for t in plain:
        if t not in added:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocab_plan(source: str, settings: dict[str, TokenSetting], pad_to: Optional[int],
                     models: list[str], base_model: Optional[str], checkpoints: dict[str, Any],
                     vocab_names: dict[str, int], required: bool) -> Optional[VocabPlan]:
    """Build the output tokenizer and every model's row index.  ``models`` are the merged inputs (the base
    included when there is one); the tokenizer of ``base_model`` (else of the first model) is the one the
    others are added to.  Returns None when that tokenizer cannot be loaded and ``required`` is false (legacy
    ``tokenizer_source``: its files are copied as they are)."""
    base = base_model or models[0]
    toks = {}
    for k in [base] + [m for m in models if m != base]:
        ck = checkpoints[k]
        toks[k] = load_tokenizer(ck.path, k, required=required and k == base) if ck.path.is_dir() else None
    if toks[base] is None:
        if required:
            raise CheckpointError(f"model '{base}' has no tokenizer to build the output vocabulary from")
        return None
    notes = []
    for k in models:
        if toks[k] is None:
            notes.append(f"model '{k}' has no loadable tokenizer; its vocabulary is taken to be the base's")
            toks[k] = toks[base]
    sizes = {k: _vocab_rows(checkpoints[k], vocab_names) for k in models}
    for k in models:
        over = [t for t, i in toks[k].get_vocab().items() if i >= sizes[k]]
        if k == base and over and source in ("base", "union"):
            raise CheckpointError(
                f"the tokenizer of '{k}' has {len(over)} token(s) beyond its {sizes[k]} embedding rows "
                f"(e.g. {over[:3]}); resize the model's embeddings to its tokenizer first")
    if source == "base":
        out = toks[base]
    elif source == "union":
        out = _union(toks[base], [(toks[k], sizes[k]) for k in models if k != base])
    else:
        out = toks[source] if source in toks else load_tokenizer(checkpoints[source].path, source, True)
    existing = set(out.get_vocab())
    for t in settings:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    V = len(vocab)
    size = V if not pad_to or V % pad_to == 0 else (V // pad_to + 1) * pad_to
    order = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in order] != list(range(V)):
        raise CheckpointError(f"the output tokenizer's ids are not 0..{V - 1} (holes in its vocabulary)")
    index = {}
    original = {}
    for k in models:
        mv = toks[k].get_vocab()
        original[k] = mv
        index[k] = torch.tensor([mv.get(t, -1) if mv.get(t, -1) < sizes[k] else -1 for t, _ in order],
                                dtype=torch.long)
    missing_any = sum(int((index[k] < 0).sum()) for k in models)
    if missing_any:
        notes.append(f"output vocabulary of {V} tokens ({size} rows): {missing_any} (model, token) rows filled "
                     f"by the default rule")
    return VocabPlan(out, vocab, size, index, original, dict(settings), base_model, dict(vocab_names), notes)
