"""Data sources by spec: ``sklearn:digits``, ``mnist1d``, ``idx:<dir>``, ``parquet:<file>``, ``tu:<NAME>``.

A source loader turns ``(argument, seed, options)`` into a ``RawSource`` (numpy arrays);
``load_source`` assigns the splits and returns a validated ``Dataset``.
"""
from __future__ import annotations

import difflib
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

from kdflow.catalog import SKLEARN_DATASETS as _SKLEARN_DATASETS
from kdflow.catalog import SOURCES as _SOURCES
from kdflow.catalog import SPEC_EXAMPLES, TU_ROOT_ENV, resolve_options, resolve_source  # noqa: F401  (re-exported)
from kdflow.data.dataset import Dataset
from kdflow.data.graph_features import GraphFeatures
from kdflow.data.idx import read_idx
from kdflow.data.split import stratified_split
from kdflow.errors import DataError, ParamsError, UnknownNameError
from kdflow.registry import Registry
from schemas.frames import MAX_SHOWN, format_failures

if TYPE_CHECKING:  # pandera (with pandas) takes ~1 s to import: imported when a table is read
    import pandera.polars as pa

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "sklearn:digits"


@dataclass
class RawSource:
    """What a loader returns before splitting.

    Attributes:
        features: float32 array with samples on the first axis, or ``GraphFeatures`` for graphs.
        labels: int64 array ``[N]``.
        sample_ids: ``N`` unique strings.
        num_classes: number of classes.
        modality: ``image``, ``sequence`` or ``tabular``.
        fixed_test: optional bool mask ``[N]`` of the source's own test split.
        meta: JSON-able details recorded in ``Dataset.meta``.
    """

    features: np.ndarray
    labels: np.ndarray
    sample_ids: list[str]
    num_classes: int
    modality: str
    fixed_test: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


Loader = Callable[..., RawSource]
SOURCES: Registry[Loader] = _SOURCES  # its names and metadata (checks, modality): kdflow/catalog.py


def _check_options(scheme: str, options: dict, allowed: Iterable[str]) -> None:
    """Raise ``ParamsError`` for option keys the source does not know (with did-you-mean)."""
    allowed = sorted(allowed)
    problems = []
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"options.{key}: unknown option for source {scheme!r}{hint} (known: {allowed})"
            )
    if problems:
        raise ParamsError(problems, source=f"data source {scheme!r}")


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def load_source(
    spec: str,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    options: dict | None = None,
) -> Dataset:
    """Load a data source and assign stratified train/val/test splits.

    Args:
        spec: ``scheme[:argument]``, e.g. ``sklearn:digits`` or ``idx:data/mnist``.
        seed: seed of the split (and of generated sources).
        val_fraction: share of samples for validation.
        test_fraction: share of samples for test, unless the source has its own test split.
        options: source-specific options (see each loader).

    Raises:
        UnknownNameError: unknown scheme.
        DataError: missing files or broken data.
    """
    scheme, _, arg = spec.partition(":")
    try:
        loader = SOURCES.get(scheme)
    except UnknownNameError as err:
        raise UnknownNameError(f"{err}; specs look like {SPEC_EXAMPLES}") from None
    options = dict(options or {})
    raw = loader(arg, seed=seed, options=options)
    if "num_classes" not in options:
        _check_no_empty_classes(raw, spec)
    splits = stratified_split(
        raw.labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        fixed_test=raw.fixed_test,
    )
    meta = {"source": spec, "options": options, "seed": seed, "val_fraction": val_fraction,
            "test_fraction": test_fraction, **raw.meta}
    ds = Dataset(
        features=raw.features if isinstance(raw.features, GraphFeatures)
        else torch.from_numpy(np.ascontiguousarray(raw.features, dtype=np.float32)),
        labels=torch.from_numpy(np.asarray(raw.labels, dtype=np.int64)),
        sample_ids=raw.sample_ids,
        splits=splits,
        num_classes=raw.num_classes,
        modality=raw.modality,
        meta=meta,
    )
    ds.validate(where=spec)
    log.info("loaded %s: %d samples, input shape %s, %d classes", spec, len(ds), ds.input_shape,
             ds.num_classes)
    return ds


