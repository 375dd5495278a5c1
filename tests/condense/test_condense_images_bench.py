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
