"""Inference latency of a model on random input, as median and p90 over repeats."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from kdflow.train.device import torch_threads


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    *,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    inputs: Any | None = None,
) -> dict:
    """Times ``model`` forward passes on a random ``[batch_size, *input_shape]`` float32 input.

    Runs in eval mode under ``torch.inference_mode`` on the model's device (CPU for kdflow's
    reports); the model's train/eval mode and torch's thread count are restored afterwards.

    Args:
        model: the network to time.
        input_shape: shape of one sample, without the batch dimension.
        batch_size: number of samples per forward pass.
        repeats: timed forward passes.
        warmup: untimed forward passes first.
        threads: intra-op threads while timing (``None`` keeps the current setting).
        inputs: a real batch of ``batch_size`` samples to time instead of random input (graphs,
            whose shape alone does not define an input); anything with ``.to(device)``.

    Returns:
        ``median_ms``, ``p90_ms``, ``repeats`` and ``batch_size``.
    """
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1 (got {repeats}, {batch_size})")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG untouched
    if inputs is not None:
        x = inputs.to(device)
    else:
        x = torch.randn((batch_size, *input_shape), generator=generator).to(device)  # [B, *input_shape]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    was_training = model.training
    times_ms: list[float] = []
    try:
        model.eval()
        with torch_threads(threads), torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync()
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                sync()
                times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return {
        "median_ms": float(np.median(times_ms)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "repeats": repeats,
        "batch_size": batch_size,
    }
