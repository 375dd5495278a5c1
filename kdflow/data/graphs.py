"""An in-memory set of labelled graphs: concatenated nodes and edges plus per-graph offsets.

Node ``i`` of the set belongs to graph ``g`` when ``node_offsets[g] <= i < node_offsets[g + 1]``;
edges are stored grouped by graph (``edge_offsets``) with global node ids.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from kdflow.errors import DataError


@dataclass(frozen=True)
class GraphSet:
    """Graphs with categorical node labels, optional edge labels and one class label per graph.

    Attributes:
        node_labels: contiguous node-label ids in ``[0, num_node_labels)``.  # [N]
        edge_index: ``(source, target)`` global node ids, grouped by graph.  # [2, E]
        node_offsets: first node of each graph, then ``N``.  # [G + 1]
        edge_offsets: first edge of each graph, then ``E``.  # [G + 1]
        graph_labels: class ids in ``[0, num_classes)``.  # [G]
        edge_labels: contiguous edge-label ids, or None.  # [E]
        node_attributes: continuous node attributes, or None.  # [N, D]
        num_node_labels: size of the node-label vocabulary.
        num_edge_labels: size of the edge-label vocabulary (1 without edge labels).
        num_classes: number of graph classes.
        name: where the graphs come from.
    """

    node_labels: np.ndarray
    edge_index: np.ndarray
    node_offsets: np.ndarray
    edge_offsets: np.ndarray
    graph_labels: np.ndarray
    edge_labels: np.ndarray | None = None
    node_attributes: np.ndarray | None = None
    num_node_labels: int = 0
    num_edge_labels: int = 1
    num_classes: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        n, e, g = len(self.node_labels), self.edge_index.shape[1], len(self.graph_labels)
        problems = []
        if self.edge_index.shape[0] != 2:
            problems.append(f"edge_index has shape {self.edge_index.shape}, expected [2, E]")
        if len(self.node_offsets) != g + 1 or self.node_offsets[0] != 0 or self.node_offsets[-1] != n:
            problems.append("node_offsets must run from 0 to the number of nodes, one per graph + 1")
        if len(self.edge_offsets) != g + 1 or self.edge_offsets[0] != 0 or self.edge_offsets[-1] != e:
            problems.append("edge_offsets must run from 0 to the number of edges, one per graph + 1")
        if self.edge_labels is not None and len(self.edge_labels) != e:
            problems.append(f"{len(self.edge_labels)} edge labels for {e} edges")
        if self.node_attributes is not None and len(self.node_attributes) != n:
            problems.append(f"{len(self.node_attributes)} node attribute rows for {n} nodes")
        if problems:
            raise DataError(f"graph set {self.name!r}: " + "; ".join(problems))

    @property
    def num_graphs(self) -> int:
        return len(self.graph_labels)

    @property
    def num_nodes(self) -> int:
        return len(self.node_labels)

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]

    @property
    def node_graph(self) -> np.ndarray:
        """Graph id of every node.  # [N]"""
        return np.repeat(np.arange(self.num_graphs), np.diff(self.node_offsets))

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays (the in-memory size of the set)."""
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                total += value.nbytes
        return total

    def subset(self, graphs: np.ndarray) -> GraphSet:
        """The graphs with ids ``graphs`` (in that order), nodes renumbered."""
        graphs = np.asarray(graphs, dtype=np.int64)
        n_count = np.diff(self.node_offsets)[graphs]
        e_count = np.diff(self.edge_offsets)[graphs]
        nodes = concat_ranges(self.node_offsets[graphs], n_count)
        edges = concat_ranges(self.edge_offsets[graphs], e_count)
        new_offsets = np.concatenate([[0], np.cumsum(n_count)])
        # shift each edge by (new first node - old first node) of its graph
        shift = np.repeat(new_offsets[:-1] - self.node_offsets[graphs], e_count)
        return GraphSet(
            node_labels=self.node_labels[nodes],
            edge_index=self.edge_index[:, edges] + shift,
            node_offsets=new_offsets,
            edge_offsets=np.concatenate([[0], np.cumsum(e_count)]),
            graph_labels=self.graph_labels[graphs],
            edge_labels=None if self.edge_labels is None else self.edge_labels[edges],
            node_attributes=None if self.node_attributes is None else self.node_attributes[nodes],
            num_node_labels=self.num_node_labels,
            num_edge_labels=self.num_edge_labels,
            num_classes=self.num_classes,
            name=self.name,
        )


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each pair, without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    within = np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)
    return within + np.repeat(starts, counts)
