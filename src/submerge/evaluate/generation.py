"""Scoring a chat model by what it generates, without a generate loop.

Greedy decoding from a prompt returns exactly the gold answer (and then stops) when, at every answer position
— the end-of-turn token included — the most likely next token given the prompt and the gold prefix *is* the gold
token.  So one teacher-forced forward pass per batch decides exact match for every example at once, and the same
pass gives the gold answer's token negative log-likelihood (the ``lm_loss`` view).  Only the hidden states at
answer positions go through the output head (a 49k-word head over every prompt token would cost a fifth of the
pass).  Exact match is in token space: the gold answer's own tokenization must be the one decoding produces
(``tests/test_generation.py`` checks this against ``model.generate`` on real examples).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ContextManager, Optional, Sequence

import torch

from submerge.errors import ConfigError
from submerge.evaluate.scorers import Scorer, TaskData, length_sorted_batches, read_jsonl

MATCH_MODES = ("exact", "contains", "regex")


def _ids(out) -> list[int]:
    """apply_chat_template's token ids, whether it returned a list or a BatchEncoding."""
    if isinstance(out, (list, tuple)):
        return list(out)
    return list(out["input_ids"])


def require_chat_template(tokenizer, source: str = "the model") -> None:
    """Refuse, in one line, a tokenizer that cannot format a chat (questions are asked as chat turns)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{source}: its tokenizer has no chat template (tokenizer_config.json 'chat_template'), "
                          f"and questions are asked as chat turns: use a chat/instruct model, or add its template")


def prompt_ids(tokenizer, prompt: str, system: Optional[str] = None,
               shots: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The chat-formatted conversation up to where the assistant's answer starts (the generation prompt);
    ``shots``: (question, answer) demonstrations asked and answered first, as earlier turns."""
    require_chat_template(tokenizer)
    messages = [{"role": "system", "content": system}] if system is not None else []
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": prompt})
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def end_of_turn_id(tokenizer) -> int:
    """The token that ends the assistant's turn (the chat model's end-of-sequence for generation)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no end-of-sequence token: a generated answer has no end to score")
    return int(tokenizer.eos_token_id)


def answer_example(tokenizer, prompt: str, answer: str, system: Optional[str] = None,
                   shots: Sequence[tuple[str, str]] = ()) -> tuple[list[int], int]:
    """(token ids of prompt + answer + end of turn, where the answer starts)."""
    head = prompt_ids(tokenizer, prompt, system, shots)
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    return head + tail, len(head)


def conversation_example(tokenizer, prompt: str, answer: str, system: Optional[str] = None,
                         shots: Sequence[tuple[str, str]] = ()) -> tuple[list[int], int, list[tuple[int, int]]]:
    """:func:`answer_example` plus where every assistant answer lies — the demonstrations' too, each with its
    end of turn — as ``(start, end)`` spans: what a chat fine-tune supervises when it learns from every assistant
    turn.  A demonstration whose tokens inside the whole conversation differ from its own tokenization (a
    template that merges tokens across turns) is an error, not a silent misalignment."""
    seq, start = answer_example(tokenizer, prompt, answer, system, shots)
    eot = end_of_turn_id(tokenizer)
    spans = []
    for k, (q, a) in enumerate(shots):
        head = prompt_ids(tokenizer, q, system, shots[:k])
        tail = tokenizer(a, add_special_tokens=False)["input_ids"] + [eot]
        if seq[len(head):len(head) + len(tail)] != tail or seq[:len(head)] != head:
            raise ConfigError(f"demonstration {k + 1}'s answer {a!r} is not tokenized alone as in the whole chat: "
                              "this chat template cannot supervise every turn")
        spans.append((len(head), len(head) + len(tail)))
    return seq, start, spans + [(start, len(seq))]


@dataclass
class AnswerBatch:
    """Right-padded examples and, flattened over the batch, each answer token: the (row, column) whose output
    predicts it, the token, and which example (row) it belongs to."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor  # 1 on the tokens before each answer (what a router may look at)
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def collate(examples: Sequence[tuple], pad_id: int) -> AnswerBatch:
    """``examples``: ``(ids, start)`` from :func:`answer_example` — the answer after ``start`` is scored — or
    ``(ids, start, spans)`` from :func:`conversation_example` — every span's tokens are targets."""
    width = max(len(ex[0]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    prompt = torch.zeros((len(examples), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (seq, start, *rest) in enumerate(examples):
        if not 0 < start < len(seq):
            raise ValueError(f"example {i}: the answer must start after the prompt and hold one token or more")
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        prompt[i, :start] = 1
        for a, b in (rest[0] if rest else [(start, len(seq))]):
            if not 0 < a < b <= len(seq):
                raise ValueError(f"example {i}: answer span {(a, b)} is outside its {len(seq)} tokens")
            rows += [i] * (b - a)
            cols += range(a - 1, b - 1)
            targets += seq[a:b]
    return AnswerBatch(ids, mask, prompt, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets))


def left_padded(heads: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch (generation continues every row at the same last column):
    ``(input_ids, attention_mask)``."""
    width = max(map(len, heads))
    ids = torch.tensor([[pad] * (width - len(h)) + list(h) for h in heads])
    mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads])
    return ids, mask


MIN_SHARED_PREFIX = 16  # tokens: below this, one pass over the whole batch is as cheap


def shared_prefix(batch: AnswerBatch) -> int:
    """How many leading tokens every row of ``batch`` shares and no answer token is predicted from: a k-shot
    benchmark's system prompt and fixed demonstrations, which need to run through the decoder once, not per row."""
    ids = batch.input_ids
    differ = (ids != ids[:1]).any(0).nonzero()
    first = int(differ[0]) if len(differ) else ids.shape[1]
    return min(first, int(batch.cols.min()))


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    """The decoder's name for its key/value cache argument: ``cache`` from transformers 5.25 (which warns on the
    old name), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def answer_logits(model: torch.nn.Module, batch: AnswerBatch, share_prefix: bool = False) -> torch.Tensor:
    """The next-token logits at every answer position (``[n answer tokens, vocabulary]``, float32).  The
    decoder runs on the whole batch; only the answer positions go through the output head, unless the model
    post-processes its logits (soft-capping), when the model's own forward is used.

    ``share_prefix`` (no gradient): the tokens all rows share (:func:`shared_prefix`) run once, and the rest of
    each row attends to their cached keys and values — the same logits up to float rounding, several times
    cheaper when the rows are short questions after the same demonstrations."""
    if hasattr(model, "get_base_model"):  # a PEFT model: its adapters sit inside the wrapped model's layers
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    plain = head is not None and decoder is not None and \
        getattr(model.config, "final_logit_softcapping", None) is None and \
        getattr(model.config, "logit_scale", None) in (None, 1, 1.0)
    if plain:
        start = shared_prefix(batch) if share_prefix and batch.size > 1 and not torch.is_grad_enabled() else 0
        if start >= MIN_SHARED_PREFIX:
            from transformers import DynamicCache

            cache = {_cache_kwarg(decoder): DynamicCache()}  # transformers >= 5.25 calls it `cache`
            decoder(input_ids=batch.input_ids[:1, :start], use_cache=True, **cache)
            next(iter(cache.values())).batch_repeat_interleave(batch.size)
            hidden = decoder(input_ids=batch.input_ids[:, start:], attention_mask=batch.attention_mask,
                             use_cache=True, **cache).last_hidden_state
            return head(hidden[batch.rows, batch.cols - start]).float()
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return head(hidden[batch.rows, batch.cols]).float()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[batch.rows, batch.cols].float()


def answer_loss(model: torch.nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Mean NLL of the answer tokens (what fine-tuning on answers minimises)."""
    return torch.nn.functional.cross_entropy(answer_logits(model, batch), batch.targets)


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, batch: AnswerBatch, share_prefix: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: exact match of greedy decoding (bool), summed NLL of its answer tokens, their count."""
    logits = answer_logits(model, batch, share_prefix)
    hit = (logits.argmax(-1) == batch.targets).float()
    nll = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none").double()
    exact = torch.ones(batch.size).scatter_reduce(0, batch.rows, hit, reduce="amin")
    nll_sum = torch.zeros(batch.size, dtype=torch.float64).index_add_(0, batch.rows, nll)
    count = torch.zeros(batch.size, dtype=torch.long).index_add_(0, batch.rows, torch.ones_like(batch.rows))
    return exact.bool(), nll_sum, count


def score_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                  system: Optional[str] = None, batch_size: int = 32, max_tokens: int = 4096,
                  encoded: Optional[list[tuple[list[int], int]]] = None,
                  around: Optional[Callable[[AnswerBatch], ContextManager]] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, exact match (bool) and mean answer-token NLL, in input order; batches sorted by length.
    ``encoded``: the examples already through :func:`answer_example`; ``around(batch)``: a context each batch is
    scored in (ESM++'s routing mask; it sees every token of the batch pass, so a shared prefix is not split off)."""
    examples = encoded if encoded is not None else [answer_example(tokenizer, p, a, system)
                                                     for p, a in zip(prompts, answers)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    exact = torch.zeros(len(examples), dtype=torch.bool)
    nll = torch.zeros(len(examples), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for idx in length_sorted_batches([len(e[0]) for e in examples], batch_size, max_tokens):
            batch = collate([examples[i] for i in idx], pad)
            with around(batch) if around is not None else contextlib.nullcontext():
                e, s, c = teacher_forced(model, batch, share_prefix=around is None)
            exact[idx] = e
            nll[idx] = s / c
    finally:
        model.train(was_training)
    return exact, nll


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[str], system: Optional[str] = None,
                     max_new_tokens: int = 32, batch_size: int = 16,
                     shots: Optional[Sequence[Sequence[tuple[str, str]]]] = None) -> list[str]:
    """Greedy answers by ``model.generate`` (left-padded batches), decoded without special tokens; ``shots``: per
    prompt, its demonstrations."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            heads = [prompt_ids(tokenizer, p, system, shots[j] if shots is not None else ())
                     for j, p in enumerate(prompts[i:i + batch_size], start=i)]
            ids, mask = left_padded(heads, pad)
            width = ids.shape[1]
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end_of_turn_id(tokenizer), pad_token_id=pad)
            out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


class GenerationScorer(Scorer):
    """``scorer: generation``: a chat model answering the eval file's prompts (``.jsonl`` rows with ``field``,
    default ``prompt``, and ``label_field``, default ``answer``; an optional ``shots`` field, a list of
    ``[question, answer]`` pairs, is asked and answered first, as earlier turns of the chat).
    ``options.match``: ``exact`` (default; greedy output equals the answer, decided by one teacher-forced pass),
    ``contains`` (the answer occurs in the greedy output) or ``regex`` (the output matches ``options.pattern``,
    with ``{answer}`` standing for the escaped answer); ``options.system`` a system prompt,
    ``options.max_new_tokens`` (default 32) for the generating modes.  Score: the fraction matched; details also
    hold the answers' mean token NLL."""

    model_class = "AutoModelForCausalLM"

    def __init__(self, task: TaskData):
        super().__init__(task)
        opts = task.options
        self.match = opts.get("match", "exact")
        if self.match not in MATCH_MODES:
            raise ConfigError(f"eval task {task.name}: options.match must be one of {list(MATCH_MODES)}, "
                              f"got {self.match!r}")
        self.system = opts.get("system")
        if self.system is not None and not isinstance(self.system, str):
            raise ConfigError(f"eval task {task.name}: options.system must be a string")
        self.max_new_tokens = opts.get("max_new_tokens", 32)
        if type(self.max_new_tokens) is not int or not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"eval task {task.name}: options.max_new_tokens must be an integer in 1..4096")
        self.pattern = opts.get("pattern")
        if self.match == "regex":
            if not isinstance(self.pattern, str):
                raise ConfigError(f"eval task {task.name}: match: regex needs options.pattern (a string)")
            try:
                re.compile(self.pattern.replace("{answer}", "x"))
            except re.error as e:
                raise ConfigError(f"eval task {task.name}: options.pattern is not a regular expression ({e})") \
                    from None

    @property
    def shots(self) -> list[tuple[tuple[str, str], ...]]:
        """Per row, its demonstrations (``shots`` field; none when absent)."""
        return self._parsed[2]

    @property
    def rows(self) -> tuple[list[str], list[str]]:
        return self._parsed[0], self._parsed[1]

    @cached_property
    def _parsed(self) -> tuple[list[str], list[str], list[tuple[tuple[str, str], ...]]]:
        t = self.task
        prompt_field = t.field if t.field != "text" else "prompt"
        answer_field = t.label_field if t.label_field != "label" else "answer"
        rows = read_jsonl(t.data, [prompt_field, answer_field])
        for i, r in enumerate(rows):
            if not isinstance(r[prompt_field], str) or not isinstance(r[answer_field], str) or not r[answer_field]:
                raise ConfigError(f"{t.data}: row {i + 1}: {prompt_field!r} and {answer_field!r} must be strings "
                                  f"(a non-empty answer)")
        rows = rows[: t.n] if t.n else rows
        shots = []
        for i, r in enumerate(rows):
            pairs = r.get("shots", [])
            if not isinstance(pairs, list) or not all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
                raise ConfigError(f"{t.data}: row {i + 1}: 'shots' must be a list of [question, answer] string pairs")
            shots.append(tuple((q, a) for q, a in pairs))
        return [r[prompt_field] for r in rows], [r[answer_field] for r in rows], shots

    def check(self) -> None:
        self.rows  # noqa: B018  (read and checked now)

    @cached_property
    def encoded(self) -> list[tuple[list[int], int]]:
        prompts, answers = self.rows
        tok = self.task.tokenizer
        return [answer_example(tok, p, a, self.system, s) for p, a, s in zip(prompts, answers, self.shots)]

    def _matches(self, outputs: list[str], answers: list[str]) -> list[bool]:
        if self.match == "contains":
            return [a.strip() in o for o, a in zip(outputs, answers)]
        return [re.search(self.pattern.replace("{answer}", re.escape(a.strip())), o) is not None
                for o, a in zip(outputs, answers)]

    def score(self, model):
        prompts, answers = self.rows
        tok = self.task.tokenizer
        exact, nll = score_answers(model, tok, prompts, answers, self.system, self.task.batch_size,
                                   self.task.options.get("max_tokens", 4096), encoded=self.encoded)
        details = {"n": len(answers), "exact_match": float(exact.double().mean()), "nll": float(nll.mean()),
                   "perplexity": math.exp(float(nll.mean()))}
        if self.match == "exact":
            return details["exact_match"], details
        outputs = generate_answers(model, tok, prompts, self.system, self.max_new_tokens, self.task.batch_size,
                                   shots=self.shots)
        hits = self._matches(outputs, answers)
        details[self.match] = sum(hits) / len(hits)
        return details[self.match], details
