"""The diffusion track's training objectives, one method per file, each a registered loss whose
``run_model(model, batch)`` runs the model itself (``kdflow.train.loop``):

- ``denoise.py``: the DDPM objective that trains teachers (not a student loss);
- ``regression.py``: ``diffusion_regression``, Luhman & Luhman, the cached noise -> image pairs;
- ``consistency.py``: ``consistency``, consistency distillation on the cached trajectory states;
- ``dmd.py``: ``dmd``, distribution matching distillation (DMD / DMD2): a fake-score network
  trained alongside (two time-scale updates), optional paired regression and GAN terms.

A student batch holds ``x`` (the noise ``[B, C, H, W]``), ``y`` (classes ``[B]``), ``real`` (training
images ``[B, C, H, W]``) and ``teacher_logits`` (the cache row: ``K`` trajectory states ``[B, K*C*H*W]``).
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from kdflow.errors import DataError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (its schedule and helpers; calls still go through the wrapper)."""
    return getattr(model, "module", model)


def cached_states(batch: Mapping[str, Tensor], like: Tensor) -> Tensor:
    """The cache rows as ``K`` states ``[B, K, C, H, W]`` of the images ``like`` ``[B, C, H, W]``."""
    rows = batch["teacher_logits"].to(device=like.device, dtype=like.dtype)  # [B, K*D]
    d = like[0].numel()
    if rows.shape[1] % d:
        raise DataError(f"teacher cache rows of {rows.shape[1]} values are not whole {tuple(like.shape[1:])} images; "
                        "rebuild the cache (logits stage) for this data")
    return rows.view(len(rows), rows.shape[1] // d, *like.shape[1:])


from kdflow.tracks.diffusion.losses import consistency, denoise, dmd, regression  # noqa: E402,F401  (register)
