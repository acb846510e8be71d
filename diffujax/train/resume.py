"""What a resumed run compares: the run config recorded by the checkpoint against this one."""

from __future__ import annotations

from diffujax.config import upgrade


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k2: v2 for k, v in node.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def config_changes(old: dict | None, new: dict) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` for the keys whose values differ between the
    checkpoint's run config and this one (the old one read in today's keys)."""
    if not old:
        return {}
    a, b = _flat(upgrade(old)), _flat(upgrade(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
