"""`strategy: cma` in submerge tune (CMA-ES over mergekit-evolve's genome) and what it stands on: per-layer
gradients of per-model parameters in the in-memory engine, equal to the streamed merge of the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from submerge.api import merge, merge_state_dicts_many
from submerge.errors import ConfigError
from submerge.tune import tune
from submerge.tune.evolve import genome_params
from test_moe import _family, _tensors
from test_tune import _accuracy, _config, _load, cls_family  # noqa: F401 (the fixture is used by name)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("evolve") / "llama", "llama")


@pytest.mark.parametrize("method, per_model, glob", [
    ("ties", [{"weight": [0.2, 1.0], "density": [0.9, 0.3]}, {"weight": 0.5, "density": [0.4, 0.6]},
              {"weight": [1.0, 0.0, 1.0], "density": 0.5}], {"lambda": 1.0}),
    ("task_arithmetic", [{"weight": [0.2, 1.0]}, {"weight": 0.5}, {"weight": [1.0, 0.0, 1.0]}], {"lambda": [0.5, 1.0]}),
    ("dare_linear", [{"weight": [0.3, 0.9], "density": [0.5, 0.8]}] * 3, {}),
])
def test_gradients_over_layers_in_memory_equal_the_streamed_merge(llama, tmp_path, method, per_model, glob):
    base = _tensors(llama / "base")
    fts = [_tensors(llama / f"ft{i}") for i in range(3)]
    cfg = {"merge_method": method, "base_model": str(llama / "base"), "dtype": "float32", "parameters": glob,
           "models": [{"model": str(llama / f"ft{i}"), "parameters": per_model[i]} for i in range(3)]}
    res = merge(cfg, tmp_path / "out", quiet=True, random_seed=3)
    streamed = _tensors(res.out_dir)
    mem = merge_state_dicts_many(method, base, fts, [glob], per_model, random_seed=3)[0]
    assert sorted(mem) == sorted(streamed)
    for k in streamed:
        assert torch.equal(mem[k], streamed[k]), k
    flat = merge_state_dicts_many(method, base, fts, [glob], [{k: (v[0] if isinstance(v, list) else v)
                                                               for k, v in p.items()} for p in per_model],
                                  random_seed=3)[0]
    assert any(not torch.equal(flat[k], mem[k]) for k in mem if ".layers.1." in k)  # the gradient did something


def test_genome_points_map_to_bounded_per_model_gradients():
    genome = {"weight": [0.0, 2.0], "density": [0.1, 0.9]}
    got = genome_params([0.5, 1.0, 0.0, 0.25, 1.5, -1.0, 0.5, 0.5], genome, n_models=2, points=2)
    assert got == [{"weight": [1.0, 2.0], "density": [0.1, 0.30000000000000004]},
                   {"weight": [2.0, 0.0], "density": [0.5, 0.5]}]
    assert genome_params([0.5, 0.5], {"weight": [0, 1]}, 2, 1) == [{"weight": 0.5}, {"weight": 0.5}]


def test_cma_search_runs_resumes_and_writes_its_best_point(cls_family, tmp_path):
    search = [{"method": "ties", "strategy": "cma", "genome": {"weight": [0.0, 1.0], "density": [0.2, 1.0]},
               "layer_points": 2, "evaluations": 12, "population": 4, "lambda": 1.0},
              {"method": "task_arithmetic", "weight": 1.0, "lambda": [0.5, 1.0]}]
    cfg = _config(cls_family, search)
    res = tune(cfg, tmp_path / "a", quiet=True, cache_dir=tmp_path / "cache", random_seed=0)
    cma = next(r for r in res.results if r.strategy == "cma")
    assert len(cma.points) == 12 and cma.error is None
    assert all(len(p.model_params) == 2 and len(p.model_params[0]["weight"]) == 2 for p in cma.points)
    assert cma.best.objective == max(p.objective for p in cma.points)
    report = json.loads((tmp_path / "a" / "tune.json").read_text())
    entry = next(c for c in report["candidates"] if c["strategy"] == "cma")
    assert len(entry["points"]) == 12 and entry["evolve"]["evaluations"] == 12
    if res.winner["method"] == "ties":  # the written model is the best point's merge
        written = yaml.safe_load((tmp_path / "a" / "submerge_config.yaml").read_text())
        assert [m["parameters"]["weight"] for m in written["models"]] == \
            [p["weight"] for p in res.winner["model_params"]]
    # resumed from the cache: no point is evaluated again, the same search comes back
    states = list((tmp_path / "cache").glob("cma-*.pkl"))
    assert len(states) == 1
    again = tune(cfg, tmp_path / "b", quiet=True, cache_dir=tmp_path / "cache", random_seed=0)
    cma2 = next(r for r in again.results if r.strategy == "cma")
    assert [p.objective for p in cma2.points] == [p.objective for p in cma.points]
    # a larger budget continues the saved search
    search[0]["evaluations"] = 16
    more = tune(_config(cls_family, search), tmp_path / "c", quiet=True, cache_dir=tmp_path / "cache",
                random_seed=0)
    cma3 = next(r for r in more.results if r.strategy == "cma")
    assert len(cma3.points) == 16


@pytest.mark.parametrize("entry, fragment", [
    ({"method": "ties", "strategy": "cma"}, "searches a genome"),
    ({"method": "ties", "strategy": "cma", "genome": {"lambda": [0, 1]}}, "not a per-model parameter"),
    ({"method": "ties", "strategy": "cma", "genome": {"weight": [1, 0]}}, "low < high"),
    ({"method": "ties", "strategy": "cma", "genome": {"weight": [0, 1]}, "evaluations": 0}, "evaluations"),
    ({"method": "ties", "strategy": "cma", "genome": {"weight": [0, 1]}, "density": [0.2, 0.4]}, "only the genome"),
    ({"method": "ties", "strategy": "cma", "genome": {"weight": [0, 1]}, "sigma": -1}, "sigma"),
    ({"method": "ties", "genome": {"weight": [0, 1]}}, "setting of strategy: cma"),
])
def test_cma_entries_are_checked_when_read(cls_family, entry, fragment):
    from submerge.tune.spec import parse_tune

    with pytest.raises(ConfigError, match=fragment):
        parse_tune(_config(cls_family, [entry]), Path("."))
