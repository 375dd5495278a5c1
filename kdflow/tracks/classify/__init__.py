"""The ``classify`` track: class labels, class logits as the teacher signal, accuracy-based evaluation.

Images ``[N, C, H, W]``, sequences ``[N, C, L]`` and tabular rows ``[N, D]`` held in memory as
one tensor; the dataset artifact is ``kdflow.data.dataset``'s. The ``graph`` track reuses this
one and changes what differs for graphs.

Importing it does not import torch: what ``kdflow validate`` / ``status`` and a no-op ``kdflow run``
ask of a track (what it offers, architecture and checkpoint checks, the summary table) reads the
registries' declarations (``kdflow/catalog.py``); the methods that compute import what they use.
"""
from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdflow.catalog import CONDENSERS, FORMATS, LOSSES, MODELS, SOURCES, STRATEGIES, is_import_path, signature
from kdflow.errors import DataError, ModelError
from kdflow.tracks import TRACKS, offered
from kdflow.tracks.classify import evaluation

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kdflow.data.dataset import Dataset
    from kdflow.select import SelectionData


class ClassifyTrack:
    """Classification of images, sequences and tabular rows."""

    name = "classify"
    summary = "class labels; images [N,C,H,W], sequences [N,C,L], tabular [N,D]; accuracy, F1, ECE, latency"
    modalities: tuple[str, ...] = ("image", "sequence", "tabular")
    model_default: tuple[str, ...] = ("classify",)  # tracks of a model registered without ``tracks``
    views_supported = True  # images and sequences (tabular data refuses at run time)

    # -- the dataset artifact -----------------------------------------------------------------
    def load_source(self, spec: str, *, seed: int, val_fraction: float, test_fraction: float,
                    options: dict[str, Any]) -> Dataset:
        scheme = spec.partition(":")[0]
        owner = SOURCES.meta(scheme).get("track", "classify") if scheme in SOURCES else self.name
        if owner != self.name:
            raise DataError(f"data.source: {scheme!r} is data of track {owner!r}, not {self.name!r}; set `track: {owner}`")
        from kdflow.data.sources import load_source

        ds = load_source(spec, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, options=options)
        return self._check(ds, spec)

    def save(self, ds: Dataset, folder: Path) -> None:
        from kdflow.data.dataset import save_dataset

        save_dataset(self._check(ds, str(folder)), folder)

    def load(self, folder: Path) -> Dataset:
        from kdflow.data.dataset import load_dataset

        return self._check(load_dataset(folder), str(folder))

    def _check(self, ds: Dataset, where: str) -> Dataset:
        if ds.modality not in self.modalities:
            raise DataError(f"{where}: track {self.name!r} takes {list(self.modalities)} data, got "
                            f"{ds.modality!r}; set `track:` to the track of this data source")
        return ds

    def describe(self, ds: Dataset) -> dict[str, Any]:
        return {"num_classes": ds.num_classes, "modality": ds.modality, "input_shape": list(ds.input_shape),
                "track": self.name}

    # -- models and the teacher signal ----------------------------------------------------------
    def architectures(self) -> list[str]:
        return offered(MODELS, self.name, self.model_default)

    def model_problems(self, arch: str, args: dict[str, Any], where: str) -> list[str]:
        """Why ``arch(**args)`` cannot be built for this track (checked without data)."""
        known = self.architectures()
        if is_import_path(arch):  # a user's model class: importable, and its signature takes the args
            from kdflow.models import resolve_architecture

            try:
                sig = inspect.signature(resolve_architecture(arch))
            except ModelError as exc:
                return [f"{where}.arch: {exc}"]
        elif arch not in known:
            import difflib

            close = difflib.get_close_matches(arch, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return [f"{where}.arch: unknown architecture {arch!r} for track {self.name!r}; {hint}(known: {', '.join(known)})"]
        else:
            sig = signature(MODELS, arch)  # from the source while the model's module is not imported
        try:
            sig.bind((1,), 2, **args)
        except TypeError as exc:
            return [f"{where}.args: {exc} (architecture {arch!r})"]
        return []

    def create_model(self, arch: str, ds: Dataset, args: dict[str, Any], teacher: Path | None = None) -> nn.Module:
        from kdflow.models import create_model

        return create_model(arch, ds.input_shape, ds.num_classes, **args)

    def load_checkpoint(self, spec: str, root: Path, out: Path) -> nn.Module:
        """A teacher folder (``model.safetensors`` + ``model.json``, or a local Hugging Face
        classifier), loaded and copied into ``out``."""
        src = (Path(root) / spec).resolve()
        if not src.is_dir():
            raise ModelError(f"checkpoint: folder not found: {src}")
        model = self.load_model(src)
        shutil.copytree(src, out, dirs_exist_ok=True)
        return model

    def checkpoint_problems(self, spec: str, root: Path, where: str) -> list[str]:
        src = (Path(root) / spec).resolve()
        return [] if src.is_dir() else [f"{where}: folder not found: {src}"]

    def load_model(self, folder: Path) -> nn.Module:
        from kdflow.models.io import load_model

        return load_model(folder)

    def save_model(self, model: nn.Module, folder: Path) -> None:
        from kdflow.models.io import save_model

        save_model(model, folder)

    def teacher_outputs(self, model: nn.Module, x: Any, *, batch_size: int, device: torch.device) -> torch.Tensor:
        """Class logits ``[N, C]`` (float32, CPU)."""
        from kdflow.train.loop import predict

        return predict(model, x, batch_size=batch_size, device=device)

    def output_dim(self, ds: Dataset) -> int:
        return ds.num_classes

    def cache_layout(self, ds: Dataset) -> dict[str, int]:
        return {}  # one row per sample

    fidelity_rows = 512

    # -- training -----------------------------------------------------------------------------
    def teacher_loss(self) -> Any:
        from kdflow.losses import create_loss

        return create_loss("ce")

    def fit_inputs(self, ds: Dataset, loss: Any = None) -> dict[str, Any]:
        """Per-sample tensors for ``fit``: the loss's own (e.g. DBR views) or the samples; a
        ``weight`` extra (e.g. Mirage frequencies) weighs each sample's loss terms."""
        own = loss.inputs(ds) if loss is not None and hasattr(loss, "inputs") else None
        tensors = dict(own) if own is not None else {"x": ds.features, "y": ds.labels}
        if "weight" in ds.extras:
            tensors["weight"] = ds.extras["weight"]
        return tensors

    def val_pair(self, ds: Dataset) -> tuple[Any, torch.Tensor]:
        return ds.features, ds.labels

    def val_metric(self) -> Any:
        """``fit``'s validation metric: None is top-1 accuracy (``val_accuracy``)."""
        return None

    def val_score(self, model: nn.Module, ds: Dataset, device: torch.device) -> dict[str, float]:
        from kdflow.metrics import accuracy
        from kdflow.train.loop import predict

        return {"val_accuracy": accuracy(predict(model, ds.features, device=device), ds.labels)}

    def views(self, ds: Dataset, k: int, seed: int, augment: dict[str, Any]) -> dict[str, torch.Tensor]:
        """K seeded augmented views per sample (images and sequences; DataError otherwise)."""
        from kdflow.data.augment import Augment, draw_views

        return draw_views(ds.input_shape, ds.modality, len(ds), k, seed, Augment(**augment))

    # -- what it offers -------------------------------------------------------------------------
    def offers(self, kind: str) -> list[str]:
        registry = {"loss": LOSSES, "condenser": CONDENSERS, "format": FORMATS, "strategy": STRATEGIES}[kind]
        return offered(registry, self.name, (self.name,))

    # -- selection, condensation, evaluation ------------------------------------------------------
    def selection_data(self, ds: Dataset, seed: int, device: torch.device) -> SelectionData:
        from kdflow.select import SelectionData

        return SelectionData.of_splits(ds, seed, device)

    def condense_figure(self, ds: Dataset, folder: Path, title: str) -> None:
        """A per-class grid of what the student sees (images only)."""
        if ds.modality == "image" and ds.features.dim() == 4:
            from kdflow.condense.grid import plot_class_grid  # matplotlib: loaded only to draw

            plot_class_grid(folder / "figures" / "samples.png", ds.features, ds.labels, ds.num_classes, title=title)

    def latency_inputs(self, test: Dataset) -> dict[int, Any]:
        """Inputs to time per batch size; none: random inputs of the sample shape."""
        return {}

    def evaluate(self, models: dict[str, nn.Module], test: Dataset, *, names: dict[str, str],
                 histories: dict[str, list[dict]], latency_repeats: int, latency_threads: int | None,
                 ece_bins: int, folder: Path) -> dict[str, Any]:
        """Teacher vs. student on ``test``: metrics.json content, plots and figures in ``folder``."""
        from kdflow.train.loop import predict

        logits = {k: predict(m, test.features) for k, m in models.items()}
        inputs = self.latency_inputs(test)
        per = {k: evaluation.model_metrics(models[k], logits[k], test.labels, test.num_classes,
                                           input_shape=test.input_shape, latency_inputs=inputs,
                                           repeats=latency_repeats, threads=latency_threads, ece_bins=ece_bins)
               for k in models}
        metrics = evaluation.compare(per, logits, names["teacher"], len(test))
        evaluation.write_pictures(folder, names["teacher"], logits, test.labels, test.num_classes, ece_bins, per,
                                  histories)
        return metrics

    def seed_metrics(self, teacher: nn.Module, students: dict[int, nn.Module], test: Dataset) -> dict[str, Any]:
        """Test accuracy, agreement and gap of every seed's student: mean, std, min, max (``student.seeds``)."""
        from kdflow.train.loop import predict

        return evaluation.seed_metrics(predict(teacher, test.features),
                                       {k: predict(m, test.features) for k, m in students.items()}, test.labels)

    def headline(self, m: dict[str, Any]) -> dict[str, float]:
        return {"teacher_accuracy": m["teacher"]["accuracy"], "student_accuracy": m["student"]["accuracy"],
                "agreement": m["agreement"], "params_ratio": m["compression"]["params_ratio"]}

    def summary_rows(self, m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        return evaluation.summary_rows(m)

    def summary_line(self, m: dict[str, Any]) -> str:
        return (f"agreement {m['agreement']:.4f}   KL(teacher||student) {m['kl_teacher_student']:.4f}   "
                f"teacher: {m['teacher']['name']}")

    def report_section(self, m: dict[str, Any]) -> str:
        return evaluation.report_section(m)

    def dvc_plots(self) -> list[dict[str, Any]]:
        return evaluation.DVC_PLOTS


TRACKS.register("classify")(ClassifyTrack())
