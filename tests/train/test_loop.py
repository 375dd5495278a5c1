"""The training loop (learning, determinism, resume, early stopping), devices, inference."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdflow.errors import DataError, KdflowError
from kdflow.models import create_model
from kdflow.train import (
    accuracy_of,
    extract_features,
    fit,
    predict,
    resolve_device,
    seed_everything,
)
from kdflow.train.loop import CHECKPOINT_FILE

CPU = torch.device("cpu")


def ce(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loss = F.cross_entropy(logits, batch["y"])
    return {"loss": loss, "ce": loss}


def toy(n: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two Gaussian blobs in 4-D, linearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) * 0.5 + (y[:, None].float() * 2 - 1) * 1.5
    return {"x": x, "y": y}


def new_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", (4,), 2, hidden=[8], dropout=0.2)  # dropout exercises the RNG


def run(model: torch.nn.Module, **kw):
    args = {"epochs": 4, "lr": 0.05, "batch_size": 16, "seed": 1, "device": CPU, **kw}
    return fit(model, toy(), ce, **args)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_learns_separable_problem() -> None:
    data = toy()
    model = new_model()
    before = accuracy_of(model, data["x"], data["y"])
    result = run(model, epochs=6, val=(data["x"], data["y"]))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.best_val_accuracy is not None and result.best_val_accuracy > max(before, 0.9)
    keys = {"epoch", "train_loss", "train_ce", "val_accuracy", "lr", "seconds"}
    assert set(result.history[0]) >= keys
    assert [row["epoch"] for row in result.history] == list(range(1, 7))
    assert result.epochs_run == 6 and result.resumed_from is None and not result.stopped_early
    assert result.history[0]["lr"] == pytest.approx(0.05) and result.history[-1]["lr"] < 0.05


def test_fit_is_deterministic() -> None:
    a, b = new_model(), new_model()
    ra, rb = run(a), run(b)
    assert same_weights(a, b)
    assert [r["train_loss"] for r in ra.history] == [r["train_loss"] for r in rb.history]
    c = new_model()
    run(c, seed=2)
    assert not same_weights(a, c)


def test_best_epoch_restored() -> None:
    data = toy()
    model = new_model()
    result = run(model, epochs=5, val=(data["x"], data["y"]))
    accs = [r["val_accuracy"] for r in result.history]
    assert result.best_epoch == accs.index(max(accs)) + 1
    assert accuracy_of(model, data["x"], data["y"]) == pytest.approx(max(accs))


class Killed(Exception):
    pass


def test_resume_is_bit_identical(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = toy()
    val = (data["x"][:32], data["y"][:32])
    full = new_model()
    full_result = run(full, val=val)

    def kill_after_2(row: dict[str, float]) -> None:
        if row["epoch"] == 2:
            raise Killed

    part = new_model()
    with pytest.raises(Killed):
        run(part, val=val, checkpoint_dir=tmp_path, fingerprint="fp", on_epoch=kill_after_2)
    assert (tmp_path / CHECKPOINT_FILE).is_file() and not list(tmp_path.glob("*.tmp"))
    torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # plain tensors and containers only

    resumed = new_model(seed=99)  # a fresh process would rebuild the model from scratch
    with caplog.at_level(logging.INFO, logger="kdflow.train.loop"):
        result = run(resumed, val=val, checkpoint_dir=tmp_path, fingerprint="fp", resume=True)
    assert "resumed" in caplog.text
    assert result.resumed_from == 2 and result.epochs_run == 4
    assert same_weights(full, resumed)
    assert result.best_epoch == full_result.best_epoch
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full_result.history]


def test_fingerprint_mismatch_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(new_model(), epochs=2, checkpoint_dir=tmp_path, fingerprint="old")
    model = new_model()
    with caplog.at_level(logging.WARNING, logger="kdflow.train.loop"):
        result = run(model, epochs=2, checkpoint_dir=tmp_path, fingerprint="new", resume=True)
    assert "another run" in caplog.text and "fingerprint" in caplog.text
    assert result.resumed_from is None and result.epochs_run == 2
    reference = new_model()
    run(reference, epochs=2)
    assert same_weights(model, reference)


def test_corrupt_checkpoint_starts_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="kdflow.train.loop"):
        result = run(new_model(), epochs=1, checkpoint_dir=tmp_path, resume=True)
    assert "unreadable" in caplog.text
    assert result.resumed_from is None and result.epochs_run == 1


def test_early_stopping() -> None:
    data = toy()
    rows: list[dict[str, float]] = []
    model = new_model()
    # lr=0: accuracy never improves after epoch 1, so patience=2 stops after epoch 3.
    val = (data["x"], data["y"])
    result = run(model, epochs=10, lr=0.0, patience=2, val=val, on_epoch=rows.append)
    assert result.stopped_early and result.epochs_run == 3 and len(rows) == 3
    assert result.best_epoch == 1


def test_extra_tensors_reach_loss() -> None:
    data = toy(32)
    data["teacher_indices"] = torch.arange(32).to(torch.uint16)[:, None]
    data["weight"] = torch.ones(32)
    seen: list[torch.Tensor] = []

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert batch["teacher_indices"].dtype == torch.uint16 and logits.dtype == torch.float32
        seen.append(batch["teacher_indices"].flatten().long())
        per_sample = F.cross_entropy(logits, batch["y"], reduction="none")
        return {"loss": (per_sample * batch["weight"]).mean()}

    fit(new_model(), data, loss_fn, epochs=1, lr=0.01, batch_size=8, seed=0, device=CPU)
    assert sorted(torch.cat(seen).tolist()) == list(range(32))  # every sample once per epoch


def test_bad_training_data() -> None:
    with pytest.raises(DataError, match="missing"):
        no_y = {"x": torch.randn(4, 4)}
        fit(new_model(), no_y, ce, epochs=1, lr=0.1, batch_size=2, seed=0, device=CPU)
    with pytest.raises(DataError, match="first axis"):
        bad = {"x": torch.randn(4, 4), "y": torch.zeros(3, dtype=torch.long)}
        fit(new_model(), bad, ce, epochs=1, lr=0.1, batch_size=2, seed=0, device=CPU)


def test_predict_features_accuracy() -> None:
    model = create_model("tiny_convnet", (1, 8, 8), 3).train()
    x = torch.randn(10, 1, 8, 8)
    logits = predict(model, x, batch_size=4)
    assert logits.shape == (10, 3) and logits.dtype == torch.float32
    assert model.training  # mode restored
    assert torch.allclose(logits, model.eval()(x), atol=1e-6)
    assert extract_features(model, x, batch_size=3).shape == (10, 8)
    y = logits.argmax(1)
    assert accuracy_of(model, x, y) == 1.0


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(KdflowError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(KdflowError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_seed_everything() -> None:
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    assert torch.equal(a, torch.rand(3))


def test_resume_of_finished_run_trains_nothing(tmp_path: Path) -> None:
    data = toy()
    first = new_model()
    done = run(first, val=(data["x"], data["y"]), checkpoint_dir=tmp_path, fingerprint="fp")
    again = new_model(seed=5)
    result = run(
        again,
        val=(data["x"], data["y"]),
        checkpoint_dir=tmp_path,
        fingerprint="fp",
        resume=True,
        on_epoch=lambda row: pytest.fail("no epoch should run"),
    )
    assert result.resumed_from == 4 and result.history == done.history
    assert same_weights(first, again)  # both hold the best epoch's weights


def test_batch_fn_builds_each_batch_and_resumes_bit_identically(tmp_path: Path) -> None:
    data = toy()
    calls: list[tuple[int, int]] = []

    def batch_fn(idx: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """A per-epoch input shift (a replayed 'view') plus the sliced tensors."""
        calls.append((epoch, len(idx)))
        shift = torch.Generator().manual_seed(epoch)
        return {"x": data["x"][idx] + torch.randn(4, generator=shift), "y": data["y"][idx]}

    full = new_model()
    run(full, batch_fn=batch_fn)
    assert {e for e, _ in calls} == {1, 2, 3, 4} and sum(n for e, n in calls if e == 1) == 96
    plain = new_model()
    run(plain)
    assert not same_weights(full, plain)  # the batches came from batch_fn

    def kill_after_2(row: dict[str, float]) -> None:
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run(new_model(), batch_fn=batch_fn, checkpoint_dir=tmp_path, fingerprint="fp", on_epoch=kill_after_2)
    resumed = new_model(seed=99)
    result = run(resumed, batch_fn=batch_fn, checkpoint_dir=tmp_path, fingerprint="fp", resume=True)
    assert result.resumed_from == 2 and same_weights(full, resumed)
