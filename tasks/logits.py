"""logits: run the chosen teacher once over the condensed training set and cache its outputs."""
from __future__ import annotations

import torch

from kdflow.cache import CacheReader, fidelity, write_cache
from kdflow.data.dataset import load_dataset
from kdflow.models.io import load_model
from kdflow.train.device import resolve_device
from kdflow.train.loop import predict
from schemas.manifest import Manifest
from schemas.params import LogitsParams
from tasks.common import StageContext
from tasks.select import chosen_teacher

FIDELITY_ROWS = 512


def _batches(teacher, x: torch.Tensor, batch_size: int, device: torch.device, ctx: StageContext):
    for start in range(0, len(x), batch_size):
        yield predict(teacher, x[start : start + batch_size], batch_size=batch_size, device=device)
        ctx.report("teacher logits", min(start + batch_size, len(x)), len(x))


def run(params: LogitsParams, ctx: StageContext) -> Manifest:
    ds = load_dataset(ctx.input("condense"))
    teacher = load_model(ctx.input("teachers") / chosen_teacher(ctx))
    device = resolve_device("auto")
    info = write_cache(
        ctx.out, _batches(teacher, ds.features, params.batch_size, device, ctx),
        num_rows=len(ds), num_classes=ds.num_classes, format=params.format, k=min(params.k, ds.num_classes),
        dtype=params.dtype, capture_temperature=params.temperature, shard_rows=params.shard_rows,
    )
    reader = CacheReader(ctx.out, info)
    reader.verify()
    sample = torch.arange(min(FIDELITY_ROWS, len(ds)))
    full = predict(teacher, ds.features[sample], device=device)
    fid = fidelity(full, reader.get(sample), capture_temperature=params.temperature)
    dense_fp32 = ds.num_classes * 4
    metrics = {**fid, "bytes_per_sample": info["bytes_per_sample"], "compression_vs_fp32": dense_fp32 / info["bytes_per_sample"]}
    return ctx.manifest(metrics=metrics, info={"cache": info, "teacher": chosen_teacher(ctx)})
