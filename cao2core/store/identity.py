"""A run's identity (the configuration and the sha256 of every file it read) compared with another's, in words."""
from __future__ import annotations

import json


def identity_change(old: dict, new: dict) -> str:
    """What differs between the identities of two runs (their manifests' ``identity``), in words."""
    a, b = old.get("identity"), new.get("identity")
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "it was written by another version of cao2, which recorded no identity"

    def leaves(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(leaves(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    la, lb = leaves(a), leaves(b)
    changed = sorted(k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k))
    if not changed:
        return "its identity differs"
    key = changed[0]

    def short(v):
        return f"{v[:12]}…" if isinstance(v, str) and len(v) == 64 else json.dumps(v)
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    return f"{key} was {short(la.get(key))}, now {short(lb.get(key))}{more}"


def file_hashes(record, prefix: str = "") -> dict:
    """Every ``sha256`` entry of a nested record (a generator's description, a manifest entry) by its dotted path:
    ``{"generator.transformer": "4d57…"}``. What a run's identity and a shared set's card list as files read."""
    found = {}
    if isinstance(record, dict):
        for key, value in record.items():
            if isinstance(value, dict):
                found.update(file_hashes(value, f"{prefix}{key}."))
            elif key == "sha256":
                found[prefix.rstrip(".") or "file"] = value
    return found
