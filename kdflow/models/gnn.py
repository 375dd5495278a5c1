"""Graph classifiers from torch_geometric convolutions: ``gcn``, ``gin``, ``gat`` and ``tiny_gcn``.

Input: a ``GraphFeatures`` (or any PyG-style batch with ``x``, ``edge_index``, ``batch``,
``num_graphs``); ``input_shape`` is ``(F,)``, the node-feature width. ``layers`` message-passing
layers of width ``hidden`` -> graph pooling (sum, mean or max; over root nodes only when the
batch carries a root mask, as Mirage's condensed graphs do) -> Linear -> ReLU -> Linear.
torch_geometric is imported when a model is built, so importing kdflow stays fast.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdflow.data.graph_features import GraphBatch, GraphFeatures
from kdflow.errors import ModelError
from kdflow.models import MODELS

POOLS = ("sum", "mean", "max")
CONVS = ("gcn", "gin", "gat")
GRAPH_MODELS = (*CONVS, "tiny_gcn")  # registered names whose input is a graph batch


def as_batch(x: Any) -> GraphBatch:
    """A ``GraphBatch`` from ``GraphFeatures`` or a torch_geometric ``Batch``."""
    if isinstance(x, GraphFeatures):
        return x.batch()
    if isinstance(x, GraphBatch):
        return x
    if hasattr(x, "edge_index") and hasattr(x, "batch"):
        return GraphBatch(x.x, x.edge_index, x.batch, getattr(x, "edge_attr", None),
                          getattr(x, "root_mask", None), int(x.num_graphs))
    raise ModelError(f"graph model: expected GraphFeatures or a PyG batch, got {type(x).__name__}")


def _conv(kind: str, width_in: int, hidden: int, heads: int, edge_dim: int) -> nn.Module:
    from torch_geometric.nn import GATConv, GCNConv, GINConv, GINEConv

    if kind == "gcn":
        return GCNConv(width_in, hidden)
    if kind == "gin":
        mlp = nn.Sequential(nn.Linear(width_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        return GINEConv(mlp, edge_dim=edge_dim) if edge_dim else GINConv(mlp, train_eps=True)
    return GATConv(width_in, hidden // heads, heads=heads, edge_dim=edge_dim or None)


class GNN(nn.Module):
    """``layers`` x [conv -> BatchNorm -> ReLU -> Dropout] -> pool -> Linear -> ReLU -> Linear."""

    def __init__(self, kind: str, in_features: int, num_classes: int, hidden: int, layers: int, pool: str,
                 dropout: float, heads: int = 1, edge_dim: int = 0) -> None:
        super().__init__()
        problems = []
        if kind not in CONVS:
            problems.append(f"conv must be one of {CONVS} (got {kind!r})")
        if pool not in POOLS:
            problems.append(f"pool must be one of {POOLS} (got {pool!r})")
        if hidden < 1 or layers < 1 or heads < 1 or edge_dim < 0:
            problems.append(f"hidden, layers, heads must be >= 1 and edge_dim >= 0 (got {hidden}, {layers}, {heads}, {edge_dim})")
        elif kind == "gat" and hidden % heads:
            problems.append(f"gat: hidden ({hidden}) must be divisible by heads ({heads})")
        if not 0 <= dropout < 1:
            problems.append(f"dropout must be in [0, 1) (got {dropout})")
        if problems:
            raise ModelError(f"{kind}: " + "; ".join(problems))
        self.kind, self.pool, self.dropout, self.edge_dim = kind, pool, dropout, edge_dim
        self.convs = nn.ModuleList(
            _conv(kind, in_features if i == 0 else hidden, hidden, heads, edge_dim) for i in range(layers)
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))
        self.lin = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def _pool(self, h: torch.Tensor, b: GraphBatch) -> torch.Tensor:
        from torch_geometric.nn import global_add_pool, global_max_pool, global_mean_pool

        fn = {"sum": global_add_pool, "mean": global_mean_pool, "max": global_max_pool}[self.pool]
        graph = b.batch
        if b.root_mask is not None:  # Mirage: a graph is the multiset of its root trees
            h, graph = h[b.root_mask], graph[b.root_mask]
        return fn(h, graph, size=b.num_graphs)  # [B, hidden]

    def features(self, x: Any) -> torch.Tensor:
        """Penultimate features: the pooled graph embedding after Linear -> ReLU.  # [B, hidden]"""
        b = as_batch(x)
        h = b.x.float()
        use_edges = self.edge_dim > 0
        if use_edges and b.edge_attr is None:
            raise ModelError(f"{self.kind}: built with edge_dim={self.edge_dim} but the graphs have no edge features")
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h, b.edge_index, b.edge_attr.float()) if use_edges else conv(h, b.edge_index)
            h = nn.functional.relu(norm(h))
            h = nn.functional.dropout(h, self.dropout, self.training)
        g = nn.functional.relu(self.lin(self._pool(h, b)))
        return nn.functional.dropout(g, self.dropout, self.training)

    def forward(self, x: Any) -> torch.Tensor:
        return self.head(self.features(x))  # [B, K]


def _width(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 1:
        raise ModelError(f"{name}: input_shape must be (node features,), got {input_shape}; use a graph dataset")
    return input_shape[0]


def _factory(kind: str, default_heads: int):
    def build(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64, layers: int = 3, pool: str = "sum",
              dropout: float = 0.0, edge_dim: int = 0, **extra: Any) -> GNN:
        heads = extra.pop("heads", default_heads) if kind == "gat" else default_heads
        if extra:
            raise TypeError(f"unexpected argument(s) {sorted(extra)}")
        return GNN(kind, _width(input_shape, kind), num_classes, hidden, layers, pool, dropout, heads, edge_dim)

    build.__doc__ = f"A {kind.upper()} graph classifier (hidden, layers, pool, dropout, edge_dim" + (", heads)." if kind == "gat" else ").")
    return build


for _kind, _heads in (("gcn", 1), ("gin", 1), ("gat", 4)):
    MODELS.register(_kind, tracks=("graph",))(_factory(_kind, _heads))


@MODELS.register("tiny_gcn", tracks=("graph",))
def tiny_gcn(input_shape: tuple[int, ...], num_classes: int) -> GNN:
    """A 2-layer, 16-unit GCN with sum pooling for fast tests."""
    return GNN("gcn", _width(input_shape, "tiny_gcn"), num_classes, 16, 2, "sum", 0.0)
