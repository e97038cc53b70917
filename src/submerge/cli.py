"""The command line: ``submerge merge|moe|validate|calibrate|fisher|extract-lora|methods|demo|bench|tune|pareto``."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import click

from submerge.errors import ConfigError, SubmergeError

MAX_THREADS = 1024
SEED = click.IntRange(min=0, max=2**63 - 1)


def _threads_option(fn):
    """``--threads N``: torch's CPU pool (and BLAS/OpenMP inside it) for the whole command; by default the CPUs
    this process may use (its affinity and cgroup CPU quota), never more, so a busy or limited machine is not
    oversubscribed.  The command receives the count as ``threads`` when it takes that argument."""
    import functools
    import inspect

    wants = "threads" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args, threads=None, **kwargs):
        from submerge.device import use_threads

        n = use_threads(threads)
        if wants:
            kwargs["threads"] = n
        return fn(*args, **kwargs)

    return click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
                        help="CPU threads for torch and BLAS (default: the CPUs this process may use, from its "
                             "affinity and cgroup quota). On a machine shared with other jobs, give each job its "
                             "share (e.g. --threads 1 beside one other job on 2 cores).")(wrapper)


MAX_MESSAGE = 1000  # characters of an error line; what an input holds is never echoed whole


def _one_line(text: object) -> str:
    """A message as one printable line: whitespace (newlines included) collapsed, control characters escaped
    (a file name may hold any of them), and cut in the middle past :data:`MAX_MESSAGE` characters."""
    raw = str(text)
    if len(raw) > 4 * MAX_MESSAGE:  # a 20 MB value quoted by some check: cut before escaping it
        raw = raw[: 2 * MAX_MESSAGE] + " " + raw[-2 * MAX_MESSAGE:]
    chars = (" " if ch.isspace() else ch if ch.isprintable() else ascii(ch)[1:-1] for ch in raw)
    line = " ".join("".join(chars).split())
    if len(line) > MAX_MESSAGE:
        half = MAX_MESSAGE // 2 - 20
        line = f"{line[:half]} ...[{len(str(text)) - 2 * half} characters left out]... {line[-half:]}"
    return line


def _fail(e: BaseException) -> None:
    click.echo(f"error: {_one_line(e)}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Every failure a user can act on ends as one line on stderr, never a traceback: submerge's own
    errors and OS errors (exit 2), SIGTERM/SIGHUP (128 + signal) and Ctrl-C (130), after the
    command has removed its temporary output."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx is not None else "submerge"
            click.echo(f"error: {_one_line(e.format_message())} (see '{cmd} --help')", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):
        from submerge.io.ledger import run_scope
        from submerge.io.outdir import Terminated

        try:
            with run_scope():  # every input the command reads is recorded (no OUT may hold one)
                return super().invoke(ctx)
        except SubmergeError as e:
            _fail(e)
        except Terminated as e:
            click.echo(f"error: stopped by signal {e.signum}; nothing was written", err=True)
            sys.exit(e.code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            _fail(f"{e.strerror or e}{where}")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    if quiet:
        level = logging.ERROR
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S")


@click.group(cls=_Group)
@click.version_option(package_name="submerge")
def main() -> None:
    """Merge fine-tuned models of one pre-trained base into one model."""


@main.command()
@_threads_option
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only after a successful merge).")
@click.option("--out-shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MB, 2GiB; mergekit's 5B = 5e9 bytes).")
@click.option("--compute-dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float64", "bfloat16", "float16"]),
              help="The dtype the merge math runs in (inputs are cast to it; the output takes the config's dtype).")
@click.option("--device", default="cpu", show_default=True,
              help="Where the math runs: cpu, cuda, cuda:1, mps, or auto (the GPU when there is one).")
@click.option("--random-seed", type=SEED, default=None, help="Seed for randomized methods (DARE, DELLA).")
@click.option("--no-copy-tokenizer", is_flag=True, help="Do not copy tokenizer files.")
@click.option("--no-prefetch", is_flag=True, help="Read tensors on the main thread (lower peak memory).")
@click.option("--lora-rank", default=None, help="Write the merge as a LoRA adapter on base_model at this rank "
              "(or 'auto': per layer the smallest rank keeping --lora-energy of the update).")
@click.option("--lora-energy", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.9, show_default=True,
              help="With --lora-rank auto: the share of each layer's ||dW||^2 the adapter keeps.")
@click.option("--strict", is_flag=True, help="Settings mergekit ignores (unknown keys, parameters the method does "
              "not read) are errors, not warnings.")
@click.option("--keep-intermediate", "--intermediate-dir", "-I", "keep_intermediate", default=None,
              type=click.Path(file_okay=False),
              help="Multi-stage configs: keep each named stage's result in this folder (a rerun reuses it).")
@click.option("--lazy/--no-lazy", default=True, show_default=True,
              help="Multi-stage configs: reuse a kept stage made from the same document (--no-lazy redoes it).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: the output's shards merged by Ray tasks (byte for byte the local merge).")
@click.option("--address", default=None, help="--backend ray: a running cluster's host:port (default: a new "
              "local Ray instance).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", count=True, help="More logging (-v, -vv).")
def merge(config: str, out_dir: str, overwrite: bool, out_shard_size: str, compute_dtype: str,
          device: str, threads: Optional[int], random_seed: Optional[int], no_copy_tokenizer: bool,
          no_prefetch: bool, lora_rank: Optional[str], lora_energy: float, strict: bool,
          keep_intermediate: Optional[str], lazy: bool, backend: str, address: Optional[str], quiet: bool,
          verbose: int) -> None:
    """Merge the models described by CONFIG (mergekit-compatible YAML) into OUT_DIR.  A CONFIG of several YAML
    documents is a multi-stage merge (mergekit-multimerge's format): named stages run first, later documents use
    them by name, the unnamed one is written to OUT_DIR."""
    from submerge.api import merge as run_merge
    from submerge.engine.plan import MergeOptions

    _setup_logging(verbose, quiet)
    if lora_rank is not None and lora_rank != "auto":
        try:
            lora_rank = int(lora_rank)
        except ValueError:
            raise click.BadParameter(f"{lora_rank!r} is neither an integer nor 'auto'", param_hint="--lora-rank") from None
    opts = MergeOptions(out_shard_size=out_shard_size, compute_dtype=compute_dtype, device=device,
                        threads=threads, random_seed=random_seed, overwrite=overwrite, quiet=quiet,
                        copy_tokenizer=not no_copy_tokenizer, prefetch=not no_prefetch, lora_rank=lora_rank,
                        lora_energy=lora_energy, strict=strict)
    res = run_merge(config, out_dir, opts, keep_intermediate=keep_intermediate, lazy=lazy, backend=backend,
                    address=address)
    for warning in res.ignored:
        click.echo(f"warning: {_one_line(warning)}", err=True)
    if not quiet:
        gbps = res.bytes_read / max(res.seconds, 1e-9) / 1e9
        click.echo(f"merged {res.tensors} tensors into {res.out_dir} in {res.seconds:.1f}s "
                   f"({res.bytes_read / 1e6:.0f} MB read, {gbps:.2f} GB/s)")
        for note in res.notes:
            click.echo(f"note: {note}")


@main.command()
@_threads_option
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("inputs", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("-n", "--n", "n", type=click.IntRange(min=1), default=32, show_default=True, help="Inputs used (a seeded random subset).")
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens per input (truncation).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the input subset.")
@click.option("--task", default=None, help="Task name recorded in the manifest.")
@click.option("--layers", default=None, help="Regex on module names: only matching linear layers.")
@click.option("--source", type=click.Choice(["finetuned", "base"]), default="finetuned", show_default=True,
              help="Which model MODEL_DIR is (recorded): the task's fine-tuned model (ESM) or the base.")
@click.option("--field", "field_name", default=None, help="JSONL field holding the text (default 'text').")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def calibrate(model_dir: str, inputs: str, out_dir: str, n: int, max_length: int, batch_size: int, seed: int,
              task: Optional[str], layers: Optional[str], source: str, field_name: Optional[str], device: str,
              overwrite: bool, quiet: bool) -> None:
    """Record per-layer input statistics of MODEL_DIR on INPUTS (.txt / .jsonl / .json texts, or a .pt /
    .safetensors file of input_ids [+ attention_mask]) into OUT_DIR, for esm / regmean merges."""
    from submerge.stats.gram import calibrate_model_dir

    _setup_logging(0, quiet)
    st = calibrate_model_dir(model_dir, inputs, out_dir, n=n, max_length=max_length, batch_size=batch_size,
                             seed=seed, task=task, layers=layers, source=source, field_name=field_name,
                             device=device, overwrite=overwrite, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {out_dir}: {len(st.layers)} layers (+{len(st.aliases)} sharing an input), "
                   f"{st.info.get('n_inputs')} inputs, {st.info.get('tokens')} tokens, {st.info.get('seconds')}s")


@main.command()
@_threads_option
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("inputs", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("-n", "--n", "n", type=click.IntRange(min=1), default=256, show_default=True, help="Inputs used (a seeded random subset).")
@click.option("--kind", type=click.Choice(["true", "sampled", "empirical"]), default="true", show_default=True,
              help="true: exact expectation over the predicted classes (no labels; a backward pass per class); "
                   "sampled: one class drawn per input; empirical: the given labels.")
@click.option("--label-field", default=None, help="JSONL field with the label (needed for --kind empirical).")
@click.option("--field", "field_name", default=None, help="JSONL field holding the text (default 'text').")
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--task", default=None, help="Task name recorded in the manifest.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def fisher(model_dir: str, inputs: str, out_dir: str, n: int, kind: str, label_field: Optional[str],
           field_name: Optional[str], max_length: int, seed: int, task: Optional[str], device: str, overwrite: bool,
           quiet: bool) -> None:
    """Estimate the diagonal Fisher of a sequence-classification MODEL_DIR on INPUTS into OUT_DIR, for the
    fisher / posterior merge methods (give OUT_DIR as the model's `calibration:` in the config)."""
    from submerge.stats.fisher import fisher_model_dir

    _setup_logging(0, quiet)
    st = fisher_model_dir(model_dir, inputs, out_dir, n=n, kind=kind, label_field=label_field,
                          field_name=field_name, max_length=max_length, seed=seed, task=task, device=device,
                          overwrite=overwrite, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {out_dir}: {kind} Fisher of {len(st.tensors)} tensors on {st.info['n_examples']} inputs "
                   f"in {st.info['seconds']}s")


@main.command()
@_threads_option
@click.argument("merged_dir", type=click.Path(file_okay=False))
@click.option("--expert", "experts", multiple=True, required=True, metavar="NAME=FOLDER",
              help="A task's fine-tuned model, in task-id order (repeat per task).")
@click.option("--inputs", "inputs", multiple=True, required=True, metavar="NAME=FILE",
              help="A task's unlabeled inputs (.txt / .jsonl / .json texts; repeat per task, same names).")
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True, help="Rank of each task's module.")
@click.option("--steps", type=click.IntRange(min=0), default=500, show_default=True, help="Adam steps per task.")
@click.option("--lr", type=click.FloatRange(min=0, max=10, min_open=True), default=1e-3, show_default=True)
@click.option("-n", "--n", "n", type=click.IntRange(min=1), default=256, show_default=True,
              help="Inputs per task (a seeded random subset).")
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--field", "field_name", default=None, help="JSONL field holding the text (default 'text').")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace surgery modules already in MERGED_DIR.")
@click.option("--quiet", "-q", is_flag=True)
def surgery(merged_dir: str, experts: tuple, inputs: tuple, rank: int, steps: int, lr: float, n: int,
            max_length: int, batch_size: int, field_name: Optional[str], seed: int, device: str, overwrite: bool,
            quiet: bool) -> None:
    """Representation Surgery (Yang et al., ICML 2024) for the merged model in MERGED_DIR: per task a rank-16
    module trained without labels to pull the merge's representation towards its expert's on the task's inputs;
    written beside the model (surgery.safetensors + surgery.json; the model files are untouched). Load it with
    submerge.routing.surgery.load_model(MERGED_DIR): routed by prototype, or by task id."""
    from submerge.routing.surgery import fit_surgery_folders

    _setup_logging(0, quiet)
    pairs = {}
    for what, items in (("--expert", experts), ("--inputs", inputs)):
        got = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                raise ConfigError(f"{what} {item!r}: expected NAME={'FOLDER' if what == '--expert' else 'FILE'}")
            if name in got:
                raise ConfigError(f"{what}: task {name!r} given twice")
            got[name] = value
        pairs[what] = got
    if set(pairs["--expert"]) != set(pairs["--inputs"]):
        raise ConfigError(f"--expert names {sorted(pairs['--expert'])} and --inputs names "
                          f"{sorted(pairs['--inputs'])} differ: each task needs both")
    order = list(pairs["--expert"])
    s = fit_surgery_folders(merged_dir, [(k, pairs["--expert"][k]) for k in order],
                            [pairs["--inputs"][k] for k in order], rank=rank, steps=steps, lr=lr, n=n,
                            max_length=max_length, batch_size=batch_size, seed=seed, field_name=field_name,
                            device=device, overwrite=overwrite, progress=not quiet)
    if not quiet:
        gaps = ", ".join(f"{t} {b:.4f} -> {a:.4f}" for t, (b, a) in zip(s.tasks, s.info["l1_before_after"]))
        click.echo(f"wrote {merged_dir}/surgery.safetensors: {len(s.tasks)} tasks, rank {rank}; "
                   f"L1 gap to each expert {gaps}")


