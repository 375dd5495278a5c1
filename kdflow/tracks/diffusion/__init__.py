"""The ``diffusion`` track: a many-step diffusion teacher distilled into a 1-4 step generator.

- Data: the image sources kdflow reads (``sklearn:digits``, ``idx:<dir>`` for MNIST / Fashion-MNIST
  IDX files), resized to ``data.options.size`` and scaled to [-1, 1].
- Teachers: ``ddpm_unet``, a ``diffusers`` ``UNet2DModel`` (class-conditional unless
  ``conditional: false``) trained with the DDPM objective, or a local ``save_pretrained`` folder
  (a UNet2DModel folder, or a pipeline / kdflow folder with ``unet/`` and ``scheduler/``).
- ``condense.method: noise`` draws the generator inputs: seeded Gaussian noise with a class each
  (and a training image each, for GAN terms), and fixes the teacher's DDIM schedule for the cache.
- Teacher signal (``logits`` stage, a dense cache): for each noise, the teacher's deterministic
  DDIM trajectory in ``teacher_steps`` steps, stored as ``states`` states (the endpoint last).
- Students: ``few_step_unet`` (LCM boundary condition), trained by one of the track's losses:
  ``diffusion_regression`` (Luhman & Luhman), ``consistency`` (consistency distillation),
  ``dmd`` (DMD2: fake score, two time-scale updates, optional GAN); exported as a diffusers
  pipeline folder (``pipeline.FewStepPipeline``).
- Evaluation: FID / precision / recall / class coverage in the features of a classifier trained
  on half of the test split (not Inception FID), latency; teacher at 1/2/4/10/50 DDIM steps vs.
  student at its declared steps; sample grids.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdflow.condense import CONDENSERS, Report
from kdflow.data.dataset import Dataset, load_dataset, save_dataset
from kdflow.data.sources import SOURCES, load_source
from kdflow.errors import DataError, ModelError
from kdflow.losses import LOSSES
from kdflow.select import STRATEGIES, SelectionData
from kdflow.tracks import TRACKS, offered
from kdflow.tracks.diffusion import evaluation, losses  # noqa: F401  (losses register)
from kdflow.tracks.diffusion.losses.denoise import DenoiseLoss
from kdflow.tracks.diffusion.models import (PREDICTIONS, UNET_ARGS, Denoiser, FewStepGenerator, build_unet, find_unet,
                                            load_diffusion, load_unet, save_diffusion)
from kdflow.tracks.diffusion.sampling import check_schedule, ddim, generate
from schemas.base import Section

log = logging.getLogger(__name__)

IMAGE_OWNERS = ("classify", "diffusion")  # tracks whose image sources this track reads
VAL_ROWS = 256  # validation images a teacher's DDPM loss is scored on per epoch
# Validation images a student's pixel-space FD is scored on per epoch (all of them when fewer). FD is
# biased when the rows are few next to the pixels (256 rows of 16x16 = 256 dimensions): on
# configs/fashion-mnist-dmd.yaml 256 rows kept epoch 8 of 64 (classifier-feature FID 4.71), 1,000 rows
# rank the epochs as that FID does (epoch 56: 3.35); see README "Diffusion distillation".
STUDENT_VAL_ROWS = 1024
ARCH_ARGS = {
    "ddpm_unet": {*UNET_ARGS, "conditional", "prediction_type"},
    "few_step_unet": {*UNET_ARGS, "init", "steps"},
}


# -- generator inputs: the noise set the teacher's trajectories are cached for ----------------------

@dataclass
class Latents:
    """Generator inputs that index like a tensor: noise ``[N, C, H, W]``, classes ``[N]`` and the
    teacher's DDIM schedule for the cache (``steps`` DDIM steps kept as ``states`` states)."""

    noise: Tensor
    labels: Tensor
    steps: int
    states: int
    shape: torch.Size = field(init=False)

    def __post_init__(self) -> None:
        self.shape = self.noise.shape

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, idx: Any) -> Latents:
        return Latents(self.noise[idx], self.labels[idx], self.steps, self.states)


