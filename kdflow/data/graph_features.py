"""Graph features that behave like a feature tensor: ``len``, ``shape``, indexing, ``.to``.

A ``GraphFeatures`` holds ``G`` graphs as one disjoint union (PyG's batch layout): concatenated
node features, an edge index with ids inside the union, and per-graph node/edge offsets.
Indexing with a slice, an int64 tensor or a bool mask returns the selected graphs, nodes
renumbered from 0, so the training loop, ``predict`` and the logit cache slice graph datasets
exactly as they slice image tensors; a GNN reads a batch with :meth:`GraphFeatures.batch`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from kdflow.errors import DataError


class GraphBatch(NamedTuple):
    """PyG-style view of a ``GraphFeatures``: what a message-passing model consumes."""

    x: torch.Tensor  # [N, F]
    edge_index: torch.Tensor  # [2, E]
    batch: torch.Tensor  # [N] graph of each node
    edge_attr: torch.Tensor | None  # [E, D]
    root_mask: torch.Tensor | None  # [N] pool over these nodes only (Mirage)
    num_graphs: int


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(s, s + c)`` per pair, vectorised.  # [sum(counts)]"""
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=starts.device)
    ends = torch.cumsum(counts, 0)
    within = torch.arange(total, device=starts.device) - torch.repeat_interleave(ends - counts, counts)
    return within + torch.repeat_interleave(starts, counts)


