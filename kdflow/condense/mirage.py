"""Mirage: graph distillation by frequent computation-tree sets (Gupta et al., ICLR 2024).

A message-passing GNN with ``hops`` layers sees a node through its computation tree: the node,
its neighbours, their neighbours, ... unrolled ``hops`` times with no visited set (a parent
reappears as its child's child). Graphs of a class share frequent sets of such trees; Mirage keeps,
per class, the tree sets contained in at least ``threshold`` training graphs and builds one small
graph per set: the disjoint union of its trees, edges pointing child to parent, roots marked.

Steps, each a plain function:

1. :func:`tree_ids`: a canonical id per node's depth-``hops`` tree, independent of child order,
   computed level by level for all nodes at once (exact, collision-free interning of sorted
   child-id rows with ``np.unique``, no recursive strings).
2. :func:`transactions`: each graph as the sorted set of its root-tree ids.
3. :func:`~kdflow.condense.itemsets.frequent_itemsets` (``kdflow.condense.itemsets``): exact
   Eclat over bitsets (support = number of graphs containing the set; ``support >= threshold``).
4. :func:`mirage`: per-class mining, dropping sets frequent in more than one class (exact set
   equality, as the official code), optional automatic thresholds, and materialisation.

Isolated nodes are dropped from transactions by default, as the official code does.
:func:`mirage_condenser` (registered as ``mirage``) runs it on a graph ``Dataset``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kdflow.condense import CONDENSERS, Report
from kdflow.condense.itemsets import auto_thresholds, drop_shared_sets, frequent_itemsets
from kdflow.data.dataset import Dataset
from kdflow.data.graph_features import GraphFeatures
from kdflow.data.graphs import GraphSet, concat_ranges
from kdflow.errors import DataError
from schemas.methods import MirageParams  # torch-free (kdflow/catalog.py)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeIds:
    """Canonical ids of every node's computation tree at each depth.

    Attributes:
        levels: ``levels[l][v]`` is the id of ``v``'s depth-``l`` tree, in ``[0, counts[l])``.
        counts: number of distinct trees per depth.
    """

    levels: list[np.ndarray]
    counts: list[int]

    @property
    def ids(self) -> np.ndarray:
        """Ids of the deepest trees.  # [N]"""
        return self.levels[-1]


def _in_edges(num_nodes: int, edge_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges sorted by target and the CSR pointer of each node's incoming edges."""
    order = np.argsort(edge_index[1], kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(edge_index[1], minlength=num_nodes))])
    return order, ptr


def tree_ids(
    node_labels: np.ndarray, edge_index: np.ndarray, edge_labels: np.ndarray | None, hops: int
) -> TreeIds:
    """Canonical ids of the depth-``0..hops`` computation trees of all nodes.

    The children of ``v`` are the sources ``u`` of the edges ``u -> v``. At depth ``l``,
    ``id_l(v)`` interns the row (label of v, in-degree, sorted multiset of
    (edge label, id_{l-1}(u))) exactly: see :func:`_intern_rows`. Ids are dense, ordered by the
    rows' content, so they do not depend on node or edge order.

    Args:
        node_labels: categorical node labels.  # [N]
        edge_index: ``(source, target)`` pairs.  # [2, E]
        edge_labels: categorical edge labels or None.  # [E]
        hops: depth of the trees (number of message-passing layers).
    """
    if hops < 0:
        raise ValueError(f"hops must be >= 0 (got {hops})")
    n = len(node_labels)
    src, dst = np.asarray(edge_index[0], np.int64), np.asarray(edge_index[1], np.int64)
    elab = np.zeros(len(src), np.int64) if edge_labels is None else np.asarray(edge_labels, np.int64)
    deg = np.bincount(dst, minlength=n)
    ptr = np.concatenate([[0], np.cumsum(deg)])[:-1]
    _, first = np.unique(node_labels, return_inverse=True)
    first = first.reshape(-1).astype(np.int64)
    levels, counts = [first], [int(first.max()) + 1 if n else 0]
    for _ in range(hops):
        key = elab * max(counts[-1], 1) + levels[-1][src]  # [E] (edge label, child tree) per edge
        key = key[np.lexsort((key, dst))]  # grouped by target, sorted within each group
        ids, count = _intern_rows(first, key, ptr, deg)
        levels.append(ids)
        counts.append(count)
    return TreeIds(levels=levels, counts=counts)


