"""Version choice over a traffic split, deterministic per user.

Weighted rendezvous hashing (highest random weight): each version ``v`` with
weight ``w_v`` scores ``w_v / -ln(u_v)``, where ``u_v`` in (0, 1) is a hash
of (version, user); the highest score wins. Its properties are the ones a
canary needs:

- a version is chosen with probability ``w_v / sum(w)``;
- the same user always gets the same version while the split stands;
- raising one version's weight only moves users *to* it (10% -> 20% keeps
  every user already on the canary there), and lowering it only moves users
  away from it; users never shuffle between two versions whose weights did
  not change.

Cost: one 64-bit BLAKE2b and one logarithm per version with traffic.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping

BUCKETS = 10_000
_TWO_64 = float(1 << 64)


def _unit_hash(version: str, user_key: str) -> float:
    digest = hashlib.blake2b(f"{version}\x00{user_key}".encode(), digest_size=8).digest()
    # Map to the open interval (0, 1) so the logarithm is finite and non-zero.
    return (int.from_bytes(digest, "big") + 0.5) / _TWO_64


def choose_version(split: Mapping[str, int], user_key: str | None) -> str:
    """The version this user's request goes to. ``split`` maps version -> percent (> 0 somewhere)."""
    key = user_key if user_key is not None else os.urandom(8).hex()
    best_version = ""
    best_score = -1.0
    for version, weight in split.items():
        if weight <= 0:
            continue
        score = weight / -math.log(_unit_hash(version, key))
        if score > best_score:
            best_version, best_score = version, score
    if not best_version:
        raise ValueError("the split gives no version any traffic")
    return best_version


def user_bucket(user_key: str | None) -> int | None:
    """A stable 0..9999 bucket of the user for inference logs (A/B analysis without user ids)."""
    if user_key is None:
        return None
    digest = hashlib.blake2b(user_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class InvalidSplit(ValueError):
    """A requested split that cannot be applied; the message names the offending keys."""


def validate_split(split: Mapping[str, object], active_versions: set[str]) -> dict[str, int]:
    """Check a requested split: whole percentages, active versions only, summing to 100.

    Returns the split as ``{version: int}``; raises InvalidSplit.
    """
    if not split:
        raise InvalidSplit("the split is empty; give each active version a whole percentage summing to 100")
    bad_type = sorted(k for k, v in split.items() if isinstance(v, bool) or not isinstance(v, int))
    if bad_type:
        raise InvalidSplit(f"percentages must be whole numbers: {', '.join(bad_type)}")
    values = {k: int(v) for k, v in split.items()}  # type: ignore[call-overload]
    out_of_range = sorted(k for k, v in values.items() if not 0 <= v <= 100)
    if out_of_range:
        raise InvalidSplit(f"percentages must be between 0 and 100: {', '.join(out_of_range)}")
    unknown = sorted(set(values) - active_versions)
    if unknown:
        known = ", ".join(sorted(active_versions)) or "none"
        raise InvalidSplit(f"not active versions: {', '.join(unknown)} (active: {known})")
    total = sum(values.values())
    if total != 100:
        raise InvalidSplit(f"percentages sum to {total}, not 100: {values}")
    return values


def rebalance(split: dict[str, int], version: str, percent: int) -> dict[str, int]:
    """Give ``version`` ``percent``; scale the others to share the rest in proportion.

    Largest-remainder rounding keeps whole percentages that sum to 100.
    """
    others = {v: w for v, w in split.items() if v != version and w > 0}
    if not others:
        return {version: 100}
    rest = 100 - percent
    total = sum(others.values())
    exact = {v: w * rest / total for v, w in others.items()}
    result = {v: int(x) for v, x in exact.items()}
    leftover = rest - sum(result.values())
    for v in sorted(exact, key=lambda v: exact[v] - result[v], reverse=True)[:leftover]:
        result[v] += 1
    result[version] = percent
    return {v: w for v, w in result.items() if w > 0 or v == version}
