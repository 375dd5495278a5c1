"""Hardening of what users feed kdflow (issue 12 items 4-7): bad pipelines are refused by
``kdflow validate`` with their key path (exit 2), broken inputs are clean errors naming the file
(exit 1), and values that make no sense are refused or warned about with the count."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    proc = cli(tmp_path, "validate", "-c", "cfg")
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr


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
