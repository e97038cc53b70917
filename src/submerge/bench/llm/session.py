"""The LLM suite's session: the chat model, the skills and their seeded splits, one expert per skill (LoRA or full
fine-tuning, cached), the reference scores (base and experts) and the statistics data-based methods read.  It
speaks the same protocol as the encoder suite's session (:class:`~submerge.bench.session.SuiteSession`), so every
merge method's rows come from the same code (:func:`~submerge.bench.rows.method_rows`): scales chosen on
validation, test touched once per reported model.

Scores are exact match of greedy decoding (per test example, 0/1) and the gold answers' mean token NLL, both from
one teacher-forced pass per batch (:mod:`submerge.evaluate.generation`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch

from submerge.bench.cache import check_same_scores
from submerge.bench.evaluate import unpack_correct
from submerge.bench.llm.backbone import ChatModel
from submerge.bench.llm.finetune import LLMRecipe, expert_key, expert_log, train_expert
from submerge.bench.llm.tasks import GenSplit, get_llm_task, questions_fingerprint
from submerge.bench.session import SuiteConfig, SuiteSession
from submerge.device import bound_heap, release_memory
from submerge.evaluate.generation import answer_example, score_answers
from submerge.io.caches import cache_folder

# The candidate skills; the suite is chosen from them on validation (benchmarks/results/llm/README.md)
LLM_CANDIDATES = ("translate_de", "translate_fr", "country_code", "reverse_dictionary", "sentiment", "language",
                  "arithmetic", "antonym", "number_words",  # these two: amendment 3 (before run 3's experts)
                  "date_words", "words_to_number", "time_12h")  # amendment 4 (during run 3, from validation)
# The suite: the candidates that passed the rule on validation in selection run 3 (every expert +26 to +96 points;
# val-tuned task arithmetic 72.9% normalised), fixed before any test number (benchmarks/results/llm/README.md)
LLM_SUITE = ("sentiment", "antonym", "number_words", "date_words", "words_to_number", "time_12h")


@dataclass
class LLMBenchConfig(SuiteConfig):
    suite: str = "llm"
    n_train: int = 800
    shots: int = 3                 # demonstrations before each question (earlier chat turns; see GenTask.split;
                                   # 3, not 1: benchmarks/results/llm/README.md, amendment 1)
    n_val: int = 50
    n_test: int = 150
    lambda_grid: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    search: str = "coarse"         # α search of the α methods: "coarse" (about 6 points) or "full"
    fisher_n: int = 32             # training questions per skill for the diagonal Fisher (fisher / posterior rows)
    recipe: LLMRecipe = field(default_factory=LLMRecipe)
    eval_batch: int = 32
    esmpp_ranks: list[int] = field(default_factory=lambda: [8])  # ESM++ expert ranks reported
    esmpp_routers: list[str] = field(default_factory=lambda: ["gaussian"])  # beside cosine (trained: encoder only)
    esmpp_per_token: bool = True   # also a row with every token routed on its own (causal) layer input
    adamerging_steps: int = 20     # AdaMerging: Adam steps (one batch of 8 questions per skill each) on val prompts
    adamerging_lr: float = 5e-3

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks or LLM_SUITE)


class Scores(dict):
    """Per task, per-example exact match; ``nll``: per task, the per-example answer NLLs of the same pass."""

    nll: Optional[dict[str, np.ndarray]] = None


class LLMSession(SuiteSession):
    """Everything an LLM-suite run shares; ``path``: another local chat model folder instead of SmolLM2."""

    def __init__(self, cfg: Optional[LLMBenchConfig] = None, path: Optional[str | Path] = None):
        cfg = self.cfg = cfg or LLMBenchConfig()
        self.t_start = time.perf_counter()
        bound_heap()
        self.cache = cache_folder("llm", cfg.cache_dir)
        say = self.say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
        self.cm = ChatModel(path, cfg.cache_dir)
        self.names = cfg.task_names
        self.tasks = [get_llm_task(n) for n in self.names]
        say(f"backbone {self.cm.name}: {self.cm.n_params() / 1e6:.1f}M parameters merged; "
            f"skills: {', '.join(self.names)}")
        self.splits: dict[str, GenSplit] = {t.name: t.split(cfg.seed, cfg.n_train, cfg.n_val, cfg.n_test, cfg.shots)
                                            for t in self.tasks}
        self.warnings: list[str] = []
        for t in self.tasks:
            sp = self.splits[t.name]
            got = (len(sp.train), len(sp.val), len(sp.test))
            if got != (cfg.n_train, cfg.n_val, cfg.n_test):
                self.warnings.append(f"task {t.name}: splits train/val/test = {got[0]}/{got[1]}/{got[2]} instead "
                                     f"of {cfg.n_train}/{cfg.n_val}/{cfg.n_test} (too few examples)")
        for w in self.warnings:
            say(f"warning: {w}")
        self.questions_key = questions_fingerprint([q for t in self.tasks for part in ("val", "test")
                                                    for q in getattr(self.splits[t.name], part)])
        self._encoded: dict[tuple[str, str], list] = {}
        self._scores: dict = {}
        self._stats: dict = {}
        self.base = {n: self.cm.pretrained[n] for n in self.cm.trainable_names()}
        self.expert_keys = [self.expert_key([t.fingerprint()], len(self.splits[t.name].train), cfg.seed)
                            for t in self.tasks]
        self.ft_logs: dict = {}
        self._experts: Optional[list[dict[str, torch.Tensor]]] = None
        self._adopted: Optional[dict] = None  # the experts' test scores taken from a resumed run (adopt_experts)

    # ------------------------------------------------------------------ experts (trained when first needed)
    @property
    def experts(self) -> list[dict[str, torch.Tensor]]:
        """Each skill's fine-tuned expert (dense trainable tensors), trained (or read from the cache) the first
        time a row needs them: a resumed run whose rows are all kept, or that lacks only the multitask
        reference, trains none.  Experts built after :meth:`adopt_experts` must score every test question as
        the adopted run's did, or the run stops (its rows could not be mixed with this one's)."""
        if self._experts is None:
            self._experts = self._build_experts()
            if self._adopted is not None:  # scored again by the experts just built, and checked
                self._scores.pop(("finetuned", "test"), None)
                check_same_scores(self._adopted["path"], "finetuned", self.names, self._adopted["packed"],
                                  self.reference_scores("finetuned", "test"))
        return self._experts

    def drop_experts(self) -> None:
        """Let the experts' dense tensors go (this backbone's six LoRA experts: about 3 GB) and give their pages
        back: the multitask reference, trained after every row, needs none of them.  A later row would read them
        from the cache again."""
        self._experts = None
        self._stats.clear()
        release_memory()

    def _build_experts(self) -> list[dict[str, torch.Tensor]]:
        cfg, experts = self.cfg, []
        for i, t in enumerate(self.tasks):
            key = self.expert_keys[i]
            folder = self.cache / "experts" / key
            cached = (folder / "submerge_finetune.json").is_file()
            experts.append(train_expert(self.cm, self.splits[t.name].train, cfg.recipe, cfg.seed, folder,
                                        desc=f"{cfg.recipe.kind} {t.name}", quiet=cfg.quiet))
            self.ft_logs[t.name] = {**expert_log(folder), "cached": cached, "key": key}  # its folder in the cache
            release_memory()
            self.say(f"[{self.clock()}] expert {i + 1}/{len(self.tasks)} {t.name}: "
                     + ("cached" if cached else f"trained in {self.ft_logs[t.name]['seconds']:.0f}s"))
        return experts

    # the references' val scores, computed (and printed) when a row first needs them
    @property
    def zs_val(self) -> dict[str, np.ndarray]:
        return self._val_scores("zeroshot", "base")

    @property
    def ft_val(self) -> dict[str, np.ndarray]:
        return self._val_scores("finetuned", "expert")

    def _val_scores(self, which: str, who: str) -> dict[str, np.ndarray]:
        first = (which, "val") not in self._scores
        got = self.reference_scores(which, "val")
        if first:
            self.say(f"{who} val exact match: " + ", ".join(f"{k} {v.mean():.3f}" for k, v in got.items()))
        return got

    @property
    def ft_val_mean(self) -> dict[str, float]:
        return {k: max(v.mean(), 1e-9) for k, v in self.ft_val.items()}

    def adopt_experts(self, previous: dict) -> bool:
        """Take the experts' test scores, fine-tuning logs and stored size from ``previous`` (a resumed run's
        results, :func:`~submerge.bench.cache.read_resume`) without training them, when its fine-tuning log
        names, for every skill, the expert this session would train: the same cache key, which hashes the
        backbone, the skill's data, the split size, the recipe, the seed and the demonstrations.  Nothing but
        the references is adopted (the zero-shot scores are still computed and checked, and rows are kept by
        :func:`~submerge.bench.cache.import_rows`).  The answer NLLs come as the run's per-skill means (all a
        results file keeps).  Returns whether it adopted them."""
        log = previous.get("finetune_log")
        per = previous.get("per_example", {}).get("finetuned")
        if self._experts is not None or not isinstance(log, dict) or not isinstance(per, dict):
            return False
        if [log[t].get("key") if isinstance(log.get(t), dict) else None for t in self.names] != self.expert_keys:
            return False
        try:
            test = Scores({t: unpack_correct(per[t], self.test_size(t)) for t in self.names})
        except (KeyError, TypeError, ValueError):
            return False
        nll = previous.get("finetuned_nll") or {}
        if all(isinstance(nll.get(t), (int, float)) for t in self.names):
            test.nll = {t: np.array([float(nll[t])]) for t in self.names}
        self._adopted = {"packed": per, "path": previous.get("_path"), "bytes": previous.get("experts_bytes")}
        self._scores[("finetuned", "test")] = test
        self.ft_logs.update({t: {**log[t], "cached": True, "adopted": True} for t in self.names})
        self.say("the experts' test scores adopted from the resumed run (same cache keys): none trained unless a "
                 "row needs them")
        return True

    # ------------------------------------------------------------------ protocol
    @property
    def fingerprint(self) -> str:
        return self.cm.fingerprint

    def test_size(self, task: str) -> int:
        return len(self.splits[task].test)

    def experts_bytes(self) -> int:
        """The experts' files as stored: a LoRA expert is its adapter (rank 16 on every linear layer: about
        20 MB for this backbone, not a dense copy of it), a full expert its tensors."""
        total = 0
        for key in self.expert_keys:
            folder = self.cache / "experts" / key
            files = [f for f in (folder / "adapter_model.safetensors", folder / "model.safetensors") if f.is_file()]
            if not files and self._adopted is not None and self._adopted["bytes"] is not None:
                return int(self._adopted["bytes"])  # not trained here: the size the adopted run measured
            total += files[0].stat().st_size
        return total

    def expert_key(self, fingerprints: Sequence[str], n_train: int, seed: int) -> str:
        """Keyed by everything that changes the expert: backbone, task data, split size, recipe, seed and the
        number of demonstrations its training questions carry."""
        return expert_key(self.cm, fingerprints, n_train, self.cfg.recipe, seed, self.cfg.shots)

    def encoded(self, task: str, split: str) -> list:
        if (task, split) not in self._encoded:
            self._encoded[(task, split)] = [answer_example(self.cm.tokenizer, q.prompt, q.answer, shots=q.shots)
                                            for q in getattr(self.splits[task], split)]
        return self._encoded[(task, split)]

    def _score_task(self, task: str, split: str, around=None, model=None) -> tuple[np.ndarray, np.ndarray]:
        """Exact match and answer NLL per question of ``task``'s ``split``, by ``model`` (default: the chat model
        as it is now loaded)."""
        exact, nll = score_answers(model if model is not None else self.cm.model, self.cm.tokenizer, None, None,
                                   batch_size=self.cfg.eval_batch, encoded=self.encoded(task, split), around=around)
        return exact.numpy().astype(np.float64), nll.numpy()

    def _scores_of(self, split: str, model=None, context: Optional[Callable[[int], ContextManager]] = None,
                   router=None) -> "Scores":
        around = (lambda batch: router.routing_mask(batch.prompt_mask)) if router is not None else None
        out, nll = Scores(), {}
        for i, t in enumerate(self.names):
            with context(i) if context is not None else contextlib.nullcontext():
                out[t], nll[t] = self._score_task(t, split, around, model)
        out.nll = nll
        return out

    def evaluate_model(self, model: torch.nn.Module, split: str) -> "Scores":
        """Per task, per-example exact match (with the NLLs) of another causal LM with the suite's tokenizer (an
        MoE of the experts, say) on ``split``, scored as the suite scores its own merges."""
        return self._scores_of(split, model=model)

    def evaluate(self, state: dict[str, torch.Tensor], split: str) -> dict[str, np.ndarray]:
        """Per task, per-example exact match of ``state`` on ``split`` (with the NLLs: :class:`Scores`)."""
        with self.loaded(state):
            return self._scores_of(split)

    def score_each(self, split: str, context: Callable[[int], ContextManager], router=None) -> "Scores":
        """Per-task exact match (with the NLLs) of the model as loaded now, skill ``i`` scored inside
        ``context(i)``; a ``router`` (an ESM++ router or a surgery handle) pools only each batch's prompts
        (``routing_mask``: the demonstrations and the question, never the gold answer the pass reads)."""
        return self._scores_of(split, context=context, router=router)

    def representations(self, batches: Sequence[dict]) -> torch.Tensor:
        """The decoder's last hidden states (after its final norm: what the output head reads; padding dropped)
        of the model as loaded now: what Representation Surgery corrects."""
        from submerge.routing.surgery import representation_module, representations

        return representations(self.model, batches, lambda m, b: representation_module(m)(**b).last_hidden_state)

    def task_correct(self, state: dict[str, torch.Tensor], i: int, split: str) -> np.ndarray:
        with self.loaded(state):
            return self._score_task(self.names[i], split)[0]

    def reference_scores(self, which: str, split: str) -> dict[str, np.ndarray]:
        """Per-example exact match of the base (``"zeroshot"``) or each skill's expert on its own skill
        (``"finetuned"``) on ``split``; kept on disk, keyed by backbone, task data, split and model."""
        if (which, split) in self._scores:
            return self._scores[(which, split)]
        out, nll = Scores(), {}
        for i, t in enumerate(self.tasks):
            model = "base" if which == "zeroshot" else self.expert_keys[i]
            key = {"backbone": self.fingerprint, "task": t.fingerprint(), "model": model, "split": split,
                   "seed": self.cfg.seed, "sizes": [self.cfg.n_train, self.cfg.n_val, self.cfg.n_test],
                   "shots": self.cfg.shots,
                   "questions": questions_fingerprint(getattr(self.splits[t.name], split))}

            def compute(i=i, task=t.name):
                with self.loaded(self.experts[i] if which == "finetuned" else None):
                    exact, losses = self._score_task(task, split)
                return exact, {"nll": losses.tolist()}

            out[t.name], stored = self.stored_scores(key, len(getattr(self.splits[t.name], split)), compute,
                                                     {"task": t.name, "model": model, "split": split})
            nll[t.name] = np.asarray(stored["nll"])
        out.nll = nll
        self._scores[(which, split)] = out
        return out

    def test_row(self, method: str, setting: str, params: dict, state: dict, alpha, seconds: float,
                 curve: Optional[dict] = None, label: Optional[str] = None,
                 res: Optional[dict] = None, reference: Optional[str] = None) -> tuple[dict, dict]:
        """The encoder suite's row, plus each skill's mean answer NLL (the ``lm_loss`` view)."""
        row, res = super().test_row(method, setting, params, state, alpha, seconds, curve, label, res, reference)
        nll = getattr(res, "nll", None)
        if nll is not None:
            row["per_task_nll"] = {k: float(v.mean()) for k, v in nll.items()}
            row["avg_nll"] = float(np.mean(list(row["per_task_nll"].values())))
        return row, res

    # ------------------------------------------------------------------ statistics
    @property
    def backbone(self) -> ChatModel:
        return self.cm

    def unlabeled_batches(self, batch_size: int = 8) -> list[list[dict]]:
        """Per skill, its validation questions (with their demonstrations, without answers) as left-padded
        batches, length-sorted: AdaMerging's unlabeled inputs."""
        from submerge.evaluate.generation import left_padded, prompt_ids
        from submerge.evaluate.scorers import length_sorted_batches

        pad = self.cm.tokenizer.pad_token_id
        out = []
        for t in self.names:
            heads = [prompt_ids(self.cm.tokenizer, q.prompt, shots=q.shots) for q in self.splits[t].val]
            batches = []
            for idx in length_sorted_batches([len(h) for h in heads], batch_size, 1 << 30):
                ids, mask = left_padded([heads[i] for i in idx], pad)
                batches.append({"input_ids": ids, "attention_mask": mask,
                                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)})
            out.append(batches)
        return out

    def task_logits(self, forward, t: int, batch: dict) -> torch.Tensor:
        """The next-token logits where the answer starts (the last, left-padded, prompt position): AdaMerging
        minimises their entropy."""
        return forward(**batch, logits_to_keep=1).logits[:, -1].float()

    def calibration_batch(self, i: int, split: str, n: int, seed: int) -> dict:
        """Skill ``i``'s calibration inputs: ``n`` whole conversations (demonstrations, question and gold answer)
        of ``split`` (a seeded sample), one right-padded batch."""
        from submerge.evaluate.generation import collate

        rows = self.encoded(self.names[i], split)
        idx = np.random.default_rng(seed).permutation(len(rows))[:n]
        batch = collate([rows[j] for j in idx], self.cm.tokenizer.pad_token_id)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

    def fisher(self, n: Optional[int] = None, kind: Optional[str] = None, split: str = "train", seed: int = 0) -> list:
        """Per skill, the diagonal empirical Fisher of its expert: the squared gradient of the gold answer's
        log-likelihood given the question (the whole answer, end of turn included, one question at a time) on
        ``n`` questions of ``split``.  The empirical kind only: a sequence's true Fisher would need answers
        sampled from the model."""
        from submerge.evaluate.generation import answer_logits, collate
        from submerge.stats.fisher import fisher_diagonal

        n = n or self.cfg.fisher_n
        key = ("fisher", n, "empirical", split, seed)
        if key not in self._stats:
            out = []
            pad = self.cm.tokenizer.pad_token_id

            def log_likelihood(model, example) -> torch.Tensor:
                batch = collate([example], pad)
                logp = torch.log_softmax(answer_logits(model, batch), -1)
                return logp.gather(1, batch.targets[:, None]).sum().reshape(1)

            for t, expert in zip(self.tasks, self.experts):
                rows = self.encoded(t.name, split)
                idx = np.random.default_rng(seed).permutation(len(rows))[:n]
                with self.loaded(expert) as model:
                    out.append(fisher_diagonal(model, [rows[i] for i in idx], log_likelihood,
                                               kind="empirical", labels=[0] * len(idx),
                                               params=self.cm.trainable_names(), progress=False,
                                               info={"task": t.name, "split": split, "n": len(idx)}))
            release_memory()
            self._stats[key] = out
        return self._stats[key]
