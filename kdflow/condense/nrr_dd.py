"""NRR-DD: Tran et al., "Enhancing Dataset Distillation via Non-Critical Region Refinement",
CVPR 2025.

Three steps, per the paper's description:

1. **Critical-based initial data discovery.** As in RDED, cut random-resized crops out of real
   images of a class. Each crop gets a *CAM ratio* (the share of its source image's class
   activation mass that falls inside the crop box) and a teacher *confidence* (softmax probability
   of the true class on the crop). Crops from the top ``cam_pool`` fraction by CAM ratio are kept,
   and among those the least confident are chosen (one per source image first), then stitched
   ``factor x factor`` into synthetic images.
2. **Non-critical region refinement.** ``C`` is the Grad-CAM of each synthetic image for its label,
   min-max normalised to [0, 1]; the mask is ``M = max(0, eps - C)``. Only pixels with ``M > 0``
   are updated, by the paper's masked gradient step ``x <- x - M * eta * grad`` of
   ``CE(teacher(x), y) + bn_weight * BN-matching``, where the BN-matching term sums, over
   BatchNorm layers, ``||mean_batch - running_mean||_2 + ||var_batch - running_var||_2`` of the
   layer's input (SRe2L's form). The step is plain (SGD-like), not Adam: an adaptive optimiser
   normalises each pixel's step and so cancels a soft mask (a pixel with ``M = 0.01`` would move
   as far as one with ``M = 1``); here a pixel's step is proportional to its ``M``.
3. **DBR labels.** For every view the student will train on, the teacher's distances to the
   one-hot original label ``y_i`` (``d_org``) and to the one-hot label of the mixed-in image
   ``y_j`` (``d_aug``) are stored, two fp16 numbers per view; the ``dbr`` loss trains the student
   to reproduce them on the same view (``kdflow.losses.dbr``). View ``v`` of image ``i`` is the
   mixup ``lam * x_i + (1 - lam) * x_j`` with another image ``j``, then a random resized crop
   (+ flip), all drawn from the view's seed (``kdflow.data.augment.view_seeds(view_seed, N,
   views)``), so only the distances are stored: ``views`` x ``N`` x 4 bytes (``dbr_d_org`` and
   ``dbr_d_aug``, ``[N, views]``). The student trains on view ``(epoch - 1) % views`` in each
   epoch (``DBRViews``); with ``views`` equal to the student's epochs it sees a fresh stored view
   every epoch, which is what the paper's storage figures imply (0.2 GB ~ 300 epochs x 200k
   images x 2 fp16 distances, vs. 120 GB of FKD-style soft labels).

Choices where the paper's description is open (all exposed as parameters):

- Grad-CAM on the last spatial layer rather than classic CAM (works for any architecture, e.g.
  ConvNet's hidden MLP between pooling and head); a teacher without spatial layers gets
  input-gradient saliency. The CAM and the mask are computed once, before refinement.
- The CAM ratio (mass inside the crop box), the ``cam_pool=0.5`` pool fraction, and
  ``correct_only=True`` (least confident among the crops the teacher classifies correctly).
- ``eta = lr = 0.05``, ``iterations=100``, ``eps=0.5``, ``bn_weight=1`` (the paper's step size
  for this image scale is not known here; the CE term is the batch mean, so a pixel's gradient
  shrinks with the batch size: raise ``lr`` with ``ipc * classes``).
- The distance is the cross-entropy ``-log softmax(z / T)[y]`` at ``temperature=1``.
- The augmentation of a view is mixup (not CutMix) with a uniformly drawn other image and
  ``lam ~ U(0, 1)``, then one random resized crop of the mixed image (``view_scale_min`` to
  ``view_scale_max`` of the area, aspect 3/4-4/3, ``view_flip``), i.e. both images get the same
  crop; ``views=300`` (the published 300-epoch student budget).

Artifacts condensed before per-view storage (``dbr_partner``, ``dbr_y_aug``, ``dbr_lambda``,
``dbr_d_org``, ``dbr_d_aug`` of ``[N]``: one uncropped mixup view per image) are still read, as
one view.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdflow.condense import CONDENSERS, Report, per_class_indices
from kdflow.condense.rded import (
    TEACHER_BATCH, Box, candidate_crops, check_image_args, default_factor, rank_candidates, sample_class_images,
    stitch_ranked, synthetic_dataset,
)
from kdflow.data.augment import Augment, apply_views, boxes_from_seeds, uniforms, view_seeds
from kdflow.data.dataset import Dataset
from kdflow.errors import DataError
from kdflow.train.device import eval_mode
from kdflow.train.loop import predict
from schemas.methods import NrrDdParams  # torch-free (kdflow/catalog.py)

DBR_PROVIDES = ("y_aug", "d_org", "d_aug", "lam")  # what a DBR batch adds to x and y
DBR_DISTANCES = ("dbr_d_org", "dbr_d_aug")  # per view: [N, views] float16
LEGACY_DBR = ("dbr_partner", "dbr_y_aug", "dbr_lambda", "dbr_d_org", "dbr_d_aug")  # one mixup view, [N]
VIEW_CHUNK = 4096  # views relabelled per teacher call at condensation


def last_spatial_layer(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The last leaf module (in forward order) whose output is a ``[B, C, h, w]`` map, if any."""
    seen: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: seen.append(mod) if out.dim() == 4 else None)
        for m in model.modules() if not list(m.children())
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen[-1] if seen else None


