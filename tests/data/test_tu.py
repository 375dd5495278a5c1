"""TU text-format reader: real MUTAG counts against the files, and clear errors on broken files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdflow.data.tu import read_tu
from kdflow.errors import DataError
from tests.conftest import shared_data

TOY = {
    "A": "1, 2\n2, 1\n2, 3\n3, 2\n4, 5\n5, 4\n",
    "graph_indicator": "1\n1\n1\n2\n2\n",
    "graph_labels": "-1\n1\n",
    "node_labels": "3\n5\n3\n5\n5\n",
    "edge_labels": "0\n0\n1\n1\n0\n0\n",
}


def write_tu(root: Path, files: dict[str, str], name: str = "TOY") -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for part, text in files.items():
        (raw / f"{name}_{part}.txt").write_text(text)
    return root


def test_reads_toy_dataset(tmp_path):
    g = read_tu(write_tu(tmp_path, TOY))
    assert g.name == "TOY" and g.num_graphs == 2 and g.num_nodes == 5 and g.num_edges == 6
    assert g.graph_labels.tolist() == [0, 1] and g.num_classes == 2
    assert g.node_labels.tolist() == [0, 1, 0, 1, 1] and g.num_node_labels == 2
    assert g.edge_labels.tolist() == [0, 0, 1, 1, 0, 0] and g.num_edge_labels == 2
    assert g.edge_index[:, :2].tolist() == [[0, 1], [1, 0]]
    assert g.node_offsets.tolist() == [0, 3, 5] and g.edge_offsets.tolist() == [0, 4, 6]
    sub = g.subset(np.array([1]))
    assert sub.edge_index.tolist() == [[0, 1], [1, 0]] and sub.graph_labels.tolist() == [1]


def test_degree_labels_without_node_labels(tmp_path):
    files = {k: v for k, v in TOY.items() if k != "node_labels"}
    g = read_tu(write_tu(tmp_path, files))
    assert g.node_labels.tolist() == [0, 1, 0, 0, 0]  # degrees 1, 2, 1, 1, 1
    assert g.num_node_labels == 2


def test_edges_grouped_by_graph(tmp_path):
    files = {**TOY, "A": "4, 5\n1, 2\n5, 4\n2, 1\n2, 3\n3, 2\n", "edge_labels": "7\n0\n7\n0\n1\n1\n"}
    g = read_tu(write_tu(tmp_path, files))
    assert g.edge_index.tolist() == [[0, 1, 1, 2, 3, 4], [1, 0, 2, 1, 4, 3]]
    assert g.edge_labels.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"A": "1, 2\n2, x\n"}, r"TOY_A.txt: line 2"),
        ({"A": "1, 2\n2\n"}, r"TOY_A.txt: line 2"),
        ({"A": "1, 9\n"}, r"line 1: node id outside 1..5"),
        ({"A": "1, 4\n"}, r"joins nodes of graphs 1 and 2"),
        ({"graph_indicator": "1\n1\n3\n2\n2\n"}, r"line 3: graph id 3 outside 1..2"),
        ({"graph_indicator": "1\n2\n1\n2\n2\n"}, r"not sorted"),
        ({"node_labels": "1\n2\n"}, r"2 lines, expected 5"),
        ({"edge_labels": "0\n"}, r"1 lines, expected 6"),
    ],
)
def test_broken_files_raise_data_error(tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        read_tu(write_tu(tmp_path, {**TOY, **change}))


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="no TU dataset found"):
        read_tu(tmp_path)
    files = {k: v for k, v in TOY.items() if k != "graph_labels"}
    with pytest.raises(DataError, match="TOY_graph_labels.txt: required TU file not found"):
        read_tu(write_tu(tmp_path, files))


def tu_dir(name: str) -> Path:
    path = shared_data() / "tu" / name
    if not path.exists():
        pytest.skip(f"TU {name} not found under {path}")
    return path


def _column(path: Path) -> np.ndarray:
    return np.array(path.read_text().split(), dtype=np.int64)


def test_mutag_matches_files():
    root = tu_dir("MUTAG")
    g = read_tu(root)
    raw = root / "raw"
    labels = _column(raw / "MUTAG_graph_labels.txt")
    node_labels = _column(raw / "MUTAG_node_labels.txt")
    edge_labels = _column(raw / "MUTAG_edge_labels.txt")
    indicator = _column(raw / "MUTAG_graph_indicator.txt")
    assert g.num_graphs == 188 == len(labels)
    assert np.bincount(g.graph_labels).tolist() == [int((labels == -1).sum()), int((labels == 1).sum())] == [63, 125]
    assert g.num_nodes == len(node_labels) == 3371 and g.num_edges == len(edge_labels) == 7442
    assert np.bincount(g.node_labels).tolist() == np.unique(node_labels, return_counts=True)[1].tolist()
    assert np.bincount(g.edge_labels).tolist() == np.unique(edge_labels, return_counts=True)[1].tolist()
    assert np.diff(g.node_offsets).tolist() == np.bincount(indicator)[1:].tolist()
    graph = g.node_graph
    assert (graph[g.edge_index[0]] == graph[g.edge_index[1]]).all()
    for k in range(g.num_graphs):  # edges of graph k lie inside graph k
        e = g.edge_index[:, g.edge_offsets[k] : g.edge_offsets[k + 1]]
        assert ((e >= g.node_offsets[k]) & (e < g.node_offsets[k + 1])).all()
    assert g.edge_index.T.tolist()[:3] == [[1, 0], [0, 1], [2, 1]]  # file order, 0-based


def test_imdb_uses_degrees():
    g = read_tu(tu_dir("IMDB-BINARY"))
    assert g.num_graphs == 1000 and np.bincount(g.graph_labels).tolist() == [500, 500]
    assert g.edge_labels is None and g.num_edge_labels == 1
    degree = np.bincount(g.edge_index[0], minlength=g.num_nodes)
    # the label ids are the sorted distinct degrees
    assert np.array_equal(np.unique(degree)[g.node_labels], degree)


def test_graph_set_checks_shapes(tmp_path):
    g = read_tu(write_tu(tmp_path, TOY))
    with pytest.raises(DataError, match="node_offsets"):
        type(g)(**{**g.__dict__, "node_offsets": np.array([0, 3, 4])})
    with pytest.raises(DataError, match="edge labels"):
        type(g)(**{**g.__dict__, "edge_labels": np.zeros(2, np.int64)})
    empty = g.subset(np.array([], np.int64))
    assert empty.num_graphs == 0 and empty.num_nodes == 0 and empty.edge_index.shape == (2, 0)
    both = g.subset(np.array([1, 0]))
    assert both.graph_labels.tolist() == [1, 0] and both.node_labels.tolist() == [1, 1, 0, 1, 0]
    assert both.edge_index.tolist() == [[0, 1, 2, 3, 3, 4], [1, 0, 3, 2, 4, 3]]


# ---------------------------------------------------------------- the tu source (torch_geometric)


def tu_source(root: Path, name: str = "TOY", **options):
    from kdflow.data.sources import load_source

    return load_source(f"tu:{name}", seed=0, val_fraction=0.1, test_fraction=0.1, options={"root": str(root), **options})


def test_tu_source_one_hot_features_match_the_reader(tmp_path):
    write_tu(tmp_path / "TOY", TOY)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    from kdflow.data.tu import load_tu

    g, labels, meta = load_tu(tmp_path, "TOY")  # two graphs: too few to split, so the loader alone
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written next to the files
    ref = read_tu(tmp_path / "TOY")
    assert len(g) == 2 and g.shape == (2, 2) and labels.tolist() == [0, 1]
    assert g.x.argmax(1).tolist() == ref.node_labels.tolist() and g.x.sum(1).eq(1).all()
    assert g.edge_attr.argmax(1).tolist() == [0, 0, 1, 1, 0, 0] and g.node_offsets.tolist() == [0, 3, 5]
    assert sorted(map(tuple, g.edge_index.T.tolist())) == sorted(map(tuple, ref.edge_index.T.tolist()))
    assert meta["node_label_columns"] == [0, 2] and meta["edge_label_columns"] == [0, 2]


def test_tu_source_errors(tmp_path, monkeypatch):
    from kdflow.errors import ParamsError

    with pytest.raises(DataError, match="no TU files TOY_.*download"):
        tu_source(tmp_path)
    monkeypatch.delenv("KDFLOW_TU_ROOT", raising=False)
    from kdflow.data.sources import load_source

    with pytest.raises(ParamsError, match="options.root"):
        load_source("tu:TOY", seed=0, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(ParamsError, match="unknown option"):
        tu_source(tmp_path, roots="x")
    write_tu(tmp_path / "TOY", {**TOY, "A": "1, 2\n2, x\n"})
    with pytest.raises(DataError, match=r"TOY_A.txt: line 2"):
        tu_source(tmp_path)


def test_tu_source_mutag_and_imdb_stratified_80_10_10():
    mutag = tu_source(tu_dir("MUTAG").parent, "MUTAG")
    assert len(mutag) == 188 and mutag.input_shape == (7,) and mutag.features.edge_attr.shape == (7442, 4)
    assert mutag.features.x.shape == (3371, 7) and mutag.labels.bincount().tolist() == [63, 125]
    counts = {s: mutag.splits.count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 150, "val": 19, "test": 19}
    for s in ("val", "test"):  # stratified: each split keeps the class ratio
        assert abs(mutag.split(s).labels.float().mean() - 125 / 188) < 0.06
    imdb = tu_source(tu_dir("IMDB-BINARY").parent, "IMDB-BINARY")
    g = imdb.features
    degree = torch.bincount(g.edge_index[1], minlength=g.x.shape[0])
    assert imdb.meta["node_labels_from_degree"] and g.edge_attr is None
    assert torch.equal(torch.unique(degree)[g.x.argmax(1)], degree)  # one-hot of the degree


def test_a_missing_raw_file_is_an_error_not_a_download(tmp_path, monkeypatch):
    from kdflow.data.tu import load_tu

    files = {k: v for k, v in TOY.items() if k != "graph_labels"}
    write_tu(tmp_path / "TOY", files)
    before = sorted(p.name for p in (tmp_path / "TOY" / "raw").iterdir())

    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("tried to download")

    monkeypatch.setattr("torch_geometric.data.download.urlopen", no_network, raising=False)
    with pytest.raises(DataError, match=r"lacks \['TOY_graph_labels.txt'\]; nothing is downloaded"):
        load_tu(tmp_path, "TOY", download=False)
    assert sorted(p.name for p in (tmp_path / "TOY" / "raw").iterdir()) == before
