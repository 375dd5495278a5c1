"""Augmentation-aware caches: K seeded views per sample, replayed bit-identically by the student."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from kdflow.cache import CacheReader
from kdflow.cache.replay import CachedBatches
from kdflow.cache.views import VIEWS_FILE, view_choice
from kdflow.data.augment import Augment, apply_views, boxes_from_seeds, draw_views, view_seeds
from kdflow.data.dataset import load_dataset
from kdflow.errors import CacheCorruptError, DataError
from kdflow.models.io import load_model
from kdflow.train.loop import predict
from schemas.params import parse_params
from tasks.common import STAGE_ORDER, execute_stage


def bilinear_reference(img: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Slow, obviously correct bilinear resize of ``[C, h, w]`` (half-pixel centres, edge clamp)."""
    c, h, w = img.shape
    out = torch.empty(c, out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        for j in range(out_w):
            y = max((i + 0.5) * h / out_h - 0.5, 0.0)
            x = max((j + 0.5) * w / out_w - 0.5, 0.0)
            y0, x0 = min(int(y), h - 1), min(int(x), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            v = ((1 - dy) * (1 - dx) * img[:, y0, x0].double() + (1 - dy) * dx * img[:, y0, x1].double()
                 + dy * (1 - dx) * img[:, y1, x0].double() + dy * dx * img[:, y1, x1].double())
            out[:, i, j] = v
    return out


def test_views_are_seeded_in_bounds_and_sample_major() -> None:
    aug = Augment(scale_min=0.3, scale_max=0.9)
    table = draw_views((1, 8, 10), "image", num_samples=50, views=4, seed=7, aug=aug)
    assert torch.equal(table["sample"], torch.arange(50).repeat_interleave(4))
    assert torch.equal(table["view"], torch.arange(4).repeat(50))
    again = draw_views((1, 8, 10), "image", num_samples=50, views=4, seed=7, aug=aug)
    assert all(torch.equal(table[k], again[k]) for k in table)
    other = draw_views((1, 8, 10), "image", num_samples=50, views=4, seed=8, aug=aug)
    assert not torch.equal(table["seed"], other["seed"])
    top, left, h, w = table["box"].T.long()
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= 8).all() and (left + w <= 10).all()
    share = (h * w).double() / 80
    assert share.min() > 0.2 and share.max() <= 1.0 and share.std() > 0.05
    assert 0.3 < table["flip"].double().mean() < 0.7
    # the box is a function of the stored seed alone
    box, flip = boxes_from_seeds(table["seed"][[5, 9]], (1, 8, 10), aug)
    assert torch.equal(box, table["box"][[5, 9]]) and torch.equal(flip, table["flip"][[5, 9]])
    assert torch.equal(view_seeds(7, 50, 4)[[5, 9]], table["seed"][[5, 9]])


def test_sequence_views_crop_along_the_length_and_never_flip() -> None:
    table = draw_views((2, 40), "sequence", num_samples=30, views=3, seed=0, aug=Augment(scale_min=0.5))
    top, start, h, length = table["box"].T.long()
    assert (top == 0).all() and (h == 1).all() and (start + length <= 40).all()
    assert length.min() >= 19 and (table["flip"] == 0).all()
    x = torch.randn(2, 2, 40)
    box = torch.tensor([[0, 0, 1, 40], [0, 10, 1, 20]], dtype=torch.int32)
    out = apply_views(x, box, torch.zeros(2, dtype=torch.uint8))
    assert torch.equal(out[0], x[0])
    ref = bilinear_reference(x[1, :, None, 10:30], 1, 40)[:, 0]  # linear = bilinear on one row
    torch.testing.assert_close(out[1].double(), ref, atol=1e-6, rtol=0)


def test_tabular_data_has_no_views() -> None:
    with pytest.raises(DataError, match="logits.views"):
        draw_views((64,), "tabular", num_samples=3, views=2, seed=0, aug=Augment())


def test_apply_views_matches_a_reference_crop_resize_flip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 6, 7, generator=g)
    box = torch.tensor([[0, 0, 6, 7], [1, 2, 3, 4], [2, 0, 4, 7]], dtype=torch.int32)
    flip = torch.tensor([0, 1, 0], dtype=torch.uint8)
    out = apply_views(x, box, flip)
    assert torch.equal(out[0], x[0])  # the full box without flip is the identity
    ref1 = bilinear_reference(x[1, :, 1:4, 2:6], 6, 7).flip(-1)
    ref2 = bilinear_reference(x[2, :, 2:6, 0:7], 6, 7)
    torch.testing.assert_close(out[1].double(), ref1, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2].double(), ref2, atol=1e-6, rtol=0)


