"""Seeded, replayable augmentations: random resized crops (and flips) stored as explicit boxes.

A *view* of a sample is fully described by its row in a views table: the RNG ``seed`` it was drawn
from, the crop ``box`` and the ``flip`` bit. ``draw_views`` derives every view's seed from
``(seed, sample, view)`` with a counter-based generator (splitmix64, vectorised in numpy), and
the box from that seed alone, so the table is the same on every machine and for any batching.
``apply_views`` rebuilds the augmented inputs from the stored boxes; the teacher (logits stage)
and the student (replay) call it with the same boxes and get bit-identical tensors.

- images ``[C, H, W]``: crop ``box = (top, left, height, width)`` whose area is a uniform share
  in ``[scale_min, scale_max]`` of the image and whose aspect ratio is log-uniform in
  ``[ratio_min, ratio_max]``, resized back to ``H x W`` (bilinear), then mirrored left-right
  when ``flip`` is set (each view with probability 1/2 when ``Augment.flip``).
- sequences ``[C, L]``: crop ``box = (0, start, 1, length)`` along L with ``length / L`` uniform
  in ``[scale_min, scale_max]``, resized back to L (linear); never flipped (reversing a signal
  does not generally keep its label).
- anything else (tabular rows, graphs): no augmentation is defined; ``draw_views`` raises.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kdflow.errors import DataError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK63 = np.uint64(2**63 - 1)


@dataclass(frozen=True)
class Augment:
    """Parameters of the random resized crop.

    Attributes:
        scale_min: smallest crop area (length for sequences) as a share of the input.
        scale_max: largest share.
        ratio_min: smallest aspect ratio width/height of image crops.
        ratio_max: largest aspect ratio.
        flip: mirror image views left-right with probability 1/2.
    """

    scale_min: float = 0.35
    scale_max: float = 1.0
    ratio_min: float = 3 / 4
    ratio_max: float = 4 / 3
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ValueError(f"augment: need 0 < scale_min <= scale_max <= 1, got "
                             f"{self.scale_min}, {self.scale_max}")
        if not 0 < self.ratio_min <= self.ratio_max:
            raise ValueError(f"augment: need 0 < ratio_min <= ratio_max, got "
                             f"{self.ratio_min}, {self.ratio_max}")

    def as_dict(self) -> dict:
        return asdict(self)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of ``x`` (uint64, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def view_seeds(seed: int, num_samples: int, views: int) -> torch.Tensor:
    """The 63-bit seed of every view, ``[num_samples * views]`` int64, row ``sample * views + view``."""
    rows = np.arange(num_samples * views, dtype=np.uint64)
    base = _splitmix64(np.asarray([seed % 2**64], dtype=np.uint64))
    return torch.from_numpy((_splitmix64(base ^ _splitmix64(rows)) & _MASK63).astype(np.int64))


def uniforms(seeds: torch.Tensor, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) per seed, ``[R, count]`` float64, a function of the seed only."""
    s = seeds.numpy().astype(np.uint64)[:, None]  # [R, 1]
    with np.errstate(over="ignore"):
        z = _splitmix64(s + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)  # [R, count]


