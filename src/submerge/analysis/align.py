"""Permutation alignment by weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023, Algorithm 1).

Hidden units can be reordered without changing what a network computes; two models trained from different
initialisations therefore sit in different orderings and cannot be averaged as they are.  Weight matching finds,
for each permutation group p, the ordering of MODEL's units that maximises ``Σ ⟨W_ref, P W_model P'ᵀ⟩`` over the
tensors p touches, one group at a time with the others fixed (a linear assignment,
``scipy.optimize.linear_sum_assignment``), in a seeded random order, until a full round improves nothing.

Groups (:func:`permutation_spec` reads them from the tensor names and shapes):

* a plain MLP (a chain of ``*.weight`` [out, in] matrices with optional ``*.bias``): the hidden units between
  consecutive layers;
* transformer blocks whose linears have ESM's roles (:mod:`submerge.layers`: q, k, v, attention out, MLP in/out):
  per block the attention heads as units (q/k/v rows and their biases, attention-out columns; a head's internal
  dimensions move together) and the MLP's hidden units; with ``residual=True`` also the residual stream, permuted
  consistently through the embeddings, every LayerNorm, every block's reads and writes and the pooler's input
  (BERT/RoBERTa naming; refused, naming the tensor, when some other tensor touches the residual width and the
  rule cannot tell how).  The residual stream is off by default: a model whose output *is* the residual stream
  (an encoder without a pooler/head) would come back with permuted outputs.

The permuted model computes the same function (tests check outputs to 1e-5); only the unit order changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from submerge.errors import CheckpointError, ConfigError
from submerge.io.ledger import one_run
from submerge.io.writer import save_tensors
from submerge.layers import layer_role, layer_structure, parse_role_patterns


@dataclass
class Group:
    """One permutation: ``size`` units of ``unit`` consecutive indices each, applied to ``axes`` (tensor, axis)."""

    name: str
    size: int
    unit: int = 1
    axes: list[tuple[str, int]] = field(default_factory=list)


def _natural(name: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


def _index(perm: torch.Tensor, unit: int) -> torch.Tensor:
    return (perm[:, None] * unit + torch.arange(unit)).reshape(-1)


def _mlp_spec(state: dict[str, torch.Tensor]) -> Optional[list[Group]]:
    """Groups of a plain MLP, or None when the tensors are not a chain of linear layers."""
    mats = sorted((k for k, v in state.items() if v.dim() == 2 and k.endswith("weight")), key=_natural)
    if len(mats) < 2:
        return None
    used = set(mats)
    groups = []
    for i in range(len(mats) - 1):
        a, b = mats[i], mats[i + 1]
        if state[b].shape[1] != state[a].shape[0]:
            return None
        g = Group(f"hidden{i}", state[a].shape[0], 1, [(a, 0), (b, 1)])
        bias = a[: -len("weight")] + "bias"
        if bias in state:
            g.axes.append((bias, 0))
            used.add(bias)
        groups.append(g)
    last_bias = mats[-1][: -len("weight")] + "bias"
    used.add(last_bias)
    if set(state) - used:  # other tensors (norms, embeddings): not a plain MLP
        return None
    return groups


def _transformer_spec(state: dict[str, torch.Tensor], heads: int, residual: bool) -> list[Group]:
    rules = parse_role_patterns("")
    _, layers = layer_structure(list(state))
    blocks: dict[int, dict[str, str]] = {}
    for name in state:
        if name not in layers or not name.endswith("weight") or state[name].dim() != 2:
            continue
        hit = layer_role(name, rules)
        if hit:
            blocks.setdefault(layers[name][0], {})[hit[0]] = name
    need = {"q", "k", "v", "attn_out", "mlp_in", "mlp_out"}
    if not blocks or any(set(b) < need for b in blocks.values()):
        raise ConfigError("align: no transformer blocks with separate q, k, v, attention-out and MLP in/out linears "
                          "(BERT/RoBERTa/Llama naming), and the tensors are not a plain MLP")
    groups: list[Group] = []
    d_model = None
    touched: set[str] = set()

    def bias(w: str) -> Optional[str]:
        b = w[: -len("weight")] + "bias"
        return b if b in state else None

    for bi in sorted(blocks):
        b = blocks[bi]
        q = state[b["q"]]
        d_model = q.shape[1]
        if q.shape[0] % heads:
            raise ConfigError(f"align: {b['q']} has {q.shape[0]} rows, not a multiple of {heads} heads")
        g = Group(f"block{bi}.heads", heads, q.shape[0] // heads, [(b["q"], 0), (b["k"], 0), (b["v"], 0),
                                                                    (b["attn_out"], 1)])
        g.axes += [(x, 0) for x in (bias(b["q"]), bias(b["k"]), bias(b["v"])) if x]
        groups.append(g)
        m = Group(f"block{bi}.mlp", state[b["mlp_in"]].shape[0], 1, [(b["mlp_in"], 0), (b["mlp_out"], 1)])
        if bias(b["mlp_in"]):
            m.axes.append((bias(b["mlp_in"]), 0))
        groups.append(m)
        touched |= {b[r] for r in need} | {x for x in map(bias, b.values()) if x}
    if residual:
        r = Group("residual", d_model, 1)
        for name, x in state.items():
            if name in touched and x.dim() == 2:
                role = layer_role(name, rules)[0]
                r.axes.append((name, 0 if role in ("attn_out", "mlp_out") else 1))
            elif name in touched:  # biases: the residual's only when the layer writes it
                w = name[: -len("bias")] + "weight"
                role = layer_role(w, rules)
                if role and role[0] in ("attn_out", "mlp_out"):
                    r.axes.append((name, 0))
            elif "embeddings" in name and x.dim() == 2 and x.shape[1] == d_model:
                r.axes.append((name, 1))
            elif ("LayerNorm" in name or "layernorm" in name or "layer_norm" in name) and x.dim() == 1 \
                    and x.shape[0] == d_model:
                r.axes.append((name, 0))
            elif "pooler" in name and name.endswith("weight") and x.dim() == 2:
                r.axes.append((name, 1))
            elif d_model in tuple(x.shape) and not ("pooler" in name and name.endswith("bias")) \
                    and not name.startswith("classifier") and "position_ids" not in name:
                raise ConfigError(f"align --residual: cannot tell how {name} {list(x.shape)} reads or writes the "
                                  f"residual stream (width {d_model}); align without --residual")
        groups.append(r)
    return groups


def permutation_spec(state: dict[str, torch.Tensor], heads: Optional[int] = None,
                     residual: bool = False) -> list[Group]:
    """The permutation groups of a state dict: a plain MLP's hidden layers, else transformer blocks (``heads``
    attention heads per block, from the model's config) and optionally the residual stream."""
    mlp = _mlp_spec(state)
    if mlp is not None:
        return mlp
    if not heads:
        raise ConfigError("align: a transformer needs its number of attention heads (config.json's "
                          "num_attention_heads, or --heads)")
    return _transformer_spec(state, heads, residual)


