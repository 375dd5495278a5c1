"""GraphFeatures behaves like a feature tensor; graph datasets round-trip and validate with pandera."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdflow.data.dataset import Dataset, load_dataset, save_dataset
from kdflow.data.graph_features import GraphFeatures
from kdflow.errors import DataError


def toy(num_graphs: int = 5, seed: int = 0, roots: bool = False) -> GraphFeatures:
    """Random small graphs: graph g has g + 1 nodes (a path, both directions) and 2 features."""
    g = torch.Generator().manual_seed(seed)
    xs, edges, n_off, e_off = [], [], [0], [0]
    for k in range(num_graphs):
        n = k + 1
        xs.append(torch.randn(n, 2, generator=g))
        base = n_off[-1]
        for i in range(n - 1):
            edges += [(base + i, base + i + 1), (base + i + 1, base + i)]
        n_off.append(base + n)
        e_off.append(len(edges))
    ei = torch.tensor(edges, dtype=torch.int64).reshape(-1, 2).T.contiguous()
    x = torch.cat(xs)
    return GraphFeatures(x, ei, torch.tensor(n_off), torch.tensor(e_off), edge_attr=torch.randn(ei.shape[1], 3, generator=g),
                         root_mask=(torch.arange(len(x)) % 2 == 0) if roots else None)


def graph_list(gf: GraphFeatures) -> list[tuple[list, list, list]]:
    """Each graph separately with local node ids: (features, edges, edge features) - the reference."""
    out = []
    for k in range(len(gf)):
        a, b = int(gf.node_offsets[k]), int(gf.node_offsets[k + 1])
        c, d = int(gf.edge_offsets[k]), int(gf.edge_offsets[k + 1])
        out.append((gf.x[a:b].tolist(), (gf.edge_index[:, c:d] - a).tolist(), gf.edge_attr[c:d].tolist()))
    return out


def test_tensor_like_surface():
    gf = toy()
    assert len(gf) == 5 and gf.shape == (5, 2) and gf.shape[1:] == (2,) and gf.shape[0] == 5
    assert gf.num_nodes.tolist() == [1, 2, 3, 4, 5] and gf.num_edges.tolist() == [0, 2, 4, 6, 8]
    assert gf.to("cpu").x.data_ptr() == gf.x.data_ptr() or torch.equal(gf.to("cpu").x, gf.x)
    b = gf.batch()
    assert b.batch.tolist() == [0] + [1] * 2 + [2] * 3 + [3] * 4 + [4] * 5 and b.num_graphs == 5


@pytest.mark.parametrize("index", [slice(1, 4), torch.tensor([4, 0, 2]), torch.tensor([True, False, True, False, True]),
                                   np.array([3, 3]), 2, -1])
def test_indexing_matches_per_graph_reference(index):
    gf = toy(roots=True)
    sub = gf[index]
    ids = torch.arange(5)[index]
    ids = [int(ids)] if ids.ndim == 0 else ids.tolist()
    assert graph_list(sub) == [graph_list(gf)[i] for i in ids]
    assert len(sub) == len(ids) and int(sub.node_offsets[0]) == 0
    if sub.edge_index.numel():
        assert int(sub.edge_index.max()) < sub.x.shape[0]
    mask = torch.cat([gf.root_mask[int(gf.node_offsets[i]):int(gf.node_offsets[i + 1])] for i in ids])
    assert torch.equal(sub.root_mask, mask)


def test_index_errors():
    gf = toy()
    with pytest.raises(IndexError):
        gf[7]
    with pytest.raises(IndexError):
        gf[torch.tensor([0, 5])]
    with pytest.raises(IndexError):
        gf[torch.tensor([True, False])]


def test_bad_construction_is_a_data_error():
    gf = toy()
    with pytest.raises(DataError, match="node_offsets"):
        GraphFeatures(gf.x, gf.edge_index, gf.node_offsets[:-1], gf.edge_offsets)
    with pytest.raises(DataError, match="edge_index"):
        GraphFeatures(gf.x, gf.edge_index[0], gf.node_offsets, gf.edge_offsets)


def graph_dataset(gf: GraphFeatures, extras: dict | None = None) -> Dataset:
    n = len(gf)
    return Dataset(features=gf, labels=torch.arange(n) % 2, sample_ids=[f"g{i}" for i in range(n)],
                   splits=["train", "val", "test", "train", "train"][:n], num_classes=2, modality="graph",
                   extras=extras or {}, meta={"node_label_columns": [0, 2]})


def test_dataset_select_and_split():
    ds = graph_dataset(toy(roots=True), {"weight": torch.arange(5.0)})
    tr = ds.split("train")
    assert len(tr) == 3 and tr.input_shape == (2,) and tr.extras["weight"].tolist() == [0.0, 3.0, 4.0]
    assert graph_list(tr.features) == [graph_list(ds.features)[i] for i in (0, 3, 4)]
    assert tr.frame()["num_nodes"].to_list() == [1, 4, 5]


def test_save_load_round_trip(tmp_path: Path):
    ds = graph_dataset(toy(roots=True), {"weight": torch.arange(5.0)})
    save_dataset(ds, tmp_path)
    back = load_dataset(tmp_path)
    assert back.modality == "graph" and back.input_shape == (2,) and back.meta == ds.meta
    for name in ("x", "edge_index", "node_offsets", "edge_offsets", "edge_attr", "root_mask"):
        assert torch.equal(getattr(back.features, name), getattr(ds.features, name)), name
    assert torch.equal(back.labels, ds.labels) and torch.equal(back.extras["weight"], ds.extras["weight"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tensors.safetensors"), framework="pt") as f:
        assert {"graph.x", "graph.edge_index", "graph.node_offsets", "graph.edge_offsets"} <= set(f.keys())
        assert "features" not in f.keys()


def test_pandera_names_graphs_with_edges_outside_or_no_nodes(tmp_path: Path):
    gf = toy()
    ei = gf.edge_index.clone()
    ei[0, 2] = 0  # an edge of graph 2 (nodes 3..5) leaving towards graph 0
    bad = GraphFeatures(gf.x, ei, gf.node_offsets, gf.edge_offsets)
    with pytest.raises(DataError, match=r"edges_outside_graph(.|\n)*rows \[2\]"):
        save_dataset(graph_dataset(bad), tmp_path)
    empty = GraphFeatures(gf.x[:0], gf.edge_index[:, :0], torch.tensor([0, 0]), torch.tensor([0, 0]))
    ds = Dataset(features=empty, labels=torch.tensor([0]), sample_ids=["a"], splits=["train"], num_classes=2,
                 modality="graph")
    with pytest.raises(DataError, match="num_nodes"):
        ds.validate()
    x = gf.x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(DataError, match="nonfinite_nodes"):
        graph_dataset(GraphFeatures(x, gf.edge_index, gf.node_offsets, gf.edge_offsets)).validate()
    labels = graph_dataset(gf)
    labels.labels = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(DataError, match="label"):
        labels.validate()


def test_modality_must_fit_features():
    ds = graph_dataset(toy())
    ds.modality = "tabular"
    with pytest.raises(DataError, match="modality"):
        ds.validate()
