"""`submerge bench`: fine-tune one expert per task, merge them with every applicable method, score.

Protocol (as the CLIP task-arithmetic benchmarks): frozen zero-shot heads, encoder-only
fine-tuning, each merged encoder scored with every task's own head.  Scales (lambda) are
chosen on the validation split only (max mean normalised val accuracy); each reported
number touches the test split once.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from submerge.api import merge_state_dicts
from submerge.bench.backbone import Backbone
from submerge.bench.estimate import RunEstimate
from submerge.bench.evaluate import bootstrap_ci, correct, pack_correct, paired_diff_ci, unpack_correct
from submerge.bench.finetune import Recipe, cache_key, cached_path, finetune, load_cached, multitask_finetune
from submerge.bench.tasks import SUITES, get_task
from submerge.device import busy_note
from submerge.errors import ConfigError, quoted
from submerge.io import check_output_target
from submerge.io.caches import cache_folder
from submerge.io.ledger import one_run
from submerge.methods import get_method, list_methods
from submerge.search import LAMBDA_GRID, auto_search_kwargs
from submerge.version import __version__

log = logging.getLogger("submerge.bench")

# Settings of the "default" row of each method: its registry defaults plus the values its paper
# recommends where the registry default (mergekit's) is a no-op.  weight = 1 for every expert.
PRESETS: dict[str, dict] = {
    "ties": {"density": 0.2},             # TIES paper: keep the top 20 %
    "magnitude_prune": {"density": 0.2},
    "dare_linear": {"density": 0.5},      # FusionBench default drop rate 0.5
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.01},   # drop top 1 % and the bottom tail
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.15},
    "della_linear": {"density": 0.5, "epsilon": 0.15},
}
# One method of every family (module of submerge.methods) that can merge several experts: the quick run's rows
QUICK_METHODS = ("linear", "task_arithmetic", "task_arithmetic+lines", "ties", "dare_ties", "consensus_ta", "model_stock", "multislerp",
                 "sce", "ram", "tsv", "iso_cts", "fisher", "regmean", "esm", "esm_pp")
# LiNeS rows (Wang et al., ICLR 2025): the method's update scaled by block depth, LiNeS' beta searched on val
# (the authors' grid), alpha by their norm rule.  Named "<method>+lines" in a bench's method list.
LINES_ROWS = ("task_arithmetic+lines", "tsv+lines", "esm+lines")
# Representation Surgery (Yang et al., ICML 2024) on the val-tuned merge of a method, modules trained on unlabeled
# val inputs: "<method>+surgery"
SURGERY_ROWS = ("task_arithmetic+surgery", "tsv+surgery", "esm+surgery")
# Named expert suites (fine-tuning recipes): "default" (lr 1e-4) and the second suite of the ESM ablation,
# experts fine-tuned at 3x the learning rate (benchmarks/results/esm_ablation/README.md).
EXPERT_SUITES = {"default": Recipe(), "lr3e-4": Recipe(lr=3e-4)}


@dataclass
class BenchConfig:
    suite: str = "text8"
    tasks: Optional[list[str]] = None
    methods: Optional[list[str]] = None
    seed: int = 0
    n_train: int = 2000
    n_val: int = 300
    n_test: int = 1000
    lambda_grid: list[float] = field(default_factory=lambda: list(LAMBDA_GRID))
    recipe: Recipe = field(default_factory=Recipe)
    backbone: Optional[str] = None
    cache_dir: Optional[str] = None
    quiet: bool = False
    calib_n: int = 32              # calibration inputs per task for data-based methods (ESM, RegMean)
    calib_split: str = "train"     # where they come from: "train" or "val" (never test)
    calib_source: str = "finetuned"  # statistics in the task's fine-tuned expert (ESM) or the base
    fisher_n: int = 64             # inputs per task for the diagonal Fisher (fisher / posterior rows)
    fisher_kind: str = "sampled"   # one drawn class per input: the true Fisher at one backward pass
    esmpp_ranks: list[int] = field(default_factory=lambda: [8, 32])  # ESM++ expert ranks reported
    esmpp_routers: list[str] = field(default_factory=lambda: ["gaussian", "trained"])  # beside cosine, largest r
    adamerging_steps: int = 100    # AdaMerging: Adam steps on unlabeled val inputs (the paper: 500 at lr 1e-3)
    adamerging_lr: float = 5e-3    # ... at 5x the paper's rate, so the coefficients can travel as far
    search: str = "full"           # α search: "full" (the papers' grids, ESM's golden section) or "coarse"
    multitask: bool = True         # the reference row: one model fine-tuned on all tasks jointly

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        """The README's main job: text8's 8 tasks with experts on 1,500 training examples each (so they
        interfere as text8's do) and small evaluation splits, 50 val / 150 test per task (chosen on validation,
        benchmarks/results/quick_suite/, round 6), one method per family, coarse scale searches, no multitask
        row."""
        base = dict(suite="quick", n_train=1500, n_val=50, n_test=150, lambda_grid=[0.25, 0.5, 0.75, 1.0],
                    methods=list(QUICK_METHODS), search="coarse", multitask=False, esmpp_ranks=[8])
        base.update(kw)
        return cls(**base)


def split_row_name(name: str) -> tuple[str, Optional[str]]:
    """A bench row name as (registered method, post-processing): ``"tsv+lines"`` -> ``("tsv", "lines")``."""
    method, _, post = name.partition("+")
    if post and post not in ("lines", "surgery"):
        raise ConfigError(f"unknown post-processing '+{post}' in bench method {name!r}; known: +lines, +surgery")
    if post and get_method(method).scale_param is None:
        raise ConfigError(f"{name}: +{post} rows need a method with a scale searched on val ({method} has none)")
    return method, post or None


def applicable_methods(n_models: int, names: Optional[Sequence[str]] = None) -> list[str]:
    """The bench rows to compute: ``names`` (checked) or every registered method plus the LiNeS rows."""
    rows = list(names) if names else [m.name for m in list_methods()] + list(LINES_ROWS) + list(SURGERY_ROWS)
    out = []
    for row in rows:
        m = get_method(split_row_name(row)[0])
        if n_models < m.min_models or (m.max_models is not None and n_models > m.max_models):
            if names:
                raise ConfigError(f"{m.name} cannot merge {n_models} experts")
            continue
        out.append(row)
    return out


def _params(method: str) -> dict:
    method = split_row_name(method)[0]
    m = get_method(method)
    p = {k: v for k, v in PRESETS.get(method, {}).items() if k in m.param_names}
    if "weight" in m.param_names:
        p["weight"] = 1.0
    return p


def release_memory() -> None:
    """Hand freed heap back to the OS.  glibc keeps freed blocks of torch's CPU tensors in its arenas (its mmap
    threshold grows with the tensors it has freed), so without this the resident size of a run only grows from
    phase to phase (fine-tuning, each method's search buffers) although nothing is kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _rss_text() -> str:
    """Resident memory of this process now and its peak so far (Linux/macOS; empty elsewhere)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * resource.getpagesize()
        return f"RSS {now / 2**30:.1f} GB (peak {peak / 2**30:.1f})"
    except (OSError, ImportError, ValueError, IndexError):
        return ""


def zero_shot_warnings(correct: dict, labels: dict) -> list[str]:
    """One line per task whose zero-shot head (per-example correctness on val) scores below the majority
    class of its val labels: its class prompts likely do not describe the classes."""
    out = []
    for name, y in labels.items():
        majority = float(np.bincount(np.asarray(y)).max() / len(y))
        acc = float(np.asarray(correct[name], dtype=float).mean())
        if acc < majority:
            out.append(f"task {name}: the zero-shot head scores {acc:.3f} on val, below the majority class "
                       f"({majority:.3f}): its class prompts may not describe the classes")
    return out


def suite_tasks(cfg: BenchConfig) -> list[str]:
    """The task names a config runs: its ``tasks``, else its suite's."""
    names = cfg.tasks or SUITES.get(cfg.suite)
    if not names:
        raise ConfigError(f"unknown suite {cfg.suite!r}; known: {sorted(SUITES)}")
    return list(names)


class BenchSession:
    """Everything a benchmark run shares: backbone, tasks, splits, heads, experts, scorers.

    Used by :func:`run_bench` and by scripts in ``benchmarks/`` (ablations) so that every
    number comes from the same protocol.
    """

    def __init__(self, cfg: Optional[BenchConfig] = None, shared: Optional[dict] = None,
                 estimate: Optional[RunEstimate] = None):
        """``shared``: what :meth:`share` returned in another process (a Ray actor of ``bench --backend
        ray``): its experts, reference scores and statistics are taken as they are, nothing is fine-tuned
        or scored again.  ``estimate``: the run's estimate, told as each expert is ready."""
        cfg = self.cfg = cfg or BenchConfig()
        self.t_start = time.perf_counter()
        self.cache = cache_folder("experts", cfg.cache_dir)
        names = self.names = suite_tasks(cfg)
        self.tasks = [get_task(n) for n in names]
        bb = self.bb = Backbone(cfg.backbone, max_len=cfg.recipe.max_len)
        say = self.say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
        say(f"backbone {bb.path} ({sum(v.numel() for v in bb.pretrained.values()) / 1e6:.1f}M params); "
            f"tasks: {', '.join(names)}")
        self.splits = {t.name: t.split(seed=0, n_test=cfg.n_test, n_val=cfg.n_val, n_train=cfg.n_train)
                       for t in self.tasks}
        self.warnings: list[str] = []
        for t in self.tasks:
            sp = self.splits[t.name]
            got = (len(sp.train[0]), len(sp.val[0]), len(sp.test[0]))
            if any(g < w for g, w in zip(got, (cfg.n_train, cfg.n_val, cfg.n_test))):
                self.warnings.append(
                    f"task {t.name} has {len(t.examples()[0])} examples: splits train/val/test = "
                    f"{got[0]}/{got[1]}/{got[2]} instead of {cfg.n_train}/{cfg.n_val}/{cfg.n_test}")
        self.heads = {t.name: bb.head(t.class_prompts()) for t in self.tasks}
        bb.reset()
        self._scores: dict = dict(shared["scores"]) if shared else {}
        self.zs_val = self.reference_scores("zeroshot", "val")
        say("zero-shot val: " + ", ".join(f"{k} {v.mean():.3f}" for k, v in self.zs_val.items()))
        self.warnings += zero_shot_warnings(self.zs_val, {t.name: self.splits[t.name].val[1] for t in self.tasks})
        for w in self.warnings:
            say(f"warning: {w}")
        self.experts, self.ft_logs, self.expert_keys = [], {}, []
        if shared:
            self.experts, self.expert_keys = list(shared["experts"]), list(shared["expert_keys"])
            self.ft_logs = dict(shared["ft_logs"])
        for i, t in enumerate(self.tasks if not shared else ()):
            state, info = self.train_expert(t, cfg.seed)
            key = self.expert_key(t, cfg.seed)
            # a freshly trained expert is on disk already: read back once every expert is trained, so the
            # training of the last ones does not run beside the first ones' weights (the phase's peak)
            self.experts.append(state if info.get("cached") else None)
            self.expert_keys.append(key)
            self.ft_logs[t.name] = info
            del state
            release_memory()
            took = "cached" if info.get("cached") else "fine-tuned in {:.0f}s".format(info["seconds"])
            if estimate is not None:
                estimate.expert_done(None if info.get("cached") else info["seconds"])
            say(f"[{self.clock()}] expert {i + 1}/{len(self.tasks)} {t.name}: {took}"
                + (f" {estimate.line()}" if estimate is not None else ""))
        for i, key in enumerate(self.expert_keys):
            if self.experts[i] is None:
                self.experts[i] = load_cached(cached_path(self.cache, key))[0]
        self.ft_val = self.reference_scores("finetuned", "val")
        say("fine-tuned val: " + ", ".join(f"{k} {v.mean():.3f}" for k, v in self.ft_val.items()))
        self.base = {n: bb.pretrained[n] for n in bb.trainable_names()}
        self.ft_val_mean = {k: max(v.mean(), 1e-9) for k, v in self.ft_val.items()}
        self._stats: dict = dict(shared["stats"]) if shared else {}

    def share(self) -> dict:
        """What another process needs to score methods exactly as this session does (see ``shared``):
        the experts, the reference scores a method row reads (the experts' val and test scores), the
        statistics computed so far."""
        self.ft_test  # noqa: B018  (computed now, so the copy carries it)
        return {"experts": self.experts, "expert_keys": self.expert_keys, "ft_logs": self.ft_logs,
                "scores": dict(self._scores), "stats": dict(self._stats)}

    def clock(self) -> str:
        """Wall time since the session started (m:ss) and the resident memory now and at its peak."""
        s = int(time.perf_counter() - self.t_start)
        return f"{s // 60}:{s % 60:02d}, {_rss_text()}"

    # Test scores of the references are computed when first asked for: a script that chooses something on
    # validation (benchmarks/quick_suite.py) never touches test.
    @property
    def zs_test(self) -> dict[str, np.ndarray]:
        return self.reference_scores("zeroshot", "test")

    @property
    def ft_test(self) -> dict[str, np.ndarray]:
        return self.reference_scores("finetuned", "test")

    def expert_key(self, task, seed: int) -> str:
        return cache_key(self.bb, task.fingerprint(), len(self.splits[task.name].train[0]), self.cfg.recipe, seed)

    def reference_scores(self, which: str, split: str) -> dict[str, np.ndarray]:
        """Per-example correctness of the zero-shot model (``which="zeroshot"``) or of each task's expert on
        its own task (``"finetuned"``) on ``split``; kept on disk beside the experts (keyed by backbone,
        task data, split sizes, head and expert), so a rerun scores each reference model once."""
        if (which, split) in self._scores:
            return self._scores[(which, split)]
        out = {}
        for i, t in enumerate(self.tasks):
            texts, labels = getattr(self.splits[t.name], split)
            head = self.heads[t.name]
            model = "zeroshot" if which == "zeroshot" else self.expert_keys[i]
            blob = json.dumps({"backbone": self.bb.fingerprint, "task": t.fingerprint(), "model": model,
                               "split": split, "n": [self.cfg.n_train, self.cfg.n_val, self.cfg.n_test],
                               "max_len": self.bb.max_len,
                               "head": hashlib.sha256(head.numpy().tobytes()).hexdigest()}, sort_keys=True)
            path = self.cache / "scores" / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"
            hit = json.loads(path.read_text()) if path.exists() else None
            if hit is not None and hit.get("n") == len(texts):
                out[t.name] = unpack_correct(hit["correct"], len(texts))
                continue
            if which == "finetuned":
                self.bb.load(self.experts[i])
            out[t.name] = correct(self.bb, texts, labels, head)
            self.bb.reset()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"n": len(texts), "correct": pack_correct(out[t.name]), "task": t.name,
                                       "model": model, "split": split}))
            tmp.replace(path)
        self._scores[(which, split)] = out
        return out

    def train_expert(self, task, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The expert of ``task`` fine-tuned with ``seed`` on its train split (cached by recipe and data)."""
        tr_x, tr_y = self.splits[task.name].train
        key = self.expert_key(task, seed)
        desc = f"fine-tune {task.name}" + (f" seed {seed}" if seed != self.cfg.seed else "")
        return finetune(self.bb, tr_x, tr_y, self.heads[task.name], self.cfg.recipe, seed, self.cache, key,
                        desc=desc, quiet=self.cfg.quiet)

    def train_multitask(self, weights: Sequence[float], seed: int) -> tuple[dict[str, torch.Tensor], dict]:
        """One model fine-tuned on all tasks jointly, loss ``Σ w_t ℓ_t`` (see
        :func:`~submerge.bench.finetune.multitask_finetune`); cached beside the experts."""
        keys = [self.expert_key(t, seed) for t in self.tasks]
        key = hashlib.sha256(json.dumps({"mt": keys, "w": list(map(float, weights))}).encode()).hexdigest()[:20]
        data = [(*self.splits[t.name].train, self.heads[t.name]) for t in self.tasks]
        return multitask_finetune(self.bb, data, list(map(float, weights)), self.cfg.recipe, seed,
                                  self.cache / f"multitask-{key}.safetensors", quiet=self.cfg.quiet)

    def sample(self, task: str, split: str, n: int, seed: int = 0) -> tuple[list[str], list[int]]:
        """``n`` examples of ``task``'s ``split`` (a seeded permutation; the same for every method)."""
        texts, labels = getattr(self.splits[task], split)
        idx = np.random.default_rng(seed).permutation(len(texts))[:n]
        return [texts[i] for i in idx], [labels[i] for i in idx]

    def score(self, split: str) -> dict[str, np.ndarray]:
        return {t.name: correct(self.bb, *getattr(self.splits[t.name], split), self.heads[t.name])
                for t in self.tasks}

    def evaluate(self, state: dict[str, torch.Tensor], split: str) -> dict[str, np.ndarray]:
        self.bb.load(state)
        res = self.score(split)
        self.bb.reset()
        return res

    def evaluate_routed(self, state: dict[str, torch.Tensor], experts, split: str, mode: str = "route",
                        **routing):
        """Score the static ``state`` with ESM++ ``experts`` attached (``mode`` route or oracle;
        ``routing`` options such as ``top_k`` or ``global_routing`` go to :func:`submerge.routing.attach`).

        Returns per-task correctness, the routing report (true task = the task being scored) and
        the wall seconds of the scoring."""
        from submerge.routing import RoutingRecorder, attach

        self.bb.load(state)
        router = attach(self.bb.model, experts, **routing)
        rec = RoutingRecorder(router)
        t0 = time.perf_counter()
        try:
            res = {}
            for i, t in enumerate(self.tasks):
                texts, labels = getattr(self.splits[t.name], split)
                with router.oracle(i) if mode == "oracle" else rec.batch(i):
                    res[t.name] = correct(self.bb, texts, labels, self.heads[t.name])
        finally:
            seconds = time.perf_counter() - t0
            router.detach()
            self.bb.reset()
        return res, (rec.report() if mode != "oracle" else None), seconds

    def val_norm(self, res: dict[str, np.ndarray]) -> float:
        return float(np.mean([res[k].mean() / self.ft_val_mean[k] for k in res]))

    def val_score(self, state: dict[str, torch.Tensor]) -> float:
        return self.val_norm(self.evaluate(state, "val"))

    def calibration(self, n: Optional[int] = None, split: Optional[str] = None, source: Optional[str] = None,
                    seed: int = 0) -> list:
        """Per task, activation statistics of ``n`` unlabeled inputs of ``split`` (one padded batch)
        run through the task's fine-tuned expert (``source="finetuned"``) or the base model."""
        from submerge.stats.gram import collect_stats

        n = n or self.cfg.calib_n
        split = split or self.cfg.calib_split
        source = source or self.cfg.calib_source
        key = (n, split, source, seed)
        if key not in self._stats:
            out = []
            for t, expert in zip(self.tasks, self.experts):
                texts, _ = self.sample(t.name, split, n, seed)
                batch = dict(self.bb.tokenize(texts))
                if source == "finetuned":
                    self.bb.load(expert)
                out.append(collect_stats(self.bb.model, [batch], progress=False,
                                         info={"task": t.name, "n_inputs": len(texts), "split": split,
                                               "source": source}))
                self.bb.reset()
            self._stats[key] = out
            release_memory()  # the unpacked accumulators' pages, between the kept statistics
        return self._stats[key]

    def fisher(self, n: Optional[int] = None, kind: Optional[str] = None, split: str = "train", seed: int = 0,
               experts: Optional[list] = None) -> list:
        """Per task, the diagonal Fisher of its expert (``kind`` true/empirical) on ``n`` inputs of ``split``,
        through the task's frozen head (softmax of ``logit_scale`` x cosine, the fine-tuning likelihood).
        ``experts``: other fine-tunes of the same tasks (not cached)."""
        from submerge.stats.fisher import fisher_diagonal

        n = n or self.cfg.fisher_n
        kind = kind or self.cfg.fisher_kind
        key = ("fisher", n, kind, split, seed)
        if experts is not None or key not in self._stats:
            out = []
            names = self.bb.trainable_names()
            scale = self.cfg.recipe.logit_scale
            for t, expert in zip(self.tasks, experts if experts is not None else self.experts):
                texts, labels = self.sample(t.name, split, n, seed)
                head = self.heads[t.name]
                self.bb.load(expert)
                examples = [self.bb.tokenize([x]) for x in texts]
                out.append(fisher_diagonal(
                    self.bb.model, examples,
                    lambda m, ex: torch.log_softmax(scale * self.bb.forward_embed(ex) @ head.T, -1),
                    kind=kind, labels=labels, params=names, progress=False,
                    info={"task": t.name, "split": split}))
                self.bb.reset()
            release_memory()  # the gradients' pages, between the kept Fishers
            if experts is not None:
                return out
            self._stats[key] = out
        return self._stats[key]

    def drop_stats(self, kind: str) -> None:
        """Forget the cached statistics of ``kind`` (``fisher`` or calibration): the caller holds what it needs."""
        for key in [k for k in self._stats if (k[0] == "fisher") == (kind == "fisher")]:
            del self._stats[key]

    def test_row(self, method: str, setting: str, params: dict, state: dict, alpha, seconds: float,
                 curve: Optional[dict] = None, label: Optional[str] = None,
                 res: Optional[dict] = None, reference: Optional[str] = None) -> tuple[dict, dict]:
        res = self.evaluate(state, "test") if res is None else res
        per = {k: float(v.mean()) for k, v in res.items()}
        ft_mean = [max(self.ft_test[k].mean(), 1e-9) for k in res]
        _, lo, hi = paired_diff_ci(list(res.values()), [np.zeros_like(v) for v in res.values()], ft_mean)
        row = {
            "method": method, "setting": setting, "label": label or f"{method} ({setting})", "params": params,
            "alpha": alpha, "per_task": per,
            "per_task_ci": {k: bootstrap_ci(v) for k, v in res.items()},
            "avg_abs": float(np.mean(list(per.values()))),
            "avg_norm": float(np.mean([per[k] / m for k, m in zip(per, ft_mean)])),
            "avg_norm_ci": [lo, hi],
            "seconds": seconds,
        }
        if reference:
            row["reference"] = reference
        if curve:
            row["val_curve"] = {str(k): v for k, v in sorted(curve.items())}
        return row, res


def _param_text(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items() if k != "weight")


def _esmpp_rows(S: BenchSession, found, stats, test_correct: dict, static=None) -> list[dict]:
    """ESM++ rows: experts of rank r on the val-tuned ESM merge, routed (and oracle at the largest r),
    with routing accuracy and the inference time against the static model (``static``: its test scores and
    seconds when the ESM row already measured them)."""
    from submerge.routing import build_experts
    from submerge.search import search_alpha

    if found is None:
        found = search_alpha("esm", S.base, S.experts, S.val_score, {}, stats=stats, random_seed=S.cfg.seed,
                             **_search_kwargs(S.cfg, get_method("esm")))
        static = None
    if static is None:
        t0 = time.perf_counter()
        res0 = S.evaluate(found.state, "test")
        static = (res0, time.perf_counter() - t0)
    static_res, static_s = static
    n_test = sum(len(v) for v in static_res.values())
    rows = []
    for r in S.cfg.esmpp_ranks:
        t0 = time.perf_counter()
        experts = build_experts(found.state, S.experts, stats, rank=r, tasks=S.names)
        build_s = time.perf_counter() - t0
        ov = experts.overhead(sum(v.numel() for v in S.base.values()))
        # the cosine rule, the task-id upper bound, then (largest rank) each linear router in turn
        variants = [("route", None)] + ([("oracle", None)] + [("route", k) for k in S.cfg.esmpp_routers]
                                        if r == max(S.cfg.esmpp_ranks) else [])
        for mode, kind in variants:
            router_s = _add_router(S, found, experts, stats, kind) if kind else 0.0
            res, report, secs = S.evaluate_routed(found.state, experts, "test", mode)
            how = "oracle task id" if mode == "oracle" else "routed" + (f", {kind} router" if kind else "")
            label = f"esm_pp r={r} ({how})"
            params = {"rank": r, "alpha": found.alpha, **({"router": kind} if kind else {})}
            row, _ = S.test_row("esm_pp", f"r={r}, {mode}" + (f", {kind} router" if kind else ""), params,
                                found.state, found.alpha, build_s + router_s, label=label, res=res,
                                reference="oracle" if mode == "oracle" else None)
            row["overhead"] = ov
            row["ms_per_example"] = 1000 * secs / n_test
            row["static_ms_per_example"] = 1000 * static_s / n_test
            if report is not None:
                row["routing"] = report.to_dict()
            test_correct[label] = res
            rows.append(row)
            S.say(f"{label:34s} norm {100 * row['avg_norm']:.1f}"
                  + (f"  routing acc {report.accuracy:.3f}" if report is not None else "")
                  + f"  {row['ms_per_example']:.2f} ms/example (static {row['static_ms_per_example']:.2f})")
    return rows


def _add_router(S: BenchSession, found, experts, stats, kind: str) -> float:
    """Give ``experts`` a linear router (``gaussian``: from the calibration statistics; ``trained``: on each
    task's calibration inputs run through the static merge) in place of the cosine rule; returns seconds."""
    from submerge.routing.routers import gaussian_router, train_router

    t0 = time.perf_counter()
    if kind == "gaussian":
        gaussian_router(experts, stats)
    elif kind == "trained":
        batches = [[dict(S.bb.tokenize(S.sample(t.name, S.cfg.calib_split, S.cfg.calib_n)[0]))] for t in S.tasks]
        S.bb.load(found.state)
        try:
            train_router(S.bb.model, experts, batches)
        finally:
            S.bb.reset()
    else:
        raise ConfigError(f"unknown ESM++ router {kind!r}; use gaussian or trained")
    return time.perf_counter() - t0


def _row_settings(cfg: dict) -> dict:
    """The settings (a config as a dict) that change every method's numbers: less what only picks methods or
    prints, and less the settings one method alone reads (``METHOD_SETTINGS``: they key that method's rows)."""
    own = {k for keys in METHOD_SETTINGS.values() for k in keys}
    return {k: v for k, v in cfg.items() if k not in ("methods", "quiet", "cache_dir") and k not in own}


class _RowCache:
    """Each finished method's rows and per-example test correctness, kept beside the experts
    (``<cache>/bench-rows/<settings>/<method>.json``), so a run that is stopped (a full text8 run is hours on
    2 cores) resumes at the next method.  Keyed by every setting that changes a number: the config (less
    what only picks methods or prints), the experts and the submerge version."""

    def __init__(self, S: "BenchSession", cfg: BenchConfig):
        settings = _row_settings(asdict(cfg))
        # a setting only one method reads keys that method's file alone (so adding one keeps the others' rows)
        self.suffix = {m: "-" + hashlib.sha256(json.dumps([getattr(cfg, k) for k in keys]).encode()).hexdigest()[:8]
                       for m, keys in METHOD_SETTINGS.items()}
        blob = json.dumps({"cfg": settings, "experts": S.expert_keys, "backbone": S.bb.fingerprint,
                           "version": __version__}, sort_keys=True, default=str)
        self.folder = S.cache / "bench-rows" / hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.sizes = {t.name: len(S.splits[t.name].test[0]) for t in S.tasks}

    def get(self, method: str) -> Optional[tuple[list[dict], dict]]:
        path = self.folder / f"{method}{self.suffix.get(method, '')}.json"
        if not path.is_file():
            return None
        try:
            hit = json.loads(path.read_text())
            correct_ = {label: {k: unpack_correct(v, self.sizes[k]) for k, v in per.items()}
                        for label, per in hit["correct"].items()}
        except (ValueError, KeyError, TypeError):  # a damaged file: the method is run again
            return None
        return hit["rows"], correct_

    def put(self, method: str, rows: list[dict], test_correct: dict) -> None:
        labels = [r["label"] for r in rows]
        blob = {"rows": rows, "correct": {lab: {k: pack_correct(v) for k, v in test_correct[lab].items()}
                                          for lab in labels}}
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{method}{self.suffix.get(method, '')}.json"
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(json.dumps(blob))
        tmp.replace(self.folder / name)


MAX_RESUME_BYTES = 256 * 1024 * 1024
MAX_RESUME_ROWS = 10_000


def read_resume(path: str | Path, cfg: "BenchConfig") -> dict:
    """An earlier run's ``results.json``, read and checked before anything else of a run is done (no backbone,
    data or expert is loaded for a file that cannot be used): a regular JSON file whose ``config`` holds this
    run's settings (less what only picks methods or prints), whose ``rows`` are objects naming their
    ``method`` and ``label``, and whose ``per_example`` maps to objects.  Returns the parsed file."""
    from submerge.io.files import read_user_text

    path = Path(path)
    where = f"--resume {path}"
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror})") from None
    if size > MAX_RESUME_BYTES:
        raise ConfigError(f"{where}: {size / 1e6:.0f} MB, larger than a bench results.json can be")
    try:
        old = json.loads(read_user_text(path, "--resume file"))
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where}: not a readable bench results.json (not valid JSON: "
                          f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{where}: not a bench results.json (expected a JSON object)")
    for key, kind in (("config", dict), ("rows", list), ("per_example", dict)):
        if not isinstance(old.get(key), kind):
            raise ConfigError(f"{where}: not a bench results.json ('{key}' must be a JSON "
                              f"{'object' if kind is dict else 'list'}, got {type(old.get(key)).__name__})")
    if len(old["rows"]) > MAX_RESUME_ROWS:
        raise ConfigError(f"{where}: {len(old['rows'])} rows; a bench results.json holds at most {MAX_RESUME_ROWS}")
    for i, row in enumerate(old["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("method"), str) or not isinstance(row.get("label"), str):
            raise ConfigError(f"{where}: rows[{i}] is not a row (an object with 'method' and 'label' strings)")
    if not all(isinstance(v, dict) for v in old["per_example"].values()):
        raise ConfigError(f"{where}: per_example must map to objects (per row / model, per task)")
    # the suite's name is not compared: a task list is "custom" in results.json; the tasks are compared later
    mine = {k: v for k, v in _row_settings(asdict(cfg)).items() if k != "suite"}
    theirs = {k: v for k, v in _row_settings(old["config"]).items() if k != "suite"}
    differ = sorted(k for k in set(mine) | set(theirs)
                    if json.dumps(mine.get(k), sort_keys=True, default=str)
                    != json.dumps(theirs.get(k), sort_keys=True, default=str))
    if differ:
        raise ConfigError(f"{where}: that run's settings differ from this one's in "
                          + ", ".join(f"{k} ({quoted(theirs.get(k))} there, {quoted(mine.get(k))} here)"
                                      for k in differ[:6]) + (" ..." if len(differ) > 6 else ""))
    old["_path"] = str(path)
    return old


def import_rows(S: "BenchSession", cache: _RowCache, old: dict, methods: Sequence[str]) -> list[str]:
    """Put the rows of an earlier run's ``results.json`` (read and checked by :func:`read_resume`) into the row
    cache, so this run computes only the methods (or rows: ``multitask``) it lacks and writes one results.json
    with all of them.  Refused unless that run had the same backbone, tasks and the same experts — their
    per-example test correctness must equal this session's, which retrained experts meet only when
    fine-tuning is reproducible.  Rows of a method whose own settings differ, and rows saved without
    per-example correctness, are left out (computed again).  Returns the methods imported."""
    path, cfg = old["_path"], S.cfg
    old_cfg, old_rows, per = old["config"], old["rows"], old["per_example"]
    backbone = old.get("backbone")
    if old.get("tasks") != S.names or not isinstance(backbone, dict) or backbone.get("sha256") != S.bb.fingerprint:
        raise ConfigError(f"--resume {path}: another backbone or task list ({quoted(old.get('tasks'))})")
    for which, scores in (("finetuned", S.ft_test), ("zeroshot", S.zs_test)):
        theirs_bits = per.get(which) or {}
        bad = [t for t in S.names if theirs_bits.get(t) != pack_correct(scores[t])]
        if bad:
            raise ConfigError(f"--resume {path}: the {which} models there score test examples differently from "
                              f"this session's on {', '.join(bad)} — other experts (fine-tuning not reproduced "
                              f"here); its rows cannot be mixed with this run's")
    by_method: dict[str, list[dict]] = {}
    for row in old_rows:
        by_method.setdefault(row["method"], []).append(row)
    imported = []
    for method, rows in by_method.items():
        if method != "multitask" and method not in methods:
            continue
        own = METHOD_SETTINGS.get(method, ())
        if any(json.dumps(old_cfg.get(k)) != json.dumps(getattr(cfg, k)) for k in own):
            continue
        try:
            correct_ = {r["label"]: {t: unpack_correct(per["rows"][r["label"]][t], cache.sizes[t]) for t in S.names}
                        for r in rows}
        except (KeyError, TypeError, ValueError):
            continue
        if method == "multitask":  # how it was trained, as the fine-tuning log said
            log = (old.get("finetune_log") or {}).get("multitask (all tasks jointly)")
            rows = [{**r, "train_log": r.get("train_log", log or {})} for r in rows]
        cache.put(method, rows, correct_)
        imported.append(method)
    return imported


def _search_kwargs(cfg: BenchConfig, m) -> dict:
    """How a method's scale is searched: ``cfg.search == "full"``: as ``submerge tune``'s ``alpha: auto``
    (λ methods on ``cfg.lambda_grid``, α methods by their own strategy); ``coarse``: about 6 points (λ methods
    keep the grid)."""
    if m.scale_param != "lambda" and cfg.search == "coarse":
        return {"strategy": "coarse"}
    return auto_search_kwargs(m, cfg.lambda_grid)


def _method_rows(S: BenchSession, method: str, stats, searched: dict) -> Optional[tuple[list[dict], dict]]:
    """One method's rows and per-example test correctness: its scale searched on val (default and
    val-tuned rows), each distinct model scored on test once; None when the method does not apply.
    ``searched`` carries ESM's search to the ESM++ rows that follow it."""
    from submerge.search import search_alpha

    name, post = split_row_name(method)
    m = get_method(name)
    params = _params(method)
    cfg = S.cfg
    t0 = time.perf_counter()
    settings, rows, test_correct = [], [], {}
    if method == "esm_pp":
        rows += _esmpp_rows(S, searched.get("esm"), stats, test_correct, searched.get("esm_static_test"))
        return rows, test_correct
    model_params = None
    if name == "adamerging":
        return _adamerging_rows(S, test_correct)
    if name == "tall_masks":
        return _tall_rows(S, params, test_correct, t0)
    if name in ("consensus_ta", "consensus_ties"):  # each task's TALL-mask threshold chosen on its own val
        lambdas = _tall_lambdas(S, params)[0]
        model_params = [{"tall_lambda": lam} for lam in lambdas]
        params = {**params, "tall_lambda": dict(zip(S.names, lambdas))}
    if post == "surgery":
        return _surgery_rows(S, name, params, stats, test_correct, t0, searched.get(f"alpha:{name}"))
    try:
        if post == "lines":  # LiNeS' beta on the authors' grid (every point), alpha by their norm rule
            found = search_alpha(name, S.base, S.experts, S.val_score, params, stats=stats, random_seed=cfg.seed,
                                 lines=True, grid=list(cfg.lambda_grid), patience=None)
            settings.append(("val-tuned", {**params, "lines": {"alpha": found.lines_alpha, "beta": found.alpha}},
                             found.state, found.alpha, found.curve))
        elif m.scale_param is None:
            merged = merge_state_dicts(method, S.base, S.experts, params, random_seed=cfg.seed, stats=stats)
            settings.append(("default", params, merged, None, None))
        else:
            search_params = {k: v for k, v in params.items() if k != "tall_lambda"}
            found = search_alpha(method, S.base, S.experts, S.val_score, search_params, model_params, stats=stats,
                                 random_seed=cfg.seed, **_search_kwargs(cfg, m))
            if method == "esm":  # ESM++ puts its experts on the val-tuned ESM merge; nothing else is kept
                searched[method] = found
            searched[f"alpha:{method}"] = found.alpha  # "<method>+surgery" starts from this merge
            default = m.param(m.scale_param).default
            settings.append(("default", params, found.path(default, copy=True), default, None))
            settings.append(("val-tuned", {**params, m.scale_param: found.alpha}, found.state, found.alpha,
                             found.curve))
    except ConfigError as e:
        S.say(f"skip {method}: {e}")
        return None
    seconds = time.perf_counter() - t0
    done: dict = {}
    for setting, p, state, alpha, curve in settings:
        label = f"{method} ({setting})" if len(settings) > 1 else method
        # the val-tuned scale can be the default one: the same model is scored once
        t_eval = time.perf_counter()
        row, res = S.test_row(method, setting, p, state, alpha, seconds, curve, label, res=done.get(alpha))
        if method == "esm" and setting == "val-tuned" and alpha not in done:
            searched["esm_static_test"] = (res, time.perf_counter() - t_eval)  # ESM++'s static reference
        done[alpha] = res
        test_correct[label] = res
        rows.append(row)
        S.say(f"{label:34s} scale {'-' if alpha is None else format(alpha, '.3g'):>5s}  "
              f"avg abs {100 * row['avg_abs']:.1f}  norm {100 * row['avg_norm']:.1f}")
    return rows, test_correct


# Settings read by one method only: they key that method's cached rows, not the others'
METHOD_SETTINGS = {"adamerging": ("adamerging_steps", "adamerging_lr"), "esm_pp": ("esmpp_routers",)}
# TALL-mask thresholds the authors try per task (chosen on that task's validation accuracy)
TALL_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)


def _task_correct(S: BenchSession, state: dict, i: int, split: str) -> np.ndarray:
    """Per-example correctness of ``state`` on task ``i``'s ``split`` only."""
    t = S.tasks[i]
    S.bb.load(state)
    try:
        return correct(S.bb, *getattr(S.splits[t.name], split), S.heads[t.name])
    finally:
        S.bb.reset()


class _TallTask:
    """Task ``i``'s TALL models ``θ_0 + m_i ⊙ τ_MTL`` for any threshold λ, ``m_i = |τ_i| > λ |τ_MTL − τ_i|``
    (as :func:`submerge.methods.consensus.tall_masks`, bit for bit): both magnitudes are computed once per task,
    not once per threshold, and each state is written into one set of reused buffers (score it, do not keep it)."""

    def __init__(self, S: BenchSession, tau: dict, mtl: dict, i: int):
        self.S, self.mtl = S, mtl
        self.mag, self.gap = {}, {}
        for n, b in S.base.items():
            d = S.experts[i][n].float() - b.float()
            self.gap[n] = torch.sub(tau[n], d).abs_()
            self.mag[n] = d.abs_()
        self._scaled = {n: torch.empty_like(g) for n, g in self.gap.items()}
        self._keep = {n: torch.empty(g.shape, dtype=torch.bool) for n, g in self.gap.items()}
        self._out = {n: torch.empty_like(b) for n, b in S.base.items()}

    def state(self, lam: float) -> dict:
        for n, b in self.S.base.items():
            g = self.gap[n]
            torch.mul(g, float(torch.tensor(lam, dtype=g.dtype)), out=self._scaled[n])
            torch.gt(self.mag[n], self._scaled[n], out=self._keep[n])
            self._out[n].copy_(torch.where(self._keep[n], self.mtl[n], b.float()))
        return self._out


def _tall_lambdas(S: BenchSession, params: dict) -> tuple[list[float], dict, dict]:
    """Per task, the TALL threshold on TALL_GRID whose task model ``θ_0 + m_t ⊙ τ_MTL`` scores best on that
    task's validation split (ties: the smaller), as the authors; ``τ_MTL`` the sum of the task vectors, or their
    TIES merge (disjoint sum) when ``params`` has a ``density``.  Returns the thresholds, ``τ_MTL`` and
    ``θ_0 + τ_MTL``."""
    from submerge.methods.consensus import multitask_vector

    density = params.get("density")
    tau, mtl = {}, {}
    for n, b in S.base.items():
        deltas = torch.stack([e[n].float() - b.float() for e in S.experts])
        tau[n] = multitask_vector(deltas, [1.0] * len(S.experts), None if density is None else [density] * len(S.experts))
        mtl[n] = b.float() + tau[n]
    chosen = []
    for i in range(len(S.tasks)):
        task = _TallTask(S, tau, mtl, i)
        scores = {lam: float(_task_correct(S, task.state(lam), i, "val").mean()) for lam in TALL_GRID}
        chosen.append(max(scores, key=lambda lam: (scores[lam], -lam)))
        del task  # four model-sized buffers: gone before the next task's are made
    return chosen, tau, mtl


def _tall_rows(S: BenchSession, params: dict, test_correct: dict, t0: float) -> tuple[list[dict], dict]:
    """TALL masks (compression with the task id): each task scored with its own masked model
    ``θ_0 + m_t ⊙ τ_MTL`` on its own test split; thresholds per task on val.  An oracle row (needs the task id)."""
    lambdas, tau, mtl = _tall_lambdas(S, params)
    seconds = time.perf_counter() - t0
    res = {t.name: _task_correct(S, _TallTask(S, tau, mtl, i).state(lam), i, "test")
           for i, (t, lam) in enumerate(zip(S.tasks, lambdas))}
    label = "tall_masks (task id)"
    row, _ = S.test_row("tall_masks", "task id", {**params, "tall_lambda": dict(zip(S.names, lambdas))}, {}, None,
                        seconds, label=label, res=res, reference="oracle")
    n_params = sum(v.numel() for v in S.base.values())
    elem = next(iter(S.base.values())).element_size()
    row["storage"] = {"model_bytes": n_params * elem, "masks_bytes": len(S.tasks) * ((n_params + 7) // 8),
                      "experts_bytes": len(S.tasks) * n_params * elem}
    test_correct[label] = res
    S.say(f"{label:34s} norm {100 * row['avg_norm']:.1f}  thresholds "
          + ", ".join(f"{lam:g}" for lam in lambdas))
    return [row], test_correct


def _val_batches(S: BenchSession) -> list[list[dict]]:
    """Per task, its validation texts as unlabeled token batches (16 texts, length-sorted)."""
    from submerge.evaluate.scorers import length_sorted_batches

    bb = S.bb
    out = []
    for t in S.tasks:
        texts = S.splits[t.name].val[0]
        out.append([dict(bb.tokenize([texts[i] for i in idx]))
                    for idx in length_sorted_batches(bb.token_lengths(texts), 16, 16 * bb.max_len)])
    return out


def _surgery_rows(S: BenchSession, method: str, params: dict, stats, test_correct: dict, t0: float,
                  alpha: Optional[float] = None) -> tuple[list[dict], dict]:
    """Representation Surgery on ``method``'s val-tuned merge: per task a rank-16 module trained (Adam, L1, the
    paper's setting) to pull the merge's token representations towards the expert's on the task's *unlabeled
    val* inputs; scored with the task id (a reference row, as TALL masks) and routed by prototypes.
    ``alpha``: the val-tuned scale when ``method``'s own row found it already (this run or a kept row): the
    merge is rebuilt at it, as the search built it, instead of searching again."""
    from submerge.routing.surgery import attach_surgery, fit_surgery, representations
    from submerge.search import affine_path, search_alpha

    m = get_method(method)
    if alpha is None:
        found = search_alpha(method, S.base, S.experts, S.val_score, params, stats=stats, random_seed=S.cfg.seed,
                             **_search_kwargs(S.cfg, m))
        alpha, state = found.alpha, found.state
    else:  # the state the search returned at that scale
        state = affine_path(method, S.base, S.experts, params, stats=stats, random_seed=S.cfg.seed)(alpha, copy=True)
    bb = S.bb
    batches = _val_batches(S)
    bb.load(state)
    merged = [representations(bb.model, b) for b in batches]
    targets = []
    for i, b in enumerate(batches):
        bb.load(S.experts[i])
        targets.append(representations(bb.model, b))
    surgery = fit_surgery(merged, targets, tasks=S.names, rank=16, steps=500, lr=1e-3, seed=S.cfg.seed)
    del merged, targets
    seconds = time.perf_counter() - t0
    bb.load(state)
    handle = attach_surgery(bb.model, surgery)
    rows = []
    try:
        res_task = {}
        for i, t in enumerate(S.tasks):
            with handle.task(i):
                res_task[t.name] = correct(bb, *S.splits[t.name].test, S.heads[t.name])
        handle.routed.clear()
        res_route, route_acc = {}, []
        for i, t in enumerate(S.tasks):
            n0 = len(handle.routed)
            res_route[t.name] = correct(bb, *S.splits[t.name].test, S.heads[t.name])
            chosen = torch.cat(handle.routed[n0:]) if len(handle.routed) > n0 else torch.empty(0, dtype=torch.long)
            route_acc.append(float((chosen == i).float().mean()) if chosen.numel() else float("nan"))
    finally:
        handle.detach()
        bb.reset()
    p = {**params, m.scale_param: alpha, "surgery_rank": 16, "surgery_steps": 500,
         "l1_before_after": dict(zip(S.names, surgery.info["l1_before_after"]))}
    for setting, res, ref in (("task id", res_task, "oracle"), ("routed", res_route, None)):
        label = f"{method}+surgery ({setting})"
        row, _ = S.test_row(f"{method}+surgery", setting, p, state, alpha, seconds, label=label,
                            res=res, reference=ref)
        if setting == "routed":
            row["routing"] = {"accuracy": float(np.nanmean(route_acc)), "per_task": dict(zip(S.names, route_acc))}
        row["surgery_bytes"] = surgery.nbytes()
        test_correct[label] = res
        rows.append(row)
        S.say(f"{label:34s} norm {100 * row['avg_norm']:.1f}")
    return rows, test_correct


# AdaMerging rows: (label, granularity, AdaMerging++)
ADAMERGING_VARIANTS = (("adamerging (task-wise)", "task", False), ("adamerging (layer-wise)", "layer", False),
                       ("adamerging++ (layer-wise)", "layer", True))


def _adamerging_rows(S: BenchSession, test_correct: dict) -> tuple[list[dict], dict]:
    """AdaMerging task-wise, layer-wise and AdaMerging++ layer-wise: coefficients learned by entropy minimisation
    on each task's *unlabeled validation* inputs (batches of 16, length-sorted, visited in a seeded order),
    through each task's frozen head; then one test scoring per variant."""
    from submerge.evaluate.scorers import mean_pooled
    from submerge.methods.adamerging import learn, merge_with

    cfg, bb = S.cfg, S.bb
    scale = cfg.recipe.logit_scale
    inputs = _val_batches(S)
    heads = [S.heads[n] for n in S.names]

    def logits(forward, t: int, batch) -> torch.Tensor:
        return scale * mean_pooled(forward, batch) @ heads[t].T

    rows = []
    for label, granularity, ties in ADAMERGING_VARIANTS:
        t0 = time.perf_counter()
        coef = learn(bb.model, S.base, S.experts, inputs, logits, tasks=S.names, names=list(S.base),
                     granularity=granularity, ties=ties, steps=cfg.adamerging_steps, lr=cfg.adamerging_lr,
                     seed=cfg.seed)
        bb.reset()
        state = merge_with(S.base, S.experts, coef)
        params = {"granularity": granularity, "ties_density": coef.ties_density, "init": 0.3,
                  "steps": cfg.adamerging_steps, "lr": cfg.adamerging_lr,
                  "mean_coefficient": dict(zip(S.names, coef.values.mean(1).tolist()))}
        row, res = S.test_row("adamerging", label[label.index("(") + 1:-1] + (" ++" if ties else ""), params, state,
                              None, time.perf_counter() - t0, label=label)
        row["coefficients"] = {"tasks": coef.tasks, "names": coef.names, "values": coef.values.tolist(),
                               "entropy_first_last": [coef.history[0], coef.history[-1]]}
        test_correct[label] = res
        rows.append(row)
        S.say(f"{label:34s} norm {100 * row['avg_norm']:.1f}  entropy {coef.history[0]:.3f} -> "
              f"{coef.history[-1]:.3f}  ({time.perf_counter() - t0:.0f}s)")
    return rows, test_correct


def _stats_for(S: BenchSession, method: str):
    m = get_method(split_row_name(method)[0])
    if not m.uses_stats(_params(method)):
        return None
    return S.fisher() if m.stats_kind == "fisher" else S.calibration()


@one_run
def run_bench(out_dir: str | Path, cfg: Optional[BenchConfig] = None, backend: str = "local",
              address: Optional[str] = None, actors: Optional[int] = None,
              resume: Optional[str | Path] = None, overwrite: bool = False) -> dict:
    """Run the benchmark into ``out_dir`` (an earlier run's results there are replaced only with ``overwrite``).
    ``backend="ray"`` computes the method rows on Ray actors
    (``address``: a running cluster, else a local one; ``actors``: how many, default one per CPU), each
    holding the session's experts and statistics from the object store; the rows are the local ones.
    ``resume``: an earlier run's results.json with the same settings and experts (see :func:`import_rows`):
    its rows are kept and only the missing methods are computed (adding a method to a published table)."""
    cfg = cfg or BenchConfig()
    out_dir = Path(out_dir)
    check_output_target(out_dir, what="results folder")
    if (out_dir / "results.json").exists() and not overwrite:
        raise ConfigError(f"results folder {out_dir} already holds a results.json (pass --overwrite to replace it, "
                          f"or --out for another folder)")
    if backend not in ("local", "ray"):
        raise ConfigError(f"unknown backend {backend!r}; use local or ray")
    if backend == "ray":
        from submerge.evaluate.backends import check_ray_address

        check_ray_address(address)
    previous = read_resume(resume, cfg) if resume is not None else None  # before any model or data is read
    n_tasks = len(suite_tasks(cfg))
    methods = applicable_methods(n_tasks, cfg.methods)
    estimate = RunEstimate(n_tasks, methods + (["multitask"] if cfg.multitask else []))
    note = None if cfg.quiet else busy_note(torch.get_num_threads())
    if note:  # after every check: a refused run prints its one error line only
        print(f"note: {note}", flush=True)
    S = BenchSession(cfg, estimate=estimate)
    say, tasks, names, bb = S.say, S.tasks, S.names, S.bb
    rows, test_correct = [], {}
    # methods that read the same statistics run one after the other, so each kind is held only while used
    # (Fisher and calibration statistics alive together made the peak of a quick run)
    method_of = {n: get_method(split_row_name(n)[0]) for n in methods}
    kind = {n: method_of[n].stats_kind if method_of[n].uses_stats(_params(n)) else "" for n in methods}
    methods.sort(key=lambda n: {"": 0, "fisher": 1}.get(kind[n], 2))
    say(f"[{S.clock()}] merging with {len(methods)} methods: {', '.join(methods)}"
        + (" (on Ray)" if backend == "ray" else ""))
    done_rows = _RowCache(S, cfg)
    if previous is not None:
        got = import_rows(S, done_rows, previous, methods)
        say(f"kept the rows of {len(got)} methods from {resume}" + (f": {', '.join(got)}" if got else ""))
    found_rows: dict[str, Optional[tuple[list[dict], dict]]] = {}
    searched: dict[str, object] = {}
    for method in methods:
        hit = done_rows.get(method)
        if hit is not None:  # a killed run's finished methods are not redone
            hit = ([{**r, "kept": True} for r in hit[0]], hit[1])  # computed earlier: its time is its own
            found_rows[method] = hit
            estimate.method_done(method, None)
            say(f"{method}: rows kept from an earlier run with the same settings")
            for r in hit[0]:  # its val-tuned scale, for "<method>+surgery"
                if r.get("setting") == "val-tuned" and r.get("alpha") is not None:
                    searched[f"alpha:{method}"] = r["alpha"]
    todo = [n for n in methods if n not in found_rows]

    def finished(method: str, got, seconds: float) -> None:
        found_rows[method] = got
        if got is not None:
            done_rows.put(method, *got)
        estimate.method_done(method, seconds)
        say(f"[{S.clock()}] {method}: {seconds:.0f}s {estimate.line()}")

    if backend == "ray" and todo:
        from submerge.bench.parallel import ray_method_rows

        ray_method_rows(S, todo, finished, address=address, actors=actors,
                        alphas={k: v for k, v in searched.items() if k.startswith("alpha:")})
    else:
        # statistics (Fisher, calibration) are dropped after the last method that reads them
        last_use = {kind[n]: i for i, n in enumerate(todo) if kind[n]}
        for i, method in enumerate(todo):
            t0 = time.perf_counter()
            stats = _stats_for(S, method)
            if stats is not None and last_use.get(kind[method]) == i:
                S.drop_stats(kind[method])
            got = _method_rows(S, method, stats, searched)
            # a search holds three model-sized buffers, a merge one: release them before the next method
            # (keeping them made a full run grow by ~0.3 GB per method on a 23M-parameter backbone)
            stats = None
            release_memory()
            finished(method, got, time.perf_counter() - t0)
    for method in methods:  # the table keeps the method order whatever order the rows finished in
        if found_rows.get(method) is not None:
            rows += found_rows[method][0]
            test_correct.update(found_rows[method][1])
    if cfg.multitask:
        label = "multitask (joint fine-tuning)"
        hit = done_rows.get("multitask")  # its row is kept with the methods' (the model may be gone)
        if hit is not None:
            (row,), res = hit[0], hit[1][label]
            info = {**row.get("train_log", {}), "cached": True}
        else:
            t0 = time.perf_counter()
            weights = [1.0 / len(tasks)] * len(tasks)
            state, info = S.train_multitask(weights, cfg.seed)
            row, res = S.test_row("multitask", "joint fine-tuning", {"weights": weights}, state, None,
                                  time.perf_counter() - t0, label=label, reference="multitask")
            row["train_log"] = info
            done_rows.put("multitask", [row], {label: res})
            del state
        S.ft_logs["multitask (all tasks jointly)"] = info
        test_correct[label] = res
        rows.append(row)
        estimate.method_done("multitask", None if info.get("cached") else info.get("seconds"))
        say(f"[{S.clock()}] {label}: norm {100 * row['avg_norm']:.1f} "
            f"({'cached' if info.get('cached') else 'trained in {:.0f}s'.format(info['seconds'])}) {estimate.line()}")
    ft_test, zs_test, splits = S.ft_test, S.zs_test, S.splits
    zs = {k: float(v.mean()) for k, v in zs_test.items()}
    ft = {k: float(v.mean()) for k, v in ft_test.items()}
    ft_norm = [ft[k] for k in ft]
    comparisons = {}
    order = list(ft)
    # every row against the strongest static baseline (TSV-M) and against task arithmetic, both val-tuned
    for ref in ("tsv (val-tuned)", "task_arithmetic (val-tuned)"):
        if ref not in test_correct:
            continue
        for label, res in test_correct.items():
            if label != ref:
                d, lo, hi = paired_diff_ci([res[k] for k in order], [test_correct[ref][k] for k in order], ft_norm)
                comparisons[f"{label} - {ref}"] = {"norm_diff": d, "ci95": [lo, hi]}
    d, lo, hi = paired_diff_ci([ft_test[k] for k in ft], [zs_test[k] for k in ft])
    comparisons["finetuned - zeroshot (abs)"] = {"abs_diff": d, "ci95": [lo, hi]}
    suite = cfg.suite if not cfg.tasks else "custom"
    results = {
        "suite": suite,
        "backbone": {"name": bb.name, "path": str(bb.path), "sha256": bb.fingerprint,
                     "params": int(sum(v.numel() for v in bb.pretrained.values()))},
        "tasks": names,
        "task_info": {t.name: {"classes": list(t.class_names), "n_train": len(splits[t.name].train[0]),
                               "n_val": len(splits[t.name].val[0]), "n_test": len(splits[t.name].test[0]),
                               "majority_test": float(np.bincount(splits[t.name].test[1]).max() / len(splits[t.name].test[1])),
                               "source": t.source, "license": t.license} for t in tasks},
        "zeroshot": zs, "zeroshot_ci": {k: bootstrap_ci(v) for k, v in zs_test.items()},
        "finetuned": ft, "finetuned_ci": {k: bootstrap_ci(v) for k, v in ft_test.items()},
        "finetune_log": S.ft_logs,
        "rows": rows,
        "comparisons": comparisons,
        "seed": cfg.seed,
        # where the experts were cached changes no number (and is often a temporary path): not recorded
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "cache_dir"}, "suite": suite,
                   "recipe": asdict(cfg.recipe)},
        "warnings": list(S.warnings),
        # per test example, 1 = correct, packed (submerge.bench.evaluate.unpack_correct(hex, n_test)): any
        # paired comparison can be recomputed from results.json alone
        "per_example": {"rows": {label: {k: pack_correct(v) for k, v in res.items()} for label, res in test_correct.items()},
                        "finetuned": {k: pack_correct(v) for k, v in ft_test.items()},
                        "zeroshot": {k: pack_correct(v) for k, v in zs_test.items()}},
        "seconds_total": time.perf_counter() - S.t_start,
        # what the table cost to compute, kept rows and cached experts at the time they took then
        "seconds_compute": sum(float(r.get("seconds") or 0) for r in rows)
        + sum(float(v.get("seconds") or 0) for v in S.ft_logs.values() if isinstance(v, dict)),
        **({"resumed_from": str(resume)} if resume is not None else {}),  # rows kept: their time is not in the total
        "versions": {"submerge": __version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused or failed run leaves no empty OUT
    tmp = out_dir / ".results.json.tmp"  # replaced whole: a --resume of the same file never sees half of it
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out_dir / "results.json")
    from submerge.bench.report import write_report

    write_report(results, out_dir)
    say(f"wrote {out_dir}/results.json, results.md and plots in {results['seconds_total'] / 60:.1f} min")
    return results