@main.command()
@_threads_option
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--calibration", multiple=True, help="A `submerge calibrate` folder per model, in model order "
              "(repeat the option), for ESM's view; default: the models' calibration: entries.")
@click.option("--scorer", default=None, help="Override every task's scorer of the config's eval: block "
              "(classification, lm_loss, python:module:function); without an eval: block no scored analysis runs.")
@click.option("--topk", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.2, show_default=True,
              help="Share of entries per tensor in each task's top-k mask (mask overlap).")
@click.option("--points", type=click.IntRange(min=3), default=5, show_default=True,
              help="Points along each path, endpoints included.")
@click.option("--no-pairs", is_flag=True, help="Skip the paths between every pair of experts (T(T-1) scored paths).")
@click.option("--no-spectra", is_flag=True, help="Skip the SVD of every matrix (and ESM's view).")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def analyze(config: str, out_dir: str, calibration: tuple, scorer: Optional[str], topk: float, points: int,
            no_pairs: bool, no_spectra: bool, overwrite: bool, quiet: bool) -> None:
    """Measure why a merge of CONFIG's models will or will not work, into OUT_DIR (analysis.json, analysis.md,
    PNGs): task-vector conflicts and spectra (streamed, data-free), ESM's essential subspaces (with calibration
    statistics), and with the config's eval: block (submerge tune's format, validation data only) loss paths,
    barriers, retention and calibration of the merge."""
    from submerge.analysis.run import analyze as run_analyze

    _setup_logging(0, quiet)
    res = run_analyze(config, out_dir, calibration=calibration, scorer=scorer, topk=topk, points=points,
                      pairs=not no_pairs, spectra=not no_spectra, overwrite=overwrite, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {out_dir}: analysis.json, analysis.md and PNGs ({res['seconds']} s)")


@main.command()
@_threads_option
@click.argument("model", type=click.Path(file_okay=False))
@click.argument("reference", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Attention heads per block (default: config.json's num_attention_heads).")
@click.option("--residual", is_flag=True, help="Also permute the residual stream (embeddings, LayerNorms, every "
              "block's reads and writes, the pooler's input); only for models whose outputs pass through a pooler "
              "or head, else the outputs come back permuted.")
@click.option("--max-iter", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the order groups are matched in.")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def align(model: str, reference: str, out_dir: str, heads: Optional[int], residual: bool, max_iter: int, seed: int,
          overwrite: bool, quiet: bool) -> None:
    """Permute MODEL's hidden units (MLP neurons, attention heads as units, optionally the residual stream) to
    match REFERENCE by weight matching (Git Re-Basin), writing a functionally identical checkpoint to OUT_DIR —
    for models fine-tuned from different initialisations, before merging them."""
    from submerge.analysis.align import align_model_dir

    _setup_logging(0, quiet)
    rep = align_model_dir(model, reference, out_dir, heads=heads, residual=residual, max_iter=max_iter,
                          seed=seed, overwrite=overwrite)
    if not quiet:
        moved = sum(rep["moved"].values())
        click.echo(f"wrote {out_dir}: {len(rep['groups'])} permutation groups, {moved} units moved, "
                   f"<W_ref, W> {rep['objective_before']:.4g} -> {rep['objective_after']:.4g} in {rep['rounds']} rounds")


# mergekit-moe's options that change nothing here, accepted so its command lines run as they are (each one set is
# reported as ignored): quantised loading for the gates, mergekit's own loader, cache and writer settings
_MOE_IGNORED = (("--load-in-4bit", "the gates are computed with --gate-dtype, not bitsandbytes 4-bit"),
                ("--load-in-8bit", "the gates are computed with --gate-dtype, not bitsandbytes 8-bit"),
                ("--allow-crimes", "the output architecture's own rules decide which inputs it takes"),
                ("--low-cpu-memory", "tensors are streamed a layer at a time already"),
                ("--clone-tensors", "tensors are always copied"),
                ("--trust-remote-code", "no remote code is run"),
                ("--lazy-unpickle", "safetensors are read lazily; .bin files are read whole"),
                ("--read-to-gpu", "see --device"), ("--multi-gpu", "see --device"), ("--gpu-rich", "see --device"),
                ("--async-write", "shards are written in place"),
                ("--unsafe-truncate-embeddings", "an MoE keeps the base's embeddings"))


def _moe_compat(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        used = [flag for flag, _ in _MOE_IGNORED if kwargs.pop(flag.lstrip("-").replace("-", "_"))]
        for key in ("transformers_cache", "lora_merge_cache", "lora_merge_dtype", "write_threads"):
            if kwargs.pop(key) is not None:
                used.append("--" + key.replace("_", "-"))
        if not kwargs.pop("safe_serialization"):
            used.append("--no-safe-serialization")
        why = dict(_MOE_IGNORED)
        kwargs["ignored_flags"] = [f"{flag} ignored: {why.get(flag, 'not used by submerge moe')}" for flag in used]
        return fn(*args, **kwargs)

    for flag, _ in reversed(_MOE_IGNORED):
        wrapper = click.option(flag, is_flag=True, hidden=True)(wrapper)
    for key in ("--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--write-threads"):
        wrapper = click.option(key, default=None, hidden=True)(wrapper)
    return click.option("--safe-serialization/--no-safe-serialization", default=True, hidden=True)(wrapper)


@main.command()
@_threads_option
@_moe_compat
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only after a successful build).")
@click.option("--out-shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MB, 5B).")
@click.option("--device", default="cpu", show_default=True, help="Where the hidden-state gates are computed.")
@click.option("--cuda/--no-cuda", default=False, help="mergekit's flag: --device cuda.")
@click.option("--random-seed", type=SEED, default=None,
              help="Seed for random gates and noise_scale (mergekit's draws, in mergekit's order).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True)
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True)
@click.option("--gate-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="dtype of the base model for hidden-state gates (mergekit uses bfloat16; float32 is more exact).")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True,
              help="Allow every expert to be the same model.")
@click.option("--num-threads", "-j", "num_threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
              hidden=True)
@click.option("--strict", is_flag=True, help="Keys mergekit ignores are errors, not warnings.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True)
def moe(config: str, out_dir: str, overwrite: bool, out_shard_size: str, device: str, cuda: bool,
        random_seed: Optional[int], copy_tokenizer: bool, write_model_card: bool, gate_dtype: str,
        allow_all_same: bool, num_threads: Optional[int], strict: bool, quiet: bool, verbose: int,
        ignored_flags: list[str]) -> None:
    """Build a mixture-of-experts model from dense fine-tunes of one base, as mergekit-moe does (its YAML and
    options): Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-MoE, with routers from each expert's prompts."""
    from submerge.moe.build import MoEOptions, build_moe

    _setup_logging(verbose, quiet)
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    opts = MoEOptions(out_shard_size=out_shard_size, device="cuda" if cuda and device == "cpu" else device,
                      random_seed=random_seed, copy_tokenizer=copy_tokenizer, overwrite=overwrite,
                      allow_all_same=allow_all_same, gate_dtype=gate_dtype, strict=strict,
                      write_model_card=write_model_card, quiet=quiet)
    res = build_moe(config, out_dir, opts)
    for w in ignored_flags + res.warnings:
        click.echo(f"warning: {_one_line(w)}", err=True)
    if not quiet:
        click.echo(f"wrote {res.out_dir}: {res.architecture}, {res.tensors} tensors, {res.bytes_written / 1e6:.1f} MB "
                   f"in {res.seconds:.1f}s (seed {res.seed})")


@main.command("extract-lora")
@_threads_option
@click.argument("base")
@click.argument("finetuned")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--rank", default="16", show_default=True, help="LoRA rank per layer, or 'auto' (see --energy).")
@click.option("--energy", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.9, show_default=True,
              help="With --rank auto: per layer the smallest rank keeping this share of ||dW||^2.")
@click.option("--embeddings", is_flag=True, help="Also extract embedding tables (lora_embedding_A/B).")
@click.option("--modules", default=None, help="Regex on module names: only matching layers.")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def extract_lora_cmd(base: str, finetuned: str, out_dir: str, rank: str, energy: float, embeddings: bool,
                     modules: Optional[str], overwrite: bool, quiet: bool) -> None:
    """Write FINETUNED - BASE as a PEFT LoRA adapter in OUT_DIR (per layer, the truncated SVD of the task vector);
    peft.PeftModel.from_pretrained(base, OUT_DIR) loads it, and `model: BASE+OUT_DIR` merges it."""
    from submerge.extract import extract_lora

    if rank != "auto":
        try:
            rank = int(rank)
        except ValueError:
            raise click.BadParameter(f"{rank!r} is neither an integer nor 'auto'", param_hint="--rank") from None
    res = extract_lora(base, finetuned, out_dir, rank=rank, energy=energy, embeddings=embeddings, modules=modules,
                       overwrite=overwrite, progress=not quiet)
    if not quiet:
        mean = sum(res.kept_energy.values()) / len(res.kept_energy)
        click.echo(f"wrote {out_dir}: {len(res.ranks)} layers, ranks {min(res.ranks.values())}-"
                   f"{max(res.ranks.values())}, mean kept energy {mean:.4f}, {res.adapter_bytes / 1e6:.2f} MB "
                   f"({100 * res.adapter_bytes / max(res.finetune_bytes, 1):.2f}% of the fine-tune)"
                   + (f"; {len(res.left_out)} changed tensor(s) not LoRA-able (see README.md)" if res.left_out else ""))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Settings mergekit ignores are errors, not warnings.")
def validate(config: str, strict: bool) -> None:
    """Check CONFIG (files, tensors, shapes, parameters) without merging."""
    from submerge.api import validate as run_validate

    plan = run_validate(config, strict=strict)
    for warning in plan.ignored:
        click.echo(f"warning: {_one_line(warning)}", err=True)
    n_merge = sum(1 for j in plan.jobs if j.copy_from is None)
    click.echo(f"ok: {plan.method.name} over {len(plan.models)} model(s), {len(plan.jobs)} output "
               f"tensors ({n_merge} merged, {len(plan.jobs) - n_merge} copied), "
               f"{plan.input_bytes() / 1e6:.1f} MB to read")
    for note in plan.notes:
        click.echo(f"note: {note}")


@main.command()
@click.argument("action", type=click.Choice(["list", "clear"]), default="list")
@click.argument("kind", type=click.Choice(["experts", "calibration", "tune", "llm", "all"]), default="all")
@click.option("--yes", is_flag=True, help="With clear: do not ask.")
def cache(action: str, kind: str, yes: bool) -> None:
    """List the folders submerge keeps between runs and their sizes, or clear them (ACTION: list | clear; KIND:
    experts (the benchmark's fine-tuned experts and finished rows), calibration (tune's statistics), llm (the LLM
    suite's backbone folder, experts and rows) or all).
    Everything in them is recomputed when needed; Hugging Face's model cache is never touched."""
    from submerge.io.caches import cache_sizes, clear_cache

    sizes = cache_sizes()
    shown = [k for k in sizes if kind in ("all", k)]
    if action == "list":
        for k in shown:
            folder, n = sizes[k]
            click.echo(f"{k:<12} {n / 1e6:>10.1f} MB  {folder}" + ("" if folder.exists() else "  (none yet)"))
        click.echo(f"{'total':<12} {sum(sizes[k][1] for k in shown) / 1e6:>10.1f} MB")
        return
    total = sum(sizes[k][1] for k in shown)
    if not yes and not sys.stdin.isatty():
        raise click.UsageError("clear asks before removing anything; pass --yes to clear without asking")
    if not yes and not click.confirm(f"remove {', '.join(str(sizes[k][0]) for k in shown)} "
                                     f"({total / 1e6:.1f} MB)?", default=False):
        click.echo("nothing removed")
        return
    click.echo(f"removed {clear_cache(kind) / 1e6:.1f} MB")


@main.command()
@click.argument("name", required=False)
def methods(name: Optional[str]) -> None:
    """List merge methods with their parameters, defaults and papers (or describe NAME)."""
    from submerge.methods import get_method, list_methods

    chosen = [get_method(name)] if name else list_methods()
    for m in chosen:
        click.echo(f"{m.name}  —  {m.pretty_name}")
        click.echo(f"  paper:   {m.paper} ({m.url})")
        click.echo(f"  variant: {m.variant}")
        needs = {"required": "needs base_model", "optional": "base_model optional (the origin when given)",
                 "input": "base_model optional (merged as one more input)",
                 "ignored": "no base_model"}[m.base_role]
        n = f"{m.min_models}" + (f"..{m.max_models}" if m.max_models != m.min_models else "") if m.max_models else f">= {m.min_models}"
        click.echo(f"  inputs:  {needs}; models besides the base: {n}" + ("; randomized (--random-seed)" if m.randomized else ""))
        for p in m.params:
            extra = f" — {p.help}" if p.help else ""
            click.echo(f"    {p.describe()}{extra}")
        click.echo("")


@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Where to put the demo family and the merged model (default: a temp folder).")
@click.option("--method", default="ties", show_default=True)
def demo(out: Optional[str], method: str) -> None:
    """Build a tiny Llama family (a base and 3 fine-tunes), merge it with --method (default ties) and reload the
    result with transformers: a check that submerge works here, no data needed.  Without --out everything is
    written to a temporary folder, removed at the end."""
    import contextlib
    import shutil

    import torch
    import yaml
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from submerge.api import merge as run_merge
    from submerge.methods import get_method
    from submerge.synthetic import make_family

    m = get_method(method)
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="submerge-demo-"))
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bars, one per tiny model
    try:
        t0 = time.perf_counter()
        base, fts = make_family(root / "family", n_finetunes=3)
        click.echo(f"built a tiny Llama base + 3 fine-tunes ({time.perf_counter() - t0:.1f}s)")
        config = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts],
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
        for mdl in config["models"]:
            mdl["parameters"] = {k: v for k, v in mdl["parameters"].items() if k in m.param_names}
        config["parameters"] = {k: v for k, v in config["parameters"].items() if k in m.param_names}
        if "t" in m.param_names:
            config["parameters"]["t"] = 0.5
            config["models"] = config["models"][:1]
        cfg_path = root / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        out_dir = root / f"merged-{method}"
        res = run_merge(cfg_path, out_dir, overwrite=True, random_seed=0, quiet=True)
        model = AutoModelForCausalLM.from_pretrained(out_dir)
        ids = torch.arange(16).reshape(1, 16) % model.config.vocab_size
        with torch.no_grad():
            logits = model(ids).logits
        click.echo(f"merged with {method} in {res.seconds:.2f}s")
        click.echo(f"reloaded with transformers: logits {list(logits.shape)}, "
                   f"finite={bool(torch.isfinite(logits).all())}")
        if out:
            click.echo(f"family, config and merge in {root} (config: {cfg_path})")
        else:
            click.echo("written to a temporary folder, now removed (--out DIR keeps the family, config and merge)")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        if not out:
            with contextlib.suppress(OSError):
                shutil.rmtree(root)


@main.command()
@_threads_option
@click.option("--suite", default="text8", show_default=True,
              help="Task suite (text8; quick = text8's tasks, small splits; llm = the chat-LLM suite, SmolLM2-135M "
                   "scored by what it generates).")
@click.option("--tasks", default=None, help="Comma-separated task names (overrides --suite).")
@click.option("--methods", default=None, help="Comma-separated methods (default: every applicable one); "
              "a variant sets parameters in brackets, e.g. 'tsv[rank_tol=1e-4]', labelled and cached by that name.")
@click.option("--quick", is_flag=True, help="The README's main job: the quick suite (text8's 8 tasks, small evaluation "
              "splits, one method per family, coarse scale search, no multitask row); minutes on 2 cores.")
@click.option("--seed", default=0, show_default=True, help="Fine-tuning seed (splits are fixed).")
@click.option("--out", "out", default=None, help="Output folder (default: bench-results/<suite>-seed<seed>).")
@click.option("--cache-dir", default=None, help="Where fine-tuned experts are cached (default ~/.cache/submerge/experts).")
@click.option("--backbone", default=None, help="A local BERT-style model folder instead of all-MiniLM-L6-v2.")
@click.option("--n-train", type=click.IntRange(min=1), default=None)
@click.option("--n-val", type=click.IntRange(min=1), default=None)
@click.option("--n-test", type=click.IntRange(min=1), default=None)
@click.option("--experts", type=click.Choice(["default", "lr3e-4", "lora", "full"]), default=None,
              help="Expert suite: the default fine-tuning recipe (lr 1e-4) or the ESM ablation's second suite "
                   "(lr 3e-4); with --suite llm: lora (rank 16 on every linear layer, the default) or full.")
@click.option("--multitask/--no-multitask", default=None,
              help="Add the reference row of one model fine-tuned on all tasks jointly (default: on, off with --quick).")
@click.option("--search", type=click.Choice(["full", "coarse"]), default=None,
              help="Scale search of the alpha methods: the papers' grids / golden section (full), or about 6 points "
                   "(coarse, the --quick default).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the method rows are computed: here, or on Ray actors (the same rows).")
@click.option("--address", default=None, help="With --backend ray: a running cluster (host:port or auto); "
                                               "default: start a local one.")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --backend ray: how many actors (default: one per CPU of the cluster).")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier run in the output folder.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An earlier run's results.json with the same settings and experts: keep its rows, compute "
                   "only the methods it lacks, write one table with all (e.g. a method added since).")
