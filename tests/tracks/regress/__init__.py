"""A toy track for tests: regression, so nothing about it is classification.

``tests/test_tracks.py`` copies this one folder to ``kdflow/tracks/regress/`` of a copy of the
project and runs ``kdflow run`` with ``track: regress``: no stage is edited. It brings its own
data (``sine:<N>``: y = sin(x0) + x1^2 / 2 + noise), dataset artifact (one parquet table checked
with pandera), model, teacher signal (one output), loss, selection strategy, evaluation (RMSE),
report section and summary rows.
"""
from __future__ import annotations

from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandera.polars as pa
import polars as pl
import torch
from pydantic import Field
from torch import Tensor, nn

from kdflow.data.dataset import Dataset
from kdflow.errors import DataError
from kdflow.losses import LOSSES, LossBase
from kdflow.metrics.latency import measure_latency
from kdflow.models import MODELS, count_params, model_bytes
from kdflow.report import table
from kdflow.select import STRATEGIES, SelectionData
from kdflow.tracks import TRACKS
from kdflow.tracks.classify import ClassifyTrack
from kdflow.train.loop import predict
from schemas.base import Section

TABLE = "table.parquet"
SCHEMA = pa.DataFrameSchema({
    "sample_id": pa.Column(pl.Utf8, unique=True, nullable=False),
    "split": pa.Column(pl.Utf8, pa.Check.isin(["train", "val", "test"]), nullable=False),
    "y": pa.Column(pl.Float32, pa.Check(lambda d: d.lazyframe.select(pl.col("y").is_finite())), nullable=False),
})


def rmse(out: Tensor, y: Tensor) -> float:
    return float(((out.reshape(-1) - y.reshape(-1)) ** 2).mean().sqrt())


@MODELS.register("regress_mlp", tracks=("regress",))
def regress_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 1))


class MseKDParams(Section):
    name: Literal["mse_kd"] = "mse_kd"
    alpha: float = Field(0.8, ge=0, le=1, description="Weight of matching the teacher; 1 - alpha weighs the targets.")


