"""Mirage against slow, obviously correct references: recursive tree strings, brute-force supports."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from kdflow.condense.itemsets import auto_threshold, frequent_itemsets
from kdflow.condense.mirage import mirage, transactions, tree_ids
from kdflow.data.graphs import GraphSet
from tests.conftest import shared_data


# ---------------------------------------------------------------- references


def canon(v: int, depth: int, labels, in_edges) -> str:
    """Canonical string of v's computation tree: label, then the sorted children strings."""
    if depth == 0:
        return f"({labels[v]})"
    kids = sorted(f"{el}:{canon(u, depth - 1, labels, in_edges)}" for u, el in in_edges[v])
    return f"({labels[v]}|{','.join(kids)})"


def in_edge_lists(n: int, edge_index: np.ndarray, edge_labels) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for e, (u, v) in enumerate(edge_index.T.tolist()):
        out[v].append((u, 0 if edge_labels is None else int(edge_labels[e])))
    return out


def ref_strings(g: GraphSet, depth: int) -> list[str]:
    adj = in_edge_lists(g.num_nodes, g.edge_index, g.edge_labels)
    labels = g.node_labels.tolist()
    return [canon(v, depth, labels, adj) for v in range(g.num_nodes)]


def brute_supports(baskets: list[set], min_support: int) -> dict[tuple, int]:
    """Support of every subset of every basket restricted to frequent single items."""
    single = Counter(i for b in baskets for i in b)
    freq = {i for i, c in single.items() if c >= min_support}
    counts: Counter = Counter()
    for b in baskets:
        items = sorted(b & freq)
        for k in range(1, len(items) + 1):
            counts.update(itertools.combinations(items, k))
    return {s: c for s, c in counts.items() if c >= min_support}


def brute_all_subsets(baskets: list[set], min_support: int) -> dict[tuple, int]:
    """Support of every subset of the item universe, counted by scanning all baskets."""
    universe = sorted(set().union(*baskets))
    out = {}
    for k in range(1, len(universe) + 1):
        for s in itertools.combinations(universe, k):
            sup = sum(set(s) <= b for b in baskets)
            if sup >= min_support:
                out[s] = sup
    return out


def assert_bijection(ids: np.ndarray, strings: list[str]) -> None:
    pairs = set(zip(ids.tolist(), strings))
    assert len(pairs) == len(set(ids.tolist())) == len(set(strings))


def make_graphs(graphs: list[tuple[list[int], list[tuple[int, int, int]], int]]) -> GraphSet:
    """Undirected graphs from (node labels, [(u, v, edge label)], class); both directions stored."""
    labels, edges, elabels, n_off, e_off, y = [], [], [], [0], [0], []
    for nodes, es, cls in graphs:
        base = n_off[-1]
        labels += nodes
        for u, v, el in es:
            edges += [(base + u, base + v), (base + v, base + u)]
            elabels += [el, el]
        n_off.append(base + len(nodes))
        e_off.append(len(edges))
        y.append(cls)
    return GraphSet(
        node_labels=np.array(labels, np.int64),
        edge_index=np.array(edges, np.int64).reshape(-1, 2).T.copy(),
        node_offsets=np.array(n_off),
        edge_offsets=np.array(e_off),
        graph_labels=np.array(y),
        edge_labels=np.array(elabels, np.int64),
        num_node_labels=max(labels) + 1,
        num_edge_labels=max(elabels) + 1,
        num_classes=max(y) + 1,
        name="toy",
    )


TOY = [
    ([0, 1, 0], [(0, 1, 0), (1, 2, 0)], 0),  # path 0-1-0
    ([0, 1, 0], [(1, 2, 0), (0, 1, 0)], 0),  # the same path, edges listed in another order
    ([1, 0, 0], [(0, 2, 0), (0, 1, 0)], 0),  # the same path, nodes in another order
    ([0, 0, 0], [(0, 1, 0), (1, 2, 0), (2, 0, 0)], 0),  # triangle
    ([0, 1, 0, 2], [(0, 1, 0), (1, 2, 1), (1, 3, 0)], 1),  # star with one double bond
    ([0, 1, 0, 2], [(0, 1, 0), (1, 2, 0), (1, 3, 1)], 1),  # the same star, bond moved to label 2
    ([0, 1, 0, 2, 3], [(0, 1, 0), (1, 2, 0), (2, 3, 0)], 1),  # path with an isolated node
    ([0, 0], [(0, 1, 0)], 1),  # one edge: 0 -> 1 -> 0 at depth 2
]


# ---------------------------------------------------------------- tree ids


