"""prepare: read the data source, split it, validate it, write the dataset artifact."""
from __future__ import annotations

from pathlib import Path

from kdflow.data.dataset import save_dataset
from kdflow.data.sources import load_source
from schemas.manifest import Manifest
from schemas.params import DataParams
from tasks.common import StageContext


def resolve_source(spec: str, root: Path) -> str:
    """Make a relative ``kind:path`` spec absolute against the project root."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("idx", "parquet") and not Path(rest).is_absolute():
        return f"{kind}:{(root / rest).resolve()}"
    return spec


def resolve_options(options: dict, root: Path) -> dict:
    """Make a relative ``root`` option (the tu source's data folder) absolute against the project root."""
    out = dict(options)
    if isinstance(out.get("root"), str) and not Path(out["root"]).expanduser().is_absolute():
        out["root"] = str((root / out["root"]).resolve())
    return out


def run(params: DataParams, ctx: StageContext) -> Manifest:
    ds = load_source(
        resolve_source(params.source, ctx.root),
        seed=ctx.seed,
        val_fraction=params.val_fraction,
        test_fraction=params.test_fraction,
        options=resolve_options(params.options, ctx.root),
    )
    ds.meta["options"] = dict(params.options)  # as declared: artifacts do not depend on the machine
    ds.meta["source"] = params.source  # the declared spec, not the machine-specific absolute path
    save_dataset(ds, ctx.out)
    counts = {f"n_{s}": sum(1 for x in ds.splits if x == s) for s in ("train", "val", "test")}
    info = {"num_classes": ds.num_classes, "modality": ds.modality, "input_shape": list(ds.input_shape)}
    return ctx.manifest(metrics={**counts, "num_classes": ds.num_classes}, info=info)