@LOSSES.register("mse_kd", params=MseKDParams, tracks=("regress",))
class MseKD(LossBase):
    """``alpha * (s - t)^2 + (1 - alpha) * (s - y)^2`` with the cached teacher output t."""

    needs = ("y", "teacher_logits")

    def __init__(self, alpha: float = 0.8) -> None:
        self.alpha = alpha

    def __call__(self, out: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        s = out.float().reshape(-1)
        kd = ((s - batch["teacher_logits"].float().reshape(-1)) ** 2).mean()
        mse = ((s - batch["y"].float().reshape(-1)) ** 2).mean()
        return {"loss": self.alpha * kd + (1 - self.alpha) * mse, "kd": kd, "mse": mse}


class Mse:
    needs = ("y",)

    def __call__(self, out: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        mse = ((out.float().reshape(-1) - batch["y"].float().reshape(-1)) ** 2).mean()
        return {"loss": mse}


@STRATEGIES.register("val_rmse", tracks=("regress",))
def val_rmse(candidates: dict[str, nn.Module], data: SelectionData) -> list[dict]:
    rows = []
    for name, model in candidates.items():
        err = rmse(predict(model, data.val_x, device=data.device), data.val_y)
        rows.append({"teacher": name, "score": -err, "val_rmse": err})
    return rows


class RegressTrack(ClassifyTrack):
    name = "regress"
    summary = "toy regression (tests): sine data, RMSE"
    modalities = ("tabular",)
    model_default = ()
    views_supported = False

    def source_problems(self, spec: str, options: dict[str, Any], root: Path) -> list[str]:
        """What ``kdflow validate`` says about ``data.source`` (this track reads its data itself)."""
        scheme, _, arg = spec.partition(":")
        if scheme != "sine" or not (arg or "600").isdigit():
            return [f"data.source: track 'regress' reads sine:<N>, got {spec!r}"]
        return []

    def load_source(self, spec: str, *, seed: int, val_fraction: float, test_fraction: float,
                    options: dict[str, Any]) -> Dataset:
        scheme, _, arg = spec.partition(":")
        if scheme != "sine":
            raise DataError(f"data.source: track 'regress' reads sine:<N>, got {spec!r}")
        n = int(arg or 600)
        g = np.random.default_rng(seed)
        x = g.uniform(-2, 2, size=(n, 4)).astype(np.float32)
        y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] ** 2 + 0.05 * g.standard_normal(n)).astype(np.float32)
        u = g.permutation(n) / n
        splits = ["test" if v < test_fraction else "val" if v < test_fraction + val_fraction else "train" for v in u]
        return Dataset(torch.from_numpy(x), torch.from_numpy(y), [f"sine-{i:05d}" for i in range(n)], splits,
                       1, "tabular", meta={"source": spec})

    def save(self, ds: Dataset, folder: Path) -> None:
        frame = pl.DataFrame({"sample_id": ds.sample_ids, "split": ds.splits, "y": ds.labels.numpy(),
                              **{f"x{i}": ds.features[:, i].numpy() for i in range(ds.features.shape[1])}})
        SCHEMA.validate(frame)
        frame.write_parquet(Path(folder) / TABLE)

    def load(self, folder: Path) -> Dataset:
        frame = SCHEMA.validate(pl.read_parquet(Path(folder) / TABLE))
        x = torch.from_numpy(frame.select(pl.col("^x\\d+$")).to_numpy().astype(np.float32))
        y = torch.from_numpy(frame["y"].to_numpy().astype(np.float32))
        return Dataset(x, y, frame["sample_id"].to_list(), frame["split"].to_list(), 1, "tabular")

    def describe(self, ds: Dataset) -> dict[str, Any]:
        return {"num_classes": 0, "modality": "tabular", "input_shape": list(ds.input_shape), "track": self.name}

    def output_dim(self, ds: Dataset) -> int:
        return 1

    def teacher_loss(self) -> Any:
        return Mse()

    def val_metric(self) -> Any:
        return ("neg_rmse", lambda model, x, y, batch_size, device: -rmse(predict(model, x, batch_size=batch_size, device=device), y))

    def val_score(self, model: nn.Module, ds: Dataset, device: torch.device) -> dict[str, float]:
        return {"val_rmse": rmse(predict(model, ds.features, device=device), ds.labels)}

    def offers(self, kind: str) -> list[str]:
        return {"loss": ["mse_kd"], "condenser": ["none"], "format": ["dense"], "strategy": ["val_rmse"]}[kind]

    def evaluate(self, models: dict[str, nn.Module], test: Dataset, *, names: dict[str, str],
                 histories: dict[str, list[dict]], latency_repeats: int, latency_threads: int | None,
                 ece_bins: int, folder: Path) -> dict[str, Any]:
        per = {}
        for k, m in models.items():
            lat = measure_latency(m, test.input_shape, 1, repeats=latency_repeats, threads=latency_threads)
            per[k] = {"rmse": rmse(predict(m, test.features), test.labels), "params": count_params(m),
                      "bytes": model_bytes(m), "latency_ms_b1": lat["median_ms"]}
        t, s = per["teacher"], per["student"]
        return {"teacher": {"name": names["teacher"], **t}, "student": s, "n_test": len(test),
                "compression": {"params_ratio": t["params"] / s["params"]}}

    def headline(self, m: dict[str, Any]) -> dict[str, float]:
        return {"teacher_rmse": m["teacher"]["rmse"], "student_rmse": m["student"]["rmse"],
                "params_ratio": m["compression"]["params_ratio"]}

    def summary_rows(self, m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        t, s = m["teacher"], m["student"]
        return [("RMSE", f"{t['rmse']:.4f}", f"{s['rmse']:.4f}", ""),
                ("params", f"{t['params']:,}", f"{s['params']:,}", f"{m['compression']['params_ratio']:.1f}x")]

    def summary_line(self, m: dict[str, Any]) -> str:
        return f"regression, {m['n_test']} test samples, teacher: {m['teacher']['name']}"

    def report_section(self, m: dict[str, Any]) -> str:
        return table(["", "teacher", "student", "ratio"], [list(r) for r in self.summary_rows(m)]) + \
            f"<p>{escape(self.summary_line(m))}</p>"

    def dvc_plots(self) -> list[dict[str, Any]]:
        return []


TRACKS.register("regress")(RegressTrack())
