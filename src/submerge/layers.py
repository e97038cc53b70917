"""What a tensor is, from its name: the numbered block stack it belongs to (``prefix.N.``), the role of a
linear layer in a transformer block (query, key, value, attention output, MLP in/out) and its layer family.
The planner, the methods (LiNeS, ESM, ESM++), the routing runtime and ``submerge analyze`` all read these
rules; they sit below all of them."""

from __future__ import annotations

import re
from collections import Counter
from typing import Optional

from submerge.errors import ConfigError

_LAYER_RE = re.compile(r"^(.*?\.)(\d+)(\..*)$")  # prefix.N.suffix

ROLES = ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out")
# Module-name rules for BERT/RoBERTa, Llama/Mistral/Qwen, GPT-2/NeoX, HF CLIP/ViT and open_clip.
# Order matters: the attention output projection is matched before the MLP output.
_DEFAULT_ROLE_RULES: list[tuple[str, str]] = [
    ("qkv", r"(in_proj_weight|c_attn\.weight|\.qkv(_proj)?\.weight|query_key_value\.weight|Wqkv\.weight)$"),
    ("q", r"(query|q_proj|q_lin)\.weight$"),
    ("k", r"(key|k_proj|k_lin)\.weight$"),
    ("v", r"(value|v_proj|v_lin)\.weight$"),
    ("attn_out", r"(attention\.output\.dense|o_proj|out_proj|attn\.c_proj|self_attn\.dense|out_lin|"
                 r"attention\.dense)\.weight$"),
    ("mlp_in", r"(intermediate\.dense|gate_proj|up_proj|fc1|c_fc|dense_h_to_4h|lin1|w1|w3)\.weight$"),
    ("mlp_out", r"(output\.dense|down_proj|fc2|mlp\.c_proj|dense_4h_to_h|lin2|w2)\.weight$"),
]


def parse_role_patterns(spec: str) -> list[tuple[str, re.Pattern]]:
    """Role rules: the built-in ones, with ``"role=regex;role=regex"`` overrides tried first."""
    rules: list[tuple[str, re.Pattern]] = []
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        role, sep, rx = part.partition("=")
        role = role.strip()
        if not sep or role not in ROLES:
            raise ConfigError(f"role_patterns: expected 'role=regex' with role in {list(ROLES)}, got {part!r}")
        try:
            rules.append((role, re.compile(rx.strip())))
        except re.error as e:
            raise ConfigError(f"role_patterns: bad regex {rx!r} ({e})") from None
    rules += [(r, re.compile(rx)) for r, rx in _DEFAULT_ROLE_RULES]
    return rules


def layer_role(name: str, rules: list[tuple[str, re.Pattern]]) -> Optional[tuple[str, re.Match]]:
    for role, rx in rules:
        m = rx.search(name)
        if m:
            return role, m
    return None


def family_of(name: str) -> str:
    """The layer family: the name with its (first) layer index replaced by ``*``."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def layer_structure(names: list[str]) -> tuple[Optional[str], dict[str, tuple[int, str]]]:
    """Find the repeated layer stack: the ``prefix.N.`` container holding most tensors.

    Returns the prefix and, for each tensor in the stack, ``(layer index, suffix)``.
    """
    found: dict[str, tuple[str, int, str]] = {}
    counts: Counter = Counter()
    for name in names:
        m = _LAYER_RE.match(name)
        if m:
            found[name] = (m.group(1), int(m.group(2)), m.group(3))
            counts[m.group(1)] += 1
    if not counts:
        return None, {}
    prefix = counts.most_common(1)[0][0]
    return prefix, {n: (i, s) for n, (p, i, s) in found.items() if p == prefix}
