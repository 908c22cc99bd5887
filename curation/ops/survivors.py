"""Which members of a near-duplicate group survive: the keep policy (cap:K, keep_one, tag) and the seeded choice.

Pure numpy, used by the dedup_text stage after its groups are found (`curation.spark.dedup`).
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["KeepPolicy", "parse_policy", "select_survivors"]


@dataclass(frozen=True)
class KeepPolicy:
    """How many members of each near-duplicate group to keep: `cap` of them, or all when None (tag)."""

    cap: int | None

    def __str__(self) -> str:
        if self.cap is None:
            return "tag"
        return "keep_one" if self.cap == 1 else f"cap:{self.cap}"


def parse_policy(spec: str) -> KeepPolicy:
    """``"cap:K"`` (K >= 1) keeps K members per group, ``"keep_one"`` is ``cap:1``, ``"tag"`` keeps all."""
    spec = spec.strip()
    if spec == "tag":
        return KeepPolicy(cap=None)
    if spec == "keep_one":
        return KeepPolicy(cap=1)
    kind, separator, cap_text = spec.partition(":")
    if kind == "cap" and separator and cap_text.isdigit() and int(cap_text) >= 1:
        return KeepPolicy(cap=int(cap_text))
    raise ValueError(f"bad keep policy {spec!r}: expected 'cap:K' with an integer K >= 1, 'keep_one' or 'tag'")


def select_survivors(group_ids: np.ndarray, uniform_keys: np.ndarray, policy: KeepPolicy | str) -> np.ndarray:
    """Boolean keep mask: per group, the `policy.cap` members with the smallest uniform key.

    `uniform_keys` are the rows' u(seed, uid, purpose) draws (DESIGN.md section 3), so which members
    survive is random across groups yet reproducible and independent of row order. Every row is in
    a group (a row that is nobody's duplicate is a group of one). Equal keys, which a good hash
    makes vanishingly rare, are broken by row position, the one case where row order matters.
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    group_ids, uniform_keys = np.asarray(group_ids), np.asarray(uniform_keys, dtype=np.float64)
    if group_ids.shape != uniform_keys.shape or group_ids.ndim != 1:
        raise ValueError(
            f"group_ids and uniform_keys must be 1-D of one length: {group_ids.shape} vs {uniform_keys.shape}"
        )
    if np.isnan(uniform_keys).any():
        raise ValueError("uniform_keys contain NaN")
    if policy.cap is None or len(group_ids) == 0:
        return np.ones(len(group_ids), dtype=bool)
    _, group_codes = np.unique(group_ids, return_inverse=True)
    order = np.lexsort((np.arange(len(group_ids)), uniform_keys, group_codes))
    sorted_codes = group_codes[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    rank = np.arange(len(order)) - np.repeat(group_starts, np.diff(np.r_[group_starts, len(order)]))
    keep = np.zeros(len(group_ids), dtype=bool)
    keep[order] = rank < policy.cap
    return keep