class NoiseParams(Section):
    method: Literal["noise"] = Field("noise", description="Seeded Gaussian noise (with a class each) for which the teacher's DDIM trajectories are cached.")
    samples: int | None = Field(None, ge=1, le=10_000_000, description="Noise samples (null: as many as training images).")
    teacher_steps: int = Field(50, ge=1, le=1000, description="DDIM steps of the teacher's cached trajectories.")
    states: int = Field(10, ge=1, le=100, description="Trajectory states kept per noise (the endpoint last): a divisor of teacher_steps and of 1000.")


@CONDENSERS.register("noise", params=NoiseParams, tracks=("diffusion",), needs_teacher=False, provides=("real",))
def noise(train: Dataset, *, teacher: nn.Module | None, seed: int, device: torch.device, report: Report | None,
          samples: int | None, teacher_steps: int, states: int) -> Dataset:
    """``samples`` seeded noises; each takes the class and image of a training row (a seeded
    permutation, cycled), so the classes follow the training distribution."""
    check_schedule(teacher_steps, states)
    n = samples or len(train)
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.randperm(len(train), generator=g) for _ in range(-(-n // len(train)))])[:n]
    z = torch.randn((n, *train.input_shape), generator=g)
    meta = {"latents": {"teacher_steps": teacher_steps, "states": states}, "seed": seed,
            **{k: train.meta[k] for k in ("size", "source") if k in train.meta}}
    return Dataset(Latents(z, train.labels[rows].clone(), teacher_steps, states), train.labels[rows].clone(),
                   [f"noise-{i:06d}" for i in range(n)], ["train"] * n, train.num_classes, "image",
                   extras={"real": train.features[rows].clone()}, meta=meta)


# -- validation and selection --------------------------------------------------------------------

def _val_rows(x: Tensor, y: Tensor, rows: int = VAL_ROWS) -> tuple[Tensor, Tensor]:
    return x[:rows], y[:rows]


def denoise_mse(model: Denoiser, x: Tensor, y: Tensor, device: torch.device, seed: int = 0) -> float:
    """The DDPM loss on ``x`` at seeded time steps and noise (lower is better)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, model.timesteps, (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    model.to(device).eval()
    with torch.no_grad():
        x, t, noise, y = x.to(device), t.to(device), noise.to(device), y.to(device)
        out = model(model.noised(x, noise, t), t, y)
        return float(F.mse_loss(out.float(), model.target(x, noise, t).float()))


def pixel_fd(model: FewStepGenerator, x: Tensor, y: Tensor, device: torch.device, seed: int = 0) -> float:
    """Fréchet distance in pixel space between one-step samples and ``x`` (the student's cheap validation)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(x.shape, generator=g)
    model.to(device).eval()
    with torch.no_grad():
        samples = generate(model, z, y if model.num_classes else None, 1)
    return evaluation.fid(x.flatten(1), samples.flatten(1))


def _val_metric(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int, device: torch.device) -> float:
    net = getattr(model, "module", model)
    if net.kind == "student":
        return -pixel_fd(net, *_val_rows(x, y, STUDENT_VAL_ROWS), device)
    return -denoise_mse(net, *_val_rows(x, y), device)


@STRATEGIES.register("val_denoise", tracks=("diffusion",))
def val_denoise(candidates: dict[str, nn.Module], data: SelectionData) -> list[dict]:
    """Rank diffusion teachers by their DDPM loss on validation images (the score is its negative)."""
    rows = []
    for name, model in candidates.items():
        mse = denoise_mse(model, *_val_rows(data.val_x, data.val_y), data.device)
        rows.append({"teacher": name, "score": -mse, "val_denoise_mse": mse})
    return rows


def _image_data(ds: Dataset, size: int | None, where: str) -> Dataset:
    """Square images resized to ``size`` and scaled from [0, 1] to [-1, 1]."""
    x = ds.features
    if ds.modality != "image" or not isinstance(x, Tensor) or x.dim() != 4:
        raise DataError(f"{where}: the diffusion track takes images [N, C, H, W], got {ds.modality} "
                        f"{list(getattr(x, 'shape', []))}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{where}: pixel values must lie in [0, 1] (found {lo:.3g}..{hi:.3g})")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[2])
    ds.features = (x.clamp(0, 1) * 2 - 1).contiguous()
    ds.meta.update(size=int(ds.features.shape[-1]), value_range=[-1, 1])
    return ds


# -- the track ------------------------------------------------------------------------------------

class DiffusionTrack:
    """Diffusion models distilled into few-step generators."""

    name = "diffusion"
    summary = "image diffusion (diffusers UNet2DModel): DDIM-trajectory cache; few-step students; FID in classifier space"
    views_supported = False
    fidelity_rows = 4  # each is a full teacher trajectory

    # -- the dataset artifact -----------------------------------------------------------------
    def load_source(self, spec: str, *, seed: int, val_fraction: float, test_fraction: float,
                    options: dict[str, Any]) -> Dataset:
        scheme = spec.partition(":")[0]
        owner = SOURCES.meta(scheme).get("track", "classify") if scheme in SOURCES else "classify"
        if owner not in IMAGE_OWNERS:
            raise DataError(f"data.source: {scheme!r} is data of track {owner!r}; the diffusion track reads images "
                            "(sklearn:digits, idx:<dir>)")
        opts = dict(options)
        size = opts.pop("size", None)
        if size is not None and (not isinstance(size, int) or not 4 <= size <= 512):
            raise DataError(f"data.options.size: an image side in pixels, 4..512 (got {size!r})")
        ds = load_source(spec, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, options=opts)
        return _image_data(ds, size, f"data.source {spec!r}")

    def save(self, ds: Dataset, folder: Path) -> None:
        if isinstance(ds.features, Latents):
            ds = Dataset(ds.features.noise, ds.labels, ds.sample_ids, ds.splits, ds.num_classes, ds.modality,
                         ds.extras, ds.meta)
        save_dataset(ds, folder)

    def load(self, folder: Path) -> Dataset:
        ds = load_dataset(folder)
        spec = ds.meta.get("latents")
        if spec:
            ds.features = Latents(ds.features, ds.labels, int(spec["teacher_steps"]), int(spec["states"]))
        return ds

    def describe(self, ds: Dataset) -> dict[str, Any]:
        return {"num_classes": ds.num_classes, "modality": "image", "input_shape": list(ds.input_shape),
                "track": self.name}

    # -- models and the teacher signal ----------------------------------------------------------
    def architectures(self) -> list[str]:
        return sorted(ARCH_ARGS)

    def model_problems(self, arch: str, args: dict[str, Any], where: str) -> list[str]:
        if arch not in ARCH_ARGS:
            close = difflib.get_close_matches(arch, list(ARCH_ARGS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return [f"{where}.arch: unknown architecture {arch!r} for track 'diffusion'; {hint}(known: {', '.join(ARCH_ARGS)})"]
        problems = [f"{where}.args.{k}: unknown argument of {arch!r} (known: {', '.join(sorted(ARCH_ARGS[arch]))})"
                    for k in sorted(set(args) - ARCH_ARGS[arch])]
        if args.get("prediction_type", "v_prediction") not in PREDICTIONS:
            problems.append(f"{where}.args.prediction_type: must be one of {list(PREDICTIONS)} (got {args['prediction_type']!r})")
        steps = args.get("steps", [1])
        if not isinstance(steps, list) or not steps or not all(isinstance(s, int) and s >= 1 for s in steps):
            problems.append(f"{where}.args.steps: a list of step counts >= 1 (got {steps!r})")
        if args.get("init", "teacher") not in ("teacher", "scratch"):
            problems.append(f"{where}.args.init: 'teacher' (copy its weights) or 'scratch' (got {args['init']!r})")
        return problems

    def create_model(self, arch: str, ds: Dataset, args: dict[str, Any], teacher: Path | None = None) -> nn.Module:
        problems = self.model_problems(arch, args, "args")
        if problems:
            raise ModelError("; ".join(problems))
        unet_args = {k: args[k] for k in UNET_ARGS if k in args}
        shape = tuple(ds.input_shape)
        if arch == "ddpm_unet":
            classes = ds.num_classes if args.get("conditional", True) else None
            return Denoiser(build_unet(shape, classes, **unet_args), args.get("prediction_type", "v_prediction"))
        if not isinstance(ds.features, Latents):
            raise ModelError("few_step_unet trains on generator inputs: use condense.method 'noise'")
        states = ds.features.states
        if teacher is None:
            raise ModelError("few_step_unet is distilled from a teacher: none was given")
        ref = load_diffusion(teacher)
        if tuple(ref.image_shape) != shape:
            raise ModelError(f"{teacher}: the teacher makes {list(ref.image_shape)} images, the data has {list(shape)}")
        if args.get("init", "teacher") == "teacher":
            if unet_args:
                raise ModelError(f"args {sorted(unet_args)}: a student initialised from the teacher has its architecture; "
                                 "use init: scratch for another one")
            unet = ref.unet
        else:
            unet = build_unet(shape, ref.num_classes, **unet_args)
        model = FewStepGenerator(unet, ref.prediction_type, ref.schedule, args.get("steps", [1, 2, 4]), states)
        model.teacher_dir = Path(teacher)
        return model

    def load_checkpoint(self, spec: str, root: Path, out: Path) -> nn.Module:
        """A ``save_pretrained`` UNet2DModel folder, or a pipeline / kdflow folder with ``unet/``:
        stored in ``out`` in the track's layout (``unet/``, ``scheduler/``, ``model.json``)."""
        src = (Path(root) / spec).resolve()
        if not src.is_dir():
            raise ModelError(f"checkpoint: folder not found: {src}")
        model = load_diffusion(src)
        if model.kind != "teacher":
            raise ModelError(f"checkpoint: {src} is a distilled student, not a teacher")
        save_diffusion(model, out)
        return model

    def checkpoint_problems(self, spec: str, root: Path, where: str) -> list[str]:
        src = (Path(root) / spec).resolve()
        if not src.is_dir():
            return [f"{where}: folder not found: {src}"]
        try:
            load_unet(find_unet(src)[0])
        except ModelError as exc:
            return [f"{where}: {exc}"]
        return []

    def load_model(self, folder: Path) -> nn.Module:
        return load_diffusion(folder)

    def save_model(self, model: nn.Module, folder: Path) -> None:
        save_diffusion(model, folder)

    def teacher_outputs(self, model: nn.Module, x: Any, *, batch_size: int, device: torch.device) -> Tensor:
        """The teacher's DDIM trajectory states of generator inputs ``x``: ``[N, K*C*H*W]`` (float32, CPU)."""
        if not isinstance(x, Latents):
            raise DataError("the diffusion teacher's cache is built for generator inputs: use condense.method 'noise'")
        model.to(device).eval()
        outs = []
        for i in range(0, len(x), batch_size):
            part = x[i : i + batch_size]
            y = part.labels.to(device) if model.num_classes else None
            outs.append(ddim(model, part.noise.to(device), y, part.steps, keep=part.states).flatten(1).float().cpu())
        return torch.cat(outs)

    def output_dim(self, ds: Dataset) -> int:
        per_image = int(np.prod(ds.input_shape))
        return per_image * (ds.features.states if isinstance(ds.features, Latents) else 1)

    def cache_layout(self, ds: Dataset) -> dict[str, int]:
        return {}

    # -- training -----------------------------------------------------------------------------
    def teacher_loss(self) -> Any:
        return DenoiseLoss()

    def fit_inputs(self, ds: Dataset, loss: Any = None) -> dict[str, Any]:
        if isinstance(ds.features, Latents):
            return {"x": ds.features.noise, "y": ds.labels, **({"real": ds.extras["real"]} if "real" in ds.extras else {})}
        return {"x": ds.features, "y": ds.labels}

    def val_pair(self, ds: Dataset) -> tuple[Any, Tensor]:
        return ds.features, ds.labels

    def val_metric(self) -> Any:
        """Teachers: the negative DDPM loss on validation images; students: the negative pixel-space
        Fréchet distance of their one-step samples to the validation images."""
        return ("score", _val_metric)

    def val_score(self, model: nn.Module, ds: Dataset, device: torch.device) -> dict[str, float]:
        if tuple(model.image_shape) != tuple(ds.input_shape):
            raise DataError(f"the model makes {list(model.image_shape)} images but the data holds {list(ds.input_shape)} "
                            "(data.options.size)")
        if model.num_classes not in (None, ds.num_classes):
            raise DataError(f"the model is conditioned on {model.num_classes} classes, the data has {ds.num_classes}")
        if model.kind == "student":
            return {"val_pixel_fd": pixel_fd(model, *_val_rows(ds.features, ds.labels, STUDENT_VAL_ROWS), device)}
        return {"val_denoise_mse": denoise_mse(model, *_val_rows(ds.features, ds.labels), device)}

    def views(self, ds: Dataset, k: int, seed: int, augment: dict[str, Any]) -> None:
        raise DataError(f"logits.views: the diffusion track has no augmented views; use logits.views 1 (got {k})")

    # -- what it offers -------------------------------------------------------------------------
    def offers(self, kind: str) -> list[str]:
        if kind == "condenser":
            return ["noise"]
        if kind == "format":
            return ["dense"]
        registry = {"loss": LOSSES, "strategy": STRATEGIES}[kind]
        return offered(registry, self.name, ())

    # -- selection, condensation, evaluation ------------------------------------------------------
    def selection_data(self, ds: Dataset, seed: int, device: torch.device) -> SelectionData:
        return SelectionData.of_splits(ds, seed, device)

    def condense_figure(self, ds: Dataset, folder: Path, title: str) -> None:
        return None  # noise: nothing to look at

    def evaluate(self, models: dict[str, nn.Module], test: Dataset, *, names: dict[str, str],
                 histories: dict[str, list[dict]], latency_repeats: int, latency_threads: int | None,
                 ece_bins: int, folder: Path) -> dict[str, Any]:
        return evaluation.evaluate(models, test.features, test.labels, test.num_classes, teacher_name=names["teacher"],
                                   latency_repeats=latency_repeats, latency_threads=latency_threads, folder=folder)

    def headline(self, m: dict[str, Any]) -> dict[str, float]:
        out = {"teacher_fid_50step": m["teacher"]["steps"]["50"]["fid"]}
        out.update({f"student_fid_{n}step": r["fid"] for n, r in m["student"]["steps"].items()})
        if m.get("goal"):
            out["speedup_vs_50step_b1"] = m["goal"]["speedup_vs_50step_b1"]
        return out

    def summary_rows(self, m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        return evaluation.summary_rows(m)

    def summary_line(self, m: dict[str, Any]) -> str:
        return (f"FID in a classifier's feature space (not Inception), {m['n_reference']} reference images, "
                f"{m['n_generated']} per model; held-out real images: FID {m['fid_real_floor']:.3f} (the floor); "
                f"teacher: {m['teacher']['name']}")

    def report_section(self, m: dict[str, Any]) -> str:
        return evaluation.report_section(m)

    def dvc_plots(self) -> list[dict[str, Any]]:
        return []


TRACKS.register("diffusion")(DiffusionTrack())