@pytest.mark.parametrize("hops", [0, 1, 2, 3])
def test_tree_ids_match_recursive_strings_on_toy_graphs(hops):
    g = make_graphs(TOY)
    ids = tree_ids(g.node_labels, g.edge_index, g.edge_labels, hops)
    for depth in range(hops + 1):
        assert_bijection(ids.levels[depth], ref_strings(g, depth))
        assert ids.counts[depth] == len(set(ids.levels[depth].tolist()))


def test_tree_unrolls_without_visited_set():
    g = make_graphs([([0, 0], [(0, 1, 0)], 0)])
    assert ref_strings(g, 2)[0] == "(0|0:(0|0:(0)))"
    out = mirage(g, hops=2, thresholds=1)
    assert out.graphs.num_graphs == 1 and out.graphs.num_nodes == 3  # root, child, root again
    assert out.graphs.edge_index.tolist() == [[1, 2], [0, 1]]  # child -> parent
    assert out.roots.tolist() == [True, False, False]


def test_tree_ids_ignore_child_order_and_edge_labels_matter():
    g = make_graphs(TOY)
    ids = tree_ids(g.node_labels, g.edge_index, g.edge_labels, 2).ids
    per_graph = [sorted(ids[a:b].tolist()) for a, b in zip(g.node_offsets[:-1], g.node_offsets[1:])]
    assert per_graph[0] == per_graph[1] == per_graph[2]  # same path, other orders
    assert per_graph[4] != per_graph[5]  # the double bond moved


def test_tree_ids_invariant_to_node_and_edge_permutation():
    g = make_graphs(TOY)
    rng = np.random.default_rng(0)
    perm = rng.permutation(g.num_nodes)  # new position of each node
    labels = np.empty_like(g.node_labels)
    labels[perm] = g.node_labels
    eorder = rng.permutation(g.num_edges)
    edges = perm[g.edge_index][:, eorder]
    a = tree_ids(g.node_labels, g.edge_index, g.edge_labels, 3)
    b = tree_ids(labels, edges, g.edge_labels[eorder], 3)
    for la, lb in zip(a.levels, b.levels):
        assert np.array_equal(lb[perm], la)


# ---------------------------------------------------------------- mining


def test_frequent_itemsets_match_all_subsets_brute_force():
    rng = np.random.default_rng(1)
    for trial in range(6):
        baskets = [set(rng.choice(9, size=rng.integers(0, 7), replace=False).tolist()) for _ in range(25)]
        arrays = [np.array(sorted(b), np.int64) for b in baskets]
        for t in (1, 3, 6, 12):
            assert frequent_itemsets(arrays, t) == brute_all_subsets(baskets, t)
            capped = frequent_itemsets(arrays, t, max_size=2)
            assert capped == {s: v for s, v in brute_all_subsets(baskets, t).items() if len(s) <= 2}


def test_frequent_itemsets_limit_and_errors():
    arrays = [np.arange(6)] * 4
    assert len(frequent_itemsets(arrays, 2)) == 2**6 - 1
    assert len(frequent_itemsets(arrays, 2, limit=10)) == 10
    assert frequent_itemsets([], 1) == {}
    with pytest.raises(ValueError):
        frequent_itemsets(arrays, 0)


def test_auto_threshold_is_closest_to_target():
    rng = np.random.default_rng(2)
    baskets = [np.unique(rng.choice(8, size=4)) for _ in range(40)]
    counts = {t: len(frequent_itemsets(baskets, t)) for t in range(1, 41)}
    for target in (1, 3, 10, 30, 100, 400):
        t = auto_threshold(baskets, target)
        nonempty = [c for c in counts.values() if c > 0]  # a class should not vanish
        assert abs(counts[t] - target) == min(abs(c - target) for c in nonempty)
    exclude = set(frequent_itemsets(baskets, 12))
    rest = {t: sum(s not in exclude for s in frequent_itemsets(baskets, t)) for t in range(1, 41)}
    for target in (2, 5, 20):
        t = auto_threshold(baskets, target, exclude=exclude)
        assert abs(rest[t] - target) == min(abs(c - target) for c in rest.values() if c > 0)


def test_transactions_sets_per_graph():
    ids = np.array([3, 1, 3, 2, 2, 0])
    out = transactions(ids, np.array([0, 3, 3, 6]), keep=np.array([1, 1, 1, 1, 0, 1], bool))
    assert [o.tolist() for o in out] == [[1, 3], [], [0, 2]]


# ---------------------------------------------------------------- end to end


def reference_mirage(g: GraphSet, hops: int, thresholds: list[int]) -> dict[tuple[int, frozenset], int]:
    """(class, set of tree strings) -> support, with sets frequent in both classes dropped."""
    strings = ref_strings(g, hops)
    deg = np.bincount(g.edge_index[1], minlength=g.num_nodes)
    baskets = [
        {strings[v] for v in range(a, b) if deg[v] > 0}
        for a, b in zip(g.node_offsets[:-1].tolist(), g.node_offsets[1:].tolist())
    ]
    mined = []
    for k, t in enumerate(thresholds):
        mined.append(brute_supports([b for b, y in zip(baskets, g.graph_labels) if y == k], t))
    shared = set(mined[0]) & set(mined[1])
    return {(k, frozenset(s)): v for k, m in enumerate(mined) for s, v in m.items() if s not in shared}