@click.option("--quiet", "-q", is_flag=True)
def bench(suite: str, tasks: Optional[str], methods: Optional[str], quick: bool, seed: int, out: Optional[str],
          cache_dir: Optional[str], backbone: Optional[str], n_train: Optional[int], n_val: Optional[int],
          n_test: Optional[int], experts: Optional[str], multitask: Optional[bool], search: Optional[str],
          backend: str, address: Optional[str], actors: Optional[int], overwrite: bool, resume: Optional[str],
          quiet: bool) -> None:
    """Fine-tune experts on real tasks, merge them with every method, write tables and plots.

    Experts, their scores and the multitask model are cached in ~/.cache/submerge/experts (--cache-dir):
    a rerun only merges and scores."""
    if suite == "llm":
        _bench_llm(tasks, methods, quick, seed, out, cache_dir, backbone, n_train, n_val, n_test, experts, multitask,
                   search, backend, resume, overwrite, quiet)
        return
    if experts in ("lora", "full"):
        raise click.UsageError(f"--experts {experts} is an LLM-suite recipe (--suite llm)")
    from submerge.bench.run import run_bench
    from submerge.bench.session import EXPERT_SUITES, BenchConfig

    kw = {k: v for k, v in dict(tasks=tasks.split(",") if tasks else None,
                                methods=_bench_rows(methods) if methods else None, seed=seed,
                                cache_dir=cache_dir, backbone=backbone, n_train=n_train, n_val=n_val,
                                n_test=n_test, quiet=quiet, multitask=multitask, search=search,
                                recipe=EXPERT_SUITES[experts] if experts else None).items() if v is not None}
    cfg = BenchConfig.quick(**kw) if quick else BenchConfig(suite=suite, **kw)
    name = f"{'quick' if quick else suite}{'' if experts in (None, 'default') else '-' + experts}-seed{seed}"
    out_dir = Path(out) if out else Path("bench-results") / name
    run_bench(out_dir, cfg, backend=backend, address=address, actors=actors, resume=resume, overwrite=overwrite)


