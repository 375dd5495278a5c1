"""Model registry, shapes, save/load round trips and load errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdflow.errors import KdflowError, ModelError
from kdflow.models import MODELS, count_params, create_model, model_bytes
from kdflow.models.gnn import GRAPH_MODELS
from kdflow.models.io import load_model, save_model

SHAPES = [(1, 40), (3, 40), (1, 8, 8), (3, 8, 8), (1, 28, 28), (3, 28, 28)]
SMALL_ARGS = {
    "mlp": {"hidden": [8]},
    "convnet": {"channels": [4, 8], "hidden": 8},
    "resnet": {"widths": [4, 8]},
    "convnet3": {"width": 8},
}


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in GRAPH_MODELS])  # graphs: test_gnn.py
@pytest.mark.parametrize("shape", SHAPES)
def test_output_and_feature_shapes(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create_model(name, shape, 7, **SMALL_ARGS.get(name, {})).eval()
    x = torch.randn(3, *shape)
    assert model(x).shape == (3, 7)
    feats = model.features(x)
    assert feats.dim() == 2 and feats.shape[0] == 3
    assert model.kdflow_spec == {"arch": name, "args": SMALL_ARGS.get(name, {}),
                                 "input_shape": list(shape), "num_classes": 7}


@pytest.mark.parametrize("name", ["mlp", "convnet", "resnet"])
def test_default_args_build(name: str) -> None:
    model = create_model(name, (1, 8, 8), 10).eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_feature_dims_match_head() -> None:
    convnet = create_model("convnet", (1, 8, 8), 3, hidden=5)
    assert convnet.features(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    assert create_model("mlp", (4,), 3, hidden=[6]).features(torch.randn(2, 4)).shape == (2, 6)
    resnet = create_model("resnet", (1, 40), 3, widths=[4, 6])
    assert resnet.features(torch.randn(2, 1, 40)).shape == (2, 6)


def test_convnet3_is_the_dd_literature_convnet_by_hand_count() -> None:
    """28x28x1, 10 classes: 3 x [conv 3x3 + bias, instance norm (affine)], pooled 28->14->7->3, linear."""
    model = create_model("convnet3", (1, 28, 28), 10)
    conv1, conv23 = 1 * 128 * 9 + 128, 128 * 128 * 9 + 128
    norms, head = 3 * 2 * 128, 128 * 3 * 3 * 10 + 10
    assert count_params(model) == conv1 + 2 * conv23 + norms + head == 308_746
    norm_layers = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    pools = [m for m in model.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert len(norm_layers) == 3 and all(m.affine for m in norm_layers) and len(pools) == 3
    x = torch.randn(2, 1, 28, 28)
    assert model.features(x).shape == (2, 1152) and model(x).shape == (2, 10)
    small = create_model("convnet3", (3, 32, 32), 4, width=16, depth=2)  # 32 -> 16 -> 8
    assert count_params(small) == (3 * 16 * 9 + 16) + (16 * 16 * 9 + 16) + 2 * 2 * 16 + (16 * 64 * 4 + 4)
    with pytest.raises(ModelError, match="convnet3: need width >= 1"):
        create_model("convnet3", (1, 28, 28), 10, depth=0)


def test_init_is_deterministic_given_seed() -> None:
    def build() -> torch.nn.Module:
        torch.manual_seed(3)
        return create_model("resnet", (1, 8, 8), 4, widths=[4, 8])

    a, b = build(), build()
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_count_params_and_bytes() -> None:
    model = create_model("mlp", (4,), 3, hidden=[5])
    assert count_params(model) == 4 * 5 + 5 + 5 * 3 + 3
    assert model_bytes(model) == count_params(model) * 4
    bn = create_model("tiny_convnet", (1, 8, 8), 3)
    assert model_bytes(bn) > count_params(bn) * 4  # batch-norm buffers count too


def test_bad_arguments_and_shapes() -> None:
    with pytest.raises(KdflowError, match="unknown model 'convnett'; did you mean 'convnet'"):
        create_model("convnett", (1, 8, 8), 10)
    with pytest.raises(ModelError, match="bad arguments"):
        create_model("mlp", (4,), 3, widths=[3])
    with pytest.raises(ModelError, match="input_shape"):
        create_model("convnet", (1, 2, 3, 4), 3)


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_convnet", "resnet"])
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, (1, 8, 8), 5, **({"widths": [4]} if name == "resnet" else {}))
    model.train()(torch.randn(16, 1, 8, 8))  # move batch-norm running stats off their init
    model.eval()
    files = save_model(model, tmp_path / "m")
    assert sorted(p.name for p in files) == ["model.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "model.json").read_text())["format"] == "kdflow"
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert loaded.kdflow_spec == model.kdflow_spec


def test_load_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="expected model.json"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="no such directory"):
        load_model(tmp_path / "nope")
    save_model(create_model("tiny_mlp", (4,), 2), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.safetensors: missing"):
        load_model(tmp_path)


def test_load_unknown_arch(tmp_path: Path) -> None:
    save_model(create_model("tiny_mlp", (4,), 2), tmp_path)
    spec = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**spec, "arch": "nonexistent"}))
    with pytest.raises(ModelError, match="model.json: unknown model 'nonexistent'"):
        load_model(tmp_path)


def test_load_corrupt_and_mismatched(tmp_path: Path) -> None:
    save_model(create_model("tiny_mlp", (4,), 2), tmp_path / "a")
    save_model(create_model("mlp", (4,), 2, hidden=[3]), tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ModelError, match="model.safetensors: weights do not match"):
        load_model(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00garbage" * 8)
    with pytest.raises(ModelError, match="model.safetensors: unreadable or corrupt"):
        load_model(tmp_path / "a")
    (tmp_path / "a" / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="model.json: unreadable"):
        load_model(tmp_path / "a")


def test_save_requires_spec(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="kdflow_spec"):
        save_model(torch.nn.Linear(2, 2), tmp_path)


def _tiny_hf_resnet(directory: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10
    )
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    model.save_pretrained(directory)
    return model


def test_load_hf_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = _tiny_hf_resnet(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    x = torch.randn(2, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.allclose(logits, reference(pixel_values=x).logits)
    assert model.features(x).shape == (2, 16)
    assert model.kdflow_spec["arch"] == "hf" and model.kdflow_spec["num_classes"] == 10

    files = save_model(model, tmp_path / "saved")  # save_pretrained + model.json
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "model.json"}
    again = load_model(tmp_path / "saved")
    assert torch.allclose(again(x), logits)


def test_load_hf_broken_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ModelError, match="config.json: cannot load"):
        load_model(tmp_path)
