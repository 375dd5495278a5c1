"""student.seeds: several students, each resumable, aggregated by evaluate; Wilson intervals in
metrics.json, the summary table and the report; byte-identical rebuilds; runtime.deterministic."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from kdflow.data.dataset import load_dataset
from kdflow.metrics.intervals import wilson_interval
from kdflow.models.io import load_model
from kdflow.report import build_report, seed_rows, seed_title
from kdflow.train.loop import predict
from schemas.params import parse_params
from tasks.common import STAGE_ORDER, execute_stage, sha256_file

TRAIN = {"epochs": 3, "lr": 0.01, "batch_size": 128, "patience": None}


def raw_params(seeds: int = 3, **runtime) -> dict:
    return tiny_params(student={"seeds": seeds, "train": TRAIN}, runtime={"threads": 1, **runtime})


def run_all(root: Path, raw: dict, until: str = "evaluate", **kw) -> dict:
    pp = parse_params(raw)
    return {s: execute_stage(s, pp, root, **kw)[0] for s in STAGE_ORDER[: STAGE_ORDER.index(until) + 1]}


def upstream_of_student(project: Path, root: Path) -> None:
    """The project's stages before the student, copied (fingerprints do not depend on the folder)."""
    for stage in STAGE_ORDER[: STAGE_ORDER.index("student")]:
        shutil.copytree(project / "artifacts/tiny" / stage, root / "artifacts/tiny" / stage)


def weights(folder: Path) -> str:
    return sha256_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seeds")
    run_all(root, raw_params())
    return root


def test_each_seed_is_its_own_student_and_the_first_is_the_stage_model(project: Path, tmp_path: Path) -> None:
    out = project / "artifacts/tiny/student"
    info = json.loads((out / "manifest.json").read_text())["info"]
    assert [(r["seed"], r["dir"]) for r in info["seeds"]] == [(0, "."), (1, "seeds/seed-1"), (2, "seeds/seed-2")]
    digests = {weights(out / r["dir"]) for r in info["seeds"]}
    assert len(digests) == 3  # distinct students
    # the stage's model (the one registered in MLflow) is what seeds: 1 trains
    upstream_of_student(project, tmp_path)
    execute_stage("student", parse_params(raw_params(seeds=1)), tmp_path)
    single = tmp_path / "artifacts/tiny/student"
    assert weights(single) == weights(out) and not (single / "seeds").exists()


def test_evaluate_aggregates_what_the_saved_students_score(project: Path) -> None:
    art = project / "artifacts/tiny"
    m = json.loads((art / "evaluate/metrics.json").read_text())
    test = load_dataset(art / "prepare").split("test")
    teacher = predict(load_model(art / "teachers" / m["teacher"]["name"]), test.features)
    students = [predict(load_model(art / "student" / d), test.features) for d in (".", "seeds/seed-1", "seeds/seed-2")]
    acc = [float((s.argmax(1) == test.labels).float().mean()) for s in students]
    agree = [float((s.argmax(1) == teacher.argmax(1)).float().mean()) for s in students]
    seeds = m["student_seeds"]
    assert m["n_test"] == len(test.labels)
    assert seeds["seeds"] == [0, 1, 2]
    assert seeds["accuracy"]["values"] == pytest.approx(acc) and seeds["agreement"]["values"] == pytest.approx(agree)
    assert seeds["accuracy"]["mean"] == pytest.approx(statistics.fmean(acc))
    assert seeds["accuracy"]["std"] == pytest.approx(statistics.stdev(acc))
    assert (seeds["accuracy"]["min"], seeds["accuracy"]["max"]) == (pytest.approx(min(acc)), pytest.approx(max(acc)))
    assert m["student"]["accuracy"] == pytest.approx(acc[0]) and m["agreement"] == pytest.approx(agree[0])
    t_acc = float((teacher.argmax(1) == test.labels).float().mean())
    assert seeds["accuracy_gap"]["mean"] == pytest.approx(t_acc - statistics.fmean(acc))
    headline = json.loads((art / "evaluate/manifest.json").read_text())["metrics"]
    assert headline["student_accuracy_mean"] == pytest.approx(statistics.fmean(acc))