def fast_as_strings(g: GraphSet, out, hops: int) -> dict[tuple[int, frozenset], int]:
    ids = tree_ids(g.node_labels, g.edge_index, g.edge_labels, hops).ids
    name = dict(zip(ids.tolist(), ref_strings(g, hops)))
    return {
        (int(y), frozenset(name[i] for i in s)): int(f)
        for y, s, f in zip(out.graphs.graph_labels, out.itemsets, out.frequency)
    }


def assert_materialised_trees(g: GraphSet, out, hops: int) -> None:
    """Each condensed graph's roots unroll to exactly the trees of its itemset, in order."""
    c = out.graphs
    strings = ref_strings(c, hops)
    name = dict(zip(tree_ids(g.node_labels, g.edge_index, g.edge_labels, hops).ids.tolist(), ref_strings(g, hops)))
    assert [strings[r] for r in np.flatnonzero(out.roots)] == [name[i] for s in out.itemsets for i in s]
    for k in range(c.num_graphs):
        a, b = c.node_offsets[k], c.node_offsets[k + 1]
        roots = [strings[v] for v in range(a, b) if out.roots[v]]
        assert len(roots) == len(out.itemsets[k])
        edges = c.edge_index[:, c.edge_offsets[k] : c.edge_offsets[k + 1]]
        assert ((edges >= a) & (edges < b)).all()
        assert len(set(roots)) == len(roots)
    # leaves are exactly the nodes at depth hops: every non-root has one outgoing edge
    out_deg = np.bincount(c.edge_index[0], minlength=c.num_nodes)
    assert (out_deg[~out.roots] == 1).all() and (out_deg[out.roots] == 0).all()


def test_mirage_matches_reference_on_toy_graphs():
    g = make_graphs(TOY)
    for hops in (1, 2):
        for thresholds in ([1, 1], [2, 1], [3, 2]):
            out = mirage(g, hops=hops, thresholds=thresholds)
            assert fast_as_strings(g, out, hops) == reference_mirage(g, hops, thresholds)
            assert_materialised_trees(g, out, hops)


def test_mirage_argument_errors():
    g = make_graphs(TOY)
    with pytest.raises(ValueError):
        mirage(g, hops=2)
    with pytest.raises(ValueError):
        mirage(g, hops=2, thresholds=2, target_graphs=3)
    with pytest.raises(Exception, match="thresholds"):
        mirage(g, hops=2, thresholds=[1, 2, 3])


def test_mirage_target_mode_on_toy_graphs():
    g = make_graphs(TOY)
    out = mirage(g, hops=1, target_graphs=4, drop_shared=False)
    assert len(out.thresholds) == 2 and len(out.itemsets) >= 1
    assert out.frequency.min() >= min(out.thresholds)


@pytest.fixture(scope="module")
def mutag():
    from kdflow.data.tu import read_tu

    path = shared_data() / "tu" / "MUTAG"
    if not path.exists():
        pytest.skip(f"TU MUTAG not found under {path}")
    return read_tu(path)


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_tree_ids_match_strings_on_mutag(mutag, hops):
    ids = tree_ids(mutag.node_labels, mutag.edge_index, mutag.edge_labels, hops)
    assert_bijection(ids.ids, ref_strings(mutag, hops))


def test_mirage_matches_reference_on_mutag(mutag):
    hops, thresholds = 2, [10, 20]
    out = mirage(mutag, hops=hops, thresholds=thresholds)
    ref = reference_mirage(mutag, hops, thresholds)
    assert len(ref) > 100
    assert fast_as_strings(mutag, out, hops) == ref
    assert_materialised_trees(mutag, out, hops)
    assert out.graphs.num_graphs == len(ref)
    assert (out.graphs.graph_labels == 0).sum() == sum(k == 0 for k, _ in ref)


def test_auto_thresholds_on_mutag_keep_both_classes(mutag):
    out = mirage(mutag, hops=2, target_graphs=4)
    counts = np.bincount(out.graphs.graph_labels, minlength=2)
    assert (counts > 0).all()  # independent per-class thresholds would leave MUTAG empty here
    again = mirage(mutag, hops=2, thresholds=out.thresholds)
    assert again.itemsets == out.itemsets and np.array_equal(again.frequency, out.frequency)
    assert (out.frequency >= np.array(out.thresholds)[out.graphs.graph_labels]).all()


