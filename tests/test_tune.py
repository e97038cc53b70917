"""`submerge tune`: every number in tune.json is what an independent merge + score gives, the winner is the
best candidate, the written model is the winner's merge; bad input fails in one line before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from submerge.api import merge_state_dicts
from submerge.cli import main
from submerge.tune import tune

WORDS = ["good", "bad", "fine", "awful", "dog", "cat", "movie", "plot", "the", "a", "red", "blue"]


def _rows(task: str, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (5,), generator=g)]
        key = {"sentiment": ("good", "fine"), "animal": ("dog", "cat")}[task]
        out.append({"text": " ".join(words), "label": int(any(w in key for w in words))})
    return out


def _train(model, tok, rows, steps=40, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    y = torch.tensor([r["label"] for r in rows])
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _word_tokenizer(specials: list[str], cls: bool):
    """A whitespace word-level tokenizer over WORDS (tokenizers' own classes: BertTokenizerFast(vocab_file=...)
    maps every word to [UNK] in this transformers version)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if cls:
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=specials[1], eos_token=specials[0],
                                   pad_token=specials[0])


@pytest.fixture(scope="module")
def cls_family(tmp_path_factory):
    """A tiny BERT classifier base and two experts fine-tuned on two real (if toy) tasks, with data files."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("tune")
    tok = _word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], cls=True)
    cfg = BertConfig(vocab_size=len(WORDS) + 4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, num_labels=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, task in enumerate(("sentiment", "animal")):
        m = BertForSequenceClassification(cfg)
        m.load_state_dict(base.state_dict())
        _train(m, tok, _rows(task, 64, 10 + i), seed=i)
        m.save_pretrained(root / task)
        tok.save_pretrained(root / task)
        for split, n, seed in (("val", 40, 20 + i), ("calib", 16, 30 + i)):
            (root / f"{task}.{split}.jsonl").write_text(
                "\n".join(json.dumps(r) for r in _rows(task, n, seed)) + "\n")
    return root


def _config(root: Path, search: list, **extra) -> dict:
    return {
        "base_model": str(root / "base"),
        "models": [{"model": str(root / t), "name": t, "calibrate": {"inputs": str(root / f"{t}.calib.jsonl")}}
                   for t in ("sentiment", "animal")],
        "calibrate": {"n": 16, "max_length": 16},
        "search": search,
        "eval": {"scorer": "classification", "max_length": 16,
                 "tasks": {t: {"data": str(root / f"{t}.val.jsonl")} for t in ("sentiment", "animal")}},
        **extra,
    }


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _accuracy(state: dict, root: Path, task: str, own_head: bool = True) -> float:
    """Independent of the tune code: the task's expert architecture, the merged body, the expert's own head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(root / task).eval()
    expert = _load(root / task)
    model.load_state_dict({**state, **({k: v for k, v in expert.items() if k.startswith("classifier.")}
                                       if own_head else {})}, strict=False)
    tok = AutoTokenizer.from_pretrained(root / task)
    rows = [json.loads(x) for x in (root / f"{task}.val.jsonl").read_text().splitlines()]
    with torch.no_grad():
        batch = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
        pred = model(**batch).logits.argmax(-1)
    return float((pred == torch.tensor([r["label"] for r in rows])).double().mean())


SEARCH = [{"method": "task_arithmetic", "weight": 1.0, "lambda": [0.3, 0.7, 1.0]},
          {"method": "ties", "weight": 1.0, "density": [0.2, 0.6], "lambda": {"range": [0.5, 1.0], "step": 0.5}},
          {"method": "tsv", "alpha": "auto", "strategy": "coarse"},
          {"method": "esm", "alpha": [0.5, 1.5]},
          {"method": "linear", "weight": 1.0}]


