"""`submerge merge --backend ray`: the output's shards merged by Ray tasks, byte for byte the local merge's files,
on a local Ray instance and on a two-node ``ray.cluster_utils.Cluster``; a killed worker's shard redone; an
unreachable cluster and a method that cannot run there are one line."""

from __future__ import annotations

import pytest
import torch

from submerge.api import merge
from submerge.engine.distributed import KILL_ONCE_ENV
from test_moe import _family
from test_safety import assert_one_line_error, run_cli

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("ray-merge") / "llama", "llama")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    kill = tmp_path_factory.mktemp("kill") / "armed"  # the kill switch: armed when this folder exists
    if ray.is_initialized():  # another module's session
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {KILL_ONCE_ENV: str(kill)}})
    yield kill
    ray.shutdown()


def _config(fam, method="dare_ties"):
    return {"merge_method": method, "base_model": str(fam / "base"), "dtype": "float32",
            "models": [{"model": str(fam / f"ft{i}"), "parameters": {"weight": 0.6, "density": 0.5}}
                       for i in range(3)], "parameters": {"normalize": True}}


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".json") and p.name != "tokenizer.json"}


def test_ray_shards_are_the_local_merges_bytes(fam, local_ray, tmp_path):
    cfg = _config(fam, "dare_ties")  # randomized: the per-tensor seeds must travel
    local = merge(cfg, tmp_path / "local", quiet=True, random_seed=7, out_shard_size="20KB")
    res = merge(cfg, tmp_path / "ray", quiet=True, random_seed=7, out_shard_size="20KB", backend="ray")
    assert len(res.files) >= 3 and res.files == local.files
    assert _files(res.out_dir) == _files(local.out_dir)
    assert any("merged on Ray" in n for n in res.notes)
    assert not [p for p in tmp_path.iterdir() if ".submerge-" in p.name]


def test_a_killed_workers_shard_is_redone(fam, local_ray, tmp_path):
    local_ray.mkdir()
    try:
        cfg = _config(fam)
        local = merge(cfg, tmp_path / "local", quiet=True, random_seed=1, out_shard_size="30KB")
        res = merge(cfg, tmp_path / "ray", quiet=True, random_seed=1, out_shard_size="30KB", backend="ray")
        killed = sorted(p.name for p in local_ray.iterdir())
        assert killed == [f"shard-{i}" for i in range(len(res.files))]  # every shard's first worker died
        assert _files(res.out_dir) == _files(local.out_dir)
    finally:
        for p in local_ray.iterdir():
            p.unlink()
        local_ray.rmdir()


def test_an_unreachable_cluster_and_a_stray_address_are_one_line(fam, tmp_path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(fam)))
    assert_one_line_error(run_cli(["merge", cfg, tmp_path / "out", "--backend", "ray", "--address",
                                   "127.0.0.1:1", "-q"]), "cannot reach a Ray head")
    assert_one_line_error(run_cli(["merge", cfg, tmp_path / "out", "--address", "127.0.0.1:1", "-q"]),
                          "--address is for --backend ray")
    assert not (tmp_path / "out").exists()


def test_a_two_node_cluster_gives_the_same_files(fam, tmp_path):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cfg = _config(fam, "ties")
        local = merge(cfg, tmp_path / "local", quiet=True, random_seed=3, out_shard_size="20KB")
        res = merge(cfg, tmp_path / "ray", quiet=True, random_seed=3, out_shard_size="20KB", backend="ray")
        assert _files(res.out_dir) == _files(local.out_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def calibrated(fam, tmp_path_factory):
    from submerge.stats.gram import calibrate_model_dir

    root = tmp_path_factory.mktemp("ray-cal")
    for i in range(3):
        texts = [" ".join(f"w{(5 * i + j + k) % 30}" for k in range(6)) for j in range(10)]
        calibrate_model_dir(fam / f"ft{i}", texts, root / f"cal{i}", n=10, max_length=16, progress=False)
    return {"merge_method": "esm", "base_model": str(fam / "base"), "dtype": "float32",
            "models": [{"model": str(fam / f"ft{i}"), "calibration": str(root / f"cal{i}")} for i in range(3)],
            "parameters": {"alpha": 0.8}}


def test_layer_parts_keep_layers_whole_and_cover_every_tensor():
    from submerge.engine.distributed import layer_parts

    names = ["embed.weight"] + [f"model.layers.{i}.{k}" for i in range(5) for k in ("q", "k", "v", "mlp")] + ["norm"]
    sizes = {n: (100 if n.endswith("mlp") else 10) for n in names}
    for n_parts in (1, 2, 3, 7, 100):
        parts = layer_parts(names, sizes, n_parts)
        assert [n for p in parts for n in p] == names and len(parts) == min(n_parts, 7) and all(parts)
        for i in range(5):
            assert sum(any(n.startswith(f"model.layers.{i}.") for n in p) for p in parts) == 1


def test_esm_parts_joined_equal_the_whole_model_pass(fam, calibrated):
    """ESM's pass run over runs of whole layers and joined (what Ray workers do) gives the local pass's state:
    the same spilled results and the same layer scales, bit for bit."""
    from submerge.engine.distributed import layer_parts
    from submerge.engine.executor import Executor
    from submerge.engine.plan import MergeOptions, plan_merge
    from submerge.engine.config import parse_config

    plan = plan_merge(parse_config(calibrated), None)
    try:
        ex = Executor(plan, MergeOptions(quiet=True))
        whole = ex._prepare()
        jobs = [j for j in plan.jobs if j.copy_from is None]
        parts = layer_parts([j.out_name for j in jobs], {j.out_name: 1 for j in jobs}, 3)
        assert len(parts) == 3
        joined = plan.method.prepare_combine([ex._prepare(only=p) for p in parts], plan.global_params)
    finally:
        plan.close()
    assert joined.beta == whole.beta and joined.esd == whole.esd and whole.beta
    for name in whole.beta:
        assert torch.equal(joined.results.get(name), whole.results.get(name))


def test_esm_on_ray_runs_its_pass_on_workers_and_matches_local(calibrated, local_ray, tmp_path):
    local = merge(calibrated, tmp_path / "local", quiet=True, out_shard_size="60KB")
    res = merge(calibrated, tmp_path / "ray", quiet=True, out_shard_size="60KB", backend="ray")
    assert _files(res.out_dir) == _files(local.out_dir)
    assert any("whole-model pass on Ray" in n for n in res.notes)
    assert not (res.out_dir / ".scratch").exists()
