"""Evaluation of generators without downloads: statistics in the feature space of a classifier
trained here, on the same data.

**This FID is not Inception FID**: the features are the penultimate layer of a small ConvNet
trained on one half of the test split (seeded); of the other half, one half is the reference set and
the other a held-out real sample as large as each model's sample set, scored like a model: its FID
(``fid_real_floor``) is the noise floor at these sample sizes. Numbers are
comparable between models of one run (same classifier, same reference, same sample count), not
with published FIDs.

- FID: ``||mu_g - mu_r||^2 + Tr(C_g + C_r - 2 (C_g C_r)^(1/2))`` of the features.
- Precision / recall (Kynkaanniemi et al., 2019): each real (generated) feature's ball reaches its
  k-th nearest real (generated) neighbour; precision is the share of generated features inside any
  real ball, recall the share of real features inside any generated ball.
- Class coverage: entropy of the classifier's predicted labels over the samples / log(classes)
  (1: every class equally often), and with a class-conditional model the share of samples
  classified as the class they were generated for.
- Latency: median milliseconds to generate one image (batch 1) and per image in a batch of 64.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdflow.models import count_params, create_model, model_bytes
from kdflow.report import table
from kdflow.train.device import torch_threads
from kdflow.train.loop import extract_features, fit, predict

TEACHER_STEPS = (1, 2, 4, 10, 50)
PR_K = 3
FEATURE_STEPS = 400  # the feature classifier's training budget
FEATURE_NOTE = ("FID/precision/recall in the penultimate features of a ConvNet trained on half of the test split "
                "(NOT Inception FID; comparable within one run only)")


# -- the statistics --------------------------------------------------------------------------------

def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians ``N(mu1, cov1)``, ``N(mu2, cov2)``."""
    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(cov1 @ cov2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular products: regularise as the usual FID code does
        eps = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = covmean.real
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def fid(real: Tensor, fake: Tensor) -> float:
    """FID of two feature sets ``[N, D]``, ``[M, D]`` (float64 statistics)."""
    a, b = real.double().numpy(), fake.double().numpy()
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _kth_radius(x: Tensor, k: int) -> Tensor:
    d = torch.cdist(x, x)  # [N, N]
    return d.kthvalue(min(k + 1, len(x)), dim=1).values  # the 0 distance to itself is the first


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_K) -> tuple[float, float]:
    """k-NN manifold precision and recall of ``fake`` against ``real`` (features ``[N, D]``)."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # [M, N]
    precision = (d <= r_real[None, :]).any(1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def coverage(pred: Tensor, num_classes: int) -> float:
    """Entropy of the predicted-label histogram over ``log(num_classes)`` (1: uniform)."""
    p = torch.bincount(pred, minlength=num_classes).double() / len(pred)
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return max(0.0, float(h / math.log(num_classes)))  # not -0.0 for one class


# -- the feature classifier ------------------------------------------------------------------------

def train_feature_net(x: Tensor, y: Tensor, num_classes: int, seed: int, steps: int = FEATURE_STEPS) -> nn.Module:
    """The evaluation's ConvNet (trained here for about ``steps`` AdamW steps, seeded) whose
    penultimate features the statistics use."""
    torch.manual_seed(seed)
    net = create_model("convnet", tuple(x.shape[1:]), num_classes, channels=[32, 64], hidden=64)
    epochs = max(5, math.ceil(steps / math.ceil(len(x) / 64)))
    fit(net, {"x": x, "y": y}, lambda logits, b: {"loss": nn.functional.cross_entropy(logits, b["y"])},
        epochs=epochs, lr=3e-3, batch_size=64, seed=seed, device=torch.device("cpu"))
    return net.eval()


def score(net: nn.Module, images: Tensor, ref: Tensor, num_classes: int, y: Tensor | None) -> dict[str, float]:
    feats = extract_features(net, images)
    precision, recall = precision_recall(ref, feats)
    pred = predict(net, images).argmax(1)
    out = {"fid": fid(ref, feats), "precision": precision, "recall": recall, "coverage": coverage(pred, num_classes)}
    if y is not None:
        out["class_accuracy"] = float((pred == y).double().mean())
    return out


def latency_ms(model: nn.Module, steps: int, noise: Tensor, y: Tensor | None, repeats: int) -> dict[str, float]:
    """Median ms per image at batch 1 (``repeats`` timed runs after a warm-up) and ms per image in
    one batch of ``len(noise)``."""
    from kdflow.tracks.diffusion.sampling import generate

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        generate(model, noise[:n], None if y is None else y[:n], steps)
        return (time.perf_counter() - t0) * 1000 / n

    timed(1)  # warm-up
    out = {"latency_ms_b1": float(np.median([timed(1) for _ in range(max(1, repeats))]))}
    out[f"latency_ms_b{len(noise)}"] = timed(len(noise))
    return out


# -- the stage's evaluation ------------------------------------------------------------------------

@dataclass
class Reference:
    """What every model is scored against: the feature classifier, the reference images' features,
    their labels (the classes asked of conditional models) and the noise all models start from."""

    net: nn.Module
    feats: Tensor  # the reference images' features
    labels: Tensor  # the held-out real images' classes: asked of conditional models
    noise: Tensor
    num_classes: int
    metrics: dict[str, Any]


def reference(images: Tensor, labels: Tensor, num_classes: int, seed: int = 0) -> Reference:
    """Split ``images`` (seeded): one half trains the feature classifier; of the other half, the first
    half is the reference set and the second a held-out real sample of the size every model generates.

    The held-out real images are scored against the reference exactly like a model's samples (same
    sample sizes, same classes asked of conditional models), so their row (``metrics["real"]``,
    FID ``fid_real_floor``) is the statistics' noise floor: a model within it is indistinguishable
    from real data at this sample size."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    half = len(images) // 2
    fit_rows, rest = order[:half], order[half:]
    n_gen = len(rest) // 2
    ref_rows, real_rows = rest[: len(rest) - n_gen], rest[len(rest) - n_gen :]
    net = train_feature_net(images[fit_rows], labels[fit_rows], num_classes, seed)
    feats = extract_features(net, images[ref_rows])
    real = score(net, images[real_rows], feats, num_classes, labels[real_rows])
    metrics = {
        "feature_space": FEATURE_NOTE, "n_reference": len(ref_rows), "n_generated": n_gen,
        "classifier_accuracy": float((predict(net, images[ref_rows]).argmax(1) == labels[ref_rows]).double().mean()),
        "fid_real_floor": real["fid"],  # held-out real images vs. the reference: the floor at these sizes
        "real": real,
        "precision_recall_k": PR_K,
    }
    noise = torch.randn((n_gen, *images.shape[1:]), generator=torch.Generator().manual_seed(seed + 1))
    return Reference(net, feats, labels[real_rows], noise, num_classes, metrics)