@pytest.fixture(scope="module")
def local_run(cls_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tuned"
    cache = out.parent / "cache"
    res = tune(_config(cls_family, SEARCH), out, quiet=True, cache_dir=cache)
    return res, out, cache


def test_every_score_is_an_independent_merge_and_score(cls_family, local_run):
    res, out, cache = local_run
    root = cls_family
    report = json.loads((out / "tune.json").read_text())
    base, experts = _load(root / "base"), [_load(root / t) for t in ("sentiment", "animal")]
    ref = {t: _accuracy(_load(root / t), root, t) for t in ("sentiment", "animal")}
    assert report["expert_scores"] == pytest.approx(ref, abs=1e-12)
    labels = [c["label"] for c in report["candidates"]]
    # lists and ranges expand: ties has 2 densities (2 candidates), its lambda grid 0.5, 1.0
    assert labels == ["task_arithmetic(weight=1.0, lambda=[0.3,0.7,1])", "ties(weight=1.0, density=0.2, lambda=[0.5,1])",
                      "ties(weight=1.0, density=0.6, lambda=[0.5,1])", "tsv(alpha=auto)", "esm(alpha=[0.5,1.5])",
                      "linear(weight=1.0)"]
    stats = sorted(cache.glob("calibration-*"))
    assert len(stats) == 2  # one folder per expert, computed once
    by_task = {}
    for folder in stats:
        by_task[json.loads((folder / "manifest.json").read_text())["task"]] = folder
    for c in report["candidates"]:
        assert c["error"] is None and c["points"]
        if c["method"] == "tsv":
            assert c["strategy"] == "coarse" and len(c["points"]) >= 4
        for p in c["points"]:
            params = dict(c["params"])
            if c["scale_param"] and p["scale"] is not None:
                params[c["scale_param"]] = p["scale"]
            kw = {"stats": [by_task["sentiment"], by_task["animal"]]} if c["method"] == "esm" else {}
            merged = merge_state_dicts(c["method"], base, experts, params, **kw)
            for t in ("sentiment", "animal"):
                assert p["scores"][t] == pytest.approx(_accuracy(merged, root, t), abs=1e-12), (c["label"], p)
                assert p["normalized"][t] == pytest.approx(p["scores"][t] / ref[t])
            assert p["objective"] == pytest.approx(sum(p["normalized"].values()) / 2)
    best = max((p["objective"] for c in report["candidates"] for p in c["points"]))
    assert report["winner"]["objective"] == best == res.winner["objective"]


def test_the_written_model_is_the_winners_merge(cls_family, local_run):
    res, out, cache = local_run
    root = cls_family
    w = res.winner
    base, experts = _load(root / "base"), [_load(root / t) for t in ("sentiment", "animal")]
    kw = {}
    if w["method"] == "esm":
        kw["stats"] = sorted(cache.glob("calibration-*"), key=lambda f: json.loads(
            (f / "manifest.json").read_text())["task"] != "sentiment")
    expect = merge_state_dicts(w["method"], base, experts, w["params"], **kw)
    got = _load(out)
    assert set(got) == set(expect)
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], atol=1e-6, rtol=1e-6)
    card = (out / "README.md").read_text()
    assert "## Tuning" in card and "Chosen by `submerge tune`" in card
    assert (out / "tune.png").stat().st_size > 2000
    md = (out / "tune.md").read_text()
    assert f"**Winner: {w['label']}**" in md and "| candidate | scale | objective | sentiment | animal |" in md
    saved = yaml.safe_load((out / "submerge_config.yaml").read_text())
    assert saved["merge_method"] == w["method"]


