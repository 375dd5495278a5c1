"""A plain conv-bn-relu-maxpool network, 1-D (``[C, L]``) or 2-D (``[C, H, W]``), and the
dataset-distillation literature's ConvNet-3 (``convnet3``)."""
from __future__ import annotations

import math

import torch
from torch import nn

from kdflow.errors import ModelError
from kdflow.models import MODELS


def conv_layers(
    input_shape: tuple[int, ...], arch: str
) -> tuple[type, type, type, tuple[int, ...]]:
    """Conv, BatchNorm and MaxPool classes for ``input_shape``, and its normalised form.

    ``[C, L]`` gives 1-D layers, ``[C, H, W]`` 2-D layers; a flat ``[D]`` is treated as ``[1, D]``.
    """
    shape = (1, *input_shape) if len(input_shape) == 1 else tuple(input_shape)
    if len(shape) == 2:
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, shape
    if len(shape) == 3:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, shape
    raise ModelError(
        f"{arch}: input_shape must be [C, L] or [C, H, W] (got {list(input_shape)}); "
        "use 'mlp' for other shapes"
    )


def as_conv_input(x: torch.Tensor, flat: bool) -> torch.Tensor:
    """Add the channel axis to flat ``[B, D]`` inputs (``[B, 1, D]``) when ``flat``."""
    return x.unsqueeze(1) if flat and x.dim() == 2 else x


class ConvNet(nn.Module):
    """[conv -> bn -> relu -> maxpool] * len(channels) -> global avg pool -> hidden -> head."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: list[int],
        kernel_size: int,
        hidden: int,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        conv, norm, pool, shape = conv_layers(input_shape, "convnet")
        if not channels or kernel_size < 1 or hidden < 1:
            raise ModelError(
                "convnet: need channels, kernel_size >= 1 and hidden >= 1 "
                f"(got {channels}, {kernel_size}, {hidden})"
            )
        self.flat = len(input_shape) == 1
        layers: list[nn.Module] = []
        width, size = shape[0], min(shape[1:])
        for c in channels:
            pad = kernel_size // 2
            layers.append(conv(width, c, kernel_size, padding=pad, bias=not batch_norm))
            layers += [norm(c)] if batch_norm else []
            layers.append(nn.ReLU())
            if size >= 2:
                layers.append(pool(2))
                size //= 2
            width = c
        self.body = nn.Sequential(*layers)
        self.hidden = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden-layer activations, ``[B, hidden]``."""
        h = self.body(as_conv_input(x, self.flat))  # [B, C, *spatial]
        return self.hidden(h.flatten(2).mean(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, K]


@MODELS.register("convnet")
def convnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: list[int] | None = None,
    kernel_size: int = 3,
    hidden: int = 128,
    dropout: float = 0.0,
    batch_norm: bool = True,
) -> ConvNet:
    """A small CNN for images ``[C, H, W]`` or sequences ``[C, L]``."""
    chans = list(channels if channels is not None else [32, 64])
    return ConvNet(input_shape, num_classes, chans, kernel_size, hidden, dropout, batch_norm)


@MODELS.register("tiny_convnet")
def tiny_convnet(input_shape: tuple[int, ...], num_classes: int) -> ConvNet:
    """One 4-channel conv block and 8 hidden units, for fast tests."""
    return ConvNet(input_shape, num_classes, [4], 3, 8, 0.0, True)


class ConvNet3(nn.Module):
    """The ConvNet of the dataset-distillation literature (DC, DM, MTT, RDED's small-image student).

    ``depth`` blocks of [conv 3x3 (``width`` channels, bias) -> instance norm (affine) -> ReLU ->
    2x2 average pooling], then one linear layer on the flattened map. Pooling stops once a side is
    below 2. For 28x28 inputs and the defaults: 28 -> 14 -> 7 -> 3, features 128 * 3 * 3 = 1152.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        conv, _, _, shape = conv_layers(input_shape, "convnet3")
        if width < 1 or depth < 1:
            raise ModelError(f"convnet3: need width >= 1 and depth >= 1 (got {width}, {depth})")
        two_d = len(shape) == 3
        norm = nn.InstanceNorm2d if two_d else nn.InstanceNorm1d
        pool = nn.AvgPool2d if two_d else nn.AvgPool1d
        self.flat = len(input_shape) == 1
        layers: list[nn.Module] = []
        channels, spatial = shape[0], list(shape[1:])
        for _ in range(depth):
            layers += [conv(channels, width, 3, padding=1), norm(width, affine=True), nn.ReLU()]
            if min(spatial) >= 2:
                layers.append(pool(2))
                spatial = [s // 2 for s in spatial]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width * math.prod(spatial), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened last feature map, ``[B, width * h * w]``."""
        return self.body(as_conv_input(x, self.flat)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, K]


@MODELS.register("convnet3")
def convnet3(input_shape: tuple[int, ...], num_classes: int, width: int = 128, depth: int = 3) -> ConvNet3:
    """ConvNet-3 of the dataset-distillation literature: 128-channel conv + instance norm + ReLU +
    average pooling blocks (``depth`` 3), then linear; the standard student of image DD tables."""
    return ConvNet3(input_shape, num_classes, width, depth)
