"""A tiny end-to-end pass of the benchmark on the real backbone and real shipped data.

Quality numbers come from `submerge bench`, not from here: this only checks the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from submerge.bench import BenchConfig, Task, get_task, run_bench
from submerge.bench.data import BenchDataError
from submerge.errors import ConfigError


def _need_data():
    try:
        from submerge.bench.backbone import minilm_path

        minilm_path()
        get_task("rt_sentiment").examples()
        get_task("wordnet_noun").examples()
    except BenchDataError as e:
        if os.environ.get("CI"):
            raise  # CI runs the set-up step: missing data there is a failure
        pytest.skip(str(e))


def test_splits_are_seeded_disjoint_and_sized():
    _need_data()
    t = get_task("wordnet_noun")
    a, b = t.split(seed=0, n_test=100, n_val=50, n_train=200), t.split(seed=0, n_test=100, n_val=50, n_train=200)
    assert a.test == b.test and len(a.test[0]) == 100 and len(a.val[0]) == 50 and len(a.train[0]) == 200
    assert not set(a.test[0]) & set(a.train[0])
    assert set(a.train[1]) <= set(range(len(t.class_names)))


def _run_counting_scorings(out, cfg):
    """run_bench, and how many times it scored a model on a task's split."""
    from submerge.bench import session

    calls = []
    real = session.correct
    session.correct = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        return run_bench(out, cfg), len(calls)
    finally:
        session.correct = real