def test_lines_candidates_score_as_independent_lines_merges(cls_family, tmp_path):
    """LiNeS in a search entry: beta fixed, a list (the affine path in beta) or auto; every point equals an
    independent merge_state_dicts(..., lines=) scored independently; the written winner carries lines:."""
    root = cls_family
    search = [{"method": "task_arithmetic", "weight": 1.0, "lines": {"beta": [0.0, 0.5, 1.0]}},
              {"method": "tsv", "lines": {"beta": 0.4, "alpha": 0.8}},
              {"method": "ties", "weight": 1.0, "density": 0.4, "lines": "auto"}]
    cfg = _config(root, search)
    cfg["models"] = [{k: v for k, v in m.items() if k != "calibrate"} for m in cfg["models"]]
    out = tmp_path / "tuned"
    res = tune(cfg, out, quiet=True, cache_dir=tmp_path / "cache")
    report = json.loads((out / "tune.json").read_text())
    base, experts = _load(root / "base"), [_load(root / t) for t in ("sentiment", "animal")]
    labels = [c["label"] for c in report["candidates"]]
    assert labels == ["task_arithmetic(weight=1.0, lambda=1.0, lines.beta=[0,0.5,1])",
                      "tsv(alpha=1.0, lines.alpha=0.8, lines.beta=0.4)",
                      "ties(weight=1.0, density=0.4, lambda=1.0, lines.beta=auto)"]
    for c, spec in zip(report["candidates"], search):
        assert c["error"] is None and c["points"]
        fixed = {k: v for k, v in spec["lines"].items() if k != "beta"} if isinstance(spec["lines"], dict) else {}
        for p in c["points"]:
            beta = p["scale"] if p["scale"] is not None else spec["lines"]["beta"]
            merged = merge_state_dicts(c["method"], base, experts, c["params"], lines={**fixed, "beta": beta})
            for t in ("sentiment", "animal"):
                assert p["scores"][t] == pytest.approx(_accuracy(merged, root, t), abs=1e-12), (c["label"], p)
    assert len(report["candidates"][2]["points"]) >= 3  # beta searched
    w = res.winner
    assert w["lines"] is not None and "beta" in w["lines"]
    saved = yaml.safe_load((out / "submerge_config.yaml").read_text())
    assert saved["lines"]["beta"] == pytest.approx(w["lines"]["beta"])
    expect = merge_state_dicts(w["method"], base, experts, w["params"], lines=w["lines"])
    got = _load(out)
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], atol=1e-6, rtol=1e-6)
    bad = _config(root, [{"method": "task_arithmetic", "lambda": [0.5, 1.0], "lines": {"beta": 0.5}}])
    with pytest.raises(Exception, match="the searched scale is lines.beta"):
        tune(bad, tmp_path / "bad", quiet=True, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "bad").exists()


def test_objective_worst_and_weighted(cls_family, tmp_path):
    search = [{"method": "task_arithmetic", "weight": 1.0, "lambda": [0.2, 0.6, 1.0]}]
    runs = {}
    for name, obj in (("worst", "worst"), ("weighted", {"weighted": {"sentiment": 3, "animal": 1}})):
        runs[name] = tune(_config(cls_family, search, objective=obj), tmp_path / name, quiet=True,
                          cache_dir=tmp_path / "c")
    for p in runs["worst"].report["candidates"][0]["points"]:
        assert p["objective"] == min(p["normalized"].values())
    for p in runs["weighted"].report["candidates"][0]["points"]:
        n = p["normalized"]
        assert p["objective"] == pytest.approx((3 * n["sentiment"] + n["animal"]) / 4)


