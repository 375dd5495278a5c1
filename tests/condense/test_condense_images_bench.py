"""Smoke test of benchmarks/condense_images.py --quick (real condensation and training, tiny budgets)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_condense_images_benchmark_quick_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/condense_images.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (res,) = data["results"]
    got = {(r["method"], r["labels"]) for r in res["rows"]}
    assert got == {("random", "hard"), ("random", "soft"), ("herding", "soft"), ("k_center", "soft"),
                   ("rded", "soft"), ("nrr_dd", "soft"), ("nrr_dd", "dbr_beta0"), ("nrr_dd", "dbr_beta1"),
                   ("full", "hard"), ("full", "soft")}
    assert data["meta"]["protocol"] == "standard"  # the default
    for r in res["rows"]:
        assert len(r["accuracies"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracies"])
        assert r["image_bytes"] == r["n"] * 64 * 4  # float32 8x8 digits
    rnd = next(r for r in res["rows"] if r["method"] == "random" and r["labels"] == "soft")
    assert rnd["n"] == 10
    for r in res["rows"]:  # dbr rows are compared with random *soft* labels, the rest with their own mode
        if r["method"] != "random" and r["vs_random"] is not None:
            labels = "soft" if r["labels"].startswith("dbr") else r["labels"]
            ref = next(x for x in res["rows"] if x["method"] == "random" and x["labels"] == labels)
            assert r["vs_random"] == pytest.approx(r["accuracy_mean"] / ref["accuracy_mean"])
    for dbr in (r for r in res["rows"] if r["labels"].startswith("dbr")):  # 2 fp16 distances per view, 8 epochs
        assert (dbr["label_bytes"], dbr["label_bytes_all_views"]) == (10 * 2 * 2, 10 * 2 * 2 * 8)
    assert "vs random" in proc.stdout


def bench_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("condense_images_bench", REPO / "benchmarks/condense_images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_standard_budget_is_300_epochs_with_the_published_steps() -> None:
    bench = bench_module()
    for ipc, steps in ((1, 300), (10, 600), (50, 1500)):
        n = 10 * ipc
        batch, epochs = bench.standard_budget(n, ipc, None)
        assert epochs == 300 and epochs * -(-n // batch) == steps  # ceil(n / batch) steps per epoch
    assert bench.standard_budget(10, 1, 30) == (10, 30)  # --steps overrides the budget
    args = bench.parse_args([])  # the default protocol
    assert args.protocol == "standard" and args.datasets == ["fashion"] and args.steps is None and args.seeds == 3
    assert args.dbr_betas == [0.0, 1.0]
    legacy = bench.parse_args(["--protocol", "legacy"])
    assert legacy.datasets == ["digits", "mnist"] and legacy.steps == 200
    with pytest.raises(SystemExit):
        bench.parse_args(["--protocol", "standard", "--ipc", "5"])  # no published budget for IPC 5


@pytest.mark.slow
def test_condense_images_benchmark_standard_protocol_reports_best_of_last_20pct(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/condense_images.py"), "--quick", "--protocol",
                           "standard", "--methods", "random", "rded", "--seeds", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["student"]["arch"] == "convnet3"
    rows = data["results"][0]["rows"]
    assert {(r["method"], r["labels"]) for r in rows} == {("random", "hard"), ("random", "soft"), ("rded", "soft")}
    for r in rows:  # the last epoch is among the evaluated ones, so best >= last
        assert r["best_last20_mean"] >= r["accuracy_mean"] - 1e-9


def test_dc_protocol_defaults_and_refusals() -> None:
    bench = bench_module()
    args = bench.parse_args(["--protocol", "dc"])
    assert args.datasets == ["fashion"] and args.methods == ["random", "herding", "k_center", "full"]
    assert args.full_epochs >= 1 and args.seeds == 3 and args.feature_net == "convnet3"
    assert bench.parse_args(["--protocol", "dc", "--feature-net", "teacher"]).feature_net == "teacher"
    with pytest.raises(SystemExit):
        bench.parse_args(["--protocol", "dc", "--methods", "rded"])  # not a DC-paper baseline
    with pytest.raises(SystemExit):
        bench.parse_args(["--protocol", "dc", "--full-epochs", "0"])


def test_dc_train_fits_a_tiny_set_and_is_seeded() -> None:
    """The DC paper's evaluation loop (SGD, lr 0.01 -> 0.001 at half) learns 20 separable images to
    100% training accuracy, and the same seed gives the same weights."""
    import torch

    from kdflow.models import create_model

    bench = bench_module()
    torch.manual_seed(0)
    y = torch.arange(2).repeat(10)
    x = torch.randn(20, 1, 8, 8) * 0.1
    x[y == 0, :, :, :4] += 3.0  # class 0 bright on the left, class 1 on the right (instance norm
    x[y == 1, :, :, 4:] += 3.0  # removes each image's mean, so the classes differ in layout)
    nets = []
    for _ in range(2):
        torch.manual_seed(1)
        net = create_model("convnet3", (1, 8, 8), 2, width=8)
        nets.append(bench.dc_train(net, x, y, 60, seed=3))
    with torch.no_grad():
        assert (nets[0](x).argmax(1) == y).all()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_dc_protocol_runs_every_baseline_on_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_dc end to end on sklearn digits with 2 training epochs: one hard-label row per baseline,
    herding and k-center pick the same images at IPC 1 (both start nearest the class mean)."""
    bench = bench_module()
    monkeypatch.setattr(bench, "DC_EPOCHS", 2)
    out = tmp_path / "dc.json"
    assert bench.main(["--protocol", "dc", "--datasets", "digits", "--ipc", "1", "--seeds", "1",
                       "--feature-net", "teacher", "--teacher-epochs", "1", "--out", str(out)]) == 0
    (res,) = json.loads(out.read_text())["results"]
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"random", "herding", "k_center"}  # no whole-set row with the teacher's features
    assert all(r["labels"] == "hard" and r["n"] == 10 and r["epochs"] == 2 for r in rows.values())
    assert rows["herding"]["accuracies"] == rows["k_center"]["accuracies"]