def score_model(model: nn.Module, steps: tuple[int, ...], ref: Reference, *, latency_repeats: int,
                latency_threads: int | None, seed: int = 0) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Per step count: the statistics of ``len(reference)`` samples and the latency; and the samples."""
    from kdflow.tracks.diffusion.sampling import generate

    model.eval()
    cond = ref.labels if model.num_classes else None
    rows, samples = {}, {}
    for n in steps:
        x = generate(model, ref.noise, cond, n, seed=seed)
        rows[str(n)] = score(ref.net, x, ref.feats, ref.num_classes, cond)
        with torch_threads(latency_threads):
            rows[str(n)].update(latency_ms(model, n, ref.noise[:16], None if cond is None else cond[:16],
                                           latency_repeats))
        samples[str(n)] = x[:64]
    info = {"params": count_params(model), "bytes": model_bytes(model), "steps": rows,
            "conditional": bool(model.num_classes)}
    return info, samples


def evaluate(models: dict[str, nn.Module], images: Tensor, labels: Tensor, num_classes: int, *, teacher_name: str,
             latency_repeats: int, latency_threads: int | None, folder: Path, seed: int = 0) -> dict[str, Any]:
    """Teacher (DDIM at ``TEACHER_STEPS``) vs. student (its declared steps) on the test images."""
    ref = reference(images, labels, num_classes, seed)
    metrics: dict[str, Any] = dict(ref.metrics)
    grids: dict[str, Tensor] = {}
    for role, model in models.items():
        steps = TEACHER_STEPS if role == "teacher" else tuple(model.steps)
        metrics[role], samples = score_model(model, steps, ref, latency_repeats=latency_repeats,
                                             latency_threads=latency_threads, seed=seed)
        for n, x in samples.items():
            if n in ("1", "50") or (role == "student" and n == str(max(steps))):
                grids[f"samples_{role}_{n}step"] = x
    metrics["teacher"]["name"] = teacher_name
    metrics["goal"] = goal(metrics)
    write_grids(folder / "figures", grids)
    return metrics


def goal(m: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: the best 1-step student vs. the teacher's 4- and 50-step DDIM."""
    t, s = m["teacher"]["steps"], m["student"]["steps"]
    if "1" not in s:
        return {}
    one = s["1"]
    return {"student_1step_fid": one["fid"], "teacher_4step_fid": t["4"]["fid"], "teacher_50step_fid": t["50"]["fid"],
            "beats_teacher_4step": one["fid"] < t["4"]["fid"],
            "fid_ratio_to_teacher_50step": one["fid"] / t["50"]["fid"] if t["50"]["fid"] > 0 else float("inf"),
            "speedup_vs_50step_b1": t["50"]["latency_ms_b1"] / one["latency_ms_b1"]}


