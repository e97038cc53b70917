"""The LLM suite on the real backbone and the real data (a smoke test, one conversion of the wheel's GGUF): the
SmolLM2 chat model answers, the teacher-forced exact match agrees with ``model.generate`` on real questions of
every candidate skill, and every skill builds its questions from what ``scripts/setup-bench.sh`` installs.
Skipped, with the command to run, where the wheel, ``gguf`` or a data package is missing."""

from __future__ import annotations

import pytest
import torch

from submerge.bench.data import BenchDataError
from submerge.bench.llm.session import LLM_CANDIDATES
from submerge.bench.llm.tasks import LLM_TASKS, fixed_demonstrations, number_in_words
from submerge.evaluate.generation import (answer_example, end_of_turn_id, generate_answers, prompt_ids,
                                          score_answers)

SETUP = "run: bash scripts/setup-bench.sh (and pip install gguf)"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    pytest.importorskip("gguf", reason=SETUP)
    from submerge.bench.llm.backbone import ChatModel

    try:
        cm = ChatModel(cache_dir=tmp_path_factory.mktemp("llm-cache"))
    except BenchDataError as e:
        pytest.skip(f"{e} ({SETUP})")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return cm


@pytest.fixture(scope="module")
def skills():
    try:
        return {name: LLM_TASKS[name].split(0, 800, 50, 150, shots=3) for name in LLM_CANDIDATES}
    except BenchDataError as e:
        pytest.skip(f"{e} ({SETUP})")


def test_every_candidate_skill_builds_disjoint_seeded_questions(skills):
    for name, sp in skills.items():
        assert len(sp.val) == 50 and len(sp.test) == 150 and len(sp.train) >= 250, name
        prompts = [{q.prompt for q in part} for part in (sp.train, sp.val, sp.test)]
        assert not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2]), name
        assert all(q.answer and q.answer.strip() == q.answer for q in sp.train + sp.val + sp.test), name
        demos = sp.test[0].shots
        assert all(q.shots == demos for q in sp.val + sp.test) and len(demos) == 3
        assert demos == fixed_demonstrations([(q.prompt, q.answer) for q in sp.train], 3)
    assert {q.answer for q in skills["sentiment"].test} == {"positive", "negative"}
    assert len({a for _, a in skills["sentiment"].test[0].shots}) == 2  # both answers demonstrated
    import datetime

    dates = LLM_TASKS["date_words"].examples()
    assert len(dates) == len({g for *_, g in dates}) == 2000
    for _, answer, iso in dates:  # the answer is the ISO date, read back
        assert datetime.datetime.strptime(answer, "%B %d, %Y").date() == datetime.date.fromisoformat(iso)
    times = {g: a for _, a, g in LLM_TASKS["time_12h"].examples()}
    assert len(times) == 1440 and [times[t] for t in ("00:00", "00:59", "11:59", "12:00", "13:05", "23:59")] == \
        ["12:00 AM", "12:59 AM", "11:59 AM", "12:00 PM", "1:05 PM", "11:59 PM"]
    words = LLM_TASKS["words_to_number"].examples()
    assert all(p == f'Write "{number_in_words(int(a))}" as a number in digits. Reply with the number only.'
               for p, a, _ in words) and len(words) == 1000
    assert [number_in_words(n) for n in (0, 15, 40, 99, 101, 570)] == [
        "zero", "fifteen", "forty", "ninety-nine", "one hundred one", "five hundred seventy"]


def test_real_chat_model_answers_and_exact_match_is_what_generate_returns(chat, skills):
    tok, model = chat.tokenizer, chat.model
    assert tok.chat_template and type(model).__name__ == "LlamaForCausalLM"
    assert "Paris" in generate_answers(model, tok, ["What is the capital of France?"], max_new_tokens=16)[0]
    eot = end_of_turn_id(tok)
    # one question per skill, as the suite asks them (after their demonstrations), each decoded greedily by
    # model.generate on its own: the one teacher-forced pass must call the gold answer exact exactly when greedy
    # decoding produced its tokens and then ended the turn, and must call the model's own ended answer exact
    qs = [q for sp in skills.values() for q in sp.val[:1]]
    gold, own, expect = [], [], []
    for q in qs:
        ids = prompt_ids(tok, q.prompt, shots=q.shots)
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=eot,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        want = tok(q.answer, add_special_tokens=False)["input_ids"] + [eot]
        gold.append(answer_example(tok, q.prompt, q.answer, shots=q.shots))
        expect.append(out[:len(want)] == want)
        if out[-1] == eot:
            own.append((ids + out, len(ids)))
    exact, nll = score_answers(model, tok, None, None, encoded=gold, batch_size=4)
    assert exact.tolist() == expect and any(expect) and torch.isfinite(nll).all()
    assert len(own) >= len(qs) // 2
    exact, _ = score_answers(model, tok, None, None, encoded=own, batch_size=4)
    assert exact.all()


def test_the_backbone_without_gguf_is_one_line(tmp_path, monkeypatch):
    """The wheel installed but the gguf package not: one BenchDataError saying what to install (the CLI's
    `error:` line), nothing left in the cache."""
    import sys

    from submerge.bench.llm.backbone import smollm_folder, smollm_gguf

    try:
        smollm_gguf()
    except BenchDataError as e:
        pytest.skip(f"{e} ({SETUP})")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(BenchDataError, match=r"pip install 'gguf"):
        smollm_folder(tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))
