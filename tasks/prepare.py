"""prepare: read the data source, split it, validate it, write the dataset artifact."""
from __future__ import annotations

from kdflow.data.sources import resolve_options, resolve_source
from schemas.manifest import Manifest
from schemas.outputs import Prepared
from schemas.params import DataParams
from tasks.common import StageContext


def run(params: DataParams, ctx: StageContext) -> Manifest:
    ds = ctx.track.load_source(
        resolve_source(params.source, ctx.root),
        seed=ctx.seed,
        val_fraction=params.val_fraction,
        test_fraction=params.test_fraction,
        options=resolve_options(params.options, ctx.root),
    )
    ds.meta["options"] = dict(params.options)  # as declared: artifacts do not depend on the machine
    ds.meta["source"] = params.source  # the declared spec, not the machine-specific absolute path
    ctx.track.save(ds, ctx.out)
    info = Prepared(**ctx.track.describe(ds))
    counts = {f"n_{s}": sum(1 for x in ds.splits if x == s) for s in ("train", "val", "test")}
    return ctx.manifest(metrics={**counts, "num_classes": info.num_classes}, info=info)