def apply_permutations(state: dict[str, torch.Tensor], groups: list[Group],
                       perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each group's permutation applied to every axis it touches (new tensors; others shared)."""
    out = dict(state)
    for g in groups:
        idx = _index(perms[g.name], g.unit)
        for name, axis in g.axes:
            out[name] = out[name].index_select(axis, idx)
    return out


def _flat(x: torch.Tensor, axis: int, size: int, unit: int) -> torch.Tensor:
    return x.movedim(axis, 0).reshape(size, -1).double()


def weight_matching(model: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], groups: list[Group], *,
                    max_iter: int = 100, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Permutations of ``model``'s units that best match ``reference`` (Algorithm 1), and a report: the objective
    ``Σ ⟨W_ref, W_model⟩`` over the permuted tensors before and after, rounds run, units moved per group."""
    from scipy.optimize import linear_sum_assignment

    for g in groups:
        for name, axis in g.axes:
            if name not in reference:
                raise CheckpointError(f"align: tensor {name} is in the model but not in the reference")
            if model[name].shape != reference[name].shape:
                raise CheckpointError(f"align: {name} is {list(model[name].shape)} in the model but "
                                      f"{list(reference[name].shape)} in the reference")
            if model[name].shape[axis] != g.size * g.unit:
                raise CheckpointError(f"align: {name} axis {axis} has {model[name].shape[axis]} entries, group "
                                      f"{g.name} expects {g.size} x {g.unit}")
    perms = {g.name: torch.arange(g.size) for g in groups}
    by_tensor: dict[str, list[tuple[Group, int]]] = {}
    for g in groups:
        for name, axis in g.axes:
            by_tensor.setdefault(name, []).append((g, axis))

    def objective(p: dict[str, torch.Tensor]) -> float:
        cur = apply_permutations(model, groups, p)
        return float(sum((cur[n].double() * reference[n].double()).sum() for n in by_tensor))

    before = objective(perms)
    gen = torch.Generator().manual_seed(seed)
    rounds = 0
    for rounds in range(1, max_iter + 1):
        changed = False
        for gi in torch.randperm(len(groups), generator=gen).tolist():
            g = groups[gi]
            cost = torch.zeros(g.size, g.size, dtype=torch.float64)
            for name, axis in g.axes:
                w = model[name]
                for other, oaxis in by_tensor[name]:  # the other groups' current permutations on this tensor
                    if other is not g:
                        w = w.index_select(oaxis, _index(perms[other.name], other.unit))
                a = _flat(reference[name], axis, g.size, g.unit)
                b = _flat(w, axis, g.size, g.unit)
                cost += a @ b.T
            _, col = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(col, dtype=torch.long)
            old_score = float(cost[torch.arange(g.size), perms[g.name]].sum())
            new_score = float(cost[torch.arange(g.size), new].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[g.name] = new
                changed = True
        if not changed:
            break
    after = objective(perms)
    report = {"objective_before": before, "objective_after": after, "rounds": rounds,
              "moved": {g.name: int((perms[g.name] != torch.arange(g.size)).sum()) for g in groups},
              "groups": [{"name": g.name, "size": g.size, "unit": g.unit, "tensors": len(g.axes)} for g in groups]}
    return perms, report


@one_run
def align_model_dir(model: str, reference: str, out_dir: str, *, heads: Optional[int] = None,
                    residual: bool = False, max_iter: int = 100, seed: int = 0, overwrite: bool = False) -> dict:
    """``submerge align``: MODEL's units permuted to match REFERENCE, written to OUT (atomically) as MODEL's folder
    with permuted weights (config and tokenizer files copied), plus ``alignment.json``."""
    import json
    from pathlib import Path

    from submerge.io import Checkpoint, atomic_folder, check_output_target
    from submerge.io.files import GENERATION_FILES, TOKENIZER_FILES, checked_file, copy_regular_file

    mpath, rpath = Path(model), Path(reference)
    for p, what in ((mpath, "model"), (rpath, "reference")):
        if not p.is_dir():
            raise CheckpointError(f"align: {what} folder {p} does not exist")
    out = check_output_target(out_dir, [mpath, rpath], "aligned model folder")
    if out.exists() and not overwrite:
        raise ConfigError(f"aligned model folder {out_dir} already exists (pass --overwrite to replace it)")
    with Checkpoint(mpath, label=str(mpath)) as ck, Checkpoint(rpath, label=str(rpath)) as rk:
        missing = sorted(set(ck.tensors) ^ set(rk.tensors))
        if missing:
            raise CheckpointError(f"align: {missing[0]} is in only one of {mpath} and {rpath} (different "
                                  f"architectures?)")
        if heads is None and ck.config:
            heads = next((ck.config[k] for k in ("num_attention_heads", "n_head", "num_heads")
                          if isinstance(ck.config.get(k), int)), None)
        state = {n: ck.read(n) for n in ck.tensors}
        ref = {n: rk.read(n) for n in rk.tensors}
    groups = permutation_spec(state, heads, residual)
    perms, report = weight_matching(state, ref, groups, max_iter=max_iter, seed=seed)
    aligned = apply_permutations(state, groups, perms)
    report.update({"model": str(mpath), "reference": str(rpath), "residual": residual, "heads": heads,
                   "paper": "Ainsworth et al., Git Re-Basin, ICLR 2023 (weight matching)",
                   "permutations": {k: v.tolist() for k, v in perms.items()}})
    with atomic_folder(out_dir, overwrite, "aligned model folder", inputs=[mpath, rpath]) as tmp:
        save_tensors(aligned, tmp / "model.safetensors", "align", metadata={"format": "pt"})
        for f in ["config.json", *TOKENIZER_FILES, *GENERATION_FILES]:
            if (mpath / f).is_file():
                copy_regular_file(checked_file(mpath / f, mpath, "model folder"), tmp / f)
        (tmp / "alignment.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