# ----------------------------------------------------------------------------- a causal LM, lm_loss
@pytest.fixture(scope="module")
def lm_family(tmp_path_factory):
    """A tiny GPT-2 and two experts fine-tuned on two text domains (a minute of CPU at most)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("lm")
    tok = _word_tokenizer(["<eos>", "<unk>"], cls=False)
    cfg = GPT2Config(vocab_size=len(WORDS) + 2, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    domains = {"reviews": "the movie plot good fine bad awful", "pets": "a red dog a blue cat the dog"}
    for i, (name, text) in enumerate(domains.items()):
        words = text.split()
        lines = [" ".join(words[(j + k) % len(words)] for k in range(6)) for j in range(24)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
        m = GPT2LMHeadModel(cfg)
        m.load_state_dict(base.state_dict())
        torch.manual_seed(i)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        batch = tok(lines, return_tensors="pt", padding=True)
        for _ in range(30):
            loss = m(**batch, labels=batch["input_ids"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval().save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _nll(state: dict, root: Path, name: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / name).eval()
    model.load_state_dict(state, strict=False)
    tok = AutoTokenizer.from_pretrained(root / name)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in (root / f"{name}.txt").read_text().splitlines():
            ids = tok(line, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return total / count


def test_lm_loss_scores_a_causal_lm(lm_family, tmp_path):
    root = lm_family
    cfg = {"base_model": str(root / "base"),
           "models": [{"model": str(root / n), "name": n} for n in ("reviews", "pets")],
           "search": [{"method": "task_arithmetic", "weight": 1.0, "lambda": [0.5, 1.0]}],
           "eval": {"scorer": "lm_loss", "max_length": 32,
                    "tasks": [{"data": str(root / "reviews.txt")}, {"data": str(root / "pets.txt")}]}}
    res = tune(cfg, tmp_path / "out", quiet=True)
    experts = {n: _load(root / n) for n in ("reviews", "pets")}
    for n in ("reviews", "pets"):
        assert res.expert_scores[n] == pytest.approx(math.exp(-_nll(experts[n], root, n)), rel=1e-5)
    base = _load(root / "base")
    for p in res.report["candidates"][0]["points"]:
        merged = merge_state_dicts("task_arithmetic", base, list(experts.values()), {"weight": 1.0, "lambda": p["scale"]})
        for n in ("reviews", "pets"):
            nll = _nll(merged, root, n)
            assert p["details"][n]["nll"] == pytest.approx(nll, rel=1e-5)
            # normalised = the expert's perplexity over the merge's
            assert p["normalized"][n] == pytest.approx(math.exp(_nll(experts[n], root, n) - nll), rel=1e-5)


# ----------------------------------------------------------------------------- bad input, one line, no work
def _write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("case", ["scorer_import", "wrong_field", "no_eval_data", "ray_address", "unknown_param",
                                  "no_calibration"])
def test_bad_input_is_one_line_before_any_work(cls_family, tmp_path, case):
    root = cls_family
    cfg = _config(root, [{"method": "task_arithmetic", "weight": 1.0}])
    args = []
    if case == "scorer_import":
        cfg["eval"]["scorer"] = {"python": "no_such_module_xyz:score"}
        want = "cannot import no_such_module_xyz"
    elif case == "wrong_field":
        cfg["eval"]["tasks"]["animal"]["label_field"] = "labels"
        want = "animal.val.jsonl:1: no field 'labels'"
    elif case == "no_eval_data":
        del cfg["eval"]["tasks"]["animal"]
        want = "no eval data for task(s) ['animal']"
    elif case == "ray_address":
        args = ["--backend", "ray", "--address", "127.0.0.1:9"]
        want = "--address 127.0.0.1:9: cannot reach a Ray head there"
    elif case == "unknown_param":
        cfg["search"][0]["densty"] = 0.3
        want = "task_arithmetic has no parameter 'densty'"
    else:
        cfg["search"] = [{"method": "esm"}]
        del cfg["models"][1]["calibrate"]
        want = "models[1] (animal): a candidate (esm) needs calibration statistics"
    path = _write_cfg(tmp_path / "tune.yaml", cfg)
    res = CliRunner().invoke(main, ["tune", str(path), str(tmp_path / "out"), "--cache-dir",
                                    str(tmp_path / "cache"), "-q", *args])
    assert res.exit_code == 2, res.output
    assert want in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_search_values_are_checked():
    from submerge.errors import ConfigError
    from submerge.tune.spec import _values

    assert _values("lambda", {"range": [0.2, 1.0], "step": 0.4}, "x") == [0.2, 0.6, 1.0]
    assert _values("lambda", {"range": [0, 1], "steps": 3}, "x") == [0.0, 0.5, 1.0]
    for bad in ({"range": [1, 0], "step": 0.1}, {"range": [0, 1]}, {"range": [0, 1], "step": -1}, []):
        with pytest.raises(ConfigError):
            _values("lambda", bad, "x")


# ----------------------------------------------------------------------------- Ray
SCORER = '''
import json, os
from pathlib import Path
import torch

def accuracy(model, task):
    rows = [json.loads(x) for x in Path(task.data).read_text().splitlines()]
    marker = task.options.get("crash_once")
    if marker and "task_arithmetic" in task.candidate and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)  # the worker process dies in the middle of the sweep
    if task.options.get("raise_on") and task.options["raise_on"] in task.candidate:
        raise ValueError("boom")
    with torch.no_grad():
        b = task.tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        pred = model(**b).logits.argmax(-1)
    return float((pred == torch.tensor([r["label"] for r in rows])).double().mean())
'''

RAY_SEARCH = [{"method": "task_arithmetic", "weight": 1.0, "lambda": [0.3, 1.0]},
              {"method": "ties", "weight": 1.0, "density": 0.5, "lambda": "auto"},
              {"method": "esm", "alpha": [1.0]},
              {"method": "linear", "weight": 1.0}]


def _table(report: dict) -> list:
    return [(c["label"], c["error"], [(p["scale"], p["scores"]) for p in c["points"]]) for c in report["candidates"]]


def _python_cfg(root: Path, tmp: Path, **options) -> dict:
    (tmp / "scorer.py").write_text(SCORER)
    cfg = _config(root, RAY_SEARCH[:1] + RAY_SEARCH[3:])
    cfg["eval"] = {"scorer": {"python": f"{tmp / 'scorer.py'}:accuracy"},
                   "model_class": "AutoModelForSequenceClassification", "options": options,
                   "tasks": {t: {"data": str(root / f"{t}.val.jsonl")} for t in ("sentiment", "animal")}}
    return cfg


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_actors_beyond_what_the_cluster_can_place_are_refused(ray_session):
    """Actors the cluster has no CPU for would wait forever: refused in one line naming the cluster's size."""
    from submerge.errors import ConfigError
    from submerge.evaluate.backends import RayBackend

    with pytest.raises(ConfigError, match="--actors 3: the Ray cluster has 2 CPU"):
        RayBackend(actors=3)
    assert RayBackend(actors=2).n_actors == 2