def write_grids(folder: Path, grids: dict[str, Tensor]) -> None:
    """An 8x8 PNG grid per entry (images in [-1, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name, x in grids.items():
        x = ((x.clamp(-1, 1) + 1) / 2)[:64]
        n, c, h, w = x.shape
        cols = 8
        rows = (n + cols - 1) // cols
        canvas = torch.ones(c, rows * (h + 1), cols * (w + 1))
        for i in range(n):
            r, k = divmod(i, cols)
            canvas[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = x[i]
        fig, ax = plt.subplots(figsize=(4, 4 * rows / cols))
        img = canvas.permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(name.removeprefix("samples_").replace("_", " "), fontsize=9)
        fig.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


# -- the report ------------------------------------------------------------------------------------

def table_rows(m: dict[str, Any]) -> list[list[str]]:
    real = m.get("real")
    rows = [] if real is None else [["real (held-out test images: the floor)", "", f"{real['fid']:.3f}",
                                     f"{real['precision']:.3f}", f"{real['recall']:.3f}", f"{real['coverage']:.3f}",
                                     f"{real['class_accuracy']:.3f}", ""]]
    for role in ("teacher", "student"):
        for n, r in m[role]["steps"].items():
            rows.append([f"{role} ({'DDIM' if role == 'teacher' else 'consistency sampler'})", n, f"{r['fid']:.3f}",
                         f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['coverage']:.3f}",
                         f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else "",
                         f"{r['latency_ms_b1']:.2f}"])
    return rows


HEADER = ["model", "steps", "FID (classifier space)", "precision", "recall", "class coverage", "class accuracy",
          "ms/image (b1)"]


def summary_rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    t, s, g = m["teacher"], m["student"], m.get("goal", {})
    rows = [("params", f"{t['params']:,}", f"{s['params']:,}", f"{t['params'] / s['params']:.2f}x")]
    if g:
        rows.append(("FID: teacher 50 / 4 steps vs student 1 step", f"{g['teacher_50step_fid']:.3f} / "
                     f"{g['teacher_4step_fid']:.3f}", f"{g['student_1step_fid']:.3f}",
                     f"{g['fid_ratio_to_teacher_50step']:.2f}x of 50-step"))
        rows.append(("ms/image b1: teacher 50 steps vs student 1 step", f"{t['steps']['50']['latency_ms_b1']:.2f}",
                     f"{s['steps']['1']['latency_ms_b1']:.2f}", f"{g['speedup_vs_50step_b1']:.1f}x faster"))
    return rows


def report_section(m: dict[str, Any]) -> str:
    html = table(HEADER, table_rows(m), numeric=(1, 2, 3, 4, 5, 6, 7))
    floor = (f"reference: {m['n_reference']} real test images; {m['n_generated']} images per model and step count; "
             f"{m['n_generated']} held-out real test images score FID {m['fid_real_floor']:.3f} against the reference "
             f"(the noise floor at these sample sizes); classifier accuracy {m['classifier_accuracy']:.3f}")
    notes = [FEATURE_NOTE, floor]
    return html + "".join(f"\n<p>{escape(n)}</p>" for n in notes)
