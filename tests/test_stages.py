"""Each stage through the stage contract (``execute_stage``), on digits with tiny budgets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch

from conftest import tiny_params
from kdflow.errors import ArtifactError
from kdflow.models import create_model
from kdflow.models.io import save_model
from schemas.manifest import Manifest
from schemas.params import parse_params
from tasks.common import STAGE_ORDER, execute_stage


def run_until(root: Path, raw: dict, until: str) -> dict[str, Manifest]:
    pp = parse_params(raw)
    out = {}
    for stage in STAGE_ORDER[: STAGE_ORDER.index(until) + 1]:
        out[stage], _ = execute_stage(stage, pp, root)
    return out


def test_teacher_loaded_from_a_local_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("mlp", (1, 8, 8), 10, hidden=[16])
    (tmp_path / "ckpt").mkdir()
    save_model(model, tmp_path / "ckpt")
    raw = tiny_params()
    raw["teachers"] = [{"name": "pre", "checkpoint": "ckpt"}]
    m = run_until(tmp_path, raw, "teachers")["teachers"]
    assert m.info["candidates"]["pre"]["origin"] == "checkpoint"
    assert m.info["candidates"]["pre"]["params"] == sum(p.numel() for p in model.parameters())
    assert (tmp_path / "artifacts/tiny/teachers/pre/model.safetensors").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    raw = tiny_params()
    raw["teachers"] = [{"name": "pre", "checkpoint": "nowhere"}]
    with pytest.raises(Exception, match="checkpoint: folder not found"):
        run_until(tmp_path, raw, "teachers")
    assert not (tmp_path / "artifacts/tiny/teachers").exists()


def test_probe_selection_ranks_every_candidate(tmp_path: Path) -> None:
    raw = tiny_params(select={"strategy": "probe", "probe": {"epochs": 2, "subset": 0.3}})
    m = run_until(tmp_path, raw, "select")["select"]
    ranking = pl.read_parquet(tmp_path / "artifacts/tiny/select/ranking.parquet")
    assert sorted(ranking["teacher"].to_list()) == ["conv", "mlp"]
    assert ranking["rank"].to_list() == [1, 2]
    assert ranking["score"].to_list() == sorted(ranking["score"].to_list(), reverse=True)
    chosen = json.loads((tmp_path / "artifacts/tiny/select/chosen.json").read_text())
    assert chosen["teachers"] == [ranking["teacher"][0]] == m.info["teachers"]


def test_select_fingerprint_reads_the_student_only_when_probing(tmp_path: Path) -> None:
    from tasks.common import fingerprint

    ups = {"prepare": "p", "teachers": "t"}
    a, b = parse_params(tiny_params()), parse_params(tiny_params(student={"arch": "mlp"}))
    assert fingerprint("select", a, ups) == fingerprint("select", b, ups)
    pa = parse_params(tiny_params(select={"strategy": "probe"}))
    pb = parse_params(tiny_params(select={"strategy": "probe"}, student={"arch": "mlp"}))
    assert fingerprint("select", pa, ups) != fingerprint("select", pb, ups)


def test_herding_condense_then_topk_cache_then_topk_kd_student(tmp_path: Path) -> None:
    raw = tiny_params(
        condense={"method": "herding", "ipc": 20},
        logits={"format": "topk", "k": 3, "temperature": 2.0, "shard_rows": 64},
        student={"loss": {"name": "topk_kd", "temperature": 2.0, "alpha": 0.5}},
    )
    ms = run_until(tmp_path, raw, "student")
    assert ms["condense"].metrics["n_condensed"] == 200
    cache = ms["logits"].info["teachers"][0]["cache"]
    assert cache["format"] == "topk" and cache["index_dtype"].endswith("uint8") and len(cache["shards"]) == 4
    assert ms["logits"].metrics["top1_agreement"] == 1.0
    assert ms["logits"].metrics["bytes_per_sample"] < 10 * 4
    assert ms["student"].metrics["epochs_run"] == 3


def test_a_stage_without_its_upstream_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="run `kdflow stage prepare`"):
        execute_stage("teachers", parse_params(tiny_params()), tmp_path)


def test_an_altered_cache_shard_is_caught_before_training_and_rebuilt_alone(tmp_path: Path) -> None:
    raw = tiny_params(logits={"shard_rows": 400})
    ms = run_until(tmp_path, raw, "logits")
    files = {f.path: f.sha256 for f in ms["logits"].files}
    shard = tmp_path / "artifacts/tiny/logits/shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="shard-00001.safetensors was altered"):
        execute_stage("student", parse_params(raw), tmp_path)
    # the stage reruns and recomputes that shard alone, byte-identical
    m, _ = execute_stage("logits", parse_params(raw), tmp_path)
    assert m.info["teachers"][0]["shards_computed"] == ["shard-00001.safetensors"]
    assert {f.path: f.sha256 for f in m.files} == files
    execute_stage("student", parse_params(raw), tmp_path)


def test_a_killed_logits_stage_resumes_from_its_written_shards(tmp_path: Path, monkeypatch) -> None:
    import kdflow.train.loop as loop  # cache rows: the track runs the teacher (loop.predict, imported when called)

    raw = tiny_params(logits={"format": "topk_q8", "k": 4, "shard_rows": 300, "batch_size": 100},
                      student={"loss": {"name": "topk_kd"}})
    run_until(tmp_path, raw, "condense")
    real, calls = loop.predict, []

    def dies_in_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "predict", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        execute_stage("logits", parse_params(raw), tmp_path)
    assert not (tmp_path / "artifacts/tiny/logits").exists()  # no half-written output
    monkeypatch.setattr(loop, "predict", real)
    m, _ = execute_stage("logits", parse_params(raw), tmp_path)
    shards = [s["file"] for s in m.info["teachers"][0]["cache"]["shards"]]
    assert len(shards) > 2 and m.info["teachers"][0]["shards_computed"] == shards[1:]
    assert m.metrics["top1_agreement"] > 0.9 and m.metrics["compression_vs_fp32"] > 1
    resumed = {f.path: f.sha256 for f in m.files}
    m2, _ = execute_stage("logits", parse_params(raw), tmp_path, force=True)
    assert m2.info["teachers"][0]["shards_computed"] == []  # the work folder still holds the verified cache
    shutil.rmtree(tmp_path / "artifacts/tiny/.work/logits")
    fresh, _ = execute_stage("logits", parse_params(raw), tmp_path, force=True)
    assert fresh.info["teachers"][0]["shards_computed"] == shards
    assert {f.path: f.sha256 for f in fresh.files} == resumed  # byte-identical to a clean run


def test_a_failure_after_training_keeps_the_student_checkpoint(tmp_path: Path) -> None:
    raw = tiny_params()
    out = run_until(tmp_path, raw, "logits")
    pp = parse_params(raw)

    class DyingTracker:  # a tracking store that fails while the student's output is committed
        def start_stage(self, *args: object) -> str:
            return "run"

        def finish_stage(self, *args: object) -> None:
            raise RuntimeError("tracking server went away")

        def fail_stage(self, *args: object) -> None:
            pass

    with pytest.raises(RuntimeError, match="went away"):
        execute_stage("student", pp, tmp_path, tracker=DyingTracker())
    work = tmp_path / "artifacts/tiny/.work/student"
    assert (work / "checkpoint.pt").is_file() and not (tmp_path / "artifacts/tiny/student").exists()
    resumed, _ = execute_stage("student", pp, tmp_path, resume=True)
    assert resumed.info["resumed_from"] == raw["student"]["train"]["epochs"]  # nothing was trained twice
    assert not work.exists()  # committed: now the checkpoint goes
    assert out["logits"].fingerprint == resumed.upstream["logits"]
