"""Samplers: the teacher's deterministic DDIM (``diffusers.DDIMScheduler``, eta 0, trailing time
steps) and the students' multi-step consistency sampler (``diffusers.LCMScheduler``).

The teacher's trajectory for the cache runs ``steps`` DDIM steps from the noise and keeps ``K``
states: the image at each of the K-step trailing DDIM time steps after the first
(``T - 1 - j T/K`` for ``j = 1..K-1``) and the endpoint. With ``T = 1000``, ``K = 10`` and 50
steps: the states at t = 899, 799, ..., 99 and x0 (``state_times``), which are also the time steps
of the LCM scheduler with ``original_inference_steps = K``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdflow.errors import ParamsError

CLEAN = -1  # the time "step" of a clean image in ``state_times``


def state_times(states: int, timesteps: int = 1000) -> list[int]:
    """Time steps of the K cached states: ``[T-1 - T/K, ..., T/K - 1, CLEAN]`` (``K`` entries)."""
    stride = timesteps // states
    return [timesteps - 1 - j * stride for j in range(1, states)] + [CLEAN]


def check_schedule(steps: int, states: int, where: str = "condense") -> None:
    """The teacher's step count must be a multiple of the stored states (each state is a DDIM step boundary)."""
    problems = []
    if steps % states:
        problems.append(f"{where}.teacher_steps: {steps} DDIM steps cannot be cut into {where}.states={states} equal "
                        f"segments; use a multiple of {states}")
    if 1000 % states:
        problems.append(f"{where}.states: {states} must divide the 1000 training time steps (e.g. 4, 5, 8, 10, 20)")
    if problems:
        raise ParamsError(problems, source=where)


def ddim_scheduler(model, steps: int):  # noqa: ANN001, ANN201
    from diffusers import DDIMScheduler

    from kdflow.tracks.diffusion.models import scheduler_config

    sched = DDIMScheduler(**scheduler_config(model))
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def ddim(model, noise: Tensor, y: Tensor | None, steps: int, keep: int = 0) -> Tensor:  # noqa: ANN001
    """Deterministic DDIM from ``noise`` ``[B, C, H, W]`` in ``steps`` steps.

    Returns the image ``[B, C, H, W]``, or with ``keep = K`` the K states ``[B, K, C, H, W]``
    (``state_times(K)``; the last one is the image).
    """
    if keep and steps % keep:
        raise ParamsError([f"teacher_steps: {steps} DDIM steps do not cut into {keep} states"], source="condense")
    sched = ddim_scheduler(model, steps)
    x, kept = noise, []
    every = steps // keep if keep else 0
    for i, t in enumerate(sched.timesteps):
        out = model.raw(x, t.expand(len(x)).to(x.device), y)
        x = sched.step(out, t, x, eta=0.0).prev_sample
        if keep and (i + 1) % every == 0:
            kept.append(x)
    return torch.stack(kept, 1) if keep else x


@torch.no_grad()
def few_step(model, noise: Tensor, y: Tensor | None, steps: int,  # noqa: ANN001
             generator: torch.Generator | None = None) -> Tensor:
    """A student's sample in ``steps`` consistency steps (the LCM scheduler's algorithm):
    ``x0 = f(x_t, t)``, re-noised to the next time step with fresh noise, ``f`` again."""
    from diffusers import LCMScheduler

    from kdflow.tracks.diffusion.models import scheduler_config

    if steps not in model.steps:
        raise ParamsError([f"steps: the student was distilled for {model.steps} steps, not {steps}"], source="evaluate")
    sched = LCMScheduler(**scheduler_config(model))
    sched.set_timesteps(steps)
    x, denoised = noise, noise
    for t in sched.timesteps:
        out = model.raw(x, t.expand(len(x)).to(x.device), y)
        x, denoised = sched.step(out, t, x, generator=generator, return_dict=False)
    return denoised


def generate(model, noise: Tensor, y: Tensor | None, steps: int, *, batch_size: int = 256,  # noqa: ANN001
             seed: int = 0) -> Tensor:
    """Images of a teacher (DDIM) or a student (consistency sampler), in batches, float32 on CPU."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = []
    model.eval()
    for i in range(0, len(noise), batch_size):
        z = noise[i : i + batch_size].to(device)
        c = None if y is None else y[i : i + batch_size].to(device)
        img = few_step(model, z, c, steps, gen) if model.kind == "student" else ddim(model, z, c, steps)
        outs.append(img.float().cpu())
    return torch.cat(outs)