def _intern_rows(
    first: np.ndarray, key: np.ndarray, ptr: np.ndarray, deg: np.ndarray
) -> tuple[np.ndarray, int]:
    """Dense exact ids of the rows ``(first[v], deg[v], key[ptr[v] : ptr[v] + deg[v]])``.

    Column by column: the id of a row prefix and the next column are combined into one integer
    (``prefix * width + value``, exact) and re-densified with ``np.unique``; rows of different
    lengths never meet because the degree is part of the first column.
    """
    n = len(first)
    if n == 0:
        return np.zeros(0, np.int64), 0
    _, h = np.unique(deg * (int(first.max()) + 1) + first, return_inverse=True)
    h = h.reshape(-1).astype(np.int64)
    width = int(key.max()) + 1 if len(key) else 1
    for j in range(int(deg.max())):
        act = np.flatnonzero(deg > j)
        if (int(h[act].max()) + 1) * width >= 2**62:
            raise OverflowError("tree ids do not fit in int64")
        _, h[act] = np.unique(h[act] * width + key[ptr[act] + j], return_inverse=True)
    _, ids = np.unique(deg * (int(h.max()) + 1) + h, return_inverse=True)
    ids = ids.reshape(-1).astype(np.int64)
    return ids, int(ids.max()) + 1


