"""Fast tests for one-line bugs the rest of the fast suite let through (issue 12, "Tests that let
planted bugs through"): each was planted, seen to fail here, and removed."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from kdflow.cache.formats import Q8_LEVELS, Q8_MAX_RANGE, decode_to_batch, encode, narrowest_uint, topk_logprobs
from kdflow.metrics import accuracy
from kdflow.metrics.classification import agreement, expected_calibration_error, reliability_bins
from schemas.params import parse_params
from tasks.common import STAGE_ORDER, artifact_root, atomic_dir, check_output, execute_stage, fingerprint


# --- evaluate: the test split, and agreement with the teacher --------------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A whole tiny pipeline on digits (one small teacher, a weak one-epoch student)."""
    root = tmp_path_factory.mktemp("evaluated")
    quick = {"epochs": 2, "lr": 0.01, "batch_size": 128, "patience": None}
    raw = tiny_params(teachers=[{"name": "mlp", "arch": "mlp", "args": {"hidden": [32]}, "train": quick}],
                      student={"train": {**quick, "epochs": 1}, "arch": "tiny_mlp"})
    pp = parse_params(raw)
    torch.set_num_threads(1)
    for stage in STAGE_ORDER:
        execute_stage(stage, pp, root)
    return root, pp


def test_evaluate_measures_the_test_split_against_the_teacher(evaluated) -> None:
    root, pp = evaluated
    from kdflow.tracks import get_track
    from kdflow.train.loop import predict

    art, track = artifact_root(root, pp.name), get_track(pp.track)
    m = json.loads((art / "evaluate" / "metrics.json").read_text())
    ds = track.load(art / "prepare")
    test = ds.split("test")
    assert len(test) != len(ds.split("val"))  # the check below tells the splits apart
    assert m["n_test"] == len(test)
    teacher = track.load_model(art / "teachers" / m["teacher"]["name"])
    student = track.load_model(art / "student")
    t_logits, s_logits = predict(teacher, test.features), predict(student, test.features)
    assert m["teacher"]["accuracy"] == pytest.approx(accuracy(t_logits, test.labels), abs=1e-9)
    assert m["student"]["accuracy"] == pytest.approx(accuracy(s_logits, test.labels), abs=1e-9)
    expected = agreement(t_logits, s_logits)
    assert expected < 1.0  # a weak student: agreement with itself (1.0) would differ
    assert m["agreement"] == pytest.approx(expected, abs=1e-9)


# --- a stage output whose listed file was deleted; temporary folders; fingerprints -----------------

def test_check_output_refuses_an_output_whose_listed_file_was_deleted(evaluated) -> None:
    root, pp = evaluated
    folder = artifact_root(root, pp.name) / "evaluate"
    copy = folder.parent / "evaluate-copy"
    shutil.copytree(folder, copy)
    assert check_output(copy) is None
    (copy / "metrics.json").unlink()
    assert check_output(copy) == f"{copy / 'metrics.json'} is missing"


def test_a_failed_stage_leaves_no_temporary_folder_and_the_old_output(tmp_path: Path) -> None:
    final = tmp_path / "stage"
    with atomic_dir(final) as tmp:
        (tmp / "good").write_text("1")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    assert sorted(p.name for p in final.iterdir()) == ["good"]


def test_a_stage_that_fails_inside_execute_stage_leaves_no_temporary_folder(tmp_path: Path) -> None:
    from kdflow.errors import KdflowError

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    pp = parse_params(tiny_params(data={"source": "parquet:broken.parquet"}))
    with pytest.raises(KdflowError, match="cannot read parquet"):
        execute_stage("prepare", pp, tmp_path)
    leftovers = [p.name for p in artifact_root(tmp_path, pp.name).iterdir()]
    assert leftovers == [], leftovers


def test_the_fingerprint_covers_every_upstream_fingerprint() -> None:
    pp = parse_params(tiny_params())
    ups = {"condense": "c" * 64, "select": "s" * 64, "teachers": "t" * 64}
    base = fingerprint("logits", pp, ups)
    for stage in ups:
        assert fingerprint("logits", pp, {**ups, stage: "x" * 64}) != base, stage
    assert fingerprint("teachers", pp, {"prepare": "a" * 64}) != fingerprint("teachers", pp, {"prepare": "b" * 64})


# --- ECE bins are (lower, upper] --------------------------------------------------------------------

def test_ece_bins_are_open_below_and_closed_above() -> None:
    # confidences exactly on an edge: 0.5 (two equal logits) and 1.0
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [200.0, -200.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    bins = reliability_bins(logits, labels, n_bins=2)
    assert [b["count"] for b in bins] == [2, 1]  # 0.5 in (0, 0.5], 1.0 in (0.5, 1]
    assert bins[0]["confidence"] == pytest.approx(0.5) and bins[0]["accuracy"] == pytest.approx(0.5)
    assert expected_calibration_error(logits, labels, n_bins=2) == pytest.approx(0.0)
    four = reliability_bins(torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64), torch.tensor([0]), n_bins=4)
    assert [b["count"] for b in four] == [0, 0, 1, 0]  # confidence 0.75 is the upper edge of (0.5, 0.75]


# --- top-k indices hold class C - 1 ------------------------------------------------------------------

@pytest.mark.parametrize("classes, dtype", [(256, torch.uint8), (257, torch.uint16), (65536, torch.uint16),
                                            (65537, torch.uint32)])
