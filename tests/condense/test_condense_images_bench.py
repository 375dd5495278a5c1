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
                   ("rded", "soft"), ("nrr_dd", "soft"), ("nrr_dd", "dbr"), ("full", "hard"), ("full", "soft")}
    for r in res["rows"]:
        assert len(r["accuracies"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracies"])
        assert r["image_bytes"] == r["n"] * 64 * 4  # float32 8x8 digits
    rnd = next(r for r in res["rows"] if r["method"] == "random" and r["labels"] == "soft")
    assert rnd["n"] == 10
    for r in res["rows"]:  # dbr rows are compared with random *soft* labels, the rest with their own mode
        if r["method"] != "random" and r["vs_random"] is not None:
            labels = "soft" if r["labels"] == "dbr" else r["labels"]
            ref = next(x for x in res["rows"] if x["method"] == "random" and x["labels"] == labels)
            assert r["vs_random"] == pytest.approx(r["accuracy_mean"] / ref["accuracy_mean"])
    dbr = next(r for r in res["rows"] if r["labels"] == "dbr")
    assert dbr["label_bytes"] == 10 * (8 + 8 + 4 + 4 + 4)  # partner, y_aug (int64), lambda, d_org, d_aug
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
    args = bench.parse_args(["--protocol", "standard"])
    assert args.datasets == ["fashion"] and args.steps is None and args.seeds == 3
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