def test_ray_gives_the_local_table_survives_a_killed_worker_and_names_a_failing_candidate(cls_family, tmp_path,
                                                                                          ray_session):
    """One sweep on a local Ray instance: a worker dies mid-sweep (Ray restarts it and retries its candidate) and
    one candidate's scorer raises; the table equals the local backend's, the failure named, the others kept."""
    marker = tmp_path / "crashed"
    remote = tune(_python_cfg(cls_family, tmp_path, crash_once=str(marker), raise_on="linear"), tmp_path / "ray",
                  quiet=True, backend="ray")
    assert marker.exists()
    local = tune(_python_cfg(cls_family, tmp_path, raise_on="linear"), tmp_path / "local", quiet=True)
    assert remote.report["backend"] == "ray" and local.report["backend"] == "local"
    assert _table(remote.report) == _table(local.report)
    assert remote.winner == local.winner and remote.expert_scores == local.expert_scores
    assert len(remote.errors) == 1 and remote.errors[0].startswith("candidate linear(weight=1.0): the python:")
    assert remote.errors[0].endswith("raised ValueError: boom")
    a, b = _load(tmp_path / "local"), _load(tmp_path / "ray")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_candidate_exits_1_with_the_others_written(cls_family, tmp_path):
    path = _write_cfg(tmp_path / "tune.yaml", _python_cfg(cls_family, tmp_path, raise_on="linear"))
    res = CliRunner().invoke(main, ["tune", str(path), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1, res.output
    assert "candidate linear(weight=1.0): the python:" in res.output and "raised ValueError: boom" in res.output
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert [c["error"] is None for c in report["candidates"]] == [True, False]


def test_two_node_ray_cluster(cls_family, tmp_path):
    """Statistics as Ray tasks and candidates on actors across two nodes: the local backend's table."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cfg = _config(cls_family, [RAY_SEARCH[0], RAY_SEARCH[2]])
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        remote = tune(cfg, tmp_path / "ray", quiet=True, cache_dir=tmp_path / "c", backend="ray")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(list((tmp_path / "c").glob("calibration-*"))) == 2  # computed by Ray tasks
    local = tune(cfg, tmp_path / "local", quiet=True, cache_dir=tmp_path / "c2")
    assert _table(remote.report) == _table(local.report) and remote.winner == local.winner


def test_adamerging_learned_by_tune(cls_family, tmp_path):
    """AdaMerging as a tune candidate: coefficients learned on the eval texts (labels unused) through each task's
    own classifier equal a direct `learn` call on the same batches; the point's scores are an independent
    scoring of `merge_with` under those coefficients; the written folder is that merge, with the coefficients and
    a config that re-merges to it."""
    import submerge
    from submerge.methods.adamerging import Coefficients, learn, merge_with
    from submerge.evaluate.scorers import length_sorted_batches
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = cls_family
    tasks = ("sentiment", "animal")
    search = [{"method": "adamerging", "granularity": ["task", "layer"], "steps": 8, "lr": "5e-2"}]
    cfg = _config(root, search)
    cfg["models"] = [{k: v for k, v in m.items() if k != "calibrate"} for m in cfg["models"]]
    out = tmp_path / "tuned"
    res = tune(cfg, out, quiet=True, cache_dir=tmp_path / "cache")
    report = json.loads((out / "tune.json").read_text())
    assert [c["label"] for c in report["candidates"]] == [
        "adamerging(granularity=task, plus=False, steps=8, lr=0.05, init=0.3, batch_size=16)",
        "adamerging(granularity=layer, plus=False, steps=8, lr=0.05, init=0.3, batch_size=16)"]
    base, experts = _load(root / "base"), [_load(root / t) for t in tasks]
    model = AutoModelForSequenceClassification.from_pretrained(root / tasks[0]).eval()
    tok = AutoTokenizer.from_pretrained(root / tasks[0])
    inputs = []
    for t in tasks:
        texts = [json.loads(x)["text"] for x in (root / f"{t}.val.jsonl").read_text().splitlines()]
        lengths = [len(x) for x in tok(texts, truncation=True, max_length=16)["input_ids"]]
        inputs.append([dict(tok([texts[i] for i in idx], padding=True, truncation=True, max_length=16,
                                return_tensors="pt")) for idx in length_sorted_batches(lengths, 16, 2048)])
    heads = [{k: v for k, v in e.items() if k.startswith("classifier.")} for e in experts]
    for c in report["candidates"]:
        assert c["error"] is None and len(c["points"]) == 1
        p = c["points"][0]
        coef = learn(model, base, experts, inputs, lambda fwd, t, b: fwd(**b).logits, tasks=list(tasks),
                     names=list(base), granularity=c["learn"]["granularity"], steps=8, lr=0.05, seed=0,
                     task_params=heads)
        got = Coefficients.from_json(p["learned"])
        assert got.names == coef.names and torch.allclose(got.values, coef.values, atol=1e-6)
        assert p["learned"]["loss_first_last"][1] < p["learned"]["loss_first_last"][0]  # entropy went down
        merged = merge_with(base, experts, got)
        for t in tasks:
            assert p["scores"][t] == pytest.approx(_accuracy(merged, root, t), abs=1e-12)
    w = res.winner
    assert w["method"] == "adamerging" and w["learn"] is not None
    best = next(c for c in report["candidates"] if c["index"] == w["index"])["points"][0]
    saved = Coefficients.load(out / "adamerging.json")
    assert torch.equal(saved.values, Coefficients.from_json(best["learned"]).values)
    assert (out / "adamerging.png").is_file()
    written, expect = _load(out), merge_with(base, experts, saved)
    for k in expect:
        torch.testing.assert_close(written[k], expect[k], atol=1e-6, rtol=1e-6)
    again = submerge.merge(out / "submerge_config.yaml", tmp_path / "again", quiet=True).out_dir
    assert all(torch.equal(_load(again)[k], written[k]) for k in written)
    with pytest.raises(Exception, match="adamerging learned by tune takes"):
        tune(_config(root, [{"method": "adamerging", "stepz": 3}]), tmp_path / "bad", quiet=True)
    assert not (tmp_path / "bad").exists()