def grad_cam(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Grad-CAM of class ``y`` on the last spatial layer, upsampled and min-max normalised.

    A teacher without a spatial layer (e.g. an MLP) gets the input-gradient saliency
    ``|d logit_y / d x|`` summed over channels instead.

    Returns:
        ``[B, H, W]`` maps in [0, 1] on ``x``'s device (all zeros where the map is flat).
    """
    layer = last_spatial_layer(model, x)
    if layer is None:
        return normalise(input_saliency(model, x, y, batch_size))
    store: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    maps = []
    try:
        with eval_mode(model), torch.enable_grad():
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                logits = model(xb)  # [b, K]
                a = store["a"]  # [b, C, h, w]
                (grad,) = torch.autograd.grad(logits.gather(1, yb[:, None]).sum(), a)
                weights = grad.mean((2, 3), keepdim=True)  # [b, C, 1, 1]
                cam = F.relu((weights * a).sum(1, keepdim=True)).detach()  # [b, 1, h, w]
                cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
                maps.append(cam[:, 0])
    finally:
        hook.remove()
    return normalise(torch.cat(maps))


def input_saliency(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """``|d logit_y / d x|`` summed over channels, ``[B, H, W]``."""
    maps = []
    with eval_mode(model), torch.enable_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].detach().requires_grad_(True)
            score = model(xb).gather(1, y[i : i + batch_size, None]).sum()
            (grad,) = torch.autograd.grad(score, xb)
            maps.append(grad.abs().sum(1))
    return torch.cat(maps)


def normalise(cam: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling of ``[B, H, W]`` to [0, 1]; flat maps become zeros."""
    lo = cam.flatten(1).min(1).values.view(-1, 1, 1)
    hi = cam.flatten(1).max(1).values.view(-1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))


