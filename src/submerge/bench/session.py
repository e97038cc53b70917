"""A benchmark session: what every row of a run shares — the backbone, the tasks and their seeded splits, the
frozen heads, the experts (fine-tuned once, cached), the reference scores and the statistics data-based methods
read — and the run's settings (:class:`BenchConfig`).  Used by :func:`~submerge.bench.run.run_bench`, by its Ray
actors (:mod:`submerge.bench.ray`) and by the scripts in ``benchmarks/``, so every number comes from one protocol.

Protocol (as the CLIP task-arithmetic benchmarks): frozen zero-shot heads, encoder-only fine-tuning, each merged
encoder scored with every task's own head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import numpy as np
import torch

from submerge.bench.backbone import Backbone
from submerge.bench.estimate import RunEstimate
from submerge.bench.evaluate import bootstrap_ci, correct, pack_correct, paired_diff_ci, unpack_correct
from submerge.bench.finetune import Recipe, cache_key, cached_path, finetune, load_cached, multitask_finetune
from submerge.bench.tasks import SUITES, get_task
from submerge.device import release_memory
from submerge.errors import ConfigError
from submerge.io.caches import cache_folder
from submerge.search import LAMBDA_GRID

log = logging.getLogger("submerge.bench")


# One method of every family (module of submerge.methods) that can merge several experts: the quick run's rows
QUICK_METHODS = ("linear", "task_arithmetic", "task_arithmetic+lines", "ties", "dare_ties", "consensus_ta", "model_stock", "multislerp",
                 "sce", "ram", "tsv", "iso_cts", "fisher", "regmean", "esm", "esm_pp")


# Named expert suites (fine-tuning recipes): "default" (lr 1e-4) and the second suite of the ESM ablation,
# experts fine-tuned at 3x the learning rate (benchmarks/results/esm_ablation/README.md).
EXPERT_SUITES = {"default": Recipe(), "lr3e-4": Recipe(lr=3e-4)}


@dataclass
class SuiteConfig:
    """The settings every suite's run has (the encoder suite's :class:`BenchConfig`, the LLM suite's
    ``LLMBenchConfig``); each suite adds its own and may change the defaults."""

    suite: str = "text8"
    tasks: Optional[list[str]] = None
    methods: Optional[list[str]] = None
    seed: int = 0
    n_train: int = 2000
    n_val: int = 300
    n_test: int = 1000
    lambda_grid: list[float] = field(default_factory=lambda: list(LAMBDA_GRID))
    cache_dir: Optional[str] = None
    quiet: bool = False
    calib_n: int = 32              # calibration inputs per task for data-based methods (ESM, RegMean)
    calib_split: str = "train"     # where they come from: "train" or "val" (never test)
    calib_source: str = "finetuned"  # statistics in the task's fine-tuned expert (ESM) or the base
    fisher_n: int = 64             # inputs per task for the diagonal Fisher (fisher / posterior rows)
    search: str = "full"           # α search: "full" (the papers' grids, ESM's golden section) or "coarse"
    multitask: bool = True         # the reference row: one model fine-tuned on all tasks jointly


@dataclass
class BenchConfig(SuiteConfig):
    recipe: Recipe = field(default_factory=Recipe)
    backbone: Optional[str] = None
    fisher_kind: str = "sampled"   # one drawn class per input: the true Fisher at one backward pass
    esmpp_ranks: list[int] = field(default_factory=lambda: [8, 32])  # ESM++ expert ranks reported
    esmpp_routers: list[str] = field(default_factory=lambda: ["gaussian", "trained"])  # beside cosine, largest r
    adamerging_steps: int = 100    # AdaMerging: Adam steps on unlabeled val inputs (the paper: 500 at lr 1e-3)
    adamerging_lr: float = 5e-3    # ... at 5x the paper's rate, so the coefficients can travel as far

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


class SuiteSession:
    """What every suite's session shares (the encoder suite's :class:`BenchSession`, the LLM suite's
    ``LLMSession``): the clock, the reference scores' test views, validation scoring and the test rows.  A
    session provides ``t_start``, ``names``, ``tasks``, ``cfg``, ``base``, ``experts``, ``say``,
    ``reference_scores(which, split)``, ``evaluate(state, split)`` (per task, per-example 0/1 arrays),
    ``task_correct(state, i, split)``, ``ft_val_mean``, ``fingerprint``, ``test_size(task)``, ``_stats``, and
    ``backbone`` (its model with ``load(state)`` / ``reset()``) and ``calibration_batch(i, split, n, seed)``."""

    questions_key: Optional[str] = None  # a hash of the evaluated questions as asked, where the config alone
    #                                      does not fix them (the LLM suite's demonstrations): it keys cached rows

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    def experts_bytes(self) -> int:
        """What the experts take as stored: one dense copy of the merged tensors each (a suite whose experts
        are stored smaller, e.g. as LoRA adapters, says so)."""
        n_params = sum(v.numel() for v in self.base.values())
        return len(self.experts) * n_params * next(iter(self.base.values())).element_size()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.backbone.load(state)

    def reset(self) -> None:
        self.backbone.reset()

    @contextlib.contextmanager
    def loaded(self, state: Optional[dict[str, torch.Tensor]]) -> Iterator[torch.nn.Module]:
        """The model with ``state`` loaded (None: the pre-trained weights), reset to them afterwards whatever
        happens inside."""
        if state is not None:
            self.load(state)
        try:
            yield self.model
        finally:
            self.reset()

    def evaluate_routed(self, state: dict[str, torch.Tensor], experts, split: str, mode: str = "route",
                        **routing):
        """Score the static ``state`` with ESM++ ``experts`` attached (``mode`` route or oracle; ``routing``
        options such as ``top_k`` or ``global_routing`` go to :func:`submerge.routing.attach`), through the
        session's ``score_each`` (a chat model routes each sequence from its prompt only).

        Returns per-task scores, the routing report (true task = the task being scored) and the wall seconds of
        the scoring."""
        from submerge.routing import RoutingRecorder, attach

        with self.loaded(state) as model:
            router = attach(model, experts, **routing)
            rec = RoutingRecorder(router)
            t0 = time.perf_counter()
            try:
                res = self.score_each(split, router.oracle if mode == "oracle" else rec.batch, router=router)
            finally:
                seconds = time.perf_counter() - t0
                router.detach()
        return res, (rec.report() if mode != "oracle" else None), seconds

    def stored_scores(self, key: dict, n: int, compute: Callable[[], tuple[np.ndarray, dict]],
                      note: dict) -> tuple[np.ndarray, dict]:
        """A reference model's per-example correctness on ``n`` examples, kept on disk under the session's
        cache (``scores/``, named by a hash of ``key``): read when there, else ``compute()`` -> (correctness,
        extra JSON fields) and written with ``note``.  Returns the correctness and the stored fields."""
        blob = json.dumps(key, sort_keys=True)
        path = self.cache / "scores" / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"
        hit = json.loads(path.read_text()) if path.exists() else None
        if hit is not None and hit.get("n") == n:
            return unpack_correct(hit["correct"], n), hit
        correct_, extra = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"n": n, "correct": pack_correct(correct_), **extra, **note}))
        tmp.replace(path)
        return correct_, extra

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

    def val_norm(self, res: dict[str, np.ndarray]) -> float:
        return float(np.mean([res[k].mean() / self.ft_val_mean[k] for k in res]))

    def val_score(self, state: dict[str, torch.Tensor]) -> float:
        return self.val_norm(self.evaluate(state, "val"))

    def drop_stats(self, kind: str) -> None:
        """Forget the cached statistics of ``kind`` (``fisher`` or calibration): the caller holds what it needs."""
        for key in [k for k in self._stats if (k[0] == "fisher") == (kind == "fisher")]:
            del self._stats[key]

    def calibration(self, n: Optional[int] = None, split: Optional[str] = None, source: Optional[str] = None,
                    seed: int = 0) -> list:
        """Per task, activation statistics of its ``calibration_batch`` (``n`` inputs of ``split``) run through
        the task's fine-tuned expert (``source="finetuned"``) or the base model; kept until ``drop_stats``."""
        from submerge.stats.gram import collect_stats

        n = n or self.cfg.calib_n
        split = split or self.cfg.calib_split
        source = source or self.cfg.calib_source
        key = (n, split, source, seed)
        if key not in self._stats:
            out = []
            for i, (t, expert) in enumerate(zip(self.tasks, self.experts)):
                batch = self.calibration_batch(i, split, n, seed)
                with self.loaded(expert if source == "finetuned" else None) as model:
                    out.append(collect_stats(model, [batch], progress=False,
                                             info={"task": t.name, "n_inputs": len(batch["input_ids"]),
                                                   "split": split, "source": source}))
            self._stats[key] = out
            release_memory()  # the unpacked accumulators' pages, between the kept statistics
        return self._stats[key]

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