def _tiny_images(n_per_class: int = 6, classes: int = 3) -> "Dataset":
    import torch

    from kdflow.data.dataset import Dataset
    gen = torch.Generator().manual_seed(0)
    n = n_per_class * classes
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = torch.randn(n, 1, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1).float()
    return Dataset(features=feats, labels=labels, sample_ids=[f"s{i}" for i in range(n)], splits=["train"] * n,
                   num_classes=classes, modality="image")


def test_dc_feature_net_is_cached_by_its_settings_and_picks_match_the_library(tmp_path: Path) -> None:
    import torch
    from rich.console import Console

    from kdflow.condense.coreset import herding_order, k_center_order, select_in_feature_space
    from kdflow.train.loop import extract_features
    bench = bench_module()
    train, console = _tiny_images(), Console(quiet=True)
    args = bench.parse_args(["--protocol", "dc", "--full-epochs", "1", "--feature-cache", str(tmp_path)])
    net, seconds, side_path = bench.dc_feature_net("tiny", train, args, console)
    (saved,) = tmp_path.glob("*.pt")
    assert saved.name.startswith("dc-convnet3-tiny-n18-e1-s0-") and side_path == saved.with_suffix(".json")
    again, seconds_again, _ = bench.dc_feature_net("tiny", train, args, console)  # loaded, not retrained
    assert seconds_again == seconds
    for key, value in net.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    args2 = bench.parse_args(["--protocol", "dc", "--full-epochs", "2", "--feature-cache", str(tmp_path)])
    bench.dc_feature_net("tiny", train, args2, console)  # other epochs: another entry
    assert len(list(tmp_path.glob("*.pt"))) == 2
    changed = bench.dc_cache_key("tiny", bench.dataclasses.replace(train, features=train.features + 1e-3), 1, 0)
    assert changed != bench.dc_cache_key("tiny", train, 1, 0)  # other images: another key

    feats = extract_features(net, train.features)
    side = bench.DCSideCache(side_path)
    for method, order in (("herding", herding_order), ("k_center", k_center_order)):
        rows = bench.dc_picks(method, 2, train, lambda: feats, side)
        expect = select_in_feature_space(order, train, feats, 2)
        assert train.select(rows).sample_ids == expect.sample_ids and len(rows) == 6

    def no_features() -> torch.Tensor:
        raise AssertionError("picks known: features must not be extracted")
    reread = bench.DCSideCache(side_path)  # a later run reads the picks from the side file
    assert bench.dc_picks("herding", 2, train, no_features, reread) == side.picks["herding-2"]


def test_teacher_cache_reuses_the_trained_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--teacher-cache: the first run trains and saves the teacher, a later one loads the same weights
    without training."""
    import torch

    bench = bench_module()
    torch.set_num_threads(1)
    args = bench.parse_args(["--protocol", "legacy", "--datasets", "digits", "--teacher-epochs", "1",
                             "--teacher-cache", str(tmp_path)])
    train, _ = bench.load("digits", args)
    first, seconds = bench.cached_teacher(train, args)
    assert len(list(tmp_path.glob("teacher-digits-legacy-e1-s0.pt"))) == 1

    def no_training(*_a, **_k):
        raise AssertionError("the cached teacher was trained again")

    monkeypatch.setattr(bench, "train_teacher", no_training)
    again, seconds_again = bench.cached_teacher(train, args)
    assert seconds_again == seconds
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_dbr_label_bytes_count_every_stored_view() -> None:
    """dbr: 2 fp16 distances per stored view and image; soft: 10 fp16 logits per image and epoch."""
    import torch

    from kdflow.data.dataset import Dataset

    bench = bench_module()
    n, views = 10, 7
    ds = Dataset(torch.zeros(n, 1, 4, 4), torch.arange(n), [str(i) for i in range(n)], ["train"] * n, 10, "image",
                 extras={"dbr_d_org": torch.zeros(n, views, dtype=torch.float16),
                         "dbr_d_aug": torch.zeros(n, views, dtype=torch.float16)},
                 meta={"dbr_views": views})
    assert bench.label_bytes(ds, "dbr_beta1", views) == (n * 4, n * 4 * views)
    assert bench.label_bytes(ds, "soft", 300) == (n * 20, n * 20 * 300)
    assert bench.label_bytes(ds, "hard", 300) == (n * 8, n * 8)
    assert bench.dbr_beta("dbr_beta0") == 0.0 and bench.dbr_beta("dbr_beta0.5") == 0.5


def test_keep_freed_memory_reuses_big_blocks_instead_of_faulting_them_in_again() -> None:
    # in a child process: mallopt is process-wide. A freed 100 MB block (ConvNet-3's activation size) is
    # unmapped by default and every page faults in again on the next allocation; kept, it is reused.
    code = f"""
import importlib.util, resource, torch
spec = importlib.util.spec_from_file_location("b", {str(REPO / "benchmarks/condense_images.py")!r})
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
def faults():
    x = torch.ones(25_000_000); del x                        # 100 MB, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(25_000_000); total = float(y.sum()); del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, total
plain, total = faults()
assert b.keep_freed_memory()
faults()                                                     # the first kept block is faulted in once
kept, total2 = faults()
print(plain, kept, total == total2)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, kept, same = proc.stdout.split()
    assert int(plain) > 20_000 and int(kept) < 1_000 and same == "True"  # 100 MB = 24,414 pages of 4 KiB
