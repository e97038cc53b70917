"""Generation scoring (submerge.evaluate.generation): exact match from one teacher-forced pass equals what greedy
``model.generate`` returns; the answers' NLL equals a full forward's; the ``generation`` scorer of tune."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from submerge.errors import ConfigError
from submerge.evaluate.generation import (GenerationScorer, answer_example, answer_loss, collate,
                                          conversation_example, generate_answers, prompt_ids, score_answers)
from submerge.evaluate.registry import make_scorer
from submerge.evaluate.scorers import TaskData

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = [f"w{i}" for i in range(40)]


def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["user", "assistant", "system", "\n"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the chat markers are special tokens, split out first
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def tiny_llama(seed: int = 0, vocab: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=3, pad_token_id=0, bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits: distinct argmaxes, few near-ties
        model.lm_head.weight.mul_(8)
    return model


def prompts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(1, 6, (n,), generator=g)]


def test_tokenizer_round_trip():
    tok = chat_tokenizer()
    ids, start = answer_example(tok, "w1 w2", "w3 w4")
    assert tok.decode(ids[start:]) .replace(" ", "") == "w3w4<|im_end|>"
    assert tok.convert_ids_to_tokens(ids[:2]) == ["<|im_start|>", "user"]


def answering_llama():
    """A tiny Llama trained a little to answer with the prompt's first word: on its training prompts greedy
    decoding answers and stops; on others it says something, stopping or not."""
    tok, model = chat_tokenizer(), tiny_llama()
    train = prompts(16, 5)
    batch = collate([answer_example(tok, p, p.split()[0]) for p in train], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        answer_loss(model, batch).backward()
        opt.step()
    return tok, model.eval(), train


def test_exact_match_equals_greedy_generation_and_nll_a_full_forward():
    tok, model, train = answering_llama()
    ps = train[:12] + prompts(12, 6)
    generated, ended = [], set()  # model.generate, one prompt at a time (no padding), as a user would call it
    for i, p in enumerate(ps):
        ids = torch.tensor([prompt_ids(tok, p)])
        new = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, eos_token_id=3,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
        words = new[:-1] if new[-1] == 3 else new
        if new[-1] == 3 and words and all(t >= 8 for t in words):  # stopped, after plain words only
            ended.add(i)
        generated.append(tok.decode(words))
    assert len(ended) >= 4
    assert [generated[i] for i in sorted(ended)] == [
        g for i, g in enumerate(generate_answers(model, tok, ps, max_new_tokens=3, batch_size=5)) if i in ended]
    gold = [generated[i] if i in ended else "w7 w8" for i in range(len(ps))]
    # wrong answers: another word, and the right one continued (greedy decoding stops before the extra word)
    wrong = [g if i % 3 else ("w9" if g != "w9" else "w10") for i, g in enumerate(gold)]
    wrong = [g + " w1" if i % 3 == 1 else g for i, g in enumerate(wrong)]
    for answers in (gold, wrong):
        exact, nll = score_answers(model, tok, ps, answers, batch_size=4, max_tokens=64)
        # exact <=> the answer is what greedy decoding returned, and decoding stopped right after it
        expected = [i in ended and answers[i] == generated[i] for i in range(len(ps))]
        assert exact.tolist() == expected and any(expected)
        assert answers is gold or not all(expected)  # the wrong answers give both kinds, each checked
        # NLL of the answer tokens from an ordinary full forward, example by example
        for i in range(len(ps)):
            ids, start = answer_example(tok, ps[i], answers[i])
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            want = -torch.stack([logp[t - 1, ids[t]] for t in range(start, len(ids))]).mean()
            assert nll[i].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_a_shared_prefix_runs_once_and_scores_the_same():
    """Questions after the same demonstrations: the shared tokens run through the decoder once and every row
    attends to their cache — the same exact matches, and NLLs to float rounding, as one full pass per batch; rows
    whose prefixes differ (and a routing context) take the full pass."""
    from submerge.evaluate.generation import MIN_SHARED_PREFIX, shared_prefix, teacher_forced

    tok, model, train = answering_llama()
    shots = [("w1 w2 w3 w4 w5", "w6"), ("w7 w8 w9", "w10")]
    ps = train[:10] + prompts(10, 3)
    greedy = generate_answers(model, tok, ps, max_new_tokens=3, shots=[shots] * len(ps))
    answers = [g if i % 3 and g.startswith("w") else "w7 w8" for i, g in enumerate(greedy)]
    examples = [answer_example(tok, q, a, shots=shots) for q, a in zip(ps, answers)]
    batch = collate(examples, tok.pad_token_id)
    start = shared_prefix(batch)
    common = next(k for k in range(64) if len({tuple(e[0][:k + 1]) for e in examples}) > 1)
    assert start == common >= len(prompt_ids(tok, "", shots=shots)) - 5 >= MIN_SHARED_PREFIX  # demos + "user"
    shared, full = teacher_forced(model, batch), teacher_forced(model, batch, share_prefix=False)
    assert torch.equal(shared[0], full[0]) and torch.equal(shared[2], full[2])
    torch.testing.assert_close(shared[1], full[1], rtol=1e-5, atol=1e-6)
    exact, nll = score_answers(model, tok, None, None, batch_size=8, encoded=examples)
    seen = []
    exact_routed, nll_routed = score_answers(model, tok, None, None, batch_size=8, encoded=examples,
                                             around=lambda b: seen.append(b.input_ids.shape) or contextlib.nullcontext())
    assert torch.equal(exact, exact_routed) and exact.any() and not exact.all()
    torch.testing.assert_close(nll, nll_routed, rtol=1e-5, atol=1e-6)
    assert all(w == max(len(e[0]) for e in examples) or w > start for _, w in seen)  # whole rows, not suffixes
    mixed = collate(examples[:2] + [answer_example(tok, ps[2], "w6")], tok.pad_token_id)
    assert shared_prefix(mixed) < MIN_SHARED_PREFIX


def test_answer_loss_trains_the_answer_only():
    tok, model = chat_tokenizer(), tiny_llama(1)
    batch = collate([answer_example(tok, p, "w5") for p in prompts(8, 1)], tok.pad_token_id)
    assert batch.targets.tolist() == [tok.convert_tokens_to_ids("w5"), 3] * 8  # the answer, then end of turn
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = answer_loss(model, batch).item()
    for _ in range(30):
        opt.zero_grad()
        answer_loss(model, batch).backward()
        opt.step()
    assert answer_loss(model, batch).item() < 0.1 * first
    exact, _ = score_answers(model, tok, prompts(8, 1), ["w5"] * 8)
    assert exact.all()
    assert generate_answers(model, tok, prompts(8, 1)[:2], max_new_tokens=4) == ["w5", "w5"]


def test_every_assistant_turn_can_be_supervised():
    """conversation_example marks each demonstration's answer (and its end of turn) as well as the question's:
    collated, the targets are every assistant turn's tokens, each predicted from the position before it."""
    tok = chat_tokenizer()
    shots = [("w1 w2", "w7"), ("w3", "w8 w9")]
    seq, start, spans = conversation_example(tok, "w4", "w10", shots=shots)
    assert (seq, start) == tuple(answer_example(tok, "w4", "w10", shots=shots))
    assert [tok.convert_ids_to_tokens(seq[a:b]) for a, b in spans] == \
        [["w7", "<|im_end|>"], ["w8", "w9", "<|im_end|>"], ["w10", "<|im_end|>"]]
    batch = collate([(seq, start, spans), answer_example(tok, "w5", "w6")], tok.pad_token_id)
    assert [tok.convert_ids_to_tokens(t) for t in batch.targets.tolist()] == \
        ["w7", "<|im_end|>", "w8", "w9", "<|im_end|>", "w10", "<|im_end|>", "w6", "<|im_end|>"]
    assert (batch.input_ids[batch.rows, batch.cols + 1] == batch.targets).all()
    assert batch.prompt_mask[0].sum() == start  # a router still sees the prompt up to the question's answer
    with pytest.raises(ValueError, match="outside"):
        collate([(seq, start, [(start, len(seq) + 1)])], tok.pad_token_id)