def test_tiny_end_to_end(tmp_path):
    _need_data()
    cfg = BenchConfig(tasks=["rt_sentiment", "wordnet_noun"], methods=["task_arithmetic", "ties", "task_arithmetic+lines",
                                                                   "consensus_ta", "tall_masks", "adamerging",
                                                                   "task_arithmetic+surgery"],
                      n_train=32, n_val=16, n_test=32, lambda_grid=[0.5, 1.0], adamerging_steps=3,
                      cache_dir=str(tmp_path / "cache"), quiet=True)
    res, n_first = _run_counting_scorings(tmp_path / "out", cfg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("suite", "backbone", "tasks", "zeroshot", "finetuned", "rows", "seed", "versions"):
        assert key in saved
    assert [r["label"] for r in saved["rows"]] == [
        "task_arithmetic (default)", "task_arithmetic (val-tuned)", "ties (default)", "ties (val-tuned)",
        "task_arithmetic+lines", "consensus_ta (default)", "consensus_ta (val-tuned)", "tall_masks (task id)",
        "adamerging (task-wise)", "adamerging (layer-wise)", "adamerging++ (layer-wise)",
        "task_arithmetic+surgery (task id)", "task_arithmetic+surgery (routed)", "multitask (joint fine-tuning)"]
    # Representation Surgery on the val-tuned TA merge: trained on unlabeled val inputs, the L1 gap shrinks
    sg = saved["rows"][11]
    assert sg["reference"] == "oracle" and sg["alpha"] == saved["rows"][1]["alpha"]
    assert all(after < before for before, after in sg["params"]["l1_before_after"].values())
    assert 0.0 <= saved["rows"][12]["routing"]["accuracy"] <= 1.0
    # AdaMerging: coefficients learned on unlabeled val inputs, in [0, 1], shared across tensors when task-wise
    for r in saved["rows"][8:11]:
        values = np.array(r["coefficients"]["values"])
        assert values.shape == (2, len(r["coefficients"]["names"])) and values.min() >= 0 and values.max() <= 1
        assert (tmp_path / "out" / f"coefficients_{r['label'].replace(' ', '_').replace('(', '').replace(')', '').replace('+', 'p')}.png").exists()
    assert np.all(np.array(saved["rows"][8]["coefficients"]["values"]).std(axis=1) == 0)
    assert saved["rows"][10]["params"]["ties_density"] == 0.2
    # Consensus TA and TALL masks: each task's mask threshold chosen on its own val from the authors' grid
    tall = saved["rows"][7]
    assert tall["reference"] == "oracle" and set(tall["params"]["tall_lambda"]) == {"rt_sentiment", "wordnet_noun"}
    assert all(lam in (0.2, 0.3, 0.4, 0.5, 0.6) for lam in tall["params"]["tall_lambda"].values())
    assert tall["storage"]["masks_bytes"] * 32 // 2 == pytest.approx(tall["storage"]["model_bytes"], rel=1e-3)
    assert saved["rows"][6]["params"]["tall_lambda"] == tall["params"]["tall_lambda"]
    # LiNeS on task arithmetic: alpha by the authors' norm rule is exactly 1/T; beta on the val grid
    lines_row = saved["rows"][4]
    assert lines_row["params"]["lines"]["alpha"] == pytest.approx(0.5, rel=1e-6)
    assert lines_row["alpha"] == lines_row["params"]["lines"]["beta"] and lines_row["alpha"] in (0.5, 1.0, 1.5, 2.0)
    mt = saved["rows"][-1]
    assert mt["reference"] == "multitask" and "reference" not in saved["rows"][0]
    assert saved["backbone"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    for r in saved["rows"]:
        lo, hi = r["avg_norm_ci"]
        assert lo <= r["avg_norm"] <= hi
    for r in saved["rows"]:
        assert set(r["per_task"]) == {"rt_sentiment", "wordnet_noun"}
        assert all(0 <= v <= 1 for v in r["per_task"].values())
        for k in ("method", "params", "alpha", "avg_abs", "avg_norm", "seconds"):
            assert k in r
    assert saved["rows"][1]["alpha"] in (0.5, 1.0, 1.25, 1.5)
    # per-example correctness is saved: every accuracy and every paired comparison can be recomputed
    from submerge.bench.evaluate import paired_diff_ci, unpack_correct

    n = {t: saved["task_info"][t]["n_test"] for t in saved["tasks"]}
    pe = saved["per_example"]
    for r in saved["rows"]:
        for t, acc in r["per_task"].items():
            assert unpack_correct(pe["rows"][r["label"]][t], n[t]).mean() == pytest.approx(acc)
    ft = [saved["finetuned"][t] for t in saved["tasks"]]
    a = [unpack_correct(pe["rows"]["ties (val-tuned)"][t], n[t]) for t in saved["tasks"]]
    b = [unpack_correct(pe["rows"]["task_arithmetic (val-tuned)"][t], n[t]) for t in saved["tasks"]]
    d, lo, hi = paired_diff_ci(a, b, ft)
    assert saved["comparisons"]["ties (val-tuned) - task_arithmetic (val-tuned)"] == {"norm_diff": d, "ci95": [lo, hi]}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| ties | val-tuned |" in md and "zero-shot" in md
    assert "| task_arithmetic+lines | val-tuned |" in md and "`<method>+lines`: LiNeS" in md
    assert "| multitask † | joint fine-tuning |" in md and "sentence-transformers/all-MiniLM-L6-v2" in md
    # the reference scores (zero-shot, experts) are cached beside the experts: one file per task and split
    assert len(list((tmp_path / "cache" / "scores").glob("*.json"))) == 2 * 2 * 2
    for png in ("normalized_accuracy.png", "heatmap.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    # experts are cached: a second run fine-tunes nothing
    again, n_again = _run_counting_scorings(tmp_path / "out2", cfg)
    assert all(v["cached"] for v in again["finetune_log"].values())
    assert again["finetuned"] == res["finetuned"] and again["zeroshot"] == res["zeroshot"]
    # neither the references (2 models x 2 tasks x 2 splits) nor the finished methods nor the multitask row
    # were scored again (a stopped run resumes at its next method)
    assert n_again == 0 and n_first > 8 + 2
    assert [r["label"] for r in again["rows"]] == [r["label"] for r in res["rows"]]
    assert [r["per_task"] for r in again["rows"]] == [r["per_task"] for r in res["rows"]]
    assert again["per_example"] == res["per_example"] and again["comparisons"] == res["comparisons"]
    # the kept rows keep the time they took: the rerun's table says what it cost, not the seconds of the rerun
    assert all(r.get("kept") for r in again["rows"] if r["method"] != "multitask")
    assert again["seconds_compute"] == pytest.approx(res["seconds_compute"])
    assert "were kept from earlier runs" in (tmp_path / "out2" / "results.md").read_text()
    # a rerun into a folder holding results is refused unless asked for
    with pytest.raises(ConfigError, match="already holds a results.json"):
        run_bench(tmp_path / "out2", cfg)
    # --resume: an earlier results.json's rows are kept, only what it lacks is computed.  Here the surgery rows
    # are removed from it and the cache is new (experts fine-tuned again: reproducible, so accepted); surgery
    # starts from TA's kept val-tuned scale (no val scoring) and gives the same predictions as the full run.
    partial = json.loads(json.dumps(saved))
    gone = [r["label"] for r in partial["rows"] if r["method"] == "task_arithmetic+surgery"]
    partial["rows"] = [r for r in partial["rows"] if r["label"] not in gone]
    for lab in gone:
        del partial["per_example"]["rows"][lab]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    cfg3 = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache3"))
    from submerge.bench import session as runner

    val_scorings = []
    real_val = runner.BenchSession.val_score
    runner.BenchSession.val_score = lambda self, st: val_scorings.append(1) or real_val(self, st)
    try:
        third = run_bench(tmp_path / "out3", cfg3, resume=tmp_path / "partial.json")
    finally:
        runner.BenchSession.val_score = real_val
    assert not all(v.get("cached") for k, v in third["finetune_log"].items() if not k.startswith("multitask"))
    assert val_scorings == []
    assert [r["label"] for r in third["rows"]] == [r["label"] for r in res["rows"]]
    assert third["per_example"] == res["per_example"] and third["comparisons"] == res["comparisons"]
    # refused, naming why: another setting; experts that score differently (not these experts)
    with pytest.raises(ConfigError, match="n_val"):
        run_bench(tmp_path / "out4", dataclasses.replace(cfg, n_val=8), resume=tmp_path / "partial.json")
    bits = partial["per_example"]["finetuned"]["wordnet_noun"]
    partial["per_example"]["finetuned"]["wordnet_noun"] = ("f" if bits[0] != "f" else "0") + bits[1:]
    (tmp_path / "other.json").write_text(json.dumps(partial))
    with pytest.raises(ConfigError, match="finetuned models there score test examples differently.*wordnet_noun"):
        run_bench(tmp_path / "out5", cfg, resume=tmp_path / "other.json")


def test_user_task_and_user_backbone(tmp_path):
    """A task given as texts + labels + class names, on a backbone folder the user brings."""
    _need_data()
    from transformers import BertConfig, BertModel

    from submerge.bench.backbone import minilm_path

    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / f, folder / f)
    texts = [f"I love this {w}" for w in ("song", "film", "book", "game")] * 10 + \
            [f"I hate this {w}" for w in ("song", "film", "book", "game")] * 10
    labels = ["good"] * 40 + ["bad"] * 40
    mine = Task("my_sentiment", ["good", "bad"], texts=texts, labels=labels)
    from submerge.bench import tasks as registry

    registry._TASKS["my_sentiment"] = mine
    registry._TASKS["my_copy"] = Task("my_copy", ["good", "bad"], texts=texts, labels=labels,
                                      prompts={"good": ["wonderful"], "bad": ["awful"]})
    try:
        cfg = BenchConfig(tasks=["my_sentiment", "my_copy"], methods=["linear"], n_train=60, n_val=10,
                          n_test=20, backbone=str(folder), cache_dir=str(tmp_path / "c"), quiet=True)
        res = run_bench(tmp_path / "o", cfg)
        assert res["backbone"]["path"] == str(folder)
        assert [r["method"] for r in res["rows"]] == ["linear", "multitask"]
        assert res["backbone"]["name"] == "tiny-bert"
        assert res["suite"] == res["config"]["suite"] == "custom"
        # 80 examples cannot give 60/10/20: the shrunken splits are reported, not silent
        assert any("my_sentiment has 80 examples: splits train/val/test = 50/10/20 instead of 60/10/20" in w
                   for w in res["warnings"]), res["warnings"]
        assert "Warnings" in (tmp_path / "o" / "results.md").read_text()
    finally:
        registry._TASKS.pop("my_sentiment")
        registry._TASKS.pop("my_copy")


def test_tiny_end_to_end_data_based_methods(tmp_path):
    """ESM / RegMean / TSV-M rows: calibration statistics from the experts, scales chosen on val; then the
    same rows from `bench --backend ray`."""
    _need_data()
    _data_based_rows_local_and_on_ray(tmp_path)


def _data_based_rows_local_and_on_ray(tmp_path):
    cfg = BenchConfig(tasks=["rt_sentiment", "wordnet_noun"],
                      methods=["esm", "esm_pp", "fisher", "posterior", "regmean", "tsv", "tsv[rank_tol=1e-4]"],
                      n_train=32, n_val=16, n_test=32, calib_n=8, fisher_n=4, cache_dir=str(tmp_path / "cache"),
                      quiet=True, esmpp_ranks=[2, 384], multitask=False)
    res = run_bench(tmp_path / "out", cfg)
    labels = [r["label"] for r in res["rows"]]
    # methods without statistics first, then those reading Fisher, then calibration (each kind held only while used)
    assert labels == ["tsv (default)", "tsv (val-tuned)", "tsv[rank_tol=1e-4] (default)",
                      "tsv[rank_tol=1e-4] (val-tuned)", "fisher", "posterior", "esm (default)", "esm (val-tuned)",
                      "esm_pp r=2 (routed)", "esm_pp r=384 (routed)", "esm_pp r=384 (oracle task id)",
                      "esm_pp r=384 (routed, gaussian router)", "esm_pp r=384 (routed, trained router)", "regmean"]
    by_label = {r["label"]: r for r in res["rows"]}
    # a variant row: the method with the parameters its name sets, searched and cached as a row of its own
    assert by_label["tsv[rank_tol=1e-4] (val-tuned)"]["params"]["rank_tol"] == 1e-4
    assert by_label["tsv[rank_tol=1e-4] (val-tuned)"]["method"] == "tsv[rank_tol=1e-4]"
    esm_tuned = by_label["esm (val-tuned)"]
    assert 0.0 <= esm_tuned["alpha"] <= 5.0 and len(esm_tuned["val_curve"]) >= 5
    assert by_label["tsv (val-tuned)"]["alpha"] in [round(0.1 * i, 2) for i in range(1, 41)]
    pp = {r["label"]: r for r in res["rows"] if r["method"] == "esm_pp"}
    assert all(r["alpha"] == esm_tuned["alpha"] for r in pp.values())  # experts sit on the val-tuned ESM
    routed = pp["esm_pp r=2 (routed)"]
    assert 0.0 <= routed["routing"]["accuracy"] <= 1.0 and routed["overhead"]["params_pct_of_base"] > 0
    assert sum(map(sum, routed["routing"]["confusion"])) > 0
    for kind in ("gaussian", "trained"):  # the linear routers: same experts, own routing accuracy per layer
        row = pp[f"esm_pp r=384 (routed, {kind} router)"]
        assert row["params"]["router"] == kind and 0.0 <= row["routing"]["accuracy"] <= 1.0
        assert set(row["routing"]["per_layer"]) == set(pp["esm_pp r=384 (routed)"]["routing"]["per_layer"])
    # full-rank experts (384 = hidden size >= every d_out of the routed q/k/v) with oracle routing are the
    # fine-tuned experts on q/k/v and the MLP input; the rest of the model is merged, so not exactly 100 %
    assert pp["esm_pp r=384 (oracle task id)"]["avg_norm"] >= routed["avg_norm"] - 0.1
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## ESM++" in md
    # the oracle row is a reference: marked, never the bold "best merged" value
    oracle_lines = [line for line in md.splitlines() if line.startswith("| esm_pp † | r=384, oracle |")]
    assert len(oracle_lines) == 2 and "**" not in oracle_lines[0]  # absolute and normalised tables
    assert pp["esm_pp r=384 (oracle task id)"]["reference"] == "oracle"
    # every row is compared with TSV-M (the strongest static baseline), not only with task arithmetic
    assert "esm (val-tuned) - tsv (val-tuned)" in res["comparisons"]
    assert "regmean - tsv (val-tuned)" in res["comparisons"]
    # `bench --backend ray`: the same rows from Ray actors holding the session's experts and statistics
    # (ESM++ in ESM's call), whatever order the methods finish in; only the timings differ
    pytest.importorskip("ray")
    # Fisher and calibration statistics, computed here and shipped to the actors; compared with a local run at one
    # torch thread, as each actor (1 CPU) runs: float reductions depend on the thread count
    ray_cfg = dataclasses.replace(cfg, methods=["fisher", "regmean"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shutil.rmtree(tmp_path / "cache" / "bench-rows")  # nothing kept but experts and reference scores
        local = run_bench(tmp_path / "out-1", ray_cfg)
        shutil.rmtree(tmp_path / "cache" / "bench-rows")
        on_ray = run_bench(tmp_path / "out-ray", ray_cfg, backend="ray", actors=2)
    finally:
        torch.set_num_threads(threads)

    def untimed(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "ms_per_example", "static_ms_per_example")}
                for r in rows if r["method"] in ray_cfg.methods]

    assert len(on_ray["rows"]) == 2 and untimed(on_ray["rows"]) == untimed(local["rows"])
    assert on_ray["per_example"]["rows"] == local["per_example"]["rows"]


def test_bench_rows_name_variants_with_checked_parameters():
    from submerge.bench.presets import applicable_methods, row_params, split_methods, split_row_name

    assert split_methods("ties, tsv[rank_tol=1e-4,embeddings=svd],esm+surgery") == [
        "ties", "tsv[rank_tol=1e-4,embeddings=svd]", "esm+surgery"]
    assert split_row_name("tsv[rank_tol=1e-4]+surgery") == ("tsv", "surgery")
    assert row_params("tsv[rank_tol=1e-4,embeddings=svd]") == {"rank_tol": 1e-4, "embeddings": "svd"}
    assert row_params("ties[density=0.5]") == {"density": 0.5, "weight": 1.0}  # over the bench's preset 0.2
    for bad in ("tsv[rank_tol=2]", "tsv[nope=1]", "tsv[rank_tol]", "tsv[rank_tol=1e-4", "tsv[embeddings=x]"):
        with pytest.raises(ConfigError):
            applicable_methods(3, [bad])


def test_ray_calls_keep_esm_pp_with_esm():
    from submerge.bench.ray import units_of

    assert units_of(["ties", "esm", "regmean", "esm_pp"]) == [["ties"], ["esm", "esm_pp"], ["regmean"]]
    assert units_of(["esm_pp", "tsv"]) == [["esm_pp"], ["tsv"]]  # ESM cached: ESM++ searches ESM itself
    assert units_of(["tsv", "ties", "tsv+surgery", "ties+lines"]) == [["tsv", "tsv+surgery"], ["ties"], ["ties+lines"]]


def test_pareto_tiny_end_to_end(tmp_path):
    """`submerge pareto` on two tasks: a 3-point grid per rule, mixture over two seeds, one multitask model."""
    _need_data()
    from submerge.bench.pareto import ParetoConfig, run_pareto, simplex_grid

    assert simplex_grid(2, 21)[0] == (0.0, 1.0) and len(simplex_grid(2, 21)) == 21
    assert len(simplex_grid(3, 6)) == 21 and all(abs(sum(w) - 1) < 1e-9 for w in simplex_grid(3, 6))
    bench = BenchConfig(n_train=32, n_val=16, n_test=32, fisher_n=4, cache_dir=str(tmp_path / "cache"), quiet=True)
    cfg = ParetoConfig(tasks=["rt_sentiment", "wordnet_noun"], grid=3, multitask=[0.5], em_steps=1, bench=bench)
    res = run_pareto(tmp_path / "p", cfg)
    assert set(res["fronts"]) == {"isotropic", "diagonal", "mixture"}
    iso = res["fronts"]["isotropic"]
    assert [p["weights"] for p in iso] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    # the isotropic rule at a corner is that expert
    e = {x["task"]: x["acc"] for x in res["experts"]}
    assert iso[2]["acc"] == e["rt_sentiment"] and iso[0]["acc"] == e["wordnet_noun"]
    assert len(res["multitask"]) == 1 and set(res["gaps"]) == {"isotropic", "diagonal", "mixture"}
    assert (tmp_path / "p" / "pareto.png").stat().st_size > 10_000 and "ground truth" in (tmp_path / "p" / "pareto.md").read_text()


def test_task_labels_are_checked_and_numpy_indices_accepted():
    import numpy as np

    from submerge.bench.tasks import register_task
    from submerge.errors import ConfigError

    texts = ["a", "b", "c", "d"]
    ok = Task("t_labels_ok", ["x", "y", "z"], texts=texts, labels=np.array([0, 2, 1, 2], dtype=np.int64))
    assert ok.examples() == (texts, [0, 2, 1, 2])
    mixed = Task("t_labels_mixed", ["x", "y"], texts=texts, labels=["y", np.int32(0), None, 1])
    assert mixed.examples() == (["a", "b", "d"], [1, 0, 1])  # None: outside the task
    bad = [
        ([True, 0, 1, 0], "boolean label"),
        ([0, 1, 3, 0], "label 3, outside 0..2"),
        ([0, -1, 1, 0], "label -1, outside 0..2"),
        (["x", "yy", "z", "x"], "label 'yy', which is not a class (did you mean y?)"),
        ([0.0, 1, 2, 0], "type float"),
        ([0, 1, 2], "4 texts but 3 labels"),
        ([None] * 4, "no labelled example"),
    ]
    for labels, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            Task("t_bad", ["x", "y", "z"], texts=texts, labels=labels).examples()
    with pytest.raises(ConfigError, match="example 1 has a int as its text"):
        Task("t_bad", ["x", "y"], texts=["a", 3], labels=[0, 1]).examples()
    # re-registering a name (a notebook cell run twice) needs replace=True
    register_task(Task("t_notebook", ["x", "y"], texts=texts, labels=[0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="replace=True"):
        register_task(Task("t_notebook", ["x", "y"], texts=texts, labels=[0, 1, 0, 1]))
    again = register_task(Task("t_notebook", ["x", "y"], texts=texts, labels=[1, 1, 0, 0]), replace=True)
    assert get_task("t_notebook") is again


def test_zero_shot_below_majority_is_flagged():
    import numpy as np

    from submerge.bench.session import zero_shot_warnings

    labels = {"a": [0, 0, 0, 1], "b": [0, 1, 0, 1]}  # majority 0.75 and 0.5
    correct = {"a": np.array([1, 1, 0, 0]), "b": np.array([1, 1, 0, 0])}  # 0.5 and 0.5
    w = zero_shot_warnings(correct, labels)
    assert len(w) == 1 and w[0].startswith("task a: the zero-shot head scores 0.500 on val, below the majority "
                                           "class (0.750)")


def test_expert_suites_are_a_bench_option():
    from click.testing import CliRunner

    from submerge.bench.session import EXPERT_SUITES
    from submerge.cli import bench, main

    choices = next(p.type.choices for p in bench.params if p.name == "experts")
    assert list(choices) == list(EXPERT_SUITES) + ["lora", "full"]  # the last two: the LLM suite's recipes
    assert (EXPERT_SUITES["default"].lr, EXPERT_SUITES["lr3e-4"].lr) == (1e-4, 3e-4)
    out = CliRunner().invoke(main, ["bench", "--experts", "lr1"])
    assert out.exit_code == 2 and "is not one of 'default', 'lr3e-4'" in out.output
    out = CliRunner().invoke(main, ["bench", "--experts", "lora"])
    assert out.exit_code == 2 and "LLM-suite recipe" in out.output
    out = CliRunner().invoke(main, ["bench", "--suite", "llm", "--experts", "lr3e-4"])
    assert out.exit_code == 2 and "encoder-suite recipe" in out.output


def test_embed_batches_by_token_count_and_matches_unbatched():
    """Batches cut by padded tokens give the embeddings of each text on its own (no padding at all)."""
    _need_data()
    from submerge.bench.backbone import Backbone

    bb = Backbone()
    texts, _ = get_task("wordnet_noun").split(seed=0, n_test=40, n_val=10, n_train=10).test
    texts = texts + ["word " * 200]  # truncated to max_len
    lengths = bb.token_lengths(texts)
    assert max(lengths) == bb.max_len and bb.token_lengths(texts) == lengths
    batched = bb.embed(texts, max_tokens=256)
    alone = torch.cat([bb.embed([t]) for t in texts])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_bench_export_then_tune_reproduces_the_bench_search(tmp_path):
    """The exported experts and val data, tuned with `auto`, give the benchmark's own val scores and scale."""
    _need_data()
    import yaml

    from submerge.bench.export import export_bench
    from submerge.bench.session import BenchSession
    from submerge.search import auto_search_kwargs, search_alpha
    from submerge.tune import tune

    cfg = BenchConfig(tasks=["rt_sentiment", "wordnet_noun"], n_train=32, n_val=16, n_test=32,
                      cache_dir=str(tmp_path / "cache"), quiet=True)
    export_bench(tmp_path / "export", cfg, methods=("task_arithmetic",))
    exported = yaml.safe_load((tmp_path / "export" / "tune.yaml").read_text())
    assert exported["search"] == [{"method": "task_arithmetic", "weight": 1.0, "lambda": "auto"}]
    assert sorted(p.name for p in (tmp_path / "export" / "data").iterdir()) == [
        "rt_sentiment.calib.jsonl", "rt_sentiment.val.jsonl", "wordnet_noun.calib.jsonl", "wordnet_noun.val.jsonl"]
    res = tune(tmp_path / "export" / "tune.yaml", tmp_path / "tuned", quiet=True, cache_dir=tmp_path / "stats")
    S = BenchSession(cfg)
    assert res.expert_scores == pytest.approx({k: float(v.mean()) for k, v in S.ft_val.items()}, abs=1e-12)
    found = search_alpha("task_arithmetic", S.base, S.experts, S.val_score, {"weight": 1.0},
                         **auto_search_kwargs("task_arithmetic"))
    points = res.report["candidates"][0]["points"]
    assert {p["scale"]: p["objective"] for p in points} == pytest.approx(found.curve, abs=1e-12)
    assert res.winner["params"]["lambda"] == found.alpha


def test_run_estimate_weights_each_step_by_its_expected_cost():
    """What is left = the expected cost of the steps not done, at this run's measured speed: kept steps cost
    nothing and say nothing about speed; an unknown method is expected to cost the median."""
    import time

    from submerge.bench.estimate import RunEstimate

    est = RunEstimate(2, ["cheap", "dear", "unknown"], t_start=time.perf_counter(),
                      costs={"finetune": 10.0, "methods": {"cheap": 1.0, "dear": 100.0}})
    assert est.method_cost["unknown"] == pytest.approx(50.5)
    assert est.left() == pytest.approx(2 * 10 + 1 + 100 + 50.5)
    est.expert_done(20.0)  # twice as slow as measured
    assert est.speed == pytest.approx(2.0) and est.left() == pytest.approx(2 * (10 + 151.5))
    est.expert_done(None)  # cached: no time, no speed information
    assert est.speed == pytest.approx(2.0)
    est.method_done("cheap", None)  # kept from an earlier run
    assert est.left() == pytest.approx(2 * 150.5)
    assert "methods 1/3" in est.line() and "min left" in est.line()
    est.method_done("dear", 50.0)  # (20 + 50) s for (10 + 100) expected
    assert est.speed == pytest.approx(70 / 110) and est.left() == pytest.approx(70 / 110 * 50.5)
    est.method_done("unknown", 30.0)
    assert est.left() == 0 and est.line().endswith("done]")