def _check_no_empty_classes(raw: RawSource, spec: str) -> None:
    """Classes are inferred as 0..max label: refuse labels that leave some of them without a sample
    (five corrupted label bytes of 255 in MNIST would make 256 classes, 245 of them empty)."""
    labels = np.asarray(raw.labels)
    if not len(labels) or labels.min() < 0:
        return  # the dataset's pandera check names negative labels
    counts = np.bincount(labels, minlength=raw.num_classes)
    empty = np.flatnonzero(counts[: raw.num_classes] == 0)
    if not len(empty):
        return
    present = {int(c): int(counts[c]) for c in np.flatnonzero(counts)}
    items = list(present.items())
    shown = dict(items if len(items) <= 12 else [*items[:6], *items[-6:]])
    raise DataError(
        f"{spec}: the labels make {raw.num_classes} classes (0..{raw.num_classes - 1}) but {len(empty)} of them have "
        f"no sample (e.g. {empty[:MAX_SHOWN].tolist()}); samples per label: {shown}. Corrupted labels? Fix them, "
        f"or set data.options.num_classes: {raw.num_classes} to keep the empty classes on purpose")


# --- sklearn ---------------------------------------------------------------------------------

SKLEARN_DATASETS: Registry[Callable[[], RawSource]] = _SKLEARN_DATASETS  # declared in kdflow/catalog.py


@SKLEARN_DATASETS.register("digits")
def _digits() -> RawSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    labels = bunch.target.astype(np.int64)
    return RawSource(images, labels, _ids("digits", len(images)), 10, "image")


def _sklearn_tabular(name: str) -> Callable[[], RawSource]:
    def load() -> RawSource:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, f"load_{name}")()
        x = bunch.data.astype(np.float32)
        y = bunch.target.astype(np.int64)
        return RawSource(x, y, _ids(name, len(x)), int(y.max()) + 1, "tabular")

    return load


for _name in ("iris", "wine", "breast_cancer"):
    SKLEARN_DATASETS.register(_name)(_sklearn_tabular(_name))


@SOURCES.register("sklearn")
def _sklearn(arg: str, *, seed: int, options: dict) -> RawSource:
    """Datasets bundled with scikit-learn (no download): ``digits`` (default), ``iris``, ..."""
    _check_options("sklearn", options, [])
    return SKLEARN_DATASETS.get(arg or "digits")()


# --- mnist1d ---------------------------------------------------------------------------------


@SOURCES.register("mnist1d", modality="sequence")
def _mnist1d(arg: str, *, seed: int, options: dict) -> RawSource:
    """MNIST-1D generated offline with ``mnist1d.data.make_dataset``; keeps its test split.

    Options are the generator's arguments (``num_samples``, ``train_split``, ...); its seed is
    the pipeline seed. The global ``random``/``numpy`` RNG states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    _check_options("mnist1d", options, [k for k in args if k not in ("seed", "url")])
    args.update(options, seed=seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        from mnist1d.utils import ObjectView

        data = make_dataset(ObjectView(args))  # pure generation: never calls the network
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:, None]  # [N, 1, L]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    fixed_test = np.arange(len(y)) >= len(data["y"])
    args.pop("url")
    return RawSource(x, y, _ids("mnist1d", len(y)), 10, "sequence", fixed_test,
                     meta={"generator_args": args})


# --- idx (MNIST files) -----------------------------------------------------------------------


def _find(directory: Path, prefix: str, kind: str) -> Path | None:
    dims = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for suffix in (".gz", ""):
            path = directory / f"{prefix}-{kind}{sep}idx{dims}-ubyte{suffix}"
            if path.is_file():
                return path
    return None


def _read_pair(
    directory: Path, prefix: str, limit: int | None
) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Images ``[N, H, W]`` uint8, labels ``[N]`` int64 and file names, or None if absent."""
    images, labels = _find(directory, prefix, "images"), _find(directory, prefix, "labels")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, kind = (images or labels), ("labels" if labels is None else "images")
        raise DataError(
            f"{directory}: found {have.name} but no {prefix}-{kind} IDX file next to it"
        )
    x, y = read_idx(images, limit), read_idx(labels, limit)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataError(f"{images}: expected uint8 images [N, H, W], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{labels}: expected integer labels [N], got {y.dtype} {list(y.shape)}")
    if len(x) != len(y):
        raise DataError(
            f"{directory}: {images.name} has {len(x)} images but {labels.name} has {len(y)} labels"
        )
    return x, y.astype(np.int64), [images.name, labels.name]


