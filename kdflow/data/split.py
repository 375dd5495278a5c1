"""Deterministic, stratified train/val/test assignment."""
from __future__ import annotations

import logging

import numpy as np

from kdflow.errors import DataError

log = logging.getLogger(__name__)


def _split_off(
    index: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` into (kept, taken), ``fraction`` taken, stratified by ``labels[index]``."""
    from sklearn.model_selection import train_test_split  # heavy import, only when splitting

    if fraction <= 0 or len(index) == 0:
        return index, index[:0]
    try:
        kept, taken = train_test_split(
            index, test_size=fraction, stratify=labels[index], random_state=seed, shuffle=True
        )
    except ValueError as err:
        counts = dict(zip(*np.unique(labels[index], return_counts=True)))
        per_class = {int(k): int(v) for k, v in counts.items()}
        raise DataError(
            f"column 'label': cannot split {len(index)} rows stratified with fraction "
            f"{fraction:g}: {err} (samples per class: {per_class}); "
            "use more samples or smaller fractions"
        ) from None
    return np.sort(kept), np.sort(taken)


def stratified_split(
    labels: np.ndarray,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    fixed_test: np.ndarray | None = None,
) -> list[str]:
    """Assign ``"train"``/``"val"``/``"test"`` to every sample, stratified per class.

    Args:
        labels: integer class per sample, ``[N]``.
        seed: random seed; the same seed gives the same assignment.
        val_fraction: share of all samples for validation (of the non-test samples when
            ``fixed_test`` is given).
        test_fraction: share of all samples for test; ignored when ``fixed_test`` is given.
        fixed_test: optional boolean mask ``[N]`` of rows that are the test split (a source's
            own test set); only the other rows are split into train/val.

    Returns:
        One split name per sample.
    """
    labels = np.asarray(labels)
    n = len(labels)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    out = np.full(n, "train", dtype=object)
    index = np.arange(n)
    if fixed_test is not None:
        fixed_test = np.asarray(fixed_test, dtype=bool)
        if fixed_test.shape != (n,):
            raise ValueError(
                f"fixed_test must be a bool mask of shape ({n},), got {fixed_test.shape}"
            )
        out[fixed_test] = "test"
        rest = index[~fixed_test]
        _, val = _split_off(rest, labels, val_fraction, seed)
    else:
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
            )
        rest, test = _split_off(index, labels, test_fraction, seed)
        out[test] = "test"
        _, val = _split_off(rest, labels, val_fraction / (1.0 - test_fraction), seed)
    out[val] = "val"
    log.debug("split %d samples: %s", n, dict(zip(*np.unique(out.astype(str), return_counts=True))))
    return out.tolist()