def test_view_choice_depends_on_seed_and_epoch_only() -> None:
    a, b = view_choice(0, 1, 500, 4), view_choice(0, 2, 500, 4)
    assert torch.equal(a, view_choice(0, 1, 500, 4)) and not torch.equal(a, b)
    assert set(a.tolist()) == {0, 1, 2, 3}


@pytest.mark.slow
def test_student_replays_exactly_the_view_the_teacher_saw(tmp_path: Path, monkeypatch) -> None:
    import kdflow.train.loop as loop  # cache rows: the track runs the teacher (loop.predict, imported when called)

    raw = tiny_params(logits={"views": 3, "shard_rows": 1000, "batch_size": 256},
                      student={"train": {"epochs": 2, "lr": 0.01, "batch_size": 128, "patience": None}})
    pp = parse_params(raw)
    for stage in STAGE_ORDER[: STAGE_ORDER.index("condense") + 1]:
        execute_stage(stage, pp, tmp_path)
    seen: list[torch.Tensor] = []
    real = loop.predict

    def recording(model, x, **kwargs):
        seen.append(x.clone())
        return real(model, x, **kwargs)

    monkeypatch.setattr(loop, "predict", recording)
    m, _ = execute_stage("logits", pp, tmp_path)
    monkeypatch.setattr(loop, "predict", real)
    art = tmp_path / "artifacts/tiny"
    ds = load_dataset(art / "condense")
    n = len(ds)
    given = torch.cat(seen)[: 3 * n]  # the cache build's inputs in row order (fidelity comes after)
    reader = CacheReader(art / "logits")
    reader.verify()
    assert len(reader) == 3 * n and reader.num_views == 3 and m.info["views"] == 3
    assert (art / "logits" / VIEWS_FILE).is_file()
    assert not torch.equal(given[0], given[1])  # views of one sample differ
    teacher = load_model(art / "teachers" / m.info["teachers"][0]["teacher"])
    batches = CachedBatches({"x": ds.features, "y": ds.labels}, [reader], [1.0], seed=pp.seed,
                            memory_limit=0)
    for epoch in (1, 2):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))[:200]
        batch = batches(idx, epoch)
        rows = idx * 3 + view_choice(pp.seed, epoch, n, 3)[idx]
        assert torch.equal(batch["x"], given[rows])  # bit-identical to the teacher's input
        assert torch.equal(batch["y"], ds.labels[idx])
        live = predict(teacher, batch["x"])  # the teacher on the replayed input
        torch.testing.assert_close(batch["teacher_logits"], live.half().float(), atol=0, rtol=0)
    # the student stage trains on the replayed views
    s, _ = execute_stage("student", pp, tmp_path)
    assert s.metrics["epochs_run"] == 2


def test_an_altered_views_table_is_caught(tmp_path: Path) -> None:
    from kdflow.cache import write_cache
    from kdflow.cache.views import write_views

    table = draw_views((1, 8, 8), "image", 5, 2, seed=0, aug=Augment())
    entry = write_views(tmp_path, table, views=2, augment=Augment().as_dict())
    info = write_cache(tmp_path, [torch.randn(10, 3)], num_rows=10, num_classes=3, format="dense", k=None,
                       dtype="float16", capture_temperature=1.0, shard_rows=4)
    reader = CacheReader(tmp_path, {**info, "views": entry})
    reader.verify()
    assert reader.num_views == 2 and torch.equal(reader.views()["box"], table["box"])
    path = tmp_path / VIEWS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=VIEWS_FILE):
        reader.verify()
    with pytest.raises(CacheCorruptError, match="sha256"):
        reader.views()


def test_dataloader_workers_give_the_same_logits() -> None:
    from kdflow.models import create_model
    from kdflow.cache.teacher_rows import TeacherRows

    torch.manual_seed(0)
    model = create_model("tiny_convnet", (1, 8, 8), 10)
    features = torch.randn(30, 1, 8, 8)
    table = draw_views((1, 8, 8), "image", 30, 2, seed=1, aug=Augment())
    rows = TeacherRows(Path("unused"), Path("unused"), table, 2, batch_size=16, model=model, features=features)
    serial = list(rows.batches(4, 60, 16))
    parallel = list(TeacherRows(**{**rows.__dict__, "workers": 2}).batches(4, 60, 16))
    assert [len(b) for b in serial] == [16, 16, 16, 8]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))
    expected = predict(model, apply_views(features[torch.arange(4, 60) // 2], table["box"][4:60], table["flip"][4:60]))
    torch.testing.assert_close(torch.cat(serial), expected)
