"""pandera contracts for the per-sample table, plus tensor checks at the same boundary.

Every check failure becomes a ``DataError`` that names the column and shows offending rows.
"""
from __future__ import annotations

import pandera.polars as pa
import polars as pl
import torch

from kdflow.errors import DataError

MAX_SHOWN = 5


def sample_schema(num_classes: int) -> pa.DataFrameSchema:
    """The schema of ``samples.parquet`` for a dataset with ``num_classes`` classes."""
    return pa.DataFrameSchema(
        {
            "sample_id": pa.Column(pl.Utf8, nullable=False, unique=True),
            "split": pa.Column(pl.Utf8, pa.Check.isin(["train", "val", "test"]), nullable=False),
            "label": pa.Column(pl.Int64, pa.Check.in_range(0, num_classes - 1), nullable=False),
            "row": pa.Column(pl.Int64, pa.Check.ge(0), nullable=False, unique=True),
        },
        strict=False,
        coerce=False,
    )


def format_failures(
    err: pa.errors.SchemaErrors, frame: pl.DataFrame, context: list[str] | None = None
) -> list[str]:
    """One message per failing (column, check): row numbers, values and the offending rows.

    Args:
        err: the lazy validation error.
        frame: the validated frame (row numbers refer to it).
        context: columns shown beside the failing one; ``None`` shows every column.
    """
    cases = err.failure_cases
    if not isinstance(cases, pl.DataFrame):
        cases = pl.from_pandas(cases)
    numbered = frame.with_row_index("#")
    lines = []
    for (column, check), group in cases.group_by(["column", "check"], maintain_order=True):
        idx = [i for i in group["index"].to_list() if i is not None][:MAX_SHOWN]
        values = group["failure_case"].to_list()[:MAX_SHOWN]
        msg = f"column {column!r} fails {check} ({group.height} row(s)); "
        msg += f"rows {idx}, values {values}" if idx else f"offending values: {values}"
        if idx:
            cols = numbered.columns if context is None else ["#", *context, column]
            cols = list(dict.fromkeys(c for c in cols if c in numbered.columns))
            msg += "\n" + str(numbered[idx].select(cols))
        lines.append(msg)
    return lines


_format_failures = format_failures


def validate_samples(frame: pl.DataFrame, num_classes: int, where: str = "dataset") -> pl.DataFrame:
    """Validate the per-sample table. Raises ``DataError`` listing every failing column."""
    if num_classes < 2:
        raise DataError(f"{where}: column 'label' has {num_classes} class(es); need at least 2")
    missing = [c for c in ("sample_id", "split", "label", "row") if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: sample table is missing column(s) {missing}")
    try:
        return sample_schema(num_classes).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as err:
        raise DataError(f"{where}: invalid sample table\n" + "\n".join(_format_failures(err, frame))) from None
    except pa.errors.SchemaError as err:  # pragma: no cover - non-lazy path
        raise DataError(f"{where}: invalid sample table: {err}") from None


def validate_tensors(
    features: torch.Tensor,
    labels: torch.Tensor,
    extras: dict[str, torch.Tensor] | None = None,
    where: str = "dataset",
) -> None:
    """Shapes agree, features are finite floats, labels are int64 ``[N]``."""
    n = labels.shape[0]
    if labels.ndim != 1:
        raise DataError(f"{where}: column 'label' must be 1-D, got shape {tuple(labels.shape)}")
    if features.shape[0] != n:
        raise DataError(
            f"{where}: column 'features' has {features.shape[0]} rows but 'label' has {n}"
        )
    if features.ndim < 2:
        raise DataError(f"{where}: column 'features' must be [N, ...], got shape {tuple(features.shape)}")
    if not torch.is_floating_point(features):
        raise DataError(f"{where}: column 'features' must be floating point, got {features.dtype}")
    bad = ~torch.isfinite(features.reshape(n, -1)).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:MAX_SHOWN].tolist()
        raise DataError(
            f"{where}: column 'features' has NaN/inf in {int(bad.sum())} row(s); first rows: {rows}"
        )
    for name, t in (extras or {}).items():
        if t.shape[0] != n:
            raise DataError(f"{where}: extra {name!r} has {t.shape[0]} rows but 'label' has {n}")
