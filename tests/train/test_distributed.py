"""Data-parallel training: the batch-share rule, DDP against one process, torchrun end to end."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import REPO, free_port, stop_process_group, tiny_params, write_params
from kdflow.train import fit
from kdflow.train.distributed import MIN_SHARE, LaunchError, shard

CPU = torch.device("cpu")
WORLD = 2


def _loopback_env() -> dict[str, str]:
    """Keep gloo on the loopback interface (Linux: ``lo``)."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return {"GLOO_SOCKET_IFNAME": "lo"} if "lo" in names else {}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shares_cover_the_batch_once(world_size: int) -> None:
    for n in range(1, 23):
        idx = torch.arange(100, 100 + n)
        shares = [shard(idx, r, world_size) for r in range(world_size)]
        counted = [s for s, k in shares if k > 0]
        assert torch.equal(torch.cat(counted), idx)  # contiguous, in rank order, each sample once
        assert sum(k for _, k in shares) == n
        sizes = [k for _, k in shares if k > 0]
        assert max(sizes) - min(sizes) <= 1
        assert n < MIN_SHARE or min(sizes) >= MIN_SHARE
        for part, k in shares:
            assert k in (0, len(part)) and len(part) > 0  # every rank runs something
    assert shard(torch.arange(7), 0, 1)[1] == 7


def _data(n: int = 30) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (n,), generator=g)
    return {"x": torch.randn(n, 4, generator=g) + y[:, None].float(), "y": y}


def _ce(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loss = F.cross_entropy(logits, batch["y"])
    return {"loss": loss, "ce": loss}


def _fit(**kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = _data()
    # 30 samples in batches of 9: shares 5 + 4, and a last batch of 3 that rank 1 sits out
    args = {"epochs": 4, "lr": 0.05, "batch_size": 9, "seed": 1, "device": CPU, "val": (data["x"], data["y"]), **kw}
    return model, fit(model, data, _ce, **args)


class _Stop(Exception):
    pass


def _stop_at(epoch: int):
    def on_epoch(row: dict[str, float]) -> None:
        if row["epoch"] == epoch:
            raise _Stop

    return on_epoch


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, result = _fit()
        torch.save({"state": model.state_dict(), "history": result.history}, Path(out) / f"plain-{rank}.pt")
        model, result = _fit(checkpoint_dir=Path(out) / "ckpt", resume=True)
        torch.save({"state": model.state_dict(), "history": result.history, "resumed_from": result.resumed_from},
                   Path(out) / f"resumed-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> float:
    assert a.keys() == b.keys()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert gap <= atol, f"weights differ by {gap}"
    return gap


def test_ddp_matches_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref_model, ref = _fit()
    with pytest.raises(_Stop):  # a one-process run killed after epoch 2, resumed under DDP below
        _fit(checkpoint_dir=tmp_path / "ckpt", on_epoch=_stop_at(2))
    for key, value in _loopback_env().items():
        monkeypatch.setenv(key, value)
    torch.multiprocessing.spawn(_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    for kind in ("plain", "resumed"):
        runs = [torch.load(tmp_path / f"{kind}-{r}.pt", weights_only=True) for r in range(WORLD)]
        for other in runs[1:]:  # every rank holds the same weights and history
            assert all(torch.equal(other["state"][k], runs[0]["state"][k]) for k in runs[0]["state"])
            assert other["history"] == runs[0]["history"]
        _close(runs[0]["state"], ref_model.state_dict(), atol=1e-5)
        got, want = runs[0]["history"], ref.history
        assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
        assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in want], rel=1e-5)
        assert [r["val_accuracy"] for r in got] == [r["val_accuracy"] for r in want]
    assert runs[0]["resumed_from"] == 2
    ckpt = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 4  # rank 0 kept writing it after the resume
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_other_stages_refused_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from kdflow.cli import app
    from schemas.params import parse_params
    from tasks.common import execute_stage

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LaunchError, match="only 'student'") as err:
        execute_stage("teachers", parse_params(tiny_params()), tmp_path)
    assert err.value.exit_code == 2
    write_params(tmp_path, tiny_params())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["stage", "prepare"])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_torchrun_student_matches_one_process(tmp_path: Path) -> None:
    from schemas.params import parse_params
    from tasks.common import STAGE_ORDER, execute_stage

    raw = tiny_params(runtime={"threads": 1})
    pp = parse_params(raw)
    one, two = tmp_path / "one", tmp_path / "two"
    for stage in STAGE_ORDER[: STAGE_ORDER.index("student")]:
        execute_stage(stage, pp, one)
    shutil.copytree(one / "artifacts", two / "artifacts")
    write_params(two, raw)
    single, _ = execute_stage("student", pp, one)

    env = {**os.environ, **_loopback_env(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "kdflow.cli", "stage", "student", "-c", "params.yaml"]
    proc = subprocess.Popen(cmd, cwd=two, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0, output
    assert output.count("student: done") == WORLD, output

    base = two / "artifacts" / "tiny"
    stages = set(STAGE_ORDER[: STAGE_ORDER.index("student") + 1])
    assert {p.name for p in base.iterdir()} - {".work"} == stages  # one output, no temporary folders
    assert not (base / ".work" / "student").exists()  # the checkpoint served its purpose
    manifest = json.loads((base / "student" / "manifest.json").read_text())
    assert manifest["fingerprint"] == single.fingerprint
    assert sorted(f["path"] for f in manifest["files"]) == sorted(f.path for f in single.files)

    got = json.loads((base / "student" / "history.json").read_text())
    want = json.loads((one / "artifacts" / "tiny" / "student" / "history.json").read_text())
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in want], rel=1e-4)
    assert [r["val_accuracy"] for r in got] == pytest.approx([r["val_accuracy"] for r in want], abs=0.01)
    from safetensors.torch import load_file

    _close(load_file(base / "student" / "model.safetensors"),
           load_file(one / "artifacts" / "tiny" / "student" / "model.safetensors"), atol=1e-4)