def test_mirage_edge_cases():
    g = make_graphs(TOY)
    empty = mirage(g.subset(np.array([], np.int64)), hops=2, thresholds=1)
    assert empty.graphs.num_graphs == 0 and empty.itemsets == []
    flat = mirage(g, hops=0, thresholds=[1, 1], drop_shared=False)  # single-node trees
    assert flat.graphs.num_edges == 0 and flat.roots.all()
    sizes = mirage(g, hops=1, thresholds=[1, 1], max_size=1)
    assert {len(s) for s in sizes.itemsets} == {1}


# ---------------------------------------------------------------- the registered condenser on Datasets


def as_dataset(g: GraphSet):
    """A GraphSet as a pipeline graph Dataset: one-hot node and edge labels as features."""
    import torch

    from kdflow.data.dataset import Dataset
    from kdflow.data.graph_features import GraphFeatures

    x = np.eye(g.num_node_labels, dtype=np.float32)[g.node_labels]
    ea = np.eye(g.num_edge_labels, dtype=np.float32)[g.edge_labels]
    feats = GraphFeatures.from_graphs(x, g.edge_index, g.node_offsets, g.edge_offsets, ea)
    return Dataset(features=feats, labels=torch.as_tensor(g.graph_labels), sample_ids=[f"g{i}" for i in range(g.num_graphs)],
                   splits=["train"] * g.num_graphs, num_classes=g.num_classes, modality="graph",
                   meta={"node_label_columns": [0, g.num_node_labels]})


@pytest.mark.parametrize("frequency", ["weight", "uniform"])
def test_condenser_returns_mirage_graphs_as_a_dataset(tmp_path, frequency):
    from kdflow.condense import condense
    from kdflow.data.dataset import load_dataset, save_dataset

    g = make_graphs(TOY)
    ref = mirage(g, hops=2, thresholds=[2, 2])
    small = condense("mirage", as_dataset(g), hops=2, thresholds=[2, 2], frequency=frequency, seed=0, teacher=None)
    out = small.features
    assert small.modality == "graph" and len(small) == ref.graphs.num_graphs > 0
    assert out.x.argmax(1).numpy().tolist() == ref.graphs.node_labels.tolist()
    assert out.edge_attr.argmax(1).numpy().tolist() == ref.graphs.edge_labels.tolist()
    assert np.array_equal(out.edge_index.numpy(), ref.graphs.edge_index)
    assert np.array_equal(out.root_mask.numpy(), ref.roots)
    assert small.extras["support"].tolist() == ref.frequency.tolist()
    assert small.labels.tolist() == ref.graphs.graph_labels.tolist()
    if frequency == "weight":
        w = small.extras["weight"]
        assert abs(float(w.mean()) - 1) < 1e-6
        np.testing.assert_allclose(w.numpy() * ref.frequency.mean(), ref.frequency, rtol=1e-6)
    else:
        assert "weight" not in small.extras
    assert small.meta["mirage"]["thresholds"] == [2, 2]
    save_dataset(small, tmp_path)
    assert torch_equal(load_dataset(tmp_path).features.root_mask, out.root_mask)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_condenser_errors():
    import torch

    from kdflow.condense import condense
    from kdflow.data.dataset import Dataset
    from kdflow.errors import DataError

    tab = Dataset(features=torch.zeros(4, 3), labels=torch.tensor([0, 1, 0, 1]), sample_ids=list("abcd"),
                  splits=["train"] * 4, num_classes=2, modality="tabular")
    with pytest.raises(DataError, match="graph dataset"):
        condense("mirage", tab, thresholds=1, seed=0, teacher=None)
    with pytest.raises(DataError, match="no frequent tree set"):
        condense("mirage", as_dataset(make_graphs(TOY)), thresholds=[100, 100], seed=0, teacher=None)


def test_condenser_on_tu_source_agrees_with_the_reader(mutag):
    """MUTAG through torch_geometric (one-hot features, reordered edges) gives Mirage the same sets."""
    import torch

    from kdflow.condense import condense
    from kdflow.data.dataset import Dataset
    from kdflow.data.tu import load_tu

    gf, labels, meta = load_tu(shared_data() / "tu", "MUTAG")
    ds = Dataset(features=gf, labels=torch.as_tensor(labels), sample_ids=[f"m{i}" for i in range(len(labels))],
                 splits=["train"] * len(labels), num_classes=2, modality="graph", meta=meta)
    small = condense("mirage", ds, hops=2, thresholds=[10, 20], seed=0, teacher=None)
    ref = mirage(mutag, hops=2, thresholds=[10, 20])
    assert len(small) == ref.graphs.num_graphs > 100
    assert sorted(small.extras["support"].tolist()) == sorted(ref.frequency.tolist())
    assert sorted(small.features.num_nodes.tolist()) == sorted(np.diff(ref.graphs.node_offsets).tolist())
