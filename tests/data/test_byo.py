"""Bring your own: an image folder, a `datasets` save_to_disk folder, a model class by import path,
a student started from a checkpoint."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_params, write_params
from kdflow.data.sources import load_source
from kdflow.errors import DataError, ModelError

PIL = pytest.importorskip("PIL.Image")


def _image_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 6, size=(8, 8), seed: int = 0,
                  mode: str = "L") -> dict[str, np.ndarray]:
    """Random images saved as PNG; returns relative path -> the uint8 pixels written."""
    rng = np.random.default_rng(seed)
    written = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = size if mode == "L" else (*size, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            pixels[..., 0, 0] = 40 * c  # a class cue, so a model can learn something
            PIL.fromarray(pixels, mode).save(root / name / f"img{i:02d}.png")
            written[f"{root.name}/{name}/img{i:02d}.png"] = pixels
    return written


def test_image_folder_one_subfolder_per_class(tmp_path: Path) -> None:
    written = _image_folder(tmp_path / "pets")
    ds = load_source(f"imagefolder:{tmp_path / 'pets'}", seed=0, val_fraction=0.2, test_fraction=0.2)
    assert ds.num_classes == 3 and tuple(ds.features.shape) == (18, 1, 8, 8) and ds.modality == "image"
    assert ds.meta["classes"] == ["cat", "dog", "owl"]
    for i, sid in enumerate(ds.sample_ids):
        assert ds.labels[i].item() == ["cat", "dog", "owl"].index(sid.split("/")[1])
        assert torch.equal(ds.features[i, 0], torch.from_numpy(written[sid].astype(np.float32) / 255.0))


def test_image_folder_train_test_colour_and_resize(tmp_path: Path) -> None:
    _image_folder(tmp_path / "d/train", per_class=4, mode="RGB")
    _image_folder(tmp_path / "d/test", per_class=2, mode="RGB", size=(10, 12), seed=1)
    with pytest.raises(DataError, match=r"10x12 pixels.*data.options.size"):
        load_source(f"imagefolder:{tmp_path / 'd'}", seed=0, val_fraction=0.2, test_fraction=0.2)
    ds = load_source(f"imagefolder:{tmp_path / 'd'}", seed=0, val_fraction=0.25, test_fraction=0.2,
                     options={"size": [8, 8]})
    assert tuple(ds.features.shape) == (18, 3, 8, 8)
    test = [sid for sid, s in zip(ds.sample_ids, ds.splits) if s == "test"]
    assert len(test) == 6 and all(sid.startswith("test/") for sid in test)  # the folder's own test split


def test_image_folder_errors_name_the_folder_or_file(tmp_path: Path) -> None:
    _image_folder(tmp_path / "p")
    (tmp_path / "p/empty").mkdir()
    with pytest.raises(DataError, match=r"p/empty: no images"):
        load_source(f"imagefolder:{tmp_path / 'p'}", seed=0, val_fraction=0.2, test_fraction=0.2)
    (tmp_path / "p/empty/broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken.png: not a readable image"):
        load_source(f"imagefolder:{tmp_path / 'p'}", seed=0, val_fraction=0.2, test_fraction=0.2)


def test_datasets_save_to_disk_folder_images_and_tables(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    pix = {s: [rng.integers(0, 256, (6, 6), dtype=np.uint8) for _ in range(n)] for s, n in (("train", 10), ("test", 4))}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"image": [PIL.fromarray(p, "L") for p in pix[s]], "label": [i % 2 for i in range(len(pix[s]))]}, features=feats)
        for s in pix})
    dd.save_to_disk(str(tmp_path / "hf"))
    ds = load_source(f"hfdisk:{tmp_path / 'hf'}", seed=0, val_fraction=0.2, test_fraction=0.2)
    assert tuple(ds.features.shape) == (14, 1, 6, 6) and ds.num_classes == 2 and ds.meta["classes"] == ["a", "b"]
    assert torch.equal(ds.features[10, 0], torch.from_numpy(pix["test"][0].astype(np.float32) / 255.0))
    assert ds.sample_ids[10] == "test-000000"

    table = datasets.Dataset.from_dict({"x0": [0.5, 1.5, 2.5, 3.5] * 3, "x1": list(range(12)), "label": [0, 1, 2] * 4})
    table.save_to_disk(str(tmp_path / "tab"))
    tab = load_source(f"hfdisk:{tmp_path / 'tab'}", seed=0, val_fraction=0.2, test_fraction=0.25)
    assert tab.modality == "tabular" and tuple(tab.features.shape) == (12, 2) and tab.num_classes == 3
    assert tab.features[5].tolist() == [1.5, 5.0]
    with pytest.raises(DataError, match="no label column 'y'"):
        load_source(f"hfdisk:{tmp_path / 'tab'}", seed=0, val_fraction=0.2, test_fraction=0.2,
                    options={"label_column": "y"})
    with pytest.raises(DataError, match="not a datasets folder"):
        load_source(f"hfdisk:{tmp_path / 'pets'}", seed=0, val_fraction=0.2, test_fraction=0.2)


USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        """A user's model: (input_shape, num_classes, **args), forward -> logits, features."""

        def __init__(self, input_shape, num_classes, hidden=16):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), hidden), nn.ReLU())
            self.head = nn.Linear(hidden, num_classes)

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.head(self.body(x))
''')


@pytest.mark.slow
def test_user_model_by_import_path_and_student_from_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from kdflow.checks import pipeline_problems
    from kdflow.models import create_model
    from kdflow.models.io import init_weights, load_model, save_model
    from schemas.params import parse_params
    from tasks.common import STAGE_ORDER, execute_stage

    (tmp_path / "mymodels.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)  # the project folder: its own modules import
    _image_folder(tmp_path / "pets", per_class=10)
    fast = {"epochs": 2, "lr": 0.01, "batch_size": 16, "patience": None}
    raw = tiny_params(name="byo", data={"source": "imagefolder:pets"},
                      teachers=[{"name": "mine", "arch": "mymodels:TinyNet", "args": {"hidden": 12}, "train": fast}],
                      student={"arch": "mymodels:TinyNet", "args": {"hidden": 12}, "init": "artifacts/byo/teachers/mine",
                               "train": {**fast, "lr": 1e-9, "epochs": 1}})
    write_params(tmp_path, raw)
    pp = parse_params(raw)
    assert pipeline_problems(pp, tmp_path) == []
    bad = parse_params({**raw, "student": {**raw["student"], "arch": "mymodels:Nope"}})
    assert any("student.arch: architecture 'mymodels:Nope': cannot import it" in p for p in pipeline_problems(bad, tmp_path))
    bad = parse_params({**raw, "student": {**raw["student"], "args": {"hiden": 3}}})
    assert any(p.startswith("student.args:") and "hiden" in p for p in pipeline_problems(bad, tmp_path))

    for stage in STAGE_ORDER[:-1]:
        execute_stage(stage, pp, tmp_path)
    spec = json.loads((tmp_path / "artifacts/byo/student/model.json").read_text())
    assert spec["arch"] == "mymodels:TinyNet"
    student = load_model(tmp_path / "artifacts/byo/student")  # reloads through the import path
    assert type(student).__name__ == "TinyNet"

    # the student started from the teacher's weights, not random ones (lr 1e-9: it barely moved)
    teacher = load_model(tmp_path / "artifacts/byo/teachers/mine")
    for (name, a), b in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    fresh = init_weights(create_model("mymodels:TinyNet", (1, 8, 8), 3, hidden=12), tmp_path / "artifacts/byo/teachers/mine")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), teacher.state_dict().values()))
    other = create_model("mymodels:TinyNet", (1, 8, 8), 3, hidden=5)
    with pytest.raises(ModelError, match="does not fit the student"):
        init_weights(other, tmp_path / "artifacts/byo/teachers/mine")
    save_model(other, tmp_path / "other")
    assert load_model(tmp_path / "other").head.out_features == 3