def _bench_rows(text: str) -> list[str]:
    from submerge.bench.presets import split_methods

    return split_methods(text)


def _bench_llm(tasks, methods, quick, seed, out, cache_dir, backbone, n_train, n_val, n_test, experts, multitask,
               search, backend, resume, overwrite, quiet) -> None:
    """``bench --suite llm``: the chat-LLM suite (submerge.bench.llm)."""
    from submerge.bench.llm.finetune import LLMRecipe
    from submerge.bench.llm.run import run_llm_bench
    from submerge.bench.llm.session import LLMBenchConfig

    for flag, value in (("--quick", quick), ("--backend ray", backend == "ray")):
        if value:
            raise click.UsageError(f"{flag} is not available with --suite llm yet")
    if experts not in (None, "lora", "full"):
        raise click.UsageError(f"--experts {experts} is an encoder-suite recipe; the LLM suite takes lora or full")
    from submerge.device import keep_freed_memory

    keep_freed_memory()  # measured on this suite: 10-20% less wall time (README, "The LLM suite")
    kw = {k: v for k, v in dict(tasks=tasks.split(",") if tasks else None,
                                methods=_bench_rows(methods) if methods else None, seed=seed, cache_dir=cache_dir,
                                n_train=n_train, n_val=n_val, n_test=n_test, quiet=quiet, multitask=multitask,
                                search=search, recipe=LLMRecipe.full() if experts == "full" else None).items()
          if v is not None}
    cfg = LLMBenchConfig(**kw)
    name = f"llm{'-full' if experts == 'full' else ''}-seed{seed}"
    run_llm_bench(Path(out) if out else Path("bench-results") / name, cfg, overwrite=overwrite, backbone=backbone,
                  resume=resume)


