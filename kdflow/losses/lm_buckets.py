"""Fused student buckets for the per-token top-k losses: one pass over the ``[N, V]`` logits.

The reference (``lm_tokens.topk_buckets_reference``) builds ``log_softmax(s / T)`` ``[N, V]``, a
bool mask ``[N, V]``, a masked copy ``[N, V]`` and its logsumexp, and lets autograd keep them
all. Here, with ``z = s / T``, ``q = softmax(z)``, ``K`` the k cached ids of a token and ``y``
its label, one forward computes::

    log q_i = log_softmax(z)_i                   (i in K: the k top buckets)
    log q_tail = log sum_{j not in K} q_j        (the tail bucket, summed from q, no cancellation)
    log q_y = log_softmax(z)_y                   (next-token CE at T = 1)

and the backward is analytic: with ``G = dL/d log q_bucket`` ``[N, k + 1]`` and
``H = dL/d log q_y`` ``[N]``::

    dL/dz_j = [j in K] G_j + [j not in K] G_tail q_j / q_tail + [j = y] H - q_j (sum_b G_b + H)

so the only ``[N, V]`` tensor kept between forward and backward is ``q`` with the top-k zeroed.
The divergence of the loss runs on the small ``[N, k + 1]`` buckets under ordinary autograd: for
the forward KL the chain gives ``softmax(z) - target`` (the teacher's top-k probabilities at K,
its tail mass spread like the student's over the rest). A token whose student tail is below
``TINY_TAIL`` takes its tail from an exact masked logsumexp (rare; its rows alone are copied).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kdflow.losses.topk_kd import TAIL_LOG_FLOOR

TINY_TAIL = 1e-30  # below this the float32 sum of q loses the tail (denormals): recomputed exactly


class BucketLogProbs(torch.autograd.Function):
    """``(z [N, V], indices [N, k] int64, labels [N] int64) -> (log q buckets [N, k + 1], log q_y [N])``.

    ``log q_tail`` is floored at ``TAIL_LOG_FLOOR`` (no gradient through the floor), as in
    ``topk_kd.student_bucket_logprobs``. Labels must lie in ``[0, V)`` (pass 0 where none).
    """

    @staticmethod
    def forward(ctx, z: Tensor, indices: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        log_q = torch.log_softmax(z, dim=-1)  # [N, V]
        log_top = log_q.gather(-1, indices)  # [N, k]
        log_y = log_q.gather(-1, labels[:, None]).squeeze(-1)  # [N]
        rest = log_q.exp_().scatter_(-1, indices, 0.0)  # [N, V] in place: q outside the top k
        log_tail = rest.sum(-1).log()  # [N]
        tiny = (log_tail < math.log(TINY_TAIL)).nonzero().flatten()  # [n_tiny]
        z_tiny = z.index_select(0, tiny)  # [n_tiny, V]
        if len(tiny):
            shifted = torch.log_softmax(z_tiny, dim=-1).scatter(-1, indices[tiny], -torch.inf)
            log_tail[tiny] = shifted.logsumexp(-1)
        floored = log_tail < TAIL_LOG_FLOOR  # [N] no gradient through the floor
        ctx.save_for_backward(rest, indices, labels, log_top, log_tail, floored, tiny, z_tiny)
        buckets = torch.cat([log_top, log_tail.clamp_min(TAIL_LOG_FLOOR)[:, None]], dim=-1)
        return buckets, log_y

    @staticmethod
    def backward(ctx, grad_buckets: Tensor, grad_y: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        rest, indices, labels, log_top, log_tail, floored, tiny, z_tiny = ctx.saved_tensors
        k = indices.shape[-1]
        g_tail = grad_buckets[:, k].masked_fill(floored, 0.0)  # [N]
        total = grad_buckets.sum(-1) + grad_y  # [N]
        ratio = torch.where(floored, 0.0, g_tail * torch.exp(-log_tail.clamp_min(TAIL_LOG_FLOOR)))
        ratio[tiny] = 0.0  # those rows take q_j / q_tail in log space below
        grad = rest * (ratio - total)[:, None]  # [N, V]: the ids outside the top k
        if len(tiny):
            share = (torch.log_softmax(z_tiny, dim=-1) - log_tail[tiny, None]).exp()  # q_j / q_tail
            grad[tiny] += share.scatter(-1, indices[tiny], 0.0) * g_tail[tiny, None]
        top = grad_buckets[:, :k] - log_top.exp() * total[:, None]  # [N, k]
        grad.scatter_(-1, indices, top)
        grad.scatter_add_(-1, labels[:, None], grad_y[:, None])
        return grad, None, None


def bucket_logprobs(z: Tensor, indices: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The student's log-probabilities over the k cached ids + a tail bucket ``[N, k + 1]`` and
    at the labels ``[N]``, for logits ``z`` ``[N, V]`` (already divided by T)."""
    return BucketLogProbs.apply(z, indices, labels)