def _task(tmp_path, rows, **options):
    f = tmp_path / "val.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TaskData("t", f, tmp_path, "generation", options=options)


def test_generation_scorer_modes(tmp_path, monkeypatch):
    tok, model = chat_tokenizer(), tiny_llama(2)
    ps = prompts(6, 2)
    out = generate_answers(model, tok, ps, max_new_tokens=4)
    rows = [{"prompt": p, "answer": o.split()[0] if o.split() else "w1"} for p, o in zip(ps, out)]
    monkeypatch.setattr(TaskData, "tokenizer", tok)
    contains = make_scorer(_task(tmp_path, rows, match="contains", max_new_tokens=4))
    assert isinstance(contains, GenerationScorer)
    value, details = contains.score(model)
    assert value == pytest.approx(sum(r["answer"] in o for r, o in zip(rows, out)) / len(rows))
    assert {"exact_match", "nll", "perplexity", "contains"} <= set(details)
    regex = make_scorer(_task(tmp_path, rows, match="regex", pattern="^{answer}\\b", max_new_tokens=4))
    assert regex.score(model)[0] == pytest.approx(
        sum(o.startswith(r["answer"]) for r, o in zip(rows, out)) / len(rows))
    exact = make_scorer(_task(tmp_path, rows))
    assert exact.score(model)[0] == details["exact_match"]


@pytest.mark.parametrize("options, message", [
    ({"match": "fuzzy"}, "options.match must be one of"),
    ({"match": "regex"}, "needs options.pattern"),
    ({"match": "regex", "pattern": "("}, "not a regular expression"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"system": 3}, "options.system"),
])
def test_generation_scorer_options_are_checked(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        make_scorer(_task(tmp_path, [{"prompt": "w1", "answer": "w2"}], **options))


def test_generation_scorer_rows_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="no field 'answer'"):
        make_scorer(_task(tmp_path, [{"prompt": "w1"}])).check()
    with pytest.raises(ConfigError, match="non-empty answer"):
        make_scorer(_task(tmp_path, [{"prompt": "w1", "answer": ""}])).check()


def test_generation_scorer_asks_the_shots_first(tmp_path, monkeypatch):
    tok, model = chat_tokenizer(), tiny_llama(4)
    monkeypatch.setattr(TaskData, "tokenizer", tok)
    rows = [{"prompt": "w1 w2", "answer": "w3", "shots": [["w4", "w5"]]}, {"prompt": "w6", "answer": "w7"}]
    sc = make_scorer(_task(tmp_path, rows))
    assert sc.encoded[0] == answer_example(tok, "w1 w2", "w3", shots=[("w4", "w5")])
    assert sc.encoded[1] == answer_example(tok, "w6", "w7")
    assert tok.convert_ids_to_tokens(sc.encoded[0][0][:3]) == ["<|im_start|>", "user", "w4"]
    _, details = sc.score(model)
    exact, nll = score_answers(model, tok, None, None, encoded=sc.encoded)
    assert details["nll"] == pytest.approx(float(nll.mean()))
    with pytest.raises(ConfigError, match="'shots' must be a list"):
        make_scorer(_task(tmp_path, [{"prompt": "w1", "answer": "w2", "shots": ["w4"]}])).check()