def cam_ratios(cam: torch.Tensor, boxes: list[Box], crops_per_image: int) -> torch.Tensor:
    """Share of each source image's CAM mass inside each crop box.

    Args:
        cam: ``[n, H, W]`` maps of the source images.
        boxes: ``n * crops_per_image`` boxes, image-major.
    Returns:
        ``[n * crops_per_image]`` ratios in [0, 1] (the box's area share when a map is flat).
    """
    out = []
    for k, (top, left, h, w) in enumerate(boxes):
        m = cam[k // crops_per_image]
        total = float(m.sum())
        if total > 0:
            out.append(float(m[top : top + h, left : left + w].sum()) / total)
        else:
            out.append(h * w / m.numel())
    return torch.tensor(out)


@contextmanager
def bn_statistics(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect, during forward passes, each BatchNorm layer's matching term on its input batch.

    Each term is ``||mean - running_mean||_2 + ||var - running_var||_2`` over the channel axis.
    """
    terms: list[torch.Tensor] = []

    def hook(mod: _BatchNorm, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        h = inputs[0].float()
        dims = [d for d in range(h.dim()) if d != 1]
        mean, var = h.mean(dims), h.var(dims, unbiased=False)  # [C]
        terms.append((mean - mod.running_mean).norm() + (var - mod.running_var).norm())

    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()


def bn_matching_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The summed BN-statistics matching term of ``x`` (0 for a model without BatchNorm)."""
    with bn_statistics(model) as terms, eval_mode(model):
        model(x)
    return torch.stack(terms).sum() if terms else x.new_zeros(())


def refine(
    teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, *,
    iterations: int, lr: float, bn_weight: float,
) -> torch.Tensor:
    """The paper's masked gradient steps ``x <- x - M * lr * grad`` of ``CE + bn_weight * BN-matching``.

    A plain step (no momentum, no per-pixel normalisation), so a soft mask scales each pixel's
    step: pixels with ``M`` near 0 barely move.

    Args:
        x: ``[N, C, H, W]`` initial images; y: ``[N]`` labels; mask: ``[N, 1, H, W]`` weights ``M``.
    Returns:
        Refined images; pixels where ``mask == 0`` equal ``x`` exactly.
    """
    x0 = x.detach()
    free = mask > 0  # [N, 1, H, W]
    z = x0.clone()
    with eval_mode(teacher), torch.enable_grad():
        for _ in range(iterations):
            z.requires_grad_(True)
            with bn_statistics(teacher) as terms:
                logits = teacher(z)
            loss = F.cross_entropy(logits, y)
            if terms:
                loss = loss + bn_weight * torch.stack(terms).sum()
            (grad,) = torch.autograd.grad(loss, z)
            with torch.no_grad():
                z = z.detach() - mask * lr * grad
                z = torch.where(free, z, x0)  # exact, even where grad is not finite
    return z.detach()


def dbr_distances(
    logits: torch.Tensor, y: torch.Tensor, y_aug: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances ``-log softmax(z / T)[y]`` of logits ``[B, K]`` to one-hot ``y`` and ``y_aug``."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # [B, K]
    return -logp.gather(1, y[:, None])[:, 0], -logp.gather(1, y_aug[:, None])[:, 0]


def mix(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Mixup views ``lam * x + (1 - lam) * x[partner]`` of ``[N, ...]`` images."""
    w = lam.view(-1, *([1] * (x.dim() - 1)))
    return w * x + (1 - w) * x[partner]


def view_params(n: int, views: int, view_seed: int, shape: tuple[int, ...], aug: Augment,
                rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The augmentation of DBR views, a function of ``(view_seed, sample, view)`` only.

    Row ``r = sample * views + view`` (all ``n * views`` rows, or those in ``rows``) gets its seed
    from ``kdflow.data.augment.view_seeds``; from that seed: the crop ``box`` and ``flip``
    (``boxes_from_seeds``, uniforms 0-4), the mixup ``partner`` (uniform 5: one of the other
    ``n - 1`` samples; the sample itself when ``n == 1``) and ``lam`` (uniform 6, ``U(0, 1)``).

    Returns:
        ``sample``, ``partner`` (int64), ``lam`` (float32) ``[R]``, ``box`` ``[R, 4]``, ``flip`` ``[R]``.
    """
    seeds = view_seeds(view_seed, n, views)  # [n * views]
    if rows is None:
        rows = torch.arange(n * views)
    seeds = seeds[rows]
    sample = rows // views
    box, flip = boxes_from_seeds(seeds, shape, aug)
    u = torch.from_numpy(uniforms(seeds, 7)[:, 5:])  # [R, 2] float64
    if n > 1:
        other = (u[:, 0] * (n - 1)).long().clamp_max(n - 2)  # [R] in [0, n - 2]
        partner = other + (other >= sample).long()  # skip the sample itself
    else:
        partner = sample.clone()
    return {"sample": sample, "partner": partner, "lam": u[:, 1].float(), "box": box, "flip": flip}


def view_images(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[R, C, H, W]`` DBR views: mixup of each row's sample with its partner, then crop + flip."""
    lam = p["lam"].view(-1, *([1] * (x.dim() - 1)))
    mixed = lam * x[p["sample"]] + (1 - lam) * x[p["partner"]]
    return apply_views(mixed, p["box"], p["flip"])


def view_augment(meta: dict) -> Augment:
    """The views' crop parameters stored in a condensed set's ``meta`` (``dbr_augment``)."""
    return Augment(**meta["dbr_augment"])


class DBRViews:
    """``fit``'s ``batch_fn`` for the ``dbr`` loss: every sample's stored view ``(epoch - 1) % views``.

    Each batch holds the view images ``x``, the labels ``y`` and ``y_aug`` (the mixed-in sample's),
    the mixup weight ``lam`` and the stored teacher distances ``d_org``, ``d_aug`` of that view. A
    set condensed before per-view storage (``LEGACY_DBR`` extras of shape ``[N]``) has one view:
    its stored uncropped mixup.

    Raises:
        DataError: ``ds`` holds no DBR extras (it was not condensed by ``nrr_dd``), or they do not
            fit its samples.
    """

    def __init__(self, ds: Dataset) -> None:
        e, n = ds.extras, len(ds)
        self.x, self.y = ds.features, ds.labels
        self.legacy = "dbr_partner" in e
        need = LEGACY_DBR if self.legacy else DBR_DISTANCES
        missing = [k for k in need if k not in e]
        if missing:
            raise DataError(f"dbr labels: the condensed dataset lacks extras {missing}; use condense.method nrr_dd")
        if self.legacy:
            self.views = 1
            self.fixed = {"x": mix(self.x, e["dbr_partner"], e["dbr_lambda"]), "y": self.y, "y_aug": e["dbr_y_aug"],
                          "lam": e["dbr_lambda"], "d_org": e["dbr_d_org"], "d_aug": e["dbr_d_aug"]}
            return
        d_org, d_aug = e["dbr_d_org"], e["dbr_d_aug"]
        keys = ("dbr_views", "dbr_view_seed", "dbr_augment")
        if d_org.dim() != 2 or d_org.shape != d_aug.shape or any(k not in ds.meta for k in keys) \
                or d_org.shape[1] != ds.meta["dbr_views"]:
            raise DataError(f"dbr labels: extras dbr_d_org/dbr_d_aug {list(d_org.shape)}/{list(d_aug.shape)} do not "
                            f"match meta {({k: ds.meta.get(k) for k in keys})} (expected [{n}, dbr_views]); "
                            "condense again with nrr_dd")
        self.views, self.seed = int(ds.meta["dbr_views"]), int(ds.meta["dbr_view_seed"])
        self.aug = view_augment(ds.meta)
        self.d_org, self.d_aug = d_org.float(), d_aug.float()  # [N, views]
        self.fixed = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-sample tensors ``fit`` sizes its epochs by (``x``, ``y``)."""
        return {"x": self.x, "y": self.y}

    def view(self, idx: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        """View ``view`` of samples ``idx``."""
        if self.fixed is not None:
            return {k: v[idx] for k, v in self.fixed.items()}
        v = view % self.views
        p = view_params(len(self.y), self.views, self.seed, tuple(self.x.shape[1:]), self.aug,
                        rows=idx * self.views + v)
        return {"x": view_images(self.x, p), "y": self.y[idx], "y_aug": self.y[p["partner"]], "lam": p["lam"],
                "d_org": self.d_org[idx, v], "d_aug": self.d_aug[idx, v]}

    def __call__(self, idx: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        return self.view(idx, epoch - 1)  # fit counts epochs from 1


def store_dbr_views(
    teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, *, views: int, view_seed: int, aug: Augment,
    temperature: float, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's distances on every DBR view of ``x``: ``d_org``, ``d_aug`` ``[N, views]`` float16."""
    n = len(y)
    d_org, d_aug = torch.empty(n * views), torch.empty(n * views)
    for a in range(0, n * views, VIEW_CHUNK):
        rows = torch.arange(a, min(a + VIEW_CHUNK, n * views))
        p = view_params(n, views, view_seed, tuple(x.shape[1:]), aug, rows=rows)
        logits = predict(teacher, view_images(x, p), batch_size=TEACHER_BATCH, device=device)
        d_org[rows], d_aug[rows] = dbr_distances(logits, y[p["sample"]], y[p["partner"]], temperature)
    return d_org.view(n, views).half(), d_aug.view(n, views).half()


def initial_images(
    train: Dataset, teacher: nn.Module, c: int, rows: torch.Tensor, g: torch.Generator, *,
    ipc: int, factor: int, crops_per_image: int, images_per_class: int,
    scale: tuple[float, float], cam_pool: float, correct_only: bool, device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """``[ipc, C, H, W]`` stitched images of class ``c``: high CAM ratio, low confidence crops."""
    size = tuple(train.features.shape[-2:])
    source = train.features[sample_class_images(rows, images_per_class, g)]  # [n, C, H, W]
    crops, boxes = candidate_crops(source, crops_per_image, scale, g)  # [n*k, C, H, W]
    teacher.to(device)
    cam = grad_cam(teacher, source.to(device), torch.full((len(source),), c, device=device)).cpu()
    ratio = cam_ratios(cam, boxes, crops_per_image)  # [n*k]
    probs = predict(teacher, crops, batch_size=batch_size, device=device).softmax(-1)  # [n*k, K]
    conf = probs[:, c]  # [n*k]
    pool = ratio >= ratio.quantile(1 - cam_pool)  # high CAM ratio
    # low confidence first within tiers: pool before the rest, recognised before misclassified
    score = conf + 2.0 * (~pool).float()
    if correct_only:
        score = score + 4.0 * (probs.argmax(-1) != c).float()
    order = rank_candidates(score, crops_per_image)
    return stitch_ranked(crops, order, ipc, factor, size)


@CONDENSERS.register(
    "nrr_dd", params=NrrDdParams, tracks=("classify",), needs_teacher=True, provides=DBR_PROVIDES
)
def nrr_dd(
    train: Dataset, *, teacher: nn.Module, seed: int, device: torch.device, report: Report | None,
    ipc: int, factor: int | None, crops_per_image: int, images_per_class: int, scale_min: float, scale_max: float,
    cam_pool: float, correct_only: bool, eps: float, iterations: int, lr: float, bn_weight: float,
    temperature: float, views: int, view_scale_min: float, view_scale_max: float, view_flip: bool,
) -> Dataset:
    """``ipc`` refined synthetic images per class with DBR label extras.

    Args:
        ipc: synthetic images per class.
        factor, crops_per_image, images_per_class, scale_min, scale_max: crop discovery, as in
            ``rded`` (same official-RDED defaults: factor by resolution, square crops of area
            0.08-1, 300 source images per class, ranks interleaved across cells).
        cam_pool: fraction of crops (highest CAM ratio) eligible before low confidence decides.
        correct_only: crops the teacher misclassifies come only after all others (the paper's
            "low confidence" read as "least confident among the recognised ones"; without it,
            8x8 digits get crops the teacher scores at ~0.1 and students fail).
        eps: CAM threshold of the mask ``M = max(0, eps - C)``; 0 freezes everything, values
            above 1 let every pixel move.
        iterations: refinement steps (0 skips refinement).
        lr: step size ``eta`` of the masked gradient step ``x <- x - M * eta * grad``.
        bn_weight: weight of the BN-statistics matching term.
        temperature: softmax temperature of the DBR distances.
        views: DBR views stored per image; the student trains on view ``(epoch - 1) % views``.
        view_scale_min, view_scale_max, view_flip: the views' random resized crop (area share)
            and flip, applied after mixup.
        report: called as ``report(classes_done, classes)`` during discovery.

    Returns:
        The synthetic images with extras ``dbr_d_org``, ``dbr_d_aug`` (float16 ``[N, views]``, the
        teacher's distances on each view, ``DBRViews`` rebuilds the views) and ``soft_labels``
        (teacher logits ``[N, K]`` of the refined images, for the soft mode); ``meta`` holds
        ``dbr_temperature``, ``dbr_views``, ``dbr_view_seed`` and ``dbr_augment``.
    """
    scale = (scale_min, scale_max)
    factor = factor if factor is not None else default_factor(tuple(train.features.shape[-2:]))
    check_image_args(train, factor, scale, "nrr_dd")
    if not 0 < cam_pool <= 1:
        raise DataError(f"nrr_dd: cam_pool must be in (0, 1] (got {cam_pool})")
    if views < 1:
        raise DataError(f"nrr_dd: views must be >= 1 (got {views})")
    try:
        aug = Augment(scale_min=view_scale_min, scale_max=view_scale_max, flip=view_flip)
    except ValueError as err:
        raise DataError(f"nrr_dd: view_scale_min/view_scale_max: {err}") from err
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, rows in enumerate(per_class_indices(train.labels, train.num_classes)):
        if len(rows) == 0:
            continue
        images.append(initial_images(
            train, teacher, c, rows, g, ipc=ipc, factor=factor, crops_per_image=crops_per_image,
            images_per_class=images_per_class, scale=scale, cam_pool=cam_pool,
            correct_only=correct_only, device=device, batch_size=TEACHER_BATCH,
        ))
        labels.append(torch.full((ipc,), c, dtype=torch.long))
        if report is not None:
            report(c + 1, train.num_classes)
    x0, y = torch.cat(images).to(device), torch.cat(labels).to(device)  # [N, C, H, W], [N]
    cam = grad_cam(teacher, x0, y)  # [N, H, W]
    mask = (eps - cam).clamp_min(0)[:, None]  # [N, 1, H, W]
    x = refine(teacher, x0, y, mask, iterations=iterations, lr=lr, bn_weight=bn_weight).cpu()
    y = y.cpu()
    view_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    d_org, d_aug = store_dbr_views(teacher, x, y, views=views, view_seed=view_seed, aug=aug,
                                   temperature=temperature, device=device)
    extras = {"dbr_d_org": d_org, "dbr_d_aug": d_aug,
              "soft_labels": predict(teacher, x, batch_size=TEACHER_BATCH, device=device)}
    ds = synthetic_dataset(train, x, y, "nrr_dd", extras)
    ds.meta.update(dbr_temperature=temperature, dbr_views=views, dbr_view_seed=view_seed, dbr_augment=aug.as_dict())
    return ds


def dbr_batch(ds: Dataset, view: int = 0) -> dict[str, torch.Tensor]:
    """The student's training tensors for the ``dbr`` loss in one view: all samples' view ``view``.

    Raises:
        DataError: ``ds`` lacks the DBR extras (it was not condensed by ``nrr_dd``).
    """
    return DBRViews(ds).view(torch.arange(len(ds)), view)