def test_wilson_intervals_in_metrics_table_and_report(project: Path) -> None:
    art = project / "artifacts/tiny"
    m = json.loads((art / "evaluate/metrics.json").read_text())
    n = m["n_test"]
    for who in ("teacher", "student"):
        acc = m[who]["accuracy"]
        assert (m[who]["accuracy_ci95"]["low"], m[who]["accuracy_ci95"]["high"]) == \
            pytest.approx(wilson_interval(round(acc * n), n))
    assert (m["agreement_ci95"]["low"], m["agreement_ci95"]["high"]) == \
        pytest.approx(wilson_interval(round(m["agreement"] * n), n))
    from kdflow.tracks import get_track

    rows = {r[0].strip(): r for r in get_track("classify").summary_rows(m)}
    ci = m["student"]["accuracy_ci95"]
    assert rows["95% CI (Wilson)"][2] == f"[{ci['low']:.4f}, {ci['high']:.4f}]"
    seeds = seed_rows(m)
    assert [r[0] for r in seeds] == ["accuracy", "agreement", "accuracy_gap"]
    mean, std = m["student_seeds"]["accuracy"]["mean"], m["student_seeds"]["accuracy"]["std"]
    assert seeds[0][2] == f"{mean:.4f} ± {std:.4f}" and "model: seed 0" in seed_title(m)
    html = build_report(art, project / "report.html").read_text()
    assert f"[{ci['low']:.4f}, {ci['high']:.4f}]" in html and f"{mean:.4f} ± {std:.4f}" in html


def test_a_killed_multi_seed_run_resumes_without_retraining_finished_seeds(project: Path, tmp_path: Path) -> None:
    class Killed(Exception):
        pass

    def kill(label: str, done: int, total: int | None, info: dict) -> None:
        if label == "student seed 1" and done >= 2:
            raise Killed

    upstream_of_student(project, tmp_path)
    pp = parse_params(raw_params())
    with pytest.raises(Killed):
        execute_stage("student", pp, tmp_path, progress=kill)
    labels = []
    manifest, _ = execute_stage("student", pp, tmp_path, resume=True,
                                progress=lambda label, done, total, info: labels.append(label))
    runs = {r["seed"]: r for r in manifest.info["seeds"]}
    assert runs[0]["resumed_from"] == 3 and runs[1]["resumed_from"] == 2 and runs[2]["resumed_from"] is None
    assert "student seed 0" not in labels  # the finished seed trained no epoch again
    ours, theirs = tmp_path / "artifacts/tiny/student", project / "artifacts/tiny/student"
    for d in (".", "seeds/seed-1", "seeds/seed-2"):
        assert weights(ours / d) == weights(theirs / d)  # bit-identical to the uninterrupted run
    assert not (tmp_path / "artifacts/tiny/.work/student").exists()  # checkpoints go after the commit


def test_a_rebuild_gives_byte_identical_students(project: Path) -> None:
    out = project / "artifacts/tiny/student"
    before = {d: weights(out / d) for d in (".", "seeds/seed-1", "seeds/seed-2")}
    _, executed = execute_stage("student", parse_params(raw_params()), project, force=True)
    assert executed and {d: weights(out / d) for d in before} == before


@pytest.mark.parametrize("flag", [True, False])
def test_runtime_deterministic_and_threads_reach_the_stage(flag: bool, tmp_path: Path, monkeypatch) -> None:
    import tasks.prepare

    seen = {}
    real = tasks.prepare.run

    def spy(params, ctx):
        seen.update(det=torch.are_deterministic_algorithms_enabled(), threads=torch.get_num_threads(),
                    ctx=ctx.deterministic)
        return real(params, ctx)

    monkeypatch.setattr(tasks.prepare, "run", spy)
    before = torch.are_deterministic_algorithms_enabled()
    raw = raw_params(deterministic=flag)
    raw["runtime"]["threads"] = 2 if torch.get_num_threads() == 1 else 1
    run_all(tmp_path, raw, until="prepare")
    assert seen == {"det": flag, "threads": raw["runtime"]["threads"], "ctx": flag}
    assert torch.are_deterministic_algorithms_enabled() == before  # restored after the stage


def test_seeds_below_one_or_on_a_track_without_seed_metrics_are_params_errors() -> None:
    from kdflow.errors import ParamsError
    from test_lm_track import tiny_lm

    raw = raw_params()
    raw["student"]["seeds"] = 0
    with pytest.raises(ParamsError, match="student.seeds"):
        parse_params(raw)
    raw = tiny_lm("text:x.txt", student={"seeds": 2})
    with pytest.raises(ParamsError, match="student.seeds: track 'lm' cannot compare students over seeds"):
        parse_params(raw)