@SOURCES.register("idx", modality="image")
def _idx(arg: str, *, seed: int, options: dict) -> RawSource:
    """MNIST-format IDX files in a directory; ``t10k`` is the fixed test split beside ``train``.

    Options: ``limit`` (the first samples of each file pair), ``num_classes``.
    """
    _check_options("idx", options, ["limit", "num_classes"])
    limit = options.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ParamsError([f"options.limit: must be a positive integer (got {limit!r})"])
    if not arg:
        raise DataError(f"the idx source needs a directory, e.g. idx:data/mnist ({SPEC_EXAMPLES})")
    directory = Path(arg).expanduser()
    if not directory.is_dir():
        raise DataError(f"{directory}: IDX directory not found (cwd {Path.cwd()})")
    pairs = {p: _read_pair(directory, p, limit) for p in ("train", "t10k")}
    pairs = {p: v for p, v in pairs.items() if v is not None}
    if not pairs:
        names = sorted(f.name for f in directory.iterdir())[:10]
        raise DataError(
            f"{directory}: no IDX files found; expected train-/t10k-images-idx3-ubyte[.gz] and "
            f"-labels-idx1-ubyte[.gz] (directory holds {names})"
        )
    shapes = {p: v[0].shape[1:] for p, v in pairs.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{directory}: image sizes differ between files: {shapes}")
    x = np.concatenate([v[0] for v in pairs.values()]).astype(np.float32)[:, None] / 255.0
    y = np.concatenate([v[1] for v in pairs.values()])
    ids = [i for p, v in pairs.items() for i in _ids(p, len(v[1]))]
    fixed_test = None
    if len(pairs) == 2:
        fixed_test = np.array([i.startswith("t10k") for i in ids])
    num_classes = int(options.get("num_classes") or y.max() + 1)
    files = [f for v in pairs.values() for f in v[2]]
    return RawSource(x, y, ids, num_classes, "image", fixed_test,
                     meta={"directory": arg, "files": files, "limit": limit})


# --- parquet ---------------------------------------------------------------------------------


def _show(frame: pl.DataFrame, rows: Iterable[int], cols: list[str]) -> str:
    """Row numbers and a small table of the offending rows."""
    rows = list(rows)[:MAX_SHOWN]
    table = frame.with_row_index("#")[rows].select(["#", *dict.fromkeys(cols)])
    return f"rows {rows}\n{table}"


def _check_label_dtype(
    frame: pl.DataFrame, label_col: str, context: list[str]
) -> tuple[pl.DataFrame, str | None]:
    """Integer labels pass; integral floats are cast to Int64 (NaN becomes null)."""
    dtype = frame[label_col].dtype
    if dtype.is_integer():
        return frame, None
    first = range(min(frame.height, MAX_SHOWN))
    if not dtype.is_float():
        return frame, (
            f"column {label_col!r} must hold integer class indices 0..C-1, got dtype {dtype}; "
            + _show(frame, first, context)
        )
    frame = frame.with_columns(pl.col(label_col).fill_nan(None))
    frac = frame.with_row_index("#").filter(pl.col(label_col) != pl.col(label_col).round(0))
    if frac.height:
        return frame, (
            f"column {label_col!r} must hold integer class indices, found {frac.height} "
            f"non-integer value(s) {frac[label_col].to_list()[:MAX_SHOWN]}; "
            + _show(frame, frac["#"], context)
        )
    return frame.with_columns(pl.col(label_col).cast(pl.Int64)), None


def _column_schema(
    frame: pl.DataFrame, label_col: str | None, id_col: str, features: list[str], num_classes: int
) -> pa.DataFrameSchema:
    """pandera schema of the well-typed columns (``label_col`` None: label not checked)."""
    import pandera.polars as pa  # ~1 s to import: only when a table is read

    finite = pa.Check(
        lambda d: d.lazyframe.select(pl.col(d.key).is_finite().fill_null(False)),
        name="finite", error="no NaN, inf or null", ignore_na=False,
    )
    columns = {
        c: pa.Column(nullable=True, checks=finite) if frame[c].dtype.is_float()
        else pa.Column(nullable=False)
        for c in features
    }
    if label_col is not None:
        columns[label_col] = pa.Column(
            nullable=False, checks=pa.Check.in_range(0, max(num_classes - 1, 0))
        )
    if id_col in frame.columns:
        columns[id_col] = pa.Column(nullable=False, unique=True)
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


def validate_table(
    frame: pl.DataFrame, label_col: str, id_col: str, num_classes: int | None, where: str
) -> tuple[pl.DataFrame, list[str], int]:
    """Validate a raw table with pandera before any tensor is built.

    Checks: integer labels without nulls in ``0..C-1``, unique non-null ids, numeric feature
    columns without NaN/inf/null.

    Returns:
        The frame (integral float labels cast to Int64), the feature columns and C.

    Raises:
        DataError: listing every problem, each naming its column and showing offending rows.
    """
    if label_col not in frame.columns:
        raise DataError(
            f"{where}: no label column {label_col!r} (columns: {frame.columns}); "
            "set options.label_column"
        )
    context = [c for c in (id_col, label_col) if c in frame.columns]
    features = [c for c in frame.columns if c not in (label_col, id_col)]
    problems = [] if frame.height else ["the table has no rows"]
    if not features:
        problems.append(f"no feature columns besides {context}")
    frame, label_problem = _check_label_dtype(frame, label_col, context)
    problems += [label_problem] if label_problem else []
    numeric = [c for c in features if frame[c].dtype.is_numeric() or frame[c].dtype == pl.Boolean]
    for c in features:
        if c not in numeric:
            problems.append(
                f"column {c!r} is not numeric (dtype {frame[c].dtype}); feature columns must be "
                "numeric: encode or drop it, or name it in options.id_column/label_column; "
                + _show(frame, range(min(frame.height, MAX_SHOWN)), [*context, c])
            )
    if label_problem is None and num_classes is None:
        top = frame[label_col].max()
        num_classes = int(top) + 1 if top is not None else 0
    num_classes = int(num_classes or 0)
    if label_problem is None and num_classes < 2:
        problems.append(f"column {label_col!r} has {num_classes} class(es); need at least 2")
    checked_label = label_col if label_problem is None else None
    schema = _column_schema(frame, checked_label, id_col, numeric, num_classes)
    from pandera.errors import SchemaErrors

    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors as err:
        problems.extend(format_failures(err, frame, context))
    if problems:
        raise DataError(f"{where}: invalid table\n" + "\n".join(problems))
    return frame, features, num_classes


@SOURCES.register("parquet", modality="tabular")
def _parquet(arg: str, *, seed: int, options: dict) -> RawSource:
    """A table: one label column, an optional id column, numeric feature columns.

    Options: ``label_column`` (default ``label``), ``id_column`` (default ``sample_id``),
    ``num_classes`` (default: max label + 1).
    """
    _check_options("parquet", options, ["label_column", "id_column", "num_classes"])
    path = Path(arg).expanduser()
    if not arg or not path.is_file():
        raise DataError(f"{path}: parquet file not found (cwd {Path.cwd()})")
    try:
        frame = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise DataError(f"{path}: cannot read parquet file ({err})") from None
    label_col = options.get("label_column", "label")
    id_col = options.get("id_column", "sample_id")
    frame, features, num_classes = validate_table(
        frame, label_col, id_col, options.get("num_classes"), where=str(path)
    )
    x = frame.select(features).cast(pl.Float32).to_numpy()  # [N, D]
    y = frame[label_col].to_numpy().astype(np.int64)
    ids = frame[id_col].cast(pl.Utf8).to_list() if id_col in frame.columns else _ids("row", len(y))
    return RawSource(x, y, ids, num_classes, "tabular",
                     meta={"file": arg, "feature_columns": features})


# --- tu (TU graph datasets) ------------------------------------------------------------------

@SOURCES.register("tu", track="graph", modality="graph")
def _tu(arg: str, *, seed: int, options: dict) -> RawSource:
    """A TU graph dataset (https://chrsmrrs.github.io/datasets/) read through torch_geometric's ``TUDataset``.

    Options: ``root`` (folder holding ``<NAME>/raw/<NAME>_A.txt``; default ``$KDFLOW_TU_ROOT``,
    relative paths are resolved by ``prepare`` against the project root), ``download`` (let
    torch_geometric download the files when they are absent; default false: never online).
    """
    from kdflow.data.tu import load_tu

    _check_options("tu", options, ["root", "download"])
    if not arg:
        raise DataError(f"the tu source needs a dataset name, e.g. tu:MUTAG ({SPEC_EXAMPLES})")
    root = options.get("root") or os.environ.get(TU_ROOT_ENV)
    if not root:
        raise ParamsError([f"options.root: where the TU files are (<root>/{arg}/raw/{arg}_A.txt); "
                           f"set data.options.root or ${TU_ROOT_ENV}"], source="data source 'tu'")
    graphs, labels, meta = load_tu(Path(root).expanduser(), arg, download=bool(options.get("download", False)))
    ids = _ids(arg, len(labels))
    return RawSource(graphs, labels, ids, int(meta["num_classes"]), "graph", meta=meta)


# Bring-your-own sources (an image folder, a datasets folder); imported last: they use SOURCES.
from kdflow.data import folders  # noqa: E402,F401
