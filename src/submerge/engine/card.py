"""The model card (README.md) written next to every merged model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from submerge.engine.plan import MergeOptions, MergePlan


def write_model_card(path: Path, plan: "MergePlan", options: "MergeOptions", seed: Optional[int],
                     files: list[str]) -> None:
    from submerge.version import __version__

    m = plan.method
    cfg = plan.config
    models = cfg.referenced_models()
    base = cfg.base_model
    lines = ["---"]
    if base:
        lines += ["base_model:", f"- {base}"]
    lines += ["library_name: transformers", "tags:", "- submerge", "- merge", f"- {m.name}", "---", ""]
    lines += [
        "# Merged model",
        "",
        f"Made with [submerge](https://pypi.org/project/submerge/) {__version__} using "
        f"**{m.pretty_name}** (`{m.name}`).",
        "",
        f"- Paper: {m.paper} — {m.url}",
        f"- Variant: {m.variant}",
        f"- Compute dtype: {options.compute_dtype}; output dtype: {cfg.out_dtype or cfg.dtype or 'as the inputs'}",
    ]
    if m.scale_param is not None:
        value = plan.global_params.get(m.scale_param)
        given = bool(cfg.parameters and m.scale_param in cfg.parameters)
        how = options.scale_note or ("set in the config" if given else
                                     "the method's default (not tuned; choose it with submerge.search_alpha)")
        lines.append(f"- Scale: {m.scale_param} = {value} ({how})")
    if plan.stats:
        lines.append("- Calibration: " + "; ".join(
            f"`{k}`: {r.info.get('n_inputs')} inputs, {r.info.get('tokens')} tokens ({r.info.get('source')} model)"
            for k, r in plan.stats.items()))
    if m.randomized:
        lines.append(f"- Random seed: {seed} (per-tensor seeds derive from it; rerun with "
                     f"`--random-seed {seed}` for identical tensors)")
    lines += ["", "## Inputs", ""]
    for key in models:
        role = " (base)" if key == base else ""
        rev = f" — Hub revision `{plan.revisions[key]}`" if key in plan.revisions else ""
        lines.append(f"- `{key}`{role}{rev}")
    lines += ["", f"{len(plan.jobs)} tensors, in {len(files)} file(s): " + ", ".join(f"`{f}`" for f in files)]
    if plan.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in plan.notes]
    if plan.ignored:
        lines += ["", "## Ignored settings", "", "The config holds settings mergekit ignores; they were ignored here too:",
                  ""] + [f"- {w}" for w in plan.ignored]
    lines += ["", "## Configuration", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    path.write_text("\n".join(lines))
