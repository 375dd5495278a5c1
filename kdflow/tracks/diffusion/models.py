"""Diffusion models of the track: a ``diffusers`` UNet2DModel teacher and few-step students.

- ``Denoiser`` (teachers): ``UNet2DModel`` + a DDPM noise schedule; ``forward(x_t, t, y)`` is the
  network's raw output (epsilon, v or x0, by ``prediction_type``), ``x0(x_t, t, y)`` the clean image
  it implies. Trained with the DDPM objective, sampled with DDIM (``sampling.ddim``).
- ``FewStepGenerator`` (students): the same UNet type, read as a consistency function with the
  boundary condition of latent consistency models (``diffusers.LCMScheduler``):
  ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)``, ``c_skip = s^2 / ((10 t)^2 + s^2)``,
  ``c_out = 10 t / sqrt((10 t)^2 + s^2)``, ``s = 0.5``. One step is ``f(z, T - 1)``; several steps
  re-noise and apply ``f`` again at the LCM scheduler's time steps (``sampling.few_step``).

Both save as ``diffusers`` folders (``unet/`` and ``scheduler/`` with ``save_pretrained``) plus
``model.json`` (what kdflow needs to rebuild the wrapper); students also as a loadable pipeline
(``pipeline.FewStepPipeline``: ``model_index.json``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdflow.errors import ModelError

log = logging.getLogger(__name__)

SPEC_FILE = "model.json"
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # the LCM scheduler's boundary-condition constants
UNET_ARGS = ("channels", "layers_per_block", "attention", "norm_groups")


def build_unet(image_shape: tuple[int, ...], num_classes: int | None, *, channels: list[int] | tuple[int, ...] = (32, 64),
               layers_per_block: int = 1, attention: bool = False, norm_groups: int = 8) -> nn.Module:
    """A ``diffusers.UNet2DModel`` for ``[C, H, W]`` images (class-conditional with ``num_classes``)."""
    from diffusers import UNet2DModel

    c, h, w = image_shape
    if h != w:
        raise ModelError(f"the UNet takes square images, got {h}x{w}")
    if h % 2 ** (len(channels) - 1):
        raise ModelError(f"args.channels: {len(channels)} levels halve {h}x{w} images {len(channels) - 1} times; "
                         "use fewer levels or a size divisible by 2^(levels-1)")
    if any(ch % norm_groups for ch in channels):
        raise ModelError(f"args.channels: every width must be a multiple of norm_groups={norm_groups} (got {list(channels)})")
    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    if attention and len(channels) > 1:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=tuple(channels),
                       layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       num_class_embeds=num_classes, norm_num_groups=norm_groups)


def alphas_cumprod(schedule: dict[str, Any]) -> Tensor:
    """``alpha_bar_t`` for t = 0..T-1 of a DDPM schedule (the same numbers diffusers' schedulers use)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule).alphas_cumprod.float()


class _Diffusion(nn.Module):
    """A UNet with its noise schedule and output parametrisation."""

    kind = "teacher"

    def __init__(self, unet: nn.Module, prediction_type: str = "v_prediction",
                 schedule: dict[str, Any] | None = None) -> None:
        super().__init__()
        if prediction_type not in PREDICTIONS:
            raise ModelError(f"args.prediction_type: must be one of {list(PREDICTIONS)} (got {prediction_type!r})")
        self.unet = unet
        self.prediction_type = prediction_type
        self.schedule = dict(schedule or SCHEDULE)
        self.register_buffer("alphas_cumprod", alphas_cumprod(self.schedule), persistent=False)

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_class_embeds

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def timesteps(self) -> int:
        return int(self.schedule["num_train_timesteps"])

    def raw(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The UNet's output at ``x_t`` ``[B, C, H, W]``, time steps ``t`` ``[B]`` and classes ``y`` ``[B]``."""
        labels = y.long() if (y is not None and self.num_classes) else None
        return self.unet(x_t, t, class_labels=labels).sample

    def abar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod.to(t.device)[t.long()].view(-1, 1, 1, 1)  # [B, 1, 1, 1]

    def x0_from(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The clean image implied by the raw output ``out`` at ``(x_t, t)``."""
        a = self.abar(t)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt()
        if self.prediction_type == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * out
        return out

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the raw output should be for ``x_t = sqrt(a) x0 + sqrt(1 - a) noise``."""
        a = self.abar(t)
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        return x0

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self.abar(t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def x0(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.x0_from(self.raw(x_t, t, y), x_t, t)


class Denoiser(_Diffusion):
    """The teacher: ``forward`` is the UNet's raw output (what the DDPM loss regresses)."""

    kind = "teacher"

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.raw(x_t, t, y)


def boundary_scalings(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` of the LCM boundary condition at integer time steps ``t`` (``[B, 1, 1, 1]``)."""
    scaled = t.float().view(-1, 1, 1, 1) * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


class FewStepGenerator(_Diffusion):
    """A student: ``forward(x_t, t, y)`` is the consistency function ``f(x_t, t)`` (an image).

    Attributes:
        steps: the step counts it was distilled for (sampling with others is refused).
        cached_states: ``K``, the teacher trajectory's stored states (the LCM scheduler's
            ``original_inference_steps``).
        teacher_dir: the teacher's folder (its initialisation; losses that need the live teacher read it).
    """

    kind = "student"

    def __init__(self, unet: nn.Module, prediction_type: str = "v_prediction", schedule: dict[str, Any] | None = None,
                 steps: list[int] | tuple[int, ...] = (1, 2, 4), cached_states: int = 10) -> None:
        super().__init__(unet, prediction_type, schedule)
        self.steps = [int(s) for s in steps]
        self.cached_states = int(cached_states)
        self.teacher_dir: Path | None = None
        bad = [s for s in self.steps if not 1 <= s <= self.cached_states]
        if bad:
            raise ModelError(f"student.args.steps: {bad} cannot be sampled: a consistency sampler takes 1.."
                             f"{self.cached_states} steps, the teacher trajectory states cached (condense.states)")

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        c_skip, c_out = boundary_scalings(t)
        return c_skip * x_t + c_out * self.x0(x_t, t, y)


# -- saving and loading ----------------------------------------------------------------------------

def scheduler_config(model: _Diffusion) -> dict[str, Any]:
    common = {**model.schedule, "prediction_type": model.prediction_type, "clip_sample": False,
              "timestep_spacing": "trailing", "set_alpha_to_one": True}
    if isinstance(model, FewStepGenerator):
        return {**common, "original_inference_steps": model.cached_states, "timestep_scaling": TIMESTEP_SCALING}
    return common


def save_diffusion(model: _Diffusion, folder: Path) -> None:
    """``unet/``, ``scheduler/`` (DDIM for teachers, LCM for students), ``model.json``; students
    also ``model_index.json`` (a pipeline folder for ``FewStepPipeline.from_pretrained``)."""
    from diffusers import DDIMScheduler, LCMScheduler

    folder = Path(folder)
    student = isinstance(model, FewStepGenerator)
    scheduler = (LCMScheduler if student else DDIMScheduler)(**scheduler_config(model))
    spec = {"name": "few_step_unet" if student else "ddpm_unet", "kind": model.kind,
            "prediction_type": model.prediction_type, "schedule": model.schedule}
    if student:
        from kdflow.tracks.diffusion.pipeline import save_pipeline

        spec.update(steps=model.steps, cached_states=model.cached_states)
        save_pipeline(model.unet, scheduler, model.steps, folder)
    else:
        model.unet.save_pretrained(folder / "unet", safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the {what} ({exc})") from None


def load_unet(folder: Path) -> nn.Module:
    """A ``UNet2DModel`` from a ``save_pretrained`` folder; a clear error naming the file otherwise."""
    from diffusers import UNet2DModel

    config = Path(folder) / "config.json"
    if not config.is_file():
        raise ModelError(f"{folder}: not a diffusers model folder (no config.json)")
    cls = _read_json(config, "model config").get("_class_name")
    if cls != "UNet2DModel":
        raise ModelError(f"{config}: _class_name is {cls!r}, not a diffusers 'UNet2DModel'")
    weights = [p.name for p in Path(folder).glob("diffusion_pytorch_model*")]
    if not weights:
        raise ModelError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin) weights next to config.json")
    try:
        return UNet2DModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as exc:
        raise ModelError(f"{folder}: cannot load the UNet2DModel ({exc})") from None


def find_unet(folder: Path) -> tuple[Path, Path | None]:
    """The UNet folder and the scheduler folder (or None) of a model folder, a pipeline folder
    (``model_index.json`` + ``unet/`` + ``scheduler/``) or a bare UNet folder."""
    folder = Path(folder)
    if (folder / "unet").is_dir():
        sched = folder / "scheduler"
        return folder / "unet", sched if (sched / "scheduler_config.json").is_file() else None
    if (folder / "config.json").is_file():
        return folder, None
    if (folder / "model_index.json").is_file():
        raise ModelError(f"{folder / 'model_index.json'}: the pipeline has no unet/ folder (only UNet2DModel pipelines are read)")
    raise ModelError(f"{folder}: not a diffusers model: expected unet/ (a pipeline or kdflow folder) or config.json "
                     "(a UNet2DModel save_pretrained folder)")


def load_diffusion(folder: Path) -> _Diffusion:
    """A teacher or student folder written by ``save_diffusion``, or a diffusers folder (a teacher)."""
    folder = Path(folder)
    unet_dir, sched_dir = find_unet(folder)
    unet = load_unet(unet_dir)
    spec_path = folder / SPEC_FILE
    spec = _read_json(spec_path, "model spec") if spec_path.is_file() else {}
    sched = _read_json(sched_dir / "scheduler_config.json", "scheduler config") if sched_dir else {}
    prediction = spec.get("prediction_type", sched.get("prediction_type", "epsilon"))
    schedule = spec.get("schedule") or {k: sched[k] for k in SCHEDULE if k in sched} or dict(SCHEDULE)
    if spec.get("kind") == "student":
        model: _Diffusion = FewStepGenerator(unet, prediction, schedule, spec["steps"], spec["cached_states"])
    else:
        model = Denoiser(unet, prediction, schedule)
    return model.eval()