class GraphFeatures:
    """``G`` graphs as concatenated nodes and edges.

    Attributes:
        x: float node features.  # [N, F]
        edge_index: ``(source, target)`` node ids inside this union, grouped by graph.  # [2, E]
        node_offsets: first node of each graph, then ``N``.  # [G + 1]
        edge_offsets: first edge of each graph, then ``E``.  # [G + 1]
        edge_attr: float edge features or None.  # [E, D]
        root_mask: True on the nodes to pool over (Mirage's tree roots), or None for all.  # [N]
    """

    def __init__(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        node_offsets: torch.Tensor,
        edge_offsets: torch.Tensor,
        edge_attr: torch.Tensor | None = None,
        root_mask: torch.Tensor | None = None,
    ) -> None:
        self.x = x
        self.edge_index = edge_index
        self.node_offsets = node_offsets
        self.edge_offsets = edge_offsets
        self.edge_attr = edge_attr
        self.root_mask = root_mask
        n, e = x.shape[0], edge_index.shape[1] if edge_index.ndim == 2 else -1
        problems = []
        if x.ndim != 2:
            problems.append(f"node features must be [N, F], got {tuple(x.shape)}")
        if edge_index.ndim != 2 or edge_index.shape[0] != 2:
            problems.append(f"edge_index must be [2, E], got {tuple(edge_index.shape)}")
        if node_offsets.ndim != 1 or len(node_offsets) < 1 or int(node_offsets[0]) != 0 or int(node_offsets[-1]) != n:
            problems.append(f"node_offsets must run from 0 to N={n}")
        if edge_offsets.shape != node_offsets.shape or int(edge_offsets[0]) != 0 or int(edge_offsets[-1]) != e:
            problems.append(f"edge_offsets must have the shape of node_offsets and run from 0 to E={e}")
        if edge_attr is not None and (edge_attr.ndim != 2 or edge_attr.shape[0] != e):
            problems.append(f"edge_attr must be [E={e}, D], got {tuple(edge_attr.shape)}")
        if root_mask is not None and (root_mask.shape != (n,) or root_mask.dtype != torch.bool):
            problems.append(f"root_mask must be bool [N={n}], got {root_mask.dtype} {tuple(root_mask.shape)}")
        if problems:
            raise DataError("graph features: " + "; ".join(problems))

    # --- tensor-like surface -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.node_offsets) - 1

    @property
    def shape(self) -> torch.Size:
        """``(G, F)``: graphs first, like a feature tensor, so ``shape[1:]`` is the input shape."""
        return torch.Size((len(self), self.x.shape[1]))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def num_nodes(self) -> torch.Tensor:
        """Nodes per graph.  # [G]"""
        return self.node_offsets.diff()

    @property
    def num_edges(self) -> torch.Tensor:
        """Edges per graph.  # [G]"""
        return self.edge_offsets.diff()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray | list) -> GraphFeatures:
        """The selected graphs (an int selects one graph, kept as a one-graph union)."""
        g = len(self)
        if isinstance(index, slice):
            idx = torch.arange(g)[index]
        elif isinstance(index, int):
            if not -g <= index < g:
                raise IndexError(f"graph {index} out of range for {g} graphs")
            idx = torch.tensor([index % g])
        else:
            idx = torch.as_tensor(np.asarray(index) if not isinstance(index, torch.Tensor) else index)
            if idx.dtype == torch.bool:
                if idx.shape != (g,):
                    raise IndexError(f"bool mask of shape {tuple(idx.shape)} for {g} graphs")
                idx = idx.nonzero().flatten()
            idx = idx.to(torch.int64).flatten()
            idx = torch.where(idx < 0, idx + g, idx)
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= g):
                raise IndexError(f"graph index out of range for {g} graphs")
        return self._gather(idx.to(self.node_offsets.device))

    def _gather(self, idx: torch.Tensor) -> GraphFeatures:
        n_start, e_start = self.node_offsets[idx], self.edge_offsets[idx]
        n_count = self.node_offsets[idx + 1] - n_start
        e_count = self.edge_offsets[idx + 1] - e_start
        nodes, edges = _ranges(n_start, n_count), _ranges(e_start, e_count)
        zero = torch.zeros(1, dtype=torch.int64, device=idx.device)
        new_n = torch.cat([zero, torch.cumsum(n_count, 0)])
        new_e = torch.cat([zero, torch.cumsum(e_count, 0)])
        shift = torch.repeat_interleave(new_n[:-1] - n_start, e_count)  # [E'] old -> new node ids
        return GraphFeatures(
            x=self.x[nodes],
            edge_index=self.edge_index[:, edges] + shift,
            node_offsets=new_n,
            edge_offsets=new_e,
            edge_attr=None if self.edge_attr is None else self.edge_attr[edges],
            root_mask=None if self.root_mask is None else self.root_mask[nodes],
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"x": self.x, "edge_index": self.edge_index, "node_offsets": self.node_offsets,
               "edge_offsets": self.edge_offsets}
        if self.edge_attr is not None:
            out["edge_attr"] = self.edge_attr
        if self.root_mask is not None:
            out["root_mask"] = self.root_mask
        return out

    def _map(self, fn) -> GraphFeatures:
        return GraphFeatures(**{k: fn(v) for k, v in self._tensors().items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GraphFeatures:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def cpu(self) -> GraphFeatures:
        return self.to("cpu")

    def pin_memory(self) -> GraphFeatures:
        return self._map(lambda t: t.pin_memory())

    def contiguous(self) -> GraphFeatures:
        return self._map(lambda t: t.contiguous())

    def batch(self) -> GraphBatch:
        """PyG-style tensors of this union (node ids already start at 0)."""
        graph = torch.repeat_interleave(torch.arange(len(self), device=self.x.device), self.num_nodes)
        return GraphBatch(self.x, self.edge_index, graph, self.edge_attr, self.root_mask, len(self))

    def __repr__(self) -> str:
        extra = (", edge_attr" if self.edge_attr is not None else "") + (", roots" if self.root_mask is not None else "")
        return (f"GraphFeatures({len(self)} graphs, {self.x.shape[0]} nodes x {self.x.shape[1]}, "
                f"{self.edge_index.shape[1]} edges{extra})")

    # --- storage ----------------------------------------------------------------------------

    def state(self, prefix: str = "graph.") -> dict[str, torch.Tensor]:
        """Named contiguous tensors for a safetensors file."""
        return {prefix + k: v.contiguous() for k, v in self._tensors().items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str = "graph.", where: str = "") -> GraphFeatures:
        """Rebuild from :meth:`state` (``DataError`` naming the missing tensors)."""
        need = ("x", "edge_index", "node_offsets", "edge_offsets")
        missing = [prefix + k for k in need if prefix + k not in tensors]
        if missing:
            raise DataError(f"{where}: graph dataset lacks tensor(s) {missing}")
        get = lambda k: tensors.get(prefix + k)  # noqa: E731
        return cls(get("x"), get("edge_index"), get("node_offsets"), get("edge_offsets"), get("edge_attr"),
                   get("root_mask"))

    @classmethod
    def from_graphs(
        cls,
        x: np.ndarray,
        edge_index: np.ndarray,
        node_offsets: np.ndarray,
        edge_offsets: np.ndarray,
        edge_attr: np.ndarray | None = None,
        root_mask: np.ndarray | None = None,
    ) -> GraphFeatures:
        """From numpy arrays (features as float32, ids as int64)."""
        t = lambda a, dt: None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=dt))  # noqa: E731
        return cls(t(x, np.float32), t(edge_index, np.int64), t(node_offsets, np.int64),
                   t(edge_offsets, np.int64), t(edge_attr, np.float32), t(root_mask, bool))


def is_graph(features: object) -> bool:
    return isinstance(features, GraphFeatures)
