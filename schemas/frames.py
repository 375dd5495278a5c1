"""pandera contracts for the per-sample table, plus tensor checks at the same boundary.

Every check failure becomes a ``DataError`` that names the column and shows offending rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl
import torch

from kdflow.errors import DataError

if TYPE_CHECKING:  # pandera (with pandas) takes ~1 s to import: each function imports it when it runs
    import pandera.polars as pa

MAX_SHOWN = 5


def sample_schema(num_classes: int) -> pa.DataFrameSchema:
    """The schema of ``samples.parquet`` for a dataset with ``num_classes`` classes."""
    import pandera.polars as pa

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
    import pandera.polars as pa

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


def graph_schema(num_classes: int) -> pa.DataFrameSchema:
    """The per-graph table of a graph dataset: label range, node counts, edges inside their graph."""
    import pandera.polars as pa

    return pa.DataFrameSchema(
        {
            "graph": pa.Column(pl.Int64, pa.Check.ge(0), nullable=False, unique=True),
            "label": pa.Column(pl.Int64, pa.Check.in_range(0, num_classes - 1), nullable=False),
            "num_nodes": pa.Column(pl.Int64, pa.Check.ge(1), nullable=False),
            "num_edges": pa.Column(pl.Int64, pa.Check.ge(0), nullable=False),
            "edges_outside_graph": pa.Column(pl.Int64, pa.Check.eq(0), nullable=False),
            "nonfinite_nodes": pa.Column(pl.Int64, pa.Check.eq(0), nullable=False),
        },
        strict=True,
        coerce=False,
    )


def graph_table(graphs, labels: torch.Tensor) -> pl.DataFrame:
    """One row per graph of a ``GraphFeatures``: counts, edges leaving their graph, bad nodes."""
    g = len(graphs)
    n_off, e_off = graphs.node_offsets.cpu(), graphs.edge_offsets.cpu()
    edge_graph = torch.repeat_interleave(torch.arange(g), e_off.diff())  # [E]
    ei = graphs.edge_index.cpu()
    lo, hi = n_off[:-1][edge_graph], n_off[1:][edge_graph]
    outside = ((ei < lo) | (ei >= hi)).any(dim=0)  # [E]
    node_graph = torch.repeat_interleave(torch.arange(g), n_off.diff())  # [N]
    bad_nodes = ~torch.isfinite(graphs.x.cpu()).all(dim=1)  # [N]
    count = lambda flags, owner: torch.bincount(owner[flags], minlength=g).numpy().astype("int64")  # noqa: E731
    return pl.DataFrame({
        "graph": torch.arange(g).numpy().astype("int64"),
        "label": labels.cpu().numpy().astype("int64"),
        "num_nodes": n_off.diff().numpy().astype("int64"),
        "num_edges": e_off.diff().numpy().astype("int64"),
        "edges_outside_graph": count(outside, edge_graph),
        "nonfinite_nodes": count(bad_nodes, node_graph),
    })


def validate_graphs(graphs, labels: torch.Tensor, num_classes: int, extras: dict[str, torch.Tensor] | None = None,
                    where: str = "dataset") -> pl.DataFrame:
    """Validate a graph dataset (a ``GraphFeatures``) with pandera on its per-graph table.

    Raises ``DataError`` naming each failing column (``num_nodes``, ``edges_outside_graph``, ...) and
    showing the offending graphs.
    """
    n = labels.shape[0]
    if labels.ndim != 1 or len(graphs) != n:
        raise DataError(f"{where}: {len(graphs)} graphs but 'label' has shape {tuple(labels.shape)}")
    if not torch.is_floating_point(graphs.x):
        raise DataError(f"{where}: node features must be floating point, got {graphs.x.dtype}")
    if graphs.edge_index.dtype != torch.int64:
        raise DataError(f"{where}: edge_index must be int64, got {graphs.edge_index.dtype}")
    if graphs.edge_attr is not None and not torch.isfinite(graphs.edge_attr).all():
        raise DataError(f"{where}: edge features hold NaN/inf")
    for name, t in (extras or {}).items():
        if t.shape[0] != n:
            raise DataError(f"{where}: extra {name!r} has {t.shape[0]} rows but 'label' has {n}")
    frame = graph_table(graphs, labels)
    import pandera.polars as pa

    try:
        return graph_schema(num_classes).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as err:
        raise DataError(f"{where}: invalid graphs\n" + "\n".join(format_failures(err, frame))) from None
