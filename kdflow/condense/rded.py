"""RDED (Sun et al., "On the Diversity and Realism of Distilled Dataset", CVPR 2024).

Per class: cut several random-resized crops out of each of many real images, score each crop by
the teacher's cross-entropy to the true label (low loss = realistic), keep the most confident
crops and stitch ``factor x factor`` of them into one synthetic image of the original size. The
synthetic images carry the teacher's logits as ``extras["soft_labels"]``.

The crop machinery here (boxes, crops, stitching, candidate ranking) is shared with NRR-DD.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.condense import CONDENSERS, Report, per_class_indices
from kdflow.data.dataset import Dataset
from kdflow.errors import DataError
from kdflow.train.loop import predict
from schemas.methods import RdedParams  # torch-free (kdflow/catalog.py)

Box = tuple[int, int, int, int]  # top, left, height, width
TEACHER_BATCH = 512  # teacher inference batch size of rded and nrr_dd
SQUARE = (1.0, 1.0)  # the official RDED crop aspect ratio
STITCH_FROM_PX = 128  # the official scripts stitch 2x2 from 128 px images up, not below


def default_factor(size: tuple[int, int]) -> int:
    """The official RDED stitching factor for ``size`` images: 1 below 128 px, 2 from 128 px up."""
    return 2 if min(size) >= STITCH_FROM_PX else 1


def random_resized_box(
    height: int, width: int, scale: tuple[float, float], g: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A torchvision-style random-resized-crop box: area fraction in ``scale``, aspect in ``ratio``.

    Falls back to the whole image when ten draws do not fit.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    return 0, 0, height, width


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of ``[B, C, h, w]`` to ``size``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def crop_resize(image: torch.Tensor, box: Box, size: tuple[int, int]) -> torch.Tensor:
    """The ``box`` of one ``[C, H, W]`` image, resized to ``size``; returns ``[C, *size]``."""
    top, left, h, w = box
    return resize(image[None, :, top : top + h, left : left + w], size)[0]


def cell_edges(length: int, factor: int) -> list[int]:
    """Cell boundaries of a ``factor``-way split of ``length`` (sizes differ by at most one)."""
    return [round(i * length / factor) for i in range(factor + 1)]


def stitch(patches: torch.Tensor, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """Tile ``factor**2`` patches ``[factor**2, C, h, w]`` row-major into one ``[C, *size]`` image.

    Patch ``k`` fills cell ``(k // factor, k % factor)``; each is resized to its cell, whose size is
    ``size / factor`` rounded so that the cells cover the image exactly.
    """
    if patches.shape[0] != factor * factor:
        raise DataError(f"stitch: need {factor * factor} patches, got {patches.shape[0]}")
    rows, cols = cell_edges(size[0], factor), cell_edges(size[1], factor)
    out = patches.new_zeros(patches.shape[1], *size)
    for k, patch in enumerate(patches):
        i, j = divmod(k, factor)
        cell = (rows[i + 1] - rows[i], cols[j + 1] - cols[j])
        out[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]] = resize(patch[None], cell)[0]
    return out


def check_image_args(train: Dataset, factor: int, scale: tuple[float, float], where: str) -> None:
    """Raise ``DataError`` unless the data are ``[N, C, H, W]`` images that fit ``factor``."""
    if train.features.dim() != 4:
        raise DataError(f"{where}: needs images [N, C, H, W], got {list(train.features.shape)}")
    h, w = train.features.shape[-2:]
    if factor < 1 or factor > min(h, w):
        raise DataError(
            f"{where}: factor must be in [1, {min(h, w)}] for {h}x{w} images (got {factor})"
        )
    if not 0 < scale[0] <= scale[1] <= 1:
        raise DataError(f"{where}: scale must satisfy 0 < low <= high <= 1 (got {list(scale)})")


def candidate_crops(
    images: torch.Tensor, crops_per_image: int, scale: tuple[float, float], g: torch.Generator,
    ratio: tuple[float, float] = SQUARE,
) -> tuple[torch.Tensor, list[Box]]:
    """``crops_per_image`` random-resized crops of each image (square by default, as the official
    RDED sampler), resized back to full size.

    Returns:
        ``[n * crops_per_image, C, H, W]`` crops (image-major) and their boxes.
    """
    h, w = images.shape[-2:]
    crops, boxes = [], []
    for image in images:
        for _ in range(crops_per_image):
            box = random_resized_box(h, w, scale, g, ratio)
            boxes.append(box)
            crops.append(crop_resize(image, box, (h, w)))
    return torch.stack(crops), boxes


def rank_candidates(score: torch.Tensor, crops_per_image: int) -> torch.Tensor:
    """Order crops by ``score`` (lower is better), one per image first.

    The best crop of every image comes first (best image first), then every image's second-best,
    and so on, so the selection spreads over as many source images as possible (RDED's diversity).

    Args:
        score: ``[n * crops_per_image]`` scores, image-major.
    Returns:
        Crop indices, best first.
    """
    per_image = score.view(-1, crops_per_image)  # [n, k]
    within = per_image.argsort(dim=1, stable=True)  # [n, k] crop order inside each image
    order = []
    for r in range(crops_per_image):
        idx = within[:, r] + torch.arange(len(per_image)) * crops_per_image  # [n]
        order.append(idx[score[idx].argsort(stable=True)])
    return torch.cat(order)


def stitch_ranked(
    crops: torch.Tensor, order: torch.Tensor, ipc: int, factor: int, size: tuple[int, int],
) -> torch.Tensor:
    """``[ipc, C, *size]`` images stitched from ``crops`` taken in ``order`` (best first).

    Ranks interleave across cells as in the official RDED code: cell ``j`` of image ``i`` takes
    rank ``j * ipc + i``, so every image gets one of the ``ipc`` best crops in its first cell.
    With fewer candidates than cells, the ranking is reused from the best.
    """
    cells = factor * factor
    rank = torch.arange(cells)[None, :] * ipc + torch.arange(ipc)[:, None]  # [ipc, cells]
    chosen = crops[order[rank.flatten() % len(order)]]  # [ipc * cells, C, H, W], image-major
    grid = chosen.view(ipc, cells, *chosen.shape[1:])
    return torch.stack([stitch(p, factor, size) for p in grid])


def sample_class_images(rows: torch.Tensor, limit: int, g: torch.Generator) -> torch.Tensor:
    """At most ``limit`` of a class's rows, drawn without replacement."""
    return rows[torch.randperm(len(rows), generator=g)[:limit]]


def synthetic_dataset(
    train: Dataset, images: torch.Tensor, labels: torch.Tensor, method: str,
    extras: dict[str, torch.Tensor],
) -> Dataset:
    """Wrap synthetic ``images`` as a train-split dataset with ids ``<method>-c<class>-<k>``."""
    counts: dict[int, int] = {}
    ids = []
    for y in labels.tolist():
        ids.append(f"{method}-c{y}-{counts.get(y, 0)}")
        counts[y] = counts.get(y, 0) + 1
    return Dataset(
        features=images.float().contiguous(), labels=labels.long(), sample_ids=ids,
        splits=["train"] * len(labels), num_classes=train.num_classes, modality=train.modality,
        extras=extras, meta=dict(train.meta),
    )


@CONDENSERS.register("rded", params=RdedParams, tracks=("classify",), needs_teacher=True, provides=())
def rded(
    train: Dataset, *, teacher: nn.Module, seed: int, device: torch.device, report: Report | None,
    ipc: int, factor: int | None, crops_per_image: int, images_per_class: int, scale_min: float,
    scale_max: float,
) -> Dataset:
    """``ipc`` stitched synthetic images per class, labelled with the teacher's soft labels.

    Defaults follow the official RDED scripts: factor by resolution, square random-resized crops
    of area 0.08-1 (torchvision's default scale), 300 source images per class, ranks interleaved
    across cells.

    Args:
        ipc: synthetic images per class.
        factor: each image is a ``factor x factor`` grid of crops (1 keeps single crops); None:
            ``default_factor`` of the image size (1 below 128 px, 2 from 128 px up).
        crops_per_image: random-resized crops scored per real image.
        images_per_class: real images sampled per class as crop sources.
        scale_min, scale_max: area fraction range of the square random-resized crops (the
            official code uses 0.08-1; kdflow's earlier default 0.5-1 is ``scale_min: 0.5``).
        report: called as ``report(classes_done, classes)``.

    Returns:
        ``ipc * num_classes`` images (fewer for a class without images) with
        ``extras["soft_labels"]``: teacher logits ``[N, K]`` of the synthetic images.
    """
    scale = (scale_min, scale_max)
    size = tuple(train.features.shape[-2:])
    factor = factor if factor is not None else default_factor(size)
    check_image_args(train, factor, scale, "rded")
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, rows in enumerate(per_class_indices(train.labels, train.num_classes)):
        if len(rows) == 0:
            continue
        source = train.features[sample_class_images(rows, images_per_class, g)]  # [n, C, H, W]
        crops, _ = candidate_crops(source, crops_per_image, scale, g)  # [n*k, C, H, W]
        logits = predict(teacher, crops, batch_size=TEACHER_BATCH, device=device)  # [n*k, K]
        loss = F.cross_entropy(logits, torch.full((len(crops),), c), reduction="none")  # [n*k]
        order = rank_candidates(loss, crops_per_image)
        images.append(stitch_ranked(crops, order, ipc, factor, size))
        labels.append(torch.full((ipc,), c, dtype=torch.long))
        if report is not None:
            report(c + 1, train.num_classes)
    x = torch.cat(images)  # [N, C, H, W]
    soft = predict(teacher, x, batch_size=TEACHER_BATCH, device=device)  # [N, K]
    return synthetic_dataset(train, x, torch.cat(labels), "rded", {"soft_labels": soft})
