"""Exact frequent-itemset mining: all itemsets with support >= a threshold, and threshold search.

:func:`frequent_itemsets` is Eclat over bitsets (support = number of baskets containing the set).
:func:`auto_threshold` finds the threshold whose itemset count is closest to a target (the count is
monotone in the threshold, so a binary search is exact); :func:`auto_thresholds` does it per
class, optionally excluding sets frequent in more than one class (:func:`drop_shared_sets`).
"""
from __future__ import annotations

from collections.abc import Sequence, Set

import numpy as np


class _LimitReached(Exception):
    pass


def frequent_itemsets(
    baskets: Sequence[np.ndarray],
    min_support: int,
    *,
    max_size: int | None = None,
    limit: int | None = None,
) -> dict[tuple[int, ...], int]:
    """All itemsets contained in at least ``min_support`` baskets (exact Eclat over bitsets).

    Args:
        baskets: one array of items per transaction (repeats count once).
        min_support: absolute threshold (``>= 1``).
        max_size: longest itemset to report, or None for no bound.
        limit: stop after this many itemsets (the result is then incomplete), or None.

    Returns:
        ``{sorted item tuple: support}``.
    """
    if min_support < 1:
        raise ValueError(f"min_support must be >= 1 (got {min_support})")
    if not baskets:
        return {}
    owner = np.repeat(np.arange(len(baskets)), [len(b) for b in baskets])
    items = np.concatenate([np.asarray(b, np.int64) for b in baskets])
    tidsets: list[tuple[int, int, int]] = []  # (support, item, bitset)
    order = np.argsort(items, kind="stable")
    uniq, starts, sizes = np.unique(items[order], return_index=True, return_counts=True)
    for item, s, c in zip(uniq.tolist(), starts.tolist(), sizes.tolist()):
        if c >= min_support:  # c counts occurrences; the support counts distinct baskets
            mask = np.zeros(len(baskets), bool)
            mask[owner[order[s : s + c]]] = True
            if (sup := int(mask.sum())) >= min_support:
                bits = int.from_bytes(np.packbits(mask, bitorder="little").tobytes(), "little")
                tidsets.append((sup, item, bits))
    tidsets.sort()  # rarest first keeps the conditional tidsets small
    out: dict[tuple[int, ...], int] = {}

    def grow(prefix: tuple[int, ...], cands: list[tuple[int, int, int]]) -> None:
        for i, (sup, item, bits) in enumerate(cands):
            found = prefix + (item,)
            out[tuple(sorted(found))] = sup
            if limit is not None and len(out) >= limit:
                raise _LimitReached
            if max_size is not None and len(found) >= max_size:
                continue
            ext = []
            for _, item2, bits2 in cands[i + 1 :]:
                both = bits & bits2
                sup2 = both.bit_count()
                if sup2 >= min_support:
                    ext.append((sup2, item2, both))
            if ext:
                grow(found, ext)

    try:
        grow((), tidsets)
    except _LimitReached:
        pass
    return out


def count_at_least(
    baskets: Sequence[np.ndarray],
    threshold: int,
    target: int,
    max_size: int | None = None,
    exclude: Set[tuple[int, ...]] = frozenset(),
) -> int:
    """``min(#frequent itemsets at threshold not in exclude, target)``, stopping the miner early."""
    found = frequent_itemsets(baskets, threshold, max_size=max_size, limit=target + len(exclude))
    return min(sum(s not in exclude for s in found), target)


def auto_threshold(
    baskets: Sequence[np.ndarray],
    target: int,
    max_size: int | None = None,
    exclude: Set[tuple[int, ...]] = frozenset(),
) -> int:
    """The threshold whose number of frequent itemsets (outside ``exclude``) is closest to ``target``.

    The count falls as the threshold rises, so a binary search finds the largest threshold ``t``
    with at least ``target`` sets; ``t`` or ``t + 1`` (fewer than ``target``) wins by distance,
    ties to ``t``, and ``t`` when ``t + 1`` gives no set at all (a class should not vanish).
    Counts are capped at ``2 * target + 1`` so low thresholds never mine everything.
    """
    lo, hi = 1, max(len(baskets), 1)
    if count_at_least(baskets, lo, target, max_size, exclude) < target:
        return lo
    while lo < hi:  # invariant: count(lo) >= target
        mid = (lo + hi + 1) // 2
        if count_at_least(baskets, mid, target, max_size, exclude) >= target:
            lo = mid
        else:
            hi = mid - 1
    cap = 2 * target + 1
    below = count_at_least(baskets, lo + 1, cap, max_size, exclude)
    at = count_at_least(baskets, lo, cap, max_size, exclude)
    return lo if below == 0 or at - target <= target - below else lo + 1


def auto_thresholds(
    per_class: Sequence[Sequence[np.ndarray]],
    target: int,
    *,
    drop_shared: bool = True,
    max_size: int | None = None,
    rounds: int = 4,
) -> list[int]:
    """Per-class thresholds giving about ``target`` condensed graphs in all, split evenly by class.

    Each class first gets the threshold closest to its share on its own. With ``drop_shared``,
    sets frequent in another class are then excluded from the count: a few rounds of one class at
    a time, the other classes' thresholds held fixed (each step is an exact 1-D search since the
    count stays monotone in the threshold), until the thresholds stop changing. The thresholds
    seen that leave the fewest classes empty, then come closest to the shares, win.
    """
    c = len(per_class)
    shares = [max(target // c + (k < target % c), 1) for k in range(c)]
    chosen = [auto_threshold(b, s, max_size) for b, s in zip(per_class, shares)]
    if not drop_shared or c < 2:
        return chosen
    mined = [frequent_itemsets(b, t, max_size=max_size) for b, t in zip(per_class, chosen)]

    def miss() -> tuple[int, int]:  # (empty classes, distance to the shares) after dropping shared sets
        kept = drop_shared_sets(mined)
        return sum(not m for m in kept), sum(abs(len(m) - s) for m, s in zip(kept, shares))

    best, best_miss = list(chosen), miss()
    for _ in range(rounds):
        before = list(chosen)
        for k in range(c):
            others = {s for j in range(c) if j != k for s in mined[j]}
            chosen[k] = auto_threshold(per_class[k], shares[k], max_size, exclude=others)
            mined[k] = frequent_itemsets(per_class[k], chosen[k], max_size=max_size)
            if (m := miss()) < best_miss:
                best, best_miss = list(chosen), m
        if chosen == before or best_miss == (0, 0):
            break
    return best


def drop_shared_sets(mined: Sequence[dict[tuple[int, ...], int]]) -> list[dict[tuple[int, ...], int]]:
    """Each class's sets without those frequent in another class (exact set equality)."""
    seen: dict[tuple[int, ...], int] = {}
    for m in mined:
        for s in m:
            seen[s] = seen.get(s, 0) + 1
    return [{s: v for s, v in m.items() if seen[s] == 1} for m in mined]