class BenchSession(SuiteSession):
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
            key = {"backbone": self.bb.fingerprint, "task": t.fingerprint(), "model": model,
                   "split": split, "n": [self.cfg.n_train, self.cfg.n_val, self.cfg.n_test],
                   "max_len": self.bb.max_len, "head": hashlib.sha256(head.numpy().tobytes()).hexdigest()}

            def compute(i=i, texts=texts, labels=labels, head=head):
                with self.loaded(self.experts[i] if which == "finetuned" else None):
                    return correct(self.bb, texts, labels, head), {}

            out[t.name], _ = self.stored_scores(key, len(texts), compute,
                                                {"task": t.name, "model": model, "split": split})
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

    def score_each(self, split: str, context: Callable[[int], ContextManager], router=None) -> dict[str, np.ndarray]:
        """Per-task correctness of the model as loaded now, task ``i`` scored inside ``context(i)``.  ``router``
        (an ESM++ router or a surgery handle) needs no mask here: an encoder's inputs hold no answer, so it pools
        what the attention mask marks."""
        res = {}
        for i, t in enumerate(self.tasks):
            with context(i):
                res[t.name] = correct(self.bb, *getattr(self.splits[t.name], split), self.heads[t.name])
        return res

    def representations(self, batches: Sequence[dict]) -> torch.Tensor:
        """The encoder's output token states (padding dropped) of the model as loaded now: what Representation
        Surgery corrects."""
        from submerge.routing.surgery import representations

        return representations(self.model, batches)

    def task_correct(self, state: dict[str, torch.Tensor], i: int, split: str) -> np.ndarray:
        """Per-example correctness of ``state`` on task ``i``'s ``split`` only."""
        t = self.tasks[i]
        with self.loaded(state):
            return correct(self.bb, *getattr(self.splits[t.name], split), self.heads[t.name])

    @property
    def fingerprint(self) -> str:
        """The backbone's: what the cached rows and a resumed run must share."""
        return self.bb.fingerprint

    def test_size(self, task: str) -> int:
        return len(self.splits[task].test[0])

    @property
    def backbone(self):
        return self.bb

    def unlabeled_batches(self) -> list[list[dict]]:
        """Per task, its validation texts as unlabeled token batches (16 texts, length-sorted): AdaMerging's and
        Surgery's inputs."""
        from submerge.evaluate.scorers import length_sorted_batches

        bb = self.bb
        out = []
        for t in self.tasks:
            texts = self.splits[t.name].val[0]
            out.append([dict(bb.tokenize([texts[i] for i in idx]))
                        for idx in length_sorted_batches(bb.token_lengths(texts), 16, 16 * bb.max_len)])
        return out

    def task_logits(self, forward, t: int, batch: dict) -> torch.Tensor:
        """Task ``t``'s class logits through its frozen head, the model called as ``forward`` (AdaMerging)."""
        from submerge.evaluate.scorers import mean_pooled

        return self.cfg.recipe.logit_scale * mean_pooled(forward, batch) @ self.heads[self.names[t]].T

    def calibration_batch(self, i: int, split: str, n: int, seed: int) -> dict:
        """Task ``i``'s calibration inputs: ``n`` unlabeled texts of ``split`` (a seeded sample), one padded batch."""
        texts, _ = self.sample(self.tasks[i].name, split, n, seed)
        return dict(self.bb.tokenize(texts))

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

