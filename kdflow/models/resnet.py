"""A small ResNet of basic blocks, 1-D (``[C, L]``) or 2-D (``[C, H, W]``)."""
from __future__ import annotations

import torch
from torch import nn

from kdflow.errors import ModelError
from kdflow.models import MODELS
from kdflow.models.convnet import as_conv_input, conv_layers


class BasicBlock(nn.Module):
    """conv3-bn-relu-conv3-bn plus a (projected when needed) shortcut, then relu."""

    def __init__(self, conv: type, norm: type, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            proj = conv(c_in, c_out, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(proj, norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv, then one stage per width (stride 2 after the first while size >= 2), GAP, fc."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, widths: list[int], blocks: int
    ) -> None:
        super().__init__()
        conv, norm, _, shape = conv_layers(input_shape, "resnet")
        if not widths or blocks < 1:
            raise ModelError(f"resnet: need widths and blocks >= 1 (got {widths}, {blocks})")
        self.flat = len(input_shape) == 1
        stem = conv(shape[0], widths[0], 3, padding=1, bias=False)
        self.stem = nn.Sequential(stem, norm(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        width, size = widths[0], min(shape[1:])
        for i, w in enumerate(widths):
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0 and size >= 2) else 1
                size = (size + 1) // 2 if stride == 2 else size
                layers.append(BasicBlock(conv, norm, width, w, stride))
                width = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled last stage, ``[B, widths[-1]]``."""
        h = self.stages(self.stem(as_conv_input(x, self.flat)))  # [B, C, *spatial]
        return h.flatten(2).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, K]


@MODELS.register("resnet")
def resnet(
    input_shape: tuple[int, ...], num_classes: int, widths: list[int] | None = None, blocks: int = 1
) -> ResNet:
    """A small ResNet for images ``[C, H, W]`` or sequences ``[C, L]``."""
    sizes = list(widths if widths is not None else [16, 32, 64])
    return ResNet(input_shape, num_classes, sizes, blocks)
