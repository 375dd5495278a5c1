"""kdflow/catalog.py declares the core registries' names and metadata without importing the code
behind them; these tests check every declaration against what the modules register (so the two
cannot drift) and that checking a pipeline (validate, status, a no-op run's check) imports no torch."""
from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdflow.errors import UnknownNameError
from kdflow.registry import Registry

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "prefect", "mlflow", "transformers", "diffusers", "torch_geometric", "polars", "pandas", "sklearn")

# In a fresh interpreter: the declared names and metadata, then the same after importing every core
# implementation package (not the tracks: they register entries of their own).
DRIFT = """
import inspect, json, sys
from kdflow import catalog
declared = {r.kind: {n: r.declared(n) for n in r.names()} for r in catalog.CORE}
assert "torch" not in sys.modules, "importing kdflow.catalog imported torch"
import kdflow.cache.formats, kdflow.condense, kdflow.data.sources, kdflow.losses, kdflow.models, kdflow.select  # noqa
from kdflow.losses import LossBase
out = {"declared": declared, "registered": {}, "left": {}, "checks": []}
for r in catalog.CORE:
    sigs = {n: catalog.signature(r, n) for n in r.names() if "signature" in r.meta(n)}  # from source (not yet imported)
    out["left"][r.kind] = sorted(n for n in r.names() if r.declared(n))  # declared, not registered by their import
    items = dict(r.items())  # imports the rest
    out["registered"][r.kind] = {n: getattr(o, "__module__", type(o).__module__) for n, o in items.items()}
    for n, obj in items.items():
        meta = r.meta(n)
        if r is catalog.LOSSES:
            own = obj.inputs.__func__ is not LossBase.inputs.__func__
            out["checks"].append([r.kind, n, "needs", list(meta["needs"]), list(obj.needs)])
            out["checks"].append([r.kind, n, "own_inputs", meta["own_inputs"], own])
        if r is catalog.FORMATS:
            out["checks"].append([r.kind, n, "provides", list(meta["provides"]), list(obj.provides)])
        if n in sigs:
            real = [(p.name, str(p.kind), p.default is inspect.Parameter.empty)
                    for p in inspect.signature(obj).parameters.values()]
            static = [(p.name, str(p.kind), p.default is inspect.Parameter.empty) for p in sigs[n].parameters.values()]
            out["checks"].append([r.kind, n, "signature", static, real])
print(json.dumps(out))
"""


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def test_every_declaration_matches_what_its_module_registers() -> None:
    proc = _python(DRIFT, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.splitlines()[-1])
    for kind, names in doc["registered"].items():
        # every name the core modules register is declared (validation knows it without importing them) ...
        assert set(names) == set(doc["declared"][kind]), f"{kind}: registered {sorted(names)}, declared {sorted(doc['declared'][kind])}"
        # ... by the module that registers it, and importing that module registered it
        assert doc["left"][kind] == [], f"{kind}: declared but not registered by their module: {doc['left'][kind]}"
        for name, module in doc["declared"][kind].items():
            assert names[name] == module, f"{kind} {name!r}: declared in {module}, defined in {names[name]}"
    assert doc["checks"], "no metadata was compared"
    for kind, name, key, declared, real in doc["checks"]:
        assert declared == real, f"{kind} {name!r}: declared {key} {declared}, the code has {real}"


def test_registry_declarations_are_checked_when_the_module_registers() -> None:
    reg: Registry = Registry("thing")
    reg.declare("a", "json", tracks=("classify",), needs=("y",))
    assert "a" in reg and reg.names() == ["a"] and reg.meta("a")["needs"] == ("y",) and reg.declared("a") == "json"
    with pytest.raises(ValueError, match=r"thing 'a': registered with \['tracks'\]"):
        reg.register("a", tracks=("lm",))(object())
    obj = object()
    reg.register("a", tracks=("classify",))(obj)  # the declared metadata it repeats, plus what it omits
    assert reg.get("a") is obj and reg.meta("a") == {"tracks": ("classify",), "needs": ("y",)} and reg.declared("a") is None
    reg.declare("b", "json")  # importing json registers nothing
    with pytest.raises(ValueError, match="importing json did not register it"):
        reg.get("b")
    with pytest.raises(UnknownNameError, match="unknown thing 'c'"):
        reg.meta("c")


def test_static_signatures_bind_like_the_real_ones() -> None:
    from kdflow import catalog

    sig = catalog._source_signature("kdflow.models.gnn", "build")  # a factory made in a loop: **extra
    assert sig is not None and sig.bind((1,), 2, hidden=8, heads=2)
    conv = catalog._source_signature("kdflow.models.convnet", "convnet")
    with pytest.raises(TypeError, match="unexpected keyword argument 'widths'"):
        conv.bind((1,), 2, widths=[4])
    with pytest.raises(TypeError, match="missing a required argument: 'num_classes'"):
        conv.bind((1,))
    assert list(conv.parameters)[:2] == ["input_shape", "num_classes"]
    assert inspect.signature(catalog.signature).parameters  # the public helper exists


# The no-op check of `kdflow run` (params, validation, pipeline_status, lineage check), that of
# `kdflow stage` (what `dvc repro` runs: main process? output current?) and the `validate`, `status`
# and `params` commands, in a fresh interpreter: which heavy packages they import.
NOOP = """
import json, sys
from pathlib import Path
from kdflow.cli import _current_output, _lineage_recorded, app
from kdflow.train.distributed import is_main, launched
from kdflow.checks import pipeline_problems
from schemas.params import load_params
from tasks.status import pipeline_status

pp = load_params(Path("params.yaml"))
problems = pipeline_problems(pp, Path.cwd())
plan = pipeline_status(pp, Path.cwd())
recorded = _lineage_recorded(pp)
stage_check = [is_main(), launched(), _current_output("prepare", pp)]
codes = [app(args, standalone_mode=False) for args in (["validate"], ["status", "--json"], ["params", "student.loss"])]
print(json.dumps({"problems": problems, "stages": [s.stage for s in plan], "codes": codes,
                  "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(%r))}))
""" % (HEAVY,)


def test_checking_a_pipeline_imports_no_torch(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")  # the default pipeline, nothing built yet
    proc = _python(NOOP, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert doc["problems"] == [] and len(doc["stages"]) == 7 and doc["codes"] == [None, None, None]
    assert doc["heavy"] == [], f"the no-op check imported {doc['heavy']}"
