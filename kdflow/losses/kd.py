"""Hinton et al. (2015) knowledge distillation on dense teacher logits."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kdflow.errors import DataError
from kdflow.losses import LOSSES, LossBase, check_args, check_batch
from schemas.methods import KDParams  # torch-free (kdflow/catalog.py)


def kd_loss(s: Tensor, t: Tensor, y: Tensor, T: float, alpha: float) -> Tensor:
    """The plain formula: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``."""
    log_p, log_q = F.log_softmax(t / T, dim=-1), F.log_softmax(s / T, dim=-1)  # [B, C]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return alpha * T**2 * kl + (1 - alpha) * F.cross_entropy(s, y)


def _log_softmax(x: Tensor) -> Tensor:
    """``log_softmax`` over the last dim of ``[B, C]``. With fewer than 16 classes on a CPU it
    runs over the transposed view: PyTorch's last-dim CPU kernel is ~3x slower there (21 vs 6 us
    at [128, 10], one thread); the result is then column-major, same values."""
    if x.shape[-1] < 16 and x.device.type == "cpu":
        return F.log_softmax(x.t(), dim=0).t()
    return F.log_softmax(x, dim=-1)


class _FusedKD(torch.autograd.Function):
    """``kd_loss`` (with per-sample weights) as one autograd node.

    The gradient with respect to the student logits has a closed form,
    ``w_i / W * [alpha * T * (q_i - p_i) + (1 - alpha) * (r_i - onehot(y_i))]`` with
    ``p = softmax(t/T)``, ``q = softmax(s/T)``, ``r = softmax(s)``, per-sample weights ``w`` and
    ``W = sum(w)``; computing it in the forward pass, in place where it can, skips a dozen small
    autograd nodes and temporaries: KD from the cache then costs about what CE costs per step
    (``benchmarks/train_from_cache.py``). ``w`` None: every sample weighs 1 (no weight kernels).
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, y: Tensor, w: Tensor | None, T: float, alpha: float):
        inv_t = 1.0 / T
        log_p = _log_softmax(t * inv_t)  # [B, C]
        log_q = _log_softmax(s * inv_t)  # [B, C]
        log_r = log_q if T == 1.0 else _log_softmax(s)  # [B, C]
        p = log_p.exp()
        if w is None:  # the common case in the fewest kernels (~20; each costs 3-20 us on a CPU)
            b = s.shape[0]
            kd = (p * (log_p - log_q)).sum() * (T * T / b)  # mean KL * T^2
            ce = F.nll_loss(log_r, y)
            grad = log_q.exp().sub_(p).mul_(alpha * T / b)  # [B, C] alpha T (q - p) / B
            grad.add_(log_r.exp(), alpha=(1.0 - alpha) / b)  # + (1 - alpha) r / B
            grad.scatter_add_(1, y[:, None], torch.full_like(grad[:, :1], (alpha - 1.0) / b))  # - onehot
            ctx.save_for_backward(grad)
            ctx.mark_non_differentiable(kd, ce)
            return ce.mul(1.0 - alpha).add_(kd, alpha=alpha), kd, ce
        rows = (p * (log_p - log_q)).sum(-1)  # [B] KL per sample
        nll = -log_r.gather(1, y[:, None])[:, 0]  # [B]
        scale = (w / w.sum())[:, None]  # [B, 1]
        kd, ce = (scale[:, 0] * rows).sum() * T**2, (scale[:, 0] * nll).sum()
        grad = log_q.exp().sub_(p).mul_(alpha * T)  # [B, C] alpha T (q - p)
        grad.add_(log_r.exp(), alpha=1.0 - alpha)  # + (1 - alpha) r
        grad.scatter_add_(1, y[:, None], torch.full_like(grad[:, :1], alpha - 1.0))  # - (1 - alpha) onehot(y)
        ctx.save_for_backward(grad.mul_(scale))
        ctx.mark_non_differentiable(kd, ce)
        return alpha * kd + (1.0 - alpha) * ce, kd, ce

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _kd: Tensor, _ce: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None


@LOSSES.register("kd", params=KDParams, tracks=("classify", "graph", "text"))
class KD(LossBase):
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    Only ``"loss"`` carries gradients; ``"kd"`` and ``"ce"`` are its terms, for logging.

    Args:
        temperature: softening temperature T.
        alpha: weight of the distillation term; ``1 - alpha`` weighs the label term.
    """

    needs: tuple[str, ...] = ("y", "teacher_logits")

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        check_args("kd", temperature, alpha)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        check_batch("kd", self.needs, student_logits, batch)
        s = student_logits.float()  # [B, C]
        t = batch["teacher_logits"].to(device=s.device, dtype=torch.float32)  # [B, C]
        if t.shape != s.shape:
            raise DataError(
                f"loss 'kd': teacher logits {tuple(t.shape)} != student logits {tuple(s.shape)}"
            )
        y = batch["y"].to(s.device).long()  # [B]
        w = batch.get("weight")
        w = None if w is None else w.to(device=s.device, dtype=torch.float32).detach()
        loss, kd, ce = _FusedKD.apply(s, t, y, w, self.temperature, self.alpha)
        return {"loss": loss, "kd": kd, "ce": ce}

    def __repr__(self) -> str:
        return f"KD(temperature={self.temperature}, alpha={self.alpha})"
