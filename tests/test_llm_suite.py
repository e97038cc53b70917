"""The LLM suite's machinery on a tiny chat Llama built here: skills' splits, LoRA and full experts (the LoRA one read
back through the engine's base+adapter path), and a whole `run_llm_bench` table."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from submerge.bench.llm.tasks import LLM_TASKS, GenTask, register_llm_task
from submerge.errors import ConfigError
from test_generation import WORDS, chat_tokenizer, tiny_llama


def _echo_task(name: str, k: int) -> GenTask:
    """Questions from one half of the vocabulary, answered by one word: a skill a tiny model learns in a few steps,
    and two of them (one per half) that a merge can keep apart or confuse."""
    def build():
        rows = []
        for i in range(60):
            words = [WORDS[k * 20 + (i * 7 + j * 3) % 20] for j in range(3)]
            rows.append((" ".join(words), WORDS[30 + k], f"{name}{i}"))
        return rows

    return GenTask(name, f"answer w{30 + k}", build, "generated", "-")


@pytest.fixture(scope="module")
def tiny_chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    tiny_llama(3).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    for name, k in (("echo_first", 0), ("echo_last", 1)):
        if name not in LLM_TASKS:
            register_llm_task(_echo_task(name, k))
    return folder


def test_splits_are_disjoint_seeded_and_every_question_has_a_training_demonstration():
    task = GenTask("groups", "-", lambda: [(f"q{i}", f"a{i % 5}", f"g{i // 2}") for i in range(40)])
    sp = task.split(0, 10, 6, 8, shots=2)
    assert (len(sp.train), len(sp.val), len(sp.test)) == (10, 6, 8)
    group = {f"q{i}": f"g{i // 2}" for i in range(40)}
    parts = [{group[q.prompt] for q in part} for part in (sp.train, sp.val, sp.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    train = {(q.prompt, q.answer) for q in sp.train}
    for q in sp.train + sp.val + sp.test:
        assert len(q.shots) == 2 and set(q.shots) <= train and (q.prompt, q.answer) not in q.shots
    assert task.split(0, 10, 6, 8, shots=2) == sp and task.split(1, 10, 6, 8, shots=2) != sp
    # val and test: one set of demonstrations, with different answers (a k-shot benchmark's fixed prompt);
    # training questions: each its own
    assert len({q.shots for q in sp.val + sp.test}) == 1 and len({a for _, a in sp.val[0].shots}) == 2
    assert len({q.shots for q in sp.train}) > 5
    two_way = GenTask("two", "-", lambda: [(f"q{i}", "yes" if i < 30 else "no", f"g{i}") for i in range(40)])
    for seed in range(5):
        got = two_way.split(seed, 20, 5, 5, shots=3)
        assert sorted({a for _, a in got.test[0].shots}) == ["no", "yes"] or \
            all(q.answer == "yes" for q in got.train)
    with pytest.raises(ConfigError, match="too few"):
        task.split(0, 1, 6, 8, shots=1)


def test_lora_expert_is_read_back_through_the_engine_and_learns(tiny_chat_folder, tmp_path):
    from submerge.bench.llm.backbone import ChatModel
    from submerge.bench.llm.finetune import LLMRecipe, load_expert, train_expert
    from submerge.evaluate.generation import answer_example, score_answers

    cm = ChatModel(tiny_chat_folder)
    sp = LLM_TASKS["echo_first"].split(0, 40, 10, 10)
    enc = [answer_example(cm.tokenizer, q.prompt, q.answer, shots=q.shots) for q in sp.val]
    before = score_answers(cm.model, cm.tokenizer, None, None, encoded=enc)[0].float().mean()
    state = train_expert(cm, sp.train, LLMRecipe(steps=60, lr=1e-2, batch_size=8), 0, tmp_path / "e", quiet=True)
    assert (tmp_path / "e" / "adapter_config.json").is_file()
    assert all(torch.equal(cm.model.state_dict()[k], v) for k, v in cm.pretrained.items())  # model reset
    changed = [k for k in state if not torch.equal(state[k], cm.pretrained[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA on the linear layers only
    cm.load(state)
    after = score_answers(cm.model, cm.tokenizer, None, None, encoded=enc)[0].float().mean()
    cm.reset()
    assert after > before + 0.3
    again = load_expert(cm, tmp_path / "e")  # the cached expert is the same tensors
    assert all(torch.equal(again[k], state[k]) for k in state)
    # the tensors LoRA leaves alone are the backbone's own (one copy for every expert), the others new tensors
    assert all((again[k] is cm.pretrained[k]) == (k not in changed) for k in again)


def test_run_llm_bench_writes_a_table(tiny_chat_folder, tmp_path):
    from submerge.bench.llm.finetune import LLMRecipe
    from submerge.bench.llm.run import run_llm_bench
    from submerge.bench.llm.session import LLMBenchConfig

    cfg = LLMBenchConfig(tasks=["echo_first", "echo_last"],
                         methods=["task_arithmetic", "ties", "tsv", "regmean", "fisher", "consensus_ta", "tall_masks",
                                  "esm", "esm_pp", "adamerging", "task_arithmetic+surgery"],
                         n_train=30, n_val=8, n_test=10, recipe=LLMRecipe(steps=60, lr=1e-2, batch_size=8),
                         cache_dir=str(tmp_path / "cache"), quiet=True, calib_n=4, fisher_n=4)
    res = run_llm_bench(tmp_path / "out", cfg, backbone=tiny_chat_folder)
    labels = [r["label"] for r in res["rows"]]
    assert "task_arithmetic (val-tuned)" in labels and "multitask (joint fine-tuning)" in labels
    assert all("avg_nll" in r and set(r["per_task_nll"]) == {"echo_first", "echo_last"} for r in res["rows"]
               if r["method"] != "tall_masks")  # TALL: each task's own masked model, exact match only
    assert "tall_masks (task id)" in labels and "consensus_ta (val-tuned)" in labels
    assert set(res["per_example"]["rows"]) == set(labels)
    assert (tmp_path / "out" / "results.md").is_file()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["task_info"]["echo_first"]["n_test"] == 10 and saved["finetuned"]["echo_first"] >= 0
    assert not (tmp_path / "out" / "results.partial.json").exists()  # the table as it grew, gone once complete
    # the experts' storage is their adapters as stored, not a dense copy of the backbone each
    adapters = [f for f in (tmp_path / "cache").rglob("adapter_model.safetensors")
                if not f.parent.name.endswith("-mt")]  # the multitask reference is not an expert
    assert len(adapters) == 2 and saved["experts_bytes"] == sum(f.stat().st_size for f in adapters)
    assert {f.parent.name for f in adapters} == {saved["finetune_log"][t]["key"] for t in ("echo_first", "echo_last")}
    tall = next(r for r in res["rows"] if r["method"] == "tall_masks")
    assert tall["storage"]["experts_bytes"] == saved["experts_bytes"]
    # a rerun keeps every row (cached by method) and trains nothing
    again = run_llm_bench(tmp_path / "out2", cfg, backbone=tiny_chat_folder)
    assert [r.get("kept") for r in again["rows"]] == [True] * len(again["rows"])
    assert again["per_example"] == res["per_example"]
    # elsewhere (an empty cache: experts trained again, reproducibly), --resume keeps that run's rows
    moved = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache2"), methods=["task_arithmetic", "ties"])
    resumed = run_llm_bench(tmp_path / "out4", moved, backbone=tiny_chat_folder,
                            resume=tmp_path / "out" / "results.json")
    assert {r["label"] for r in resumed["rows"] if r.get("kept")} >= {"task_arithmetic (val-tuned)", "ties (default)"}
    assert resumed["per_example"]["finetuned"] == res["per_example"]["finetuned"]
    # ... and trains no expert when that run names the same experts (their cache keys) and no row needs them
    assert not list((tmp_path / "cache2").rglob("adapter_model.safetensors"))
    assert resumed["experts_bytes"] == saved["experts_bytes"] and resumed["finetune_log"]["echo_first"]["adopted"]
    # a row that needs the experts trains them, and they must score test as the adopted run's did
    more = run_llm_bench(tmp_path / "out5", dataclasses.replace(moved, methods=["task_arithmetic", "linear"]),
                         backbone=tiny_chat_folder, resume=tmp_path / "out" / "results.json")
    assert more["per_example"]["finetuned"] == res["per_example"]["finetuned"]
    assert "linear" in {r["method"] for r in more["rows"] if not r.get("kept")}
    assert len(list((tmp_path / "cache2").rglob("adapter_model.safetensors"))) == 2
    forged = json.loads((tmp_path / "out" / "results.json").read_text())
    bits = forged["per_example"]["finetuned"]["echo_first"]
    bits = ("0" if bits[0] != "0" else "1") + bits[1:]
    forged["per_example"]["finetuned"]["echo_first"] = bits
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    with pytest.raises(ConfigError, match="score test examples differently"):
        run_llm_bench(tmp_path / "out6", dataclasses.replace(moved, cache_dir=str(tmp_path / "cache3"),
                                                             methods=["task_arithmetic", "linear"]),
                      backbone=tiny_chat_folder, resume=tmp_path / "forged.json")
    routed = [r for r in res["rows"] if r["method"] == "esm_pp"]
    assert {r["setting"] for r in routed} == {"r=8, route", "r=8, oracle", "r=8, route, per token",
                                              "r=8, route, gaussian router"}
    assert all(0 <= r["routing"]["accuracy"] <= 1 for r in routed if r.get("routing"))
    # a run stopped inside ESM++ (its slow routed rows) resumes at its next row: the finished ones are kept
    (done,) = [f for f in (tmp_path / "cache").rglob("bench-rows/*/esm_pp*.json") if ".partial" not in f.name]
    blob = json.loads(done.read_text())
    first = blob["rows"][:2]
    partial = done.with_name(done.name.replace(".json", ".partial.json"))
    partial.write_text(json.dumps({"rows": first, "correct": {r["label"]: blob["correct"][r["label"]] for r in first}}))
    done.unlink()
    again2 = run_llm_bench(tmp_path / "out3", dataclasses.replace(cfg, methods=["esm", "esm_pp"]),
                           backbone=tiny_chat_folder)
    routed2 = [r for r in again2["rows"] if r["method"] == "esm_pp"]
    assert [r["label"] for r in routed2 if r.get("kept")] == [r["label"] for r in first] and len(routed2) == 4
    assert all(again2["per_example"]["rows"][r["label"]] == res["per_example"]["rows"][r["label"]] for r in routed2)
    assert done.is_file() and not partial.exists()
    assert {r["label"] for r in res["rows"] if r["method"] == "adamerging"} == {
        "adamerging (task-wise)", "adamerging (layer-wise)", "adamerging++ (layer-wise)"}
    # Representation Surgery on the decoder's last hidden states, on task arithmetic's val-tuned merge (its scale
    # reused, not searched again): the L1 gap to each expert shrinks on the val prompts it was trained on
    surgered = {r["setting"]: r for r in res["rows"] if r["method"] == "task_arithmetic+surgery"}
    assert set(surgered) == {"task id", "routed"}
    ta = next(r for r in res["rows"] if r["label"] == "task_arithmetic (val-tuned)")
    assert surgered["task id"]["alpha"] == ta["alpha"]
    assert all(after < before for before, after in surgered["task id"]["params"]["l1_before_after"].values())
    assert 0 <= surgered["routed"]["routing"]["accuracy"] <= 1 and "avg_nll" in surgered["routed"]


def test_export_llm_and_tune_on_it(tiny_chat_folder, tmp_path):
    """bench-export --suite llm writes ordinary files (adapters, one-shot val questions, statistics, tune.yaml), and
    submerge tune runs on them with the generation scorer."""
    import yaml

    from submerge.bench.llm.export import export_llm
    from submerge.bench.llm.finetune import LLMRecipe
    from submerge.bench.llm.session import LLMBenchConfig
    from submerge.tune import tune

    cfg = LLMBenchConfig(tasks=["echo_first", "echo_last"], n_train=30, n_val=8, n_test=10, multitask=False,
                         recipe=LLMRecipe(steps=60, lr=1e-2, batch_size=8), cache_dir=str(tmp_path / "cache"),
                         quiet=True, calib_n=4)
    out = export_llm(tmp_path / "exp", cfg, methods=("task_arithmetic", "tsv", "esm"), backbone=tiny_chat_folder)
    assert (out / "experts" / "echo_first" / "adapter_config.json").is_file()
    rows = [json.loads(x) for x in (out / "data" / "echo_first.val.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["shots"]) == cfg.shots == 3 for r in rows)
    config = yaml.safe_load((out / "tune.yaml").read_text())
    assert config["models"][0] == {"model": "base+experts/echo_first", "name": "echo_first",
                                   "calibration": "stats/echo_first"}
    assert config["eval"]["scorer"] == "generation"
    result = tune(out / "tune.yaml", tmp_path / "tuned", quiet=True)
    assert not result.errors and result.winner["method"] in ("task_arithmetic", "tsv", "esm")
    assert set(result.expert_scores) == {"echo_first", "echo_last"} and min(result.expert_scores.values()) == 1.0
    assert (tmp_path / "tuned" / "model.safetensors").is_file()


def test_every_setting_that_changes_a_question_keys_the_caches(tiny_chat_folder, tmp_path):
    """Experts and reference scores are cached by what changes them: a run with other demonstrations per question
    (or another seed, split size or recipe) trains and scores its own."""
    from submerge.bench.llm.finetune import LLMRecipe
    from submerge.bench.llm.session import LLMBenchConfig, LLMSession

    kw = dict(tasks=["echo_first", "echo_last"], n_train=30, n_val=8, n_test=10, multitask=False, quiet=True,
              recipe=LLMRecipe(steps=2, lr=1e-2, batch_size=8), cache_dir=str(tmp_path / "cache"))
    keys = set()
    for change in ({}, {"shots": 2}, {"seed": 1}, {"n_train": 20}, {"recipe": LLMRecipe(steps=3, batch_size=8)},
                   {"recipe": LLMRecipe(steps=2, lr=1e-2, batch_size=8, turns="last")}):
        S = LLMSession(LLMBenchConfig(**{**kw, **change}), tiny_chat_folder)
        assert not (tmp_path / "cache" / "experts" / S.expert_keys[0]).exists()  # trained when first needed
        assert len(S.experts) == 2
        keys.add(tuple(S.expert_keys))
    assert len(keys) == 6
    assert len(list((tmp_path / "cache" / "experts").iterdir())) == 12


def test_micro_batches_give_the_batch_gradient(tiny_chat_folder, tmp_path):
    """A recipe with micro-batches trains the same expert as one pass per batch (the same mean loss, gradients
    accumulated), up to float rounding."""
    from submerge.bench.llm.backbone import ChatModel
    from submerge.bench.llm.finetune import LLMRecipe, train_expert

    cm = ChatModel(tiny_chat_folder)
    sp = LLM_TASKS["echo_first"].split(0, 40, 10, 10)
    whole = train_expert(cm, sp.train, LLMRecipe(kind="full", steps=3, lr=1e-3, batch_size=8, micro_batch=None), 0,
                         tmp_path / "a", quiet=True)
    split = train_expert(cm, sp.train, LLMRecipe(kind="full", steps=3, lr=1e-3, batch_size=8, micro_batch=3), 0,
                         tmp_path / "b", quiet=True)
    changed = [k for k in whole if not torch.equal(whole[k], cm.pretrained[k])]
    assert changed
    for k in changed:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-6)


def test_an_interrupted_fine_tune_continues_from_its_checkpoint_to_the_same_expert(tiny_chat_folder, tmp_path,
                                                                                    monkeypatch):
    """A fine-tune stopped part-way (a session's end) continues from its saved state, and the expert is bit for
    bit the uninterrupted one's: trainable tensors, AdamW moments and the schedule are restored, the batches are
    the seed's."""
    import submerge.bench.llm.finetune as ft
    from submerge.bench.llm.backbone import ChatModel

    cm = ChatModel(tiny_chat_folder)
    sp = LLM_TASKS["echo_first"].split(0, 40, 10, 10)
    recipe = ft.LLMRecipe(steps=5, lr=1e-2, batch_size=8)
    whole = ft.train_expert(cm, sp.train, recipe, 0, tmp_path / "whole", quiet=True, checkpoint_seconds=None)
    assert not ft.progress_file(tmp_path / "whole").exists()

    real_loss, calls = ft.answer_loss, []

    def stops_at_step_3(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(ft, "answer_loss", stops_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        ft.train_expert(cm, sp.train, recipe, 0, tmp_path / "cut", quiet=True, checkpoint_seconds=0)
    assert torch.load(ft.progress_file(tmp_path / "cut"), weights_only=True)["step"] == 2
    assert not (tmp_path / "cut").exists()
    assert all(torch.equal(cm.model.state_dict()[k], v) for k, v in cm.pretrained.items())  # model reset
    after = []

    def counted(model, batch):
        after.append(1)
        return real_loss(model, batch)

    monkeypatch.setattr(ft, "answer_loss", counted)
    resumed = ft.train_expert(cm, sp.train, recipe, 0, tmp_path / "cut", quiet=True, checkpoint_seconds=0)
    assert len(after) == 3  # steps 3-5 only: it continued, it did not start again
    assert not ft.progress_file(tmp_path / "cut").exists()
    assert set(resumed) == set(whole) and all(torch.equal(resumed[k], whole[k]) for k in whole)
    log_whole, log_cut = ft.expert_log(tmp_path / "whole"), ft.expert_log(tmp_path / "cut")
    assert log_cut["loss_first_last"] == log_whole["loss_first_last"] and log_cut["steps"] == 5


def test_an_moe_of_the_experts_holds_their_mlps_and_is_scored_like_any_model(tiny_chat_folder, tmp_path):
    """The MoE reference rows (issue 33): `submerge moe` of the suite's LoRA experts (base+adapter), with
    mergekit-moe's hidden gates and submerge's calibration gates; expert i's MLP is skill i's expert's MLP,
    attention is the base's, and the scorer scores any causal LM as the session scores its own."""
    from safetensors.torch import load_file

    from submerge.bench.llm.finetune import LLMRecipe
    from submerge.bench.llm.moe import moe_rows
    from submerge.bench.llm.session import LLMBenchConfig, LLMSession

    S = LLMSession(LLMBenchConfig(tasks=["echo_first", "echo_last"], n_train=30, n_val=8, n_test=10, multitask=False,
                                  quiet=True, recipe=LLMRecipe(steps=20, lr=1e-2, batch_size=8), calib_n=4,
                                  cache_dir=str(tmp_path / "cache")), tiny_chat_folder)
    with S.loaded(None) as model:
        exact = S.evaluate_model(model, "val")
    assert all((exact[t] == S.zs_val[t]).all() for t in S.names)
    rows = moe_rows(S, tmp_path)
    assert [r["label"] for r in rows] == ["moe (hidden gates)", "moe (calibration gates)"]
    for r in rows:
        assert r["architecture"] == "MixtralForCausalLM" and r["params"] > S.cm.n_params()
        assert {t: len(v) for t, v in r["per_example"].items()} == {"echo_first": 10, "echo_last": 10}
        assert 0 <= r["avg_abs"] <= 1 and r["ms_per_question"] > 0
    moe = {}
    for f in (tmp_path / "moe-hidden").glob("*.safetensors"):
        moe.update(load_file(f))
    for layer in range(2):
        pre = f"model.layers.{layer}."
        for i, expert in enumerate(S.experts):  # transformers 5's fused layout: [E, 2I, H] and [E, H, I]
            gate_up = torch.cat([expert[f"{pre}mlp.gate_proj.weight"], expert[f"{pre}mlp.up_proj.weight"]])
            torch.testing.assert_close(moe[f"{pre}mlp.experts.gate_up_proj"][i], gate_up, rtol=0, atol=0)
            torch.testing.assert_close(moe[f"{pre}mlp.experts.down_proj"][i], expert[f"{pre}mlp.down_proj.weight"],
                                       rtol=0, atol=0)
            assert not torch.equal(expert[f"{pre}mlp.down_proj.weight"], S.base[f"{pre}mlp.down_proj.weight"])
        torch.testing.assert_close(moe[f"{pre}self_attn.q_proj.weight"], S.base[f"{pre}self_attn.q_proj.weight"],
                                   rtol=0, atol=0)


def test_the_experts_are_let_go_before_the_multitask_reference_and_read_back_the_same(tiny_chat_folder, tmp_path):
    """run_llm_bench trains the multitask reference after every row, without the experts held (on SmolLM2 that is
    about 3 GB of its peak); a row that needs them again reads the same tensors back from the cache."""
    import weakref

    from submerge.bench.llm.finetune import LLMRecipe
    from submerge.bench.llm.session import LLMBenchConfig, LLMSession

    S = LLMSession(LLMBenchConfig(tasks=["echo_first", "echo_last"], n_train=30, n_val=8, n_test=10, quiet=True,
                                  recipe=LLMRecipe(steps=4, lr=1e-2, batch_size=8),
                                  cache_dir=str(tmp_path / "cache")), tiny_chat_folder)
    name = next(n for n in S.base if n.endswith("down_proj.weight"))
    held = [{n: t.clone() for n, t in e.items()} for e in S.experts]
    assert not torch.equal(held[0][name], S.base[name])
    gone = [weakref.ref(e[name]) for e in S.experts]
    S.drop_experts()
    assert all(ref() is None for ref in gone)
    assert all(torch.equal(e[n], h[n]) for e, h in zip(S.experts, held) for n in h)


def test_a_backbone_without_a_chat_template_is_one_line(tmp_path):
    """`bench --suite llm --backbone` on a model whose tokenizer cannot format a chat: one `error:` line (exit 2)
    naming the folder, before any expert is trained; the generation scorer refuses it the same way."""
    from click.testing import CliRunner

    from submerge.cli import main
    from submerge.evaluate.generation import prompt_ids

    folder = tmp_path / "plain"
    tiny_llama(2).save_pretrained(folder)
    tok = chat_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(folder)
    r = CliRunner().invoke(main, ["bench", "--suite", "llm", "--backbone", str(folder), "--out", str(tmp_path / "o"),
                                  "--cache-dir", str(tmp_path / "c"), "--tasks", "echo_first,echo_last"])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and str(folder) in lines[0] and "chat template" in lines[0]
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="chat template"):
        prompt_ids(tok, "a question")
