"""Reader of the TU graph-dataset text format (https://chrsmrrs.github.io/datasets/).

Files ``<NAME>_<part>.txt``, one value (or a comma-separated row) per line, ids 1-based:

- ``A``: ``src, dst`` per edge (undirected graphs list both directions);
- ``graph_indicator``: graph id of every node, nodes sorted by graph;
- ``graph_labels``: class of every graph (any integers; mapped to ``0..C-1`` in sorted order);
- ``node_labels`` / ``edge_labels`` (optional): one integer per node / edge;
- ``node_attributes`` (optional): comma-separated floats per node.

Without node labels (IMDB-BINARY), the degree of each node is its label.

:func:`read_tu` reads the files into a ``GraphSet`` (categorical labels, used by Mirage's tests and
benchmark); :func:`load_tu` reads them through torch_geometric's ``TUDataset`` into the pipeline's
``GraphFeatures`` (one-hot node labels + node attributes, one-hot edge labels + edge attributes).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kdflow.data.graph_features import GraphFeatures
from kdflow.data.graphs import GraphSet
from kdflow.errors import DataError

log = logging.getLogger(__name__)


def find_tu_files(root: Path, name: str | None = None) -> tuple[Path, str]:
    """The folder holding ``<NAME>_A.txt`` (``root`` or ``root/raw``) and the dataset name."""
    root = Path(root)
    for folder in (root / "raw", root):
        hits = sorted(folder.glob(f"{name}_A.txt" if name else "*_A.txt"))
        if len(hits) == 1:
            return folder, hits[0].name[: -len("_A.txt")]
        if len(hits) > 1:
            raise DataError(f"{folder}: several TU datasets ({[h.name for h in hits]}); pass the name")
    raise DataError(
        f"{root}: no TU dataset found (expected {name or '<NAME>'}_A.txt in it or in raw/); "
        "download and extract the dataset from https://chrsmrrs.github.io/datasets/"
    )


def read_tu(root: Path, name: str | None = None) -> GraphSet:
    """Read a TU dataset from its raw text files.

    Args:
        root: the dataset folder (``<root>/raw/<NAME>_A.txt`` or ``<root>/<NAME>_A.txt``).
        name: the dataset name; inferred from the single ``*_A.txt`` when omitted.

    Raises:
        DataError: a missing or malformed file, with the file and line at fault.
    """
    folder, name = find_tu_files(root, name)
    part = lambda p: folder / f"{name}_{p}.txt"  # noqa: E731

    indicator = _read_ints(part("graph_indicator"), 1)[:, 0]
    raw_graph_labels = _read_ints(part("graph_labels"), 1)[:, 0]
    pairs = _read_ints(part("A"), 2)
    n, g = len(indicator), len(raw_graph_labels)

    if n and (indicator.min() < 1 or indicator.max() > g):
        row = int(np.flatnonzero((indicator < 1) | (indicator > g))[0])
        raise DataError(
            f"{part('graph_indicator')}: line {row + 1}: graph id {indicator[row]} outside 1..{g} "
            f"({g} lines in {part('graph_labels').name})"
        )
    if np.any(np.diff(indicator) < 0):
        row = int(np.flatnonzero(np.diff(indicator) < 0)[0]) + 1
        raise DataError(f"{part('graph_indicator')}: line {row + 1}: nodes are not sorted by graph id")
    if len(pairs) and (pairs.min() < 1 or pairs.max() > n):
        row = int(np.flatnonzero(((pairs < 1) | (pairs > n)).any(axis=1))[0])
        raise DataError(f"{part('A')}: line {row + 1}: node id outside 1..{n} in {pairs[row].tolist()}")
    edges = (pairs - 1).T  # [2, E]
    graph_of = indicator - 1
    cross = graph_of[edges[0]] != graph_of[edges[1]]
    if cross.any():
        row = int(np.flatnonzero(cross)[0])
        raise DataError(
            f"{part('A')}: line {row + 1}: edge {pairs[row].tolist()} joins nodes of graphs "
            f"{indicator[edges[0, row]]} and {indicator[edges[1, row]]}"
        )

    edge_labels = None
    if part("edge_labels").is_file():
        edge_labels = _read_ints(part("edge_labels"), 1, expect=len(pairs))[:, 0]
    if part("node_labels").is_file():
        node_values = _read_ints(part("node_labels"), 1, expect=n)[:, 0]
    else:
        log.info("%s: no node labels; using node degrees as labels", name)
        node_values = np.bincount(edges[0], minlength=n)
    attributes = None
    if part("node_attributes").is_file():
        attributes = _read_floats(part("node_attributes"), expect=n)

    order = np.argsort(graph_of[edges[0]], kind="stable")  # group edges by graph
    edges = edges[:, order]
    counts_e = np.bincount(graph_of[edges[0]], minlength=g)
    counts_n = np.bincount(graph_of, minlength=g)
    node_vocab, node_labels = np.unique(node_values, return_inverse=True)
    classes, graph_labels = np.unique(raw_graph_labels, return_inverse=True)
    num_edge_labels = 1
    if edge_labels is not None:
        edge_vocab, edge_labels = np.unique(edge_labels[order], return_inverse=True)
        num_edge_labels = len(edge_vocab)
    log.info(
        "%s: %d graphs, %d nodes, %d edges, classes %s", name, g, n, edges.shape[1], classes.tolist()
    )
    return GraphSet(
        node_labels=node_labels.astype(np.int64),
        edge_index=edges.astype(np.int64),
        node_offsets=np.concatenate([[0], np.cumsum(counts_n)]).astype(np.int64),
        edge_offsets=np.concatenate([[0], np.cumsum(counts_e)]).astype(np.int64),
        graph_labels=graph_labels.astype(np.int64),
        edge_labels=None if edge_labels is None else edge_labels.astype(np.int64),
        node_attributes=attributes,
        num_node_labels=len(node_vocab),
        num_edge_labels=num_edge_labels,
        num_classes=len(classes),
        name=name,
    )


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: required TU file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _read_ints(path: Path, columns: int, expect: int | None = None) -> np.ndarray:
    """``[rows, columns]`` integers; DataError names the first bad line."""
    lines = _lines(path)
    if expect is not None and len(lines) != expect:
        raise DataError(f"{path}: {len(lines)} lines, expected {expect} (one per node/edge)")
    tokens = ",".join(lines).replace(" ", "").split(",")
    try:
        values = np.array(tokens, dtype=np.int64) if tokens != [""] else np.zeros(0, np.int64)
    except ValueError:
        values = None
    if values is None or len(values) != len(lines) * columns:
        for i, line in enumerate(lines):
            cells = [c.strip() for c in line.split(",")]
            if len(cells) != columns or not all(c.lstrip("-").isdigit() for c in cells):
                raise DataError(
                    f"{path}: line {i + 1}: expected {columns} comma-separated integer(s), got {line!r}"
                )
        raise DataError(f"{path}: cannot parse as integers")  # pragma: no cover
    return values.reshape(len(lines), columns)


def _read_floats(path: Path, expect: int) -> np.ndarray:
    lines = _lines(path)
    if len(lines) != expect:
        raise DataError(f"{path}: {len(lines)} lines, expected {expect} (one per node)")
    width = len(lines[0].split(",")) if lines else 0
    try:
        values = np.array(",".join(lines).split(","), dtype=np.float32)
    except ValueError:
        values = None
    if values is None or len(values) != len(lines) * width:
        for i, line in enumerate(lines):
            try:
                if len([float(c) for c in line.split(",")]) != width:
                    raise ValueError
            except ValueError:
                raise DataError(
                    f"{path}: line {i + 1}: expected {width} comma-separated numbers, got {line!r}"
                ) from None
    return values.reshape(len(lines), width)


REQUIRED = ("A", "graph_indicator", "graph_labels")  # the files TUDataset cannot do without


def load_tu(root: Path, name: str, *, download: bool = False) -> tuple[GraphFeatures, np.ndarray, dict]:
    """A TU dataset through torch_geometric's ``TUDataset``, as pipeline graph features.

    The raw files (``<root>/<name>/raw/<name>_*.txt`` or ``<root>/<name>/<name>_*.txt``) are copied
    into a temporary ``TUDataset`` root, so it finds them, never downloads, and writes its
    ``processed/`` cache there rather than next to the user's files. Only when the files are
    absent and ``download`` is true does ``TUDataset`` download into ``<root>/<name>``.

    Node features are ``[node attributes | one-hot node labels]``, edge features
    ``[edge attributes | one-hot edge labels]``; without node labels (IMDB-BINARY) the node degree
    is the label (one-hot over the degrees that occur).

    Returns:
        The graphs, class ids ``[G]`` in ``0..C-1`` and metadata (``num_classes``, the column
        ranges of the label one-hots, ``num_node_attributes`` ...).

    Raises:
        DataError: files missing (and no download) or malformed, naming the file and line.
    """
    from torch_geometric.datasets import TUDataset

    root = Path(root)
    try:
        folder, _ = find_tu_files(root / name, name)
    except DataError:
        if not download:
            raise DataError(
                f"{root / name}: no TU files {name}_*.txt (looked in raw/ too); put the extracted "
                f"dataset there, or set data.options.download: true to let torch_geometric fetch it"
            ) from None
        folder = None
    if folder is not None and not download:  # a missing required file would make TUDataset download the set
        missing = [f"{name}_{part}.txt" for part in REQUIRED if not (folder / f"{name}_{part}.txt").is_file()]
        if missing:
            raise DataError(f"{folder}: TU dataset {name!r} lacks {missing}; nothing is downloaded unless "
                            "data.options.download is true (into a temporary folder: yours is never touched)")
    with tempfile.TemporaryDirectory(prefix="kdflow-tu-") as tmp:
        if folder is not None:
            raw = Path(tmp) / name / "raw"
            raw.mkdir(parents=True)
            for f in folder.glob(f"{name}_*.txt"):
                shutil.copy(f, raw / f.name)
        try:
            ds = TUDataset(tmp if folder is not None else str(root), name, use_node_attr=True, use_edge_attr=True)
        except (ValueError, RuntimeError, IndexError, OSError) as exc:
            if folder is not None:
                read_tu(folder, name)  # raises a DataError naming the file and line when it can
            raise DataError(f"{folder or root}: torch_geometric cannot read TU dataset {name!r}: {exc}") from None
        y = getattr(ds._data, "y", None)
        if y is None or y.numel() != len(ds):
            labels_file = (folder or root / name) / f"{name}_graph_labels.txt"
            raise DataError(f"{labels_file}: {0 if y is None else y.numel()} graph label(s) for {len(ds)} graphs; "
                            "the file needs one integer class label per graph (line i: graph i)")
        graphs, labels, meta = _from_pyg(ds, name)
    meta.update(loader="torch_geometric.datasets.TUDataset", name=name)
    return graphs, labels, meta


def _from_pyg(ds, name: str) -> tuple[GraphFeatures, np.ndarray, dict]:
    """Concatenated tensors of an in-memory ``TUDataset`` (its ``_data`` + ``slices``)."""
    import torch

    data, slices = ds._data, ds.slices
    e_off = slices["edge_index"].to(torch.int64)
    if data.x is not None:
        n_off = slices["x"].to(torch.int64)
    else:
        counts = torch.as_tensor(data._num_nodes, dtype=torch.int64)
        n_off = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    edge_graph = torch.repeat_interleave(torch.arange(len(n_off) - 1), e_off.diff())
    edge_index = data.edge_index.to(torch.int64) + n_off[:-1][edge_graph]  # local -> global ids
    n_attr, n_lab = ds.num_node_attributes, ds.num_node_labels
    if data.x is not None:
        x, node_cols = _compact(data.x.float(), n_attr, n_attr + n_lab)
    else:  # no node labels: the degree is the label
        log.info("%s: no node labels; using node degrees as labels", name)
        degree = torch.bincount(edge_index[1], minlength=int(n_off[-1]))
        _, label = torch.unique(degree, return_inverse=True)
        x = torch.nn.functional.one_hot(label).float()
        node_cols = [0, x.shape[1]]
    e_attr, e_lab = ds.num_edge_attributes, ds.num_edge_labels
    edge_attr, edge_cols = (None, None) if data.edge_attr is None else _compact(data.edge_attr.float(), e_attr, e_attr + e_lab)
    y = data.y.numpy().astype(np.int64)
    graphs = GraphFeatures(x.contiguous(), edge_index.contiguous(), n_off, e_off,
                           None if edge_attr is None else edge_attr.contiguous())
    meta = {
        "num_classes": int(y.max()) + 1,
        "num_graphs": len(y),
        "node_label_columns": node_cols,
        "num_node_attributes": int(n_attr) if data.x is not None else 0,
        "node_labels_from_degree": data.x is None,
        "edge_label_columns": edge_cols,
    }
    log.info("%s: %d graphs, %d nodes x %d features, %d edges%s", name, len(y), x.shape[0], x.shape[1],
             edge_index.shape[1], f", edge features {edge_attr.shape[1]}" if edge_attr is not None else "")
    return graphs, y, meta


def _compact(features, lo: int, hi: int):
    """Drop the one-hot columns in ``[lo, hi)`` that no row uses (torch_geometric one-hots label
    ``l - min`` up to the largest label, so gaps in the label values leave empty columns)."""
    used = features[:, lo:hi].abs().sum(0) > 0
    keep = [*range(lo), *(lo + i for i in used.nonzero().flatten().tolist()), *range(hi, features.shape[1])]
    return features[:, keep].contiguous(), [lo, lo + int(used.sum())]
