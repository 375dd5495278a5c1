"""A stage's inputs as MLflow datasets, so the UI draws the data edges between stage runs.

Each upstream artifact becomes one dataset: name = the upstream stage, digest = a prefix of its
fingerprint (MLflow caps digests at 36 characters; the full one is the input tag
``kdflow.fingerprint``), source = the artifact folder, schema = what the folder holds (the sample
table's columns, the models' input/output tensors or the cache's tensors). The ``prepare`` stage's
input is the declared data source itself.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from schemas.stages import role

DIGEST_LEN = 36  # MLflow's limit on dataset digests
SOURCE_NAME = "source"
CONTEXT_TAG = "mlflow.data.context"
FINGERPRINT_TAG = "kdflow.fingerprint"
RUN_TAG = "kdflow.run_id"


_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16",
                       "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                       "U64": "uint64", "BOOL": "bool"}


def digest(fingerprint: str) -> str:
    """The part of a fingerprint MLflow can store as a dataset digest."""
    return fingerprint[:DIGEST_LEN]


def artifact_input(stage: str, upstream: str, manifest: Any, folder: Path) -> DatasetInput:
    """The upstream stage's output folder as an input of ``stage``'s run."""
    folder = Path(folder).resolve()
    profile = {"stage": upstream, "files": len(manifest.files), "bytes": sum(f.bytes for f in manifest.files),
               "metrics": manifest.metrics}
    meta = folder / "dataset.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        profile.update({k: info[k] for k in ("num_classes", "modality", "input_shape", "counts") if k in info})
    dataset = Dataset(
        name=upstream,
        digest=digest(manifest.fingerprint),
        source_type="local",
        source=json.dumps({"uri": str(folder)}),
        schema=artifact_schema(folder),
        profile=json.dumps(profile, sort_keys=True),
    )
    tags = [InputTag(CONTEXT_TAG, role(stage, upstream)),  # how the stage uses it, from schemas/stages.py
            InputTag(FINGERPRINT_TAG, manifest.fingerprint)]
    if manifest.mlflow_run_id:
        tags.append(InputTag(RUN_TAG, manifest.mlflow_run_id))
    return DatasetInput(dataset, tags)


def source_input(data: dict[str, Any], root: Path) -> DatasetInput:
    """The declared data source (the ``data`` params section) as the input of ``prepare``.

    Its digest hashes the whole section (spec, fractions, options): what ``prepare`` reads.
    """
    spec = str(data.get("source", ""))
    scheme, sep, arg = spec.partition(":")
    if scheme in ("http", "https"):
        source_type, uri = "http", spec
    elif sep and arg and scheme in ("idx", "parquet"):
        path = Path(arg) if Path(arg).is_absolute() else Path(root) / arg
        source_type, uri = "local", str(path.resolve())
    else:
        source_type, uri = scheme or "unknown", spec
    full = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    dataset = Dataset(
        name=SOURCE_NAME,
        digest=digest(full),
        source_type=source_type[:36],
        source=json.dumps({"uri": uri, "spec": spec}),
        schema=None,
        profile=json.dumps(data, sort_keys=True, default=str),
    )
    return DatasetInput(dataset, [InputTag(CONTEXT_TAG, "source"), InputTag(FINGERPRINT_TAG, full)])


def artifact_schema(folder: Path) -> str | None:
    """What an artifact folder holds, as MLflow dataset-schema JSON (None when nothing fits).

    A table (``*.parquet``) gives its columns; models (``model.json``) their input/output
    tensors; other safetensors files (the logit cache) their tensors.
    """
    tables = sorted(Path(folder).glob("*.parquet"))
    if tables:
        return json.dumps({"mlflow_colspec": _table_schema(tables[0]).to_dict()})
    specs = sorted(Path(folder).rglob("model.json"))
    if specs:
        return _models_schema(specs, Path(folder))
    tensors = _tensor_specs(sorted(Path(folder).rglob("*.safetensors")))
    if tensors:
        return json.dumps({"mlflow_tensorspec": {"features": Schema(tensors).to_json(), "targets": None}})
    return None


def _table_schema(path: Path) -> Schema:
    import polars as pl

    def kind(dtype: Any) -> str:
        if dtype == pl.Boolean:
            return "boolean"
        if dtype.is_integer():
            return "long" if dtype in (pl.Int64, pl.UInt32, pl.UInt64) else "integer"
        if dtype.is_float():
            return "double" if dtype == pl.Float64 else "float"
        return "string"

    return Schema([ColSpec(kind(dtype), name) for name, dtype in pl.read_parquet_schema(path).items()])


def _models_schema(specs: list[Path], folder: Path) -> str | None:
    import numpy as np

    inputs, outputs = [], []
    for path in specs:
        spec = json.loads(path.read_text())
        if "input_shape" not in spec or "num_classes" not in spec:
            continue
        label = path.parent.relative_to(folder).as_posix()
        label = "model" if label == "." else label
        inputs.append(TensorSpec(np.dtype("float32"), (-1, *spec["input_shape"]), label))
        outputs.append(TensorSpec(np.dtype("float32"), (-1, spec["num_classes"]), label))
    if not inputs:
        return None
    spec = {"features": Schema(inputs).to_json(), "targets": Schema(outputs).to_json()}
    return json.dumps({"mlflow_tensorspec": spec})


def _tensor_specs(files: list[Path]) -> list[TensorSpec]:
    """One spec per tensor name across safetensors files (rows -> -1), read from headers only."""
    import numpy as np

    seen: dict[str, TensorSpec] = {}
    for path in files:
        for name, entry in _safetensors_header(path).items():
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype", ""))
            if name == "__metadata__" or name in seen or dtype is None:
                continue
            shape = entry.get("shape", [])
            seen[name] = TensorSpec(np.dtype(dtype), (-1, *shape[1:]) if shape else (-1,), name)
    return list(seen.values())


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))
