"""GNN classifiers on GraphFeatures: shapes, batching equals one graph at a time, root pooling, save/load."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdflow.errors import ModelError
from kdflow.models import create_model
from kdflow.models.gnn import GRAPH_MODELS
from kdflow.models.io import load_model, save_model
from kdflow.train.loop import extract_features, predict
from tests.data.test_graph_features import toy

ARGS = {"gcn": {"hidden": 8, "layers": 2}, "gin": {"hidden": 8, "layers": 2, "edge_dim": 3},
        "gat": {"hidden": 8, "layers": 2, "heads": 2, "edge_dim": 3}, "tiny_gcn": {}}


@pytest.mark.parametrize("name", GRAPH_MODELS)
@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_batched_logits_equal_one_graph_at_a_time(name, pool):
    torch.manual_seed(0)
    args = {**ARGS[name], **({"pool": pool} if name != "tiny_gcn" else {})}
    model = create_model(name, (2,), 3, **args).eval()
    gf = toy(6)
    with torch.no_grad():
        together = model(gf)  # [6, 3]
        alone = torch.cat([model(gf[i]) for i in range(len(gf))])
    assert together.shape == (6, 3)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    feats = extract_features(model, gf, batch_size=4)
    assert feats.shape == (6, model.head.in_features)
    torch.testing.assert_close(predict(model, gf, batch_size=4), together, rtol=1e-5, atol=1e-5)


def test_root_mask_pools_over_roots_only():
    torch.manual_seed(0)
    model = create_model("gcn", (2,), 2, hidden=8, layers=1, pool="sum").eval()
    gf = toy(4, roots=True)
    b = gf.batch()
    with torch.no_grad():
        h = torch.relu(model.norms[0](model.convs[0](b.x, b.edge_index)))  # node embeddings [N, 8]
        ref = torch.stack([h[(b.batch == g) & b.root_mask].sum(0) for g in range(4)])  # per-graph loop
        ref = torch.relu(model.lin(ref))
        torch.testing.assert_close(model.features(gf), ref)
        no_roots = type(gf)(gf.x, gf.edge_index, gf.node_offsets, gf.edge_offsets)
        assert not torch.allclose(model.features(no_roots), ref)


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_save_load_round_trip(tmp_path: Path, name: str):
    torch.manual_seed(0)
    model = create_model(name, (2,), 3, **ARGS[name]).eval()
    save_model(model, tmp_path)
    back = load_model(tmp_path)
    gf = toy(4)
    with torch.no_grad():
        assert torch.equal(model(gf), back(gf))


def test_bad_arguments():
    with pytest.raises(ModelError, match="input_shape"):
        create_model("gcn", (1, 8, 8), 2)
    with pytest.raises(ModelError, match="pool"):
        create_model("gin", (2,), 2, pool="median")
    with pytest.raises(ModelError, match="divisible"):
        create_model("gat", (2,), 2, hidden=10, heads=4)
    with pytest.raises(ModelError, match="bad arguments"):
        create_model("gcn", (2,), 2, heads=2)
    model = create_model("gin", (2,), 2, edge_dim=3)
    gf = toy(2)
    with pytest.raises(ModelError, match="no edge features"):
        model(type(gf)(gf.x, gf.edge_index, gf.node_offsets, gf.edge_offsets))


def test_accepts_a_pyg_batch():
    from torch_geometric.data import Batch, Data

    torch.manual_seed(0)
    model = create_model("tiny_gcn", (2,), 2).eval()
    gf = toy(3)
    graphs = [Data(x=gf[i].x, edge_index=gf[i].edge_index) for i in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(model(Batch.from_data_list(graphs)), model(gf))


def test_latency_of_a_graph_model_on_real_graphs():
    from kdflow.metrics.latency import measure_latency

    model = create_model("tiny_gcn", (2,), 2)
    out = measure_latency(model, (2,), 4, repeats=2, warmup=1, inputs=toy(4))
    assert out["median_ms"] > 0 and out["batch_size"] == 4