def transactions(
    ids: np.ndarray, node_offsets: np.ndarray, keep: np.ndarray | None = None
) -> list[np.ndarray]:
    """Each graph as the sorted, de-duplicated array of its nodes' tree ids.

    Args:
        ids: tree id per node.  # [N]
        node_offsets: per-graph node offsets.  # [G + 1]
        keep: nodes to use (e.g. non-isolated), or None for all.  # [N] bool
    """
    graph = np.repeat(np.arange(len(node_offsets) - 1), np.diff(node_offsets))
    if keep is not None:
        graph, ids = graph[keep], ids[keep]
    width = int(ids.max()) + 1 if len(ids) else 1
    pairs = np.unique(graph * width + ids)  # (graph, id) pairs, sorted by graph then id
    bounds = np.searchsorted(pairs // width, np.arange(len(node_offsets)))
    items = pairs % width
    return [items[bounds[g] : bounds[g + 1]] for g in range(len(node_offsets) - 1)]


@dataclass(frozen=True)
class CondensedGraphs:
    """Mirage's output: one graph per frequent tree set.

    Attributes:
        graphs: disjoint unions of trees; edges child -> parent; labels are class ids.
        roots: True on the root node of each tree.  # [N]
        frequency: support of each set (number of training graphs containing it).  # [G]
        itemsets: the tree ids of each set.
        thresholds: the per-class thresholds used.
        timings: seconds spent in ``extract`` (trees + transactions), ``thresholds`` (the automatic
            search, 0 with fixed thresholds), ``mine`` (at the final thresholds) and ``materialise``.
    """

    graphs: GraphSet
    roots: np.ndarray
    frequency: np.ndarray
    itemsets: list[tuple[int, ...]]
    thresholds: list[int]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.graphs.nbytes + self.roots.nbytes + self.frequency.nbytes


def mirage(
    train: GraphSet,
    *,
    hops: int = 2,
    thresholds: int | Sequence[int] | None = None,
    target_graphs: int | None = None,
    drop_shared: bool = True,
    drop_isolated: bool = True,
    max_size: int | None = None,
) -> CondensedGraphs:
    """Condense ``train`` into frequent computation-tree sets per class.

    Args:
        train: the training graphs.
        hops: depth of the computation trees (GNN layers).
        thresholds: absolute minimum support per class (one int for all classes); exclusive
            with ``target_graphs``.
        target_graphs: pick per-class thresholds so that each class yields about
            ``target_graphs / num_classes`` sets (see :func:`auto_thresholds`).
        drop_shared: drop a set frequent in more than one class (exact set equality).
        drop_isolated: leave isolated nodes' trees out of the transactions (official code).
        max_size: largest set size mined, or None.
    """
    if (thresholds is None) == (target_graphs is None):
        raise ValueError("pass exactly one of thresholds and target_graphs")
    c = train.num_classes
    t0 = time.perf_counter()
    ids = tree_ids(train.node_labels, train.edge_index, train.edge_labels, hops)
    keep = None
    if drop_isolated:
        keep = np.bincount(train.edge_index[1], minlength=train.num_nodes) > 0
    baskets = transactions(ids.ids, train.node_offsets, keep)
    per_class = [[baskets[g] for g in np.flatnonzero(train.graph_labels == k)] for k in range(c)]
    t1 = time.perf_counter()
    if target_graphs is not None:
        chosen = auto_thresholds(per_class, target_graphs, drop_shared=drop_shared, max_size=max_size)
    elif isinstance(thresholds, int):
        chosen = [thresholds] * c
    else:
        chosen = [int(t) for t in thresholds]
        if len(chosen) != c:
            raise DataError(f"{len(chosen)} thresholds for {c} classes; give one per class")
    t_search = time.perf_counter()
    mined = [frequent_itemsets(b, t, max_size=max_size) for b, t in zip(per_class, chosen)]
    if drop_shared:
        mined = drop_shared_sets(mined)
    t2 = time.perf_counter()
    items = [(k, s, v) for k, m in enumerate(mined) for s, v in sorted(m.items())]
    graphs, roots = materialise(train, ids, [s for _, s, _ in items], [k for k, _, _ in items])
    t3 = time.perf_counter()
    log.info(
        "mirage: %d hops, thresholds %s -> %s sets per class; extract %.2fs, search %.2fs, mine %.2fs",
        hops, chosen, [len(m) for m in mined], t1 - t0, t_search - t1, t2 - t_search,
    )
    return CondensedGraphs(
        graphs=graphs,
        roots=roots,
        frequency=np.array([v for _, _, v in items], np.int64),
        itemsets=[s for _, s, _ in items],
        thresholds=chosen,
        timings={
            "extract": t1 - t0,
            "thresholds": t_search - t1,
            "mine": t2 - t_search,
            "materialise": t3 - t2,
        },
    )


def materialise(
    train: GraphSet, ids: TreeIds, itemsets: Sequence[tuple[int, ...]], labels: Sequence[int]
) -> tuple[GraphSet, np.ndarray]:
    """Build one graph per itemset: the disjoint union of its trees, edges child -> parent.

    Each tree is unrolled from one node of ``train`` whose deepest tree has that id; tree nodes
    copy that node's (and its descendants') labels and attributes.
    """
    hops = len(ids.levels) - 1
    rep = np.full(ids.counts[-1], -1, np.int64)
    uniq, first = np.unique(ids.ids, return_index=True)
    rep[uniq] = first  # first node with each id
    order, ptr = _in_edges(train.num_nodes, train.edge_index)
    deg = np.diff(ptr)
    elab = train.edge_labels
    node_parts, edge_parts, elab_parts, root_parts, n_off, e_off = [], [], [], [], [0], [0]
    for itemset in itemsets:
        base = 0
        nodes_g, edges_g, elab_g, roots_g = [], [], [], []
        for tid in itemset:
            frontier = rep[[tid]]  # graph nodes of the current tree level
            index = np.array([base])  # their tree-node indices
            nodes_g.append(frontier)
            roots_g.append(np.ones(1, bool))
            size = 1
            for _ in range(hops):
                counts = deg[frontier]
                e = order[concat_ranges(ptr[frontier], counts)]  # incoming edges, per parent
                child = train.edge_index[0, e]
                parent = np.repeat(index, counts)
                new_index = base + size + np.arange(len(child))
                edges_g.append(np.stack([new_index, parent]))
                if elab is not None:
                    elab_g.append(elab[e])
                nodes_g.append(child)
                roots_g.append(np.zeros(len(child), bool))
                frontier, index, size = child, new_index, size + len(child)
            base += size
        node_parts.append(np.concatenate(nodes_g))  # ids of the train nodes each tree node copies
        root_parts.append(np.concatenate(roots_g))
        local = np.concatenate(edges_g, axis=1) if edges_g else np.zeros((2, 0), np.int64)
        edge_parts.append(local + n_off[-1])
        elab_parts.append(np.concatenate(elab_g) if elab_g else np.zeros(0, np.int64))
        n_off.append(n_off[-1] + base)
        e_off.append(e_off[-1] + edge_parts[-1].shape[1])
    cat = lambda parts, empty: np.concatenate(parts) if parts else empty  # noqa: E731
    source = cat(node_parts, np.zeros(0, np.int64))
    graphs = GraphSet(
        node_labels=train.node_labels[source],
        edge_index=np.concatenate(edge_parts, axis=1) if edge_parts else np.zeros((2, 0), np.int64),
        node_offsets=np.array(n_off, np.int64),
        edge_offsets=np.array(e_off, np.int64),
        graph_labels=np.asarray(labels, np.int64),
        edge_labels=None if elab is None else cat(elab_parts, np.zeros(0, np.int64)),
        node_attributes=None if train.node_attributes is None else train.node_attributes[source],
        num_node_labels=train.num_node_labels,
        num_edge_labels=train.num_edge_labels,
        num_classes=train.num_classes,
        name=f"{train.name}-mirage",
    )
    return graphs, cat(root_parts, np.zeros(0, bool))


# --- the condenser on pipeline datasets ------------------------------------------------------


def _categories(rows: torch.Tensor) -> tuple[np.ndarray, int]:
    """Dense ids of the distinct rows (one-hot labels -> label ids; any rows -> exact classes)."""
    if rows.shape[1] == 0:
        return np.zeros(rows.shape[0], np.int64), 1
    _, inv = np.unique(rows.numpy(), axis=0, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    return inv, int(inv.max()) + 1 if len(inv) else 0


def graph_set(train: Dataset) -> GraphSet:
    """A graph ``Dataset`` as a ``GraphSet``: categorical node labels from the node-label columns
    (``meta['node_label_columns']``, else all features), edge labels from the distinct edge-feature
    rows, the full node features kept as attributes (copied into the condensed trees)."""
    g = train.features
    if not isinstance(g, GraphFeatures):
        raise DataError(f"mirage: needs a graph dataset (modality 'graph'), got modality {train.modality!r}")
    g = g.cpu()
    lo, hi = train.meta.get("node_label_columns") or [0, g.x.shape[1]]
    node_labels, n_lab = _categories(g.x[:, lo:hi])
    edge_labels, e_lab = (None, 1) if g.edge_attr is None else _categories(g.edge_attr)
    return GraphSet(
        node_labels=node_labels,
        edge_index=g.edge_index.numpy(),
        node_offsets=g.node_offsets.numpy(),
        edge_offsets=g.edge_offsets.numpy(),
        graph_labels=train.labels.numpy(),
        edge_labels=edge_labels,
        node_attributes=g.x.numpy(),
        num_node_labels=n_lab,
        num_edge_labels=e_lab,
        num_classes=train.num_classes,
        name=str(train.meta.get("name", "graphs")),
    )


def to_dataset(result: CondensedGraphs, train: Dataset, source: GraphSet, frequency: str) -> Dataset:
    """Mirage's graphs as a training ``Dataset`` with a root mask and ``support``/``weight`` extras.

    ``source`` is ``graph_set(train)``: its edge labels are the distinct edge-feature rows, so each
    condensed edge gets back the exact features of the edges carrying its label.
    """
    gs = result.graphs
    edge_attr = None
    if train.features.edge_attr is not None:  # edge label id -> the edge-feature row it stands for
        rep = np.zeros((source.num_edge_labels, train.features.edge_attr.shape[1]), np.float32)
        rep[source.edge_labels] = train.features.edge_attr.cpu().numpy()
        edge_attr = rep[gs.edge_labels]
    feats = GraphFeatures.from_graphs(gs.node_attributes, gs.edge_index, gs.node_offsets, gs.edge_offsets,
                                      edge_attr, result.roots)
    support = torch.as_tensor(result.frequency, dtype=torch.int64)
    extras = {"support": support}
    if frequency == "weight":  # frequency-proportional weights, mean 1 (the loss's weighted mean)
        extras["weight"] = support.float() / support.float().mean()
    counts = np.bincount(gs.graph_labels, minlength=train.num_classes).tolist()
    return Dataset(
        features=feats,
        labels=torch.as_tensor(gs.graph_labels, dtype=torch.int64),
        sample_ids=[f"mirage-{k}-{i:05d}" for i, k in enumerate(gs.graph_labels.tolist())],
        splits=["train"] * gs.num_graphs,
        num_classes=train.num_classes,
        modality="graph",
        extras=extras,
        meta={**train.meta, "mirage": {
            "thresholds": result.thresholds, "sets_per_class": counts, "frequency": frequency,
            "timings": result.timings, "bytes": feats.nbytes, "train_bytes": train.features.nbytes,
        }},
    )


@CONDENSERS.register("mirage", params=MirageParams, tracks=("graph",), needs_teacher=False, provides=("weight",))
def mirage_condenser(
    train: Dataset, *, teacher: nn.Module | None, seed: int, device: torch.device, report: Report | None,
    hops: int, thresholds: int | list[int] | None, target_graphs: int | None, frequency: str,
    max_set_size: int | None,
) -> Dataset:
    """Mirage on a graph training split (no model is used; deterministic, so ``seed`` is unused).

    Args:
        train: graph training split.
        hops: depth of the computation trees; match the GNN's number of layers.
        thresholds: absolute support per class (one int for all), or None with ``target_graphs``.
        target_graphs: total condensed graphs the automatic thresholds aim at.
        frequency: ``weight`` (each graph's loss weighted by its support, mean 1) or ``uniform``.
        max_set_size: largest tree set mined, or None.
    """
    if frequency not in ("weight", "uniform"):
        raise DataError(f"mirage: frequency must be 'weight' or 'uniform' (got {frequency!r})")
    source = graph_set(train)
    result = mirage(source, hops=hops, thresholds=thresholds, target_graphs=target_graphs, max_size=max_set_size)
    if result.graphs.num_graphs == 0:
        raise DataError(f"mirage: no frequent tree set at thresholds {result.thresholds}; lower condense.thresholds "
                        "or set condense.target_graphs")
    return to_dataset(result, train, source, frequency)
