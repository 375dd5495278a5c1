"""The exported student: a ``diffusers`` pipeline folder (``save_pretrained``) that loads offline.

    from kdflow.tracks.diffusion.pipeline import FewStepPipeline
    pipe = FewStepPipeline.from_pretrained("artifacts/<pipeline>/student")   # local folder, no hub
    images = pipe(batch_size=16, class_labels=[3] * 16, num_inference_steps=1).images  # [16, C, H, W] in [-1, 1]

The folder holds ``model_index.json``, ``unet/`` (``UNet2DModel``) and ``scheduler/``
(``LCMScheduler``); sampling is the LCM scheduler's multi-step consistency algorithm, in one of the
step counts the student was distilled for (``distilled_steps``; others are refused).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from kdflow.errors import ParamsError


@dataclass
class FewStepOutput(BaseOutput):
    images: torch.Tensor  # [B, C, H, W] in [-1, 1]


class FewStepPipeline(DiffusionPipeline):
    """A distilled few-step generator: ``unet`` (UNet2DModel) + ``scheduler`` (LCMScheduler)."""

    def __init__(self, unet, scheduler, distilled_steps: str = "1") -> None:  # noqa: ANN001
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(distilled_steps=str(distilled_steps))

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in str(self.config.distilled_steps).split(",")]

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: list[int] | torch.Tensor | None = None,
                 num_inference_steps: int = 1, generator: torch.Generator | None = None) -> FewStepOutput:
        if num_inference_steps not in self.steps:
            raise ParamsError([f"num_inference_steps: this student was distilled for {self.steps} steps, "
                               f"not {num_inference_steps}"], source="pipeline")
        cfg = self.unet.config
        device = self.unet.device
        if cfg.num_class_embeds and class_labels is None:
            raise ParamsError([f"class_labels: the generator is class-conditional ({cfg.num_class_embeds} classes); "
                               "pass one label per image"], source="pipeline")
        labels = None
        if cfg.num_class_embeds:
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            if len(labels) != batch_size:
                raise ParamsError([f"class_labels: {len(labels)} labels for batch_size {batch_size}"], source="pipeline")
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = torch.randn(shape, generator=generator, device=device)
        self.scheduler.set_timesteps(num_inference_steps)
        denoised = x
        for t in self.scheduler.timesteps:
            out = self.unet(x, t.expand(batch_size).to(device), class_labels=labels).sample
            x, denoised = self.scheduler.step(out, t, x, generator=generator, return_dict=False)
        return FewStepOutput(images=denoised)


def save_pipeline(unet, scheduler, steps: list[int], folder: Path) -> None:  # noqa: ANN001
    """Write the student's pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``)."""
    FewStepPipeline(unet=unet, scheduler=scheduler, distilled_steps=",".join(map(str, steps))).save_pretrained(
        folder, safe_serialization=True)