@main.command()
@_threads_option
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Run the sweep in this process, or on a Ray cluster (statistics as Ray tasks, candidates on "
                   "actors holding the tensors once).")
@click.option("--address", default=None, help="Ray: a running cluster's head (host:port, or auto); default: start "
              "a local one.")
@click.option("--actors", type=click.IntRange(min=1), default=None, help="Ray: sweep actors (default: one per CPU).")
@click.option("--cache-dir", default=None, help="Where computed statistics are cached (default "
              "~/.cache/submerge/calibration).")
@click.option("--random-seed", type=SEED, default=0, show_default=True, help="Seed for randomized methods.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only after a successful run).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True)
def tune(config: str, out_dir: str, backend: str, address: Optional[str], actors: Optional[int],
         cache_dir: Optional[str], threads: Optional[int], random_seed: int, overwrite: bool, quiet: bool,
         verbose: int) -> None:
    """Choose the merge method and its parameters on your validation data; write the best merge.

    CONFIG is a merge config without merge_method, plus search: (methods and the parameters to try: a list,
    {range: [lo, hi], step: s}, or alpha/lambda: auto), eval: (per task a validation file and a scorer:
    classification, lm_loss, generation (a chat model's exact match) or {python: module:function}) and
    objective: (mean, worst or {weighted: ...}).  OUT_DIR gets the winning merge (as `submerge merge` writes
    it) with tune.json, tune.md and tune.png.  Only validation data is read.  Exit code 1 when some candidates
    failed (the others are reported)."""
    from submerge.tune import tune as run_tune

    _setup_logging(verbose, quiet)
    res = run_tune(config, out_dir, backend=backend, address=address, overwrite=overwrite, quiet=quiet,
                   cache_dir=cache_dir, threads=threads, actors=actors, random_seed=random_seed)
    if res.errors:
        for e in res.errors:
            click.echo(f"error: {_one_line(e)}", err=True)
        click.echo(f"error: {len(res.errors)} of {len(res.results)} candidates failed; the others are in "
                   f"{out_dir}/tune.json", err=True)
        sys.exit(1)


@main.command("bench-export")
@_threads_option
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--suite", default="quick", show_default=True, help="Task suite (quick, text8, llm).")
@click.option("--tasks", default=None, help="Comma-separated task names (overrides --suite).")
@click.option("--seed", default=0, show_default=True, help="Fine-tuning seed of the experts.")
@click.option("--experts", type=click.Choice(["default", "lr3e-4", "lora", "full"]), default=None,
              help="The encoder suite's recipes (default, lr3e-4) or the LLM suite's (lora, full).")
@click.option("--cache-dir", default=None, help="Where fine-tuned experts are cached (default ~/.cache/submerge/experts).")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def bench_export(out_dir: str, suite: str, tasks: Optional[str], seed: int, experts: Optional[str],
                 cache_dir: Optional[str], overwrite: bool, quiet: bool) -> None:
    """Write the benchmark's base, experts and validation data as ordinary files, with a ready tune.yaml.

    OUT_DIR gets base/ and experts/<task>/ (Hugging Face folders; each expert carries its frozen head),
    data/<task>.val.jsonl and .calib.jsonl, and tune.yaml: `submerge tune OUT_DIR/tune.yaml TUNED`
    then reproduces the benchmark's val-tuned rows.  Experts come from the benchmark's cache (fine-tuned first
    when missing)."""
    if suite == "llm":
        from submerge.bench.llm.export import export_llm
        from submerge.bench.llm.finetune import LLMRecipe
        from submerge.bench.llm.session import LLMBenchConfig

        if experts not in (None, "lora", "full"):
            raise click.UsageError(f"--experts {experts} is an encoder-suite recipe; the LLM suite takes lora or full")
        kw = {k: v for k, v in dict(tasks=tasks.split(",") if tasks else None, seed=seed, cache_dir=cache_dir,
                                    quiet=quiet, recipe=LLMRecipe.full() if experts == "full" else None).items()
              if v is not None}
        export_llm(out_dir, LLMBenchConfig(multitask=False, **kw), overwrite=overwrite)
        return
    if experts in ("lora", "full"):
        raise click.UsageError(f"--experts {experts} is an LLM-suite recipe (--suite llm)")
    from submerge.bench.export import export_bench
    from submerge.bench.session import EXPERT_SUITES, BenchConfig

    kw = {k: v for k, v in dict(tasks=tasks.split(",") if tasks else None, seed=seed, cache_dir=cache_dir,
                                quiet=quiet, recipe=EXPERT_SUITES[experts] if experts else None).items()
          if v is not None}
    cfg = BenchConfig.quick(multitask=False, **kw) if suite == "quick" and not tasks else BenchConfig(suite=suite, **kw)
    export_bench(out_dir, cfg, overwrite=overwrite)


@main.command()
@_threads_option
@click.option("--tasks", default="rt_sentiment,rt_subjectivity", show_default=True,
              help="Comma-separated benchmark tasks (2 or 3 for a grid; more are sampled).")
@click.option("--grid", type=click.IntRange(min=2, max=1001), default=21, show_default=True, help="Points per edge of the weight simplex.")
@click.option("--samples", type=click.IntRange(min=1), default=30, show_default=True, help="Weightings sampled for > 3 tasks.")
@click.option("--rules", default="isotropic,diagonal,mixture", show_default=True,
              help="Posterior families: isotropic (= task arithmetic), diagonal (Fisher), mixture (EM over seeds).")
@click.option("--mixture-seeds", default="0,1", show_default=True, help="Fine-tuning seeds = mixture components.")
@click.option("--multitask", default="0.1,0.3,0.5,0.7,0.9", show_default=True,
              help="2 tasks: weights of task 1 for true multitask fine-tunes (ground truth); '' for none.")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--quick", is_flag=True, help="1000 training / 100 val / 300 test examples per task.")
@click.option("--n-train", type=click.IntRange(min=1), default=None)
@click.option("--n-test", type=click.IntRange(min=1), default=None)
@click.option("--fisher-n", type=click.IntRange(min=1), default=None, help="Inputs per task for each expert's Fisher (default 64).")
@click.option("--cache-dir", default=None)
@click.option("--out", "out", default=None, help="Output folder (default: bench-results/pareto-<tasks>).")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier run in the output folder.")
@click.option("--quiet", "-q", is_flag=True)
def pareto(tasks: str, grid: int, samples: int, rules: str, mixture_seeds: str, multitask: str, split: str, seed: int,
           quick: bool, n_train: Optional[int], n_test: Optional[int], fisher_n: Optional[int],
           cache_dir: Optional[str], out: Optional[str], overwrite: bool, quiet: bool) -> None:
    """Preview task trade-offs: sweep task weights, merge with posterior rules, plot the fronts (PNG)."""
    from submerge.bench.pareto import ParetoConfig, run_pareto
    from submerge.bench.session import BenchConfig

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    kw = {k: v for k, v in dict(n_train=n_train, n_test=n_test, fisher_n=fisher_n, cache_dir=cache_dir,
                                quiet=quiet).items() if v is not None}
    bench = BenchConfig(**{"n_train": 1000, "n_val": 100, "n_test": 300, **kw}) if quick else BenchConfig(**kw)
    cfg = ParetoConfig(tasks=names, grid=grid, samples=samples, rules=[r.strip() for r in rules.split(",") if r.strip()],
                       mixture_seeds=[int(x) for x in mixture_seeds.split(",") if x.strip()],
                       multitask=[float(x) for x in multitask.split(",") if x.strip()], split=split, seed=seed,
                       bench=bench)
    out_dir = Path(out) if out else Path("bench-results") / f"pareto-{'-'.join(names)}-seed{seed}"
    res = run_pareto(out_dir, cfg, overwrite=overwrite)
    if not quiet:
        click.echo(f"wrote {out_dir}/pareto.json, pareto.md, pareto.png in {res['seconds_total'] / 60:.1f} min")
        for rule, g in res["gaps"].items():
            click.echo(f"{rule}: {g['same_weights']:.2f} points from the multitask models at the same weights, "
                       f"{g['to_front']:.2f} from its front")


if __name__ == "__main__":  # pragma: no cover
    main()


def run() -> None:
    """The ``submerge`` console script: :func:`main`, then a fast exit.

    Tearing down an interpreter that imported torch takes about a second (module and allocator
    finalisers), after every output is written, renamed and closed; the script flushes its streams
    and ends the process at once instead.  ``SUBMERGE_CLEAN_EXIT=1`` keeps the normal interpreter exit
    (profilers, coverage).  In-process callers (``main``, click's test runner) are unaffected."""
    import logging

    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command == "merge":
        from submerge.device import reuse_freed_buffers

        reuse_freed_buffers()  # measured: about 12% of a TIES merge's wall time (README, merge speed)
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            click.echo(str(e.code), err=True)
    if os.environ.get("SUBMERGE_CLEAN_EXIT") == "1":
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
