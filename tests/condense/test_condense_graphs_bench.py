"""benchmarks/condense_graphs.py --protocol mirage: argument handling, the paper's top-half figure, a tiny MUTAG run."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[2]


def bench_module():
    spec = importlib.util.spec_from_file_location("condense_graphs_bench", REPO / "benchmarks/condense_graphs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_protocol_defaults_and_bad_arguments() -> None:
    mod = bench_module()
    assert mod.parse_args([]).seeds == 3 and mod.parse_args([]).protocol == "default"
    args = mod.parse_args(["--protocol", "mirage"])
    assert args.seeds == 5 and args.epochs_scale == 1.0
    assert set(mod.DATASETS) <= set(mod.MIRAGE_PROTOCOL)
    for bad in (["--protocol", "paper"], ["--protocol", "mirage", "--epochs-scale", "0"], ["--seeds", "0"]):
        with pytest.raises(SystemExit) as err:
            mod.parse_args(bad)
        assert err.value.code == 2


def test_top_half_is_the_better_half_by_validation() -> None:
    mod = bench_module()
    runs = [{"val_roc_auc": v, "roc_auc": t} for v, t in [(0.9, 0.1), (0.5, 0.2), (0.7, 0.3), (0.6, 0.4), (0.8, 0.5)]]
    got = mod._top_half(runs)  # 5 runs -> the 2 best by validation: 0.9 (test 0.1) and 0.8 (test 0.5)
    assert got["n"] == 2 and got["mean"] == pytest.approx(0.3) and got["std"] == pytest.approx(math.sqrt(0.08))
    assert mod._top_half(runs[:1])["mean"] == pytest.approx(0.1)


@pytest.mark.slow
def test_mirage_protocol_tiny_budget_on_mutag(tmp_path: Path) -> None:
    root = shared_data() / "tu"
    if not (root / "MUTAG").exists():
        pytest.skip(f"TU MUTAG not found under {root}")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks/condense_graphs.py"), "--protocol", "mirage", "--root", str(root),
           "--datasets", "MUTAG", "--models", "gcn", "--seeds", "2", "--epochs-scale", "0.03", "--no-kd",
           "--repeats", "1", "--no-reference", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["gnn"]
    assert row["protocol"]["epochs"] == 100 and row["protocol"]["layers"] == 2  # DD configuration for MUTAG
    res = row["models"]["gcn"]
    assert set(res) == {"full", "mirage_weight", "mirage_uniform", "random_same_bytes"}
    for r in res.values():
        assert len(r["runs"]) == 2 and r["top_half_roc_auc"]["n"] == 1
        for run in r["runs"]:
            assert run["epochs"] == 3 and 1 <= run["best_epoch"] <= 3  # ceil(100 * 0.03), 1-based epochs
            assert 0.0 <= run["roc_auc"] <= 1.0 and 0.0 <= run["val_roc_auc"] <= 1.0
        best = max(r["runs"], key=lambda x: x["val_roc_auc"])
        assert r["top_half_roc_auc"]["mean"] == pytest.approx(best["roc_auc"])
        assert r["roc_auc"]["mean"] == pytest.approx(sum(x["roc_auc"] for x in r["runs"]) / 2)
    assert row["sizes"]["random_same_bytes"]["bytes"] <= row["sizes"]["mirage"]["bytes"]
    assert "official Mirage budget" in proc.stdout
