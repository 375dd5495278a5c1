"""Bring-your-own data sources: a folder of images, one sub-folder per class (``imagefolder:``),
and a Hugging Face ``datasets`` folder written by ``save_to_disk`` (``hfdisk:``).

Both give images ``[N, C, H, W]`` in [0, 1] (or, for a ``datasets`` table without an image
column, numeric feature columns ``[N, D]``), labels, stable sample ids and the class names.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kdflow.data.sources import SOURCES, RawSource, _check_options
from kdflow.errors import DataError, ParamsError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = ("train", "test")


def _size_option(options: dict) -> tuple[int, int] | None:
    size = options.get("size")
    if size is None:
        return None
    if isinstance(size, int):
        size = [size, size]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and 1 <= s <= 4096 for s in size)):
        raise ParamsError([f"data.options.size: an int or [height, width] between 1 and 4096 (got {size!r})"])
    return size[0], size[1]


def _channels_option(options: dict) -> int | None:
    channels = options.get("channels")
    if channels not in (None, 1, 3):
        raise ParamsError([f"data.options.channels: 1 (grey) or 3 (RGB) (got {channels!r})"])
    return channels


def images_to_array(images: Iterable[Any], names: list[str], *, size: tuple[int, int] | None,
                    channels: int | None) -> np.ndarray:
    """PIL images -> float32 ``[N, C, H, W]`` in [0, 1]: resized to ``size`` ``(H, W)`` when given
    (else all must share the first one's size), grey (C=1) or RGB (C=3; default: RGB when any
    image has colour)."""
    images = list(images)
    if channels is None:
        channels = 1 if all(im.mode in ("1", "L", "I", "I;16", "F") for im in images) else 3
    mode = "L" if channels == 1 else "RGB"
    out = []
    first = None
    for im, name in zip(images, names):
        im = im.convert(mode)
        if size is not None:
            im = im.resize((size[1], size[0]))
        elif first is None:
            first = (im.height, im.width, name)
        elif (im.height, im.width) != first[:2]:
            raise DataError(f"{name}: {im.height}x{im.width} pixels, but {first[2]} has {first[0]}x{first[1]}; "
                            f"set data.options.size (e.g. [{first[0]}, {first[1]}]) to resize every image")
        arr = np.asarray(im, dtype=np.float32) / 255.0
        out.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    return np.stack(out) if out else np.zeros((0, channels, 1, 1), np.float32)


def _class_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_class_tree(root: Path, classes: list[str]) -> tuple[list[Any], list[int], list[str]]:
    from PIL import Image, UnidentifiedImageError

    images, labels, ids = [], [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        if not files:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) for class {name!r}")
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    images.append(im.copy())
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{f}: not a readable image ({exc})") from None
            labels.append(label)
            ids.append(f.relative_to(root.parent).as_posix())
    return images, labels, ids


@SOURCES.register("imagefolder", path=True, modality="image")  # its check: kdflow/catalog.py
def _imagefolder(arg: str, *, seed: int, options: dict) -> RawSource:
    """``<dir>/<class>/*.png|jpg|...``: one sub-folder per class (sorted names are labels 0, 1, ...).

    With ``<dir>/train/<class>/`` and ``<dir>/test/<class>/``, ``test`` is the fixed test split.
    Options: ``size`` (int or [height, width]: resize every image; default: all must share one
    size), ``channels`` (1 or 3; default 3 when any image has colour).
    """
    _check_options("imagefolder", options, ["size", "channels"])
    size, channels = _size_option(options), _channels_option(options)
    if not arg:
        raise DataError("the imagefolder source needs a folder, e.g. imagefolder:data/pets")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (cwd {Path.cwd()})")
    split = all((root / s).is_dir() for s in SPLIT_FOLDERS)
    parts = [root / s for s in SPLIT_FOLDERS] if split else [root]
    classes = [d.name for d in _class_folders(parts[0])]
    if not classes:
        raise DataError(f"{parts[0]}: no class folders; expected one sub-folder of images per class")
    if split and [d.name for d in _class_folders(parts[1])] != classes:
        raise DataError(f"{root}: train/ and test/ must hold the same class folders "
                        f"({classes} vs {[d.name for d in _class_folders(parts[1])]})")
    images, labels, ids, test = [], [], [], []
    for i, part in enumerate(parts):
        im, lb, idx = _read_class_tree(part, classes)
        images += im
        labels += lb
        ids += idx
        test += [split and i == 1] * len(lb)
    x = images_to_array(images, ids, size=size, channels=channels)
    return RawSource(x, np.asarray(labels, np.int64), ids, len(classes), "image",
                     fixed_test=np.asarray(test) if split else None, meta={"classes": classes})


# --- Hugging Face datasets (save_to_disk) --------------------------------------------------------


def _label_names(feature: Any) -> list[str] | None:
    return list(feature.names) if hasattr(feature, "names") else None


@SOURCES.register("hfdisk", path=True)  # its check: kdflow/catalog.py
def _hfdisk(arg: str, *, seed: int, options: dict) -> RawSource:
    """A folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``;
    its ``test`` split is the fixed test split, the other splits are pooled). Needs the
    ``datasets`` package.

    Options: ``label_column`` (default ``label``), ``image_column`` (default: the first column of
    type ``Image``; without one, every other numeric column is a feature: tabular data),
    ``size``, ``channels`` (as for ``imagefolder``).
    """
    _check_options("hfdisk", options, ["label_column", "image_column", "size", "channels"])
    size, channels = _size_option(options), _channels_option(options)
    try:
        import datasets
    except ImportError:
        raise DataError("the hfdisk source needs the `datasets` package: pip install datasets") from None
    root = Path(arg).expanduser()
    try:
        loaded = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{root}: not a datasets folder written by save_to_disk ({exc})") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"data": loaded}
    first = next(iter(splits.values()))
    label = options.get("label_column", "label")
    if label not in first.features:
        raise DataError(f"{root}: no label column {label!r} (columns: {list(first.features)}); set data.options.label_column")
    image = options.get("image_column") or next(
        (c for c, f in first.features.items() if isinstance(f, datasets.Image)), None)
    if image is not None and image not in first.features:
        raise DataError(f"{root}: no image column {image!r} (columns: {list(first.features)})")
    columns = [] if image else [c for c, f in first.features.items()
                                if c != label and getattr(f, "dtype", "").startswith(("int", "uint", "float", "bool"))]
    if not image and not columns:
        raise DataError(f"{root}: neither an Image column nor numeric feature columns besides {label!r}")
    feats, labels, ids, test = [], [], [], []
    for name, ds in splits.items():
        if list(ds.features) != list(first.features):
            raise DataError(f"{root}: split {name!r} has columns {list(ds.features)}, not {list(first.features)}")
        y = np.asarray(ds[label], dtype=np.int64)
        if image:
            feats.append(images_to_array(ds[image], [f"{root.name}/{name}/{i}" for i in range(len(ds))],
                                         size=size, channels=channels))
        else:
            feats.append(np.stack([np.asarray(ds[c], dtype=np.float32) for c in columns], axis=1))
        labels.append(y)
        ids += [f"{name}-{i:06d}" for i in range(len(ds))]
        test.append(np.full(len(ds), name == "test"))
    y = np.concatenate(labels)
    if y.size and y.min() < 0:
        raise DataError(f"{root}: column {label!r} holds negative labels (e.g. {int(y.min())})")
    names = _label_names(first.features[label])
    num_classes = len(names) if names else int(y.max()) + 1
    fixed = np.concatenate(test)
    return RawSource(np.concatenate(feats), y, ids, num_classes, "image" if image else "tabular",
                     fixed_test=fixed if fixed.any() else None,
                     meta={"classes": names or [str(i) for i in range(num_classes)], "columns": columns or [image]})