def boxes_from_seeds(seeds: torch.Tensor, shape: tuple[int, ...], aug: Augment
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop boxes ``[R, 4]`` int32 (top, left, height, width) and flips ``[R]`` uint8 drawn from
    each view's seed, for inputs of ``shape`` (``[C, H, W]`` or ``[C, L]``)."""
    u = uniforms(seeds, 5)  # [R, 5]
    share = aug.scale_min + (aug.scale_max - aug.scale_min) * u[:, 0]
    if len(shape) == 3:
        _, height, width = shape
        log_r = math.log(aug.ratio_min) + (math.log(aug.ratio_max) - math.log(aug.ratio_min)) * u[:, 1]
        area = share * height * width
        w = np.clip(np.rint(np.sqrt(area * np.exp(log_r))), 1, width)
        h = np.clip(np.rint(np.sqrt(area / np.exp(log_r))), 1, height)
        top = np.floor(u[:, 2] * (height - h + 1))
        left = np.floor(u[:, 3] * (width - w + 1))
        flip = (u[:, 4] < 0.5) & aug.flip
    else:
        (_, length), h, top = shape, np.ones_like(share), np.zeros_like(share)
        w = np.clip(np.rint(share * length), 1, length)
        left = np.floor(u[:, 3] * (length - w + 1))
        flip = np.zeros(len(share), dtype=bool)
    box = np.stack([top, left, h, w], axis=1).astype(np.int32)
    return torch.from_numpy(box), torch.from_numpy(flip.astype(np.uint8))


def draw_views(shape: tuple[int, ...], modality: str, num_samples: int, views: int, seed: int,
               aug: Augment) -> dict[str, torch.Tensor]:
    """The views table of ``num_samples`` samples x ``views`` views, rows sample-major.

    Returns:
        ``sample`` ``[R]`` int64, ``view`` ``[R]`` int64, ``seed`` ``[R]`` int64, ``box`` ``[R, 4]``
        int32, ``flip`` ``[R]`` uint8, with ``R = num_samples * views``.

    Raises:
        DataError: the modality has no augmentation (tabular, graphs).
    """
    if modality not in ("image", "sequence") or len(shape) != (3 if modality == "image" else 2):
        raise DataError(f"logits.views > 1 needs image [C, H, W] or sequence [C, L] samples; "
                        f"this dataset is {modality} {list(shape)}: set logits.views to 1")
    rows = torch.arange(num_samples * views, dtype=torch.int64)
    seeds = view_seeds(seed, num_samples, views)
    box, flip = boxes_from_seeds(seeds, shape, aug)
    return {"sample": rows // views, "view": rows % views, "seed": seeds, "box": box, "flip": flip}


def _axis(start: torch.Tensor, size: torch.Tensor, out_len: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear sampling along one axis of crops ``[start, start + size)`` resized to
    ``out_len`` (half-pixel centres, clamped to the crop): the two source indices
    ``[B, out_len]`` and the weight of the second."""
    i = torch.arange(out_len, dtype=torch.float64)
    size = size.long()[:, None]  # [B, 1]
    src = ((i[None] + 0.5) * size.double() / out_len - 0.5).clamp(min=0.0)  # [B, out]
    src = torch.minimum(src, (size - 1).double())
    i0 = src.floor().long()
    i1 = torch.minimum(i0 + 1, size - 1)
    start = start.long()[:, None]
    return start + i0, start + i1, src - i0


def apply_views(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each input ``x[i]`` to ``box[i]``, resize it back (bilinear / linear, half-pixel
    centres, as ``F.interpolate(align_corners=False)``), mirror it if ``flip[i]``; one
    vectorised gather for the whole batch.

    Args:
        x: ``[B, C, H, W]`` images or ``[B, C, L]`` sequences (float).
        box: ``[B, 4]`` (top, left, height, width); for sequences ``(0, start, 1, length)``.
        flip: ``[B]`` 0/1.

    Returns:
        A new tensor shaped like ``x``.
    """
    if x.shape[0] != box.shape[0] or box.shape[0] != flip.shape[0]:
        raise ValueError(f"apply_views: {x.shape[0]} inputs, {box.shape[0]} boxes, "
                         f"{flip.shape[0]} flips")
    if x.ndim not in (3, 4):
        raise ValueError(f"apply_views: need [B, C, H, W] or [B, C, L], got {tuple(x.shape)}")
    box = box.long()
    x0, x1, wx = _axis(box[:, 1], box[:, 3], x.shape[-1])  # [B, W]
    if x.ndim == 3:
        return _lerp(x, 2, x0, x1, wx)
    y0, y1, wy = _axis(box[:, 0], box[:, 2], x.shape[-2])  # [B, H]
    out = _lerp(_lerp(x, 2, y0, y1, wy), 3, x0, x1, wx)  # rows, then columns
    mirrored = flip.bool()[:, None, None, None]
    return torch.where(mirrored, out.flip(-1), out).contiguous()


def _lerp(x: torch.Tensor, dim: int, i0: torch.Tensor, i1: torch.Tensor, w: torch.Tensor
          ) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` between per-sample indices ``i0``/``i1``
    ``[B, out]`` with weights ``w`` of ``i1``."""
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[dim] = i0.shape[1]
    size = list(x.shape)
    size[dim] = i0.shape[1]
    w = w.to(x.dtype).reshape(shape)
    return (1 - w) * x.gather(dim, i0.reshape(shape).expand(size)) \
        + w * x.gather(dim, i1.reshape(shape).expand(size))