def test_index_dtype_holds_the_last_class(classes: int, dtype: torch.dtype) -> None:
    assert narrowest_uint(classes) == dtype


@pytest.mark.parametrize("fmt", ["topk", "topk_q8"])
def test_class_256_of_257_survives_the_cache(fmt: str) -> None:
    logits = torch.zeros(3, 257)
    logits[:, 256] = 10.0
    logits[1, 255] = 11.0
    stored = encode(logits, format=fmt, k=4, dtype="float16", capture_temperature=1.0)
    idx = decode_to_batch(stored, fmt)["teacher_indices"]
    assert idx[:, 0].tolist() == [256, 255, 256] and int(idx[1, 1]) == 256


# --- q8: the grid spans at most Q8_MAX_RANGE nats below the top class --------------------------------

def test_q8_keeps_its_grid_step_when_one_cached_class_is_far_out() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    logits[:, 7] = -500.0  # one cached class far below the rest
    values, _, _ = topk_logprobs(logits, 50, 1.0)  # [n, k] descending
    stored = encode(logits, format="topk_q8", k=50, dtype="float16", capture_temperature=1.0)
    decoded = decode_to_batch(stored, "topk_q8")["teacher_logprobs"]
    step = stored["scale"]  # [n]
    assert float(step.max()) <= Q8_MAX_RANGE / Q8_LEVELS * (1 + 1e-6)
    on_grid = values >= values[:, :1] - Q8_MAX_RANGE
    err = (decoded - values).abs()
    assert bool((err <= step[:, None])[on_grid].all())  # within one grid step, as the docstring says
    assert float(err[:, 0].max()) < 0.1  # near the top class the error stays small


# --- every numeric bound of the params schema is enforced --------------------------------------------

def _bounded_fields():
    """(key path, raw section to merge, bound kind, bound, is_int) for every bounded params field,
    the method sections (condensers, losses) of every track included."""
    import annotated_types as at

    from kdflow.condense import CONDENSERS
    from kdflow.losses import LOSSES
    from kdflow.tracks import discovered, get_track
    from schemas.base import _number_kinds
    from schemas.params import PipelineParams, _sub_models

    for name in discovered():
        get_track(name)
    kinds = {at.Gt: (">", "gt"), at.Ge: (">=", "ge"), at.Lt: ("<", "lt"), at.Le: ("<=", "le")}

    def walk(model, path: list):
        for name, field in model.model_fields.items():
            here = [*path, name]
            for meta in field.metadata:
                for cls, (op, attr) in kinds.items():
                    if isinstance(meta, cls):
                        yield here, op, getattr(meta, attr), int in _number_kinds(field.annotation)
            if name == "condense" and model is PipelineParams:
                for method in CONDENSERS.names():
                    yield from walk(CONDENSERS.meta(method)["params"], [*here, {"method": method}])
            elif name == "loss":
                for loss in LOSSES.names():
                    yield from walk(LOSSES.meta(loss)["params"], [*here, {"name": loss}])
            elif name == "teachers":
                yield from walk(_sub_models(field.annotation)[0], [*here, 0])
            elif name == "stages":
                yield from walk(_sub_models(field.annotation)[0], [*here, "student"])
            else:
                for sub in _sub_models(field.annotation):
                    yield from walk(sub, here)

    return list(walk(PipelineParams, []))


BOUNDED = _bounded_fields()


def _outside(op: str, bound, is_int: bool):
    step = 1 if is_int else max(abs(bound) * 1e-6, 1e-9)
    return {">": bound, ">=": bound - step, "<": bound, "<=": bound + step}[op]


def _line(path: list, op: str, bound) -> str:
    return ".".join(str(p) if not isinstance(p, dict) else f"{{{next(iter(p.values()))}}}" for p in path) + f" {op} {bound!r}"


def test_no_bound_of_the_schema_was_removed_or_changed() -> None:
    """A removed bound would also remove its case below: compare with the recorded list."""
    recorded = {ln for ln in (Path(__file__).parent / "params_bounds.txt").read_text().splitlines()
                if ln and not ln.startswith("#")}
    assert {"student.loss.{kd}.alpha <= 1", "logits.temperature > 0", "select.probe.temperature > 0"} <= recorded
    missing = recorded - {_line(path, op, bound) for path, op, bound, _ in BOUNDED}
    assert not missing, f"bounds removed or changed: {sorted(missing)}"


@pytest.mark.parametrize("path, op, bound, is_int", BOUNDED,
                         ids=[".".join(str(p) if not isinstance(p, dict) else next(iter(p.values())) for p in b[0])
                              + f"{b[1]}{b[2]}" for b in BOUNDED])
def test_every_bound_is_enforced(path: list, op: str, bound, is_int: bool) -> None:
    from kdflow.errors import ParamsError

    raw = tiny_params()
    node, key_path = raw, ""
    for i, part in enumerate(path[:-1]):
        if isinstance(part, dict):  # a method section: choose the method
            node.clear()
            node.update(part)
            continue
        key_path += f"[{part}]" if isinstance(part, int) else (f".{part}" if key_path else part)
        nxt = path[i + 1]
        if isinstance(part, int):
            node = node[part]
        else:
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
            if isinstance(nxt, int) and not node:
                node.append({})
    value = _outside(op, bound, is_int)
    node[path[-1]] = int(value) if is_int else float(value)
    key_path += f".{path[-1]}" if key_path else path[-1]
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert any(p.startswith(f"{key_path}: must be {op} ") for p in info.value.problems), info.value.problems
