"""A student with its own tokenizer (student.tokenizer): re-tokenised blocks, ULD, bits per byte."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdflow.errors import ParamsError
from kdflow.tracks import get_track
from kdflow.tracks.lm import corpus, evaluation, own_tokens
from schemas.params import parse_params
from test_lm_track import TEXT, tiny_lm

LM = get_track("lm")


def bpe_tokenizer(folder: Path, text: str, vocab: int = 300) -> Path:
    """A byte-level BPE tokenizer trained on ``text`` (offline, well under a second), saved as a
    Hugging Face folder: another vocabulary than the byte tokenizer's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_a_loss_that_compares_token_ids_is_refused_with_another_tokenizer(text_file: Path) -> None:
    for loss in ("lm_kd", "lm_rkl", "lm_jsd"):
        with pytest.raises(ParamsError) as err:
            parse_params(tiny_lm(f"text:{text_file}", student={"tokenizer": "bpe", "loss": {"name": loss}}))
        assert any(p.startswith(f"student.loss.name: {loss!r} compares the teacher's token ids")
                   and "student.tokenizer 'bpe' differs from data.options.tokenizer 'byte'" in p
                   for p in err.value.problems), err.value.problems
    ok = parse_params(tiny_lm(f"text:{text_file}", student={"tokenizer": "bpe", "loss": {"name": "lm_uld"}}))
    assert ok.student.tokenizer == "bpe"
    same = parse_params(tiny_lm(f"text:{text_file}", student={"tokenizer": "byte"}))  # the data's: lm_kd is fine
    assert same.student.loss.name == "lm_kd"
    with pytest.raises(ParamsError, match="student.on_policy.rounds: the teacher grades"):
        parse_params(tiny_lm(f"text:{text_file}", student={"tokenizer": "bpe", "loss": {"name": "lm_uld"},
                                                           "on_policy": {"rounds": 1}}))
    with pytest.raises(ParamsError, match="student.seeds: students over seeds are compared in the data's tokens"):
        parse_params(tiny_lm(f"text:{text_file}", student={"tokenizer": "bpe", "loss": {"name": "lm_uld"}, "seeds": 2}))


def test_a_missing_student_tokenizer_folder_is_a_validate_error(tmp_path: Path, text_file: Path) -> None:
    from kdflow.checks import pipeline_problems

    pp = parse_params(tiny_lm(f"text:{text_file}", student={"tokenizer": "nowhere", "loss": {"name": "lm_uld"}}))
    found = [p for p in pipeline_problems(pp, tmp_path) if p.startswith("student.tokenizer")]
    assert found == [f"student.tokenizer: not 'byte', 'pypi:<package>' or a folder: {tmp_path / 'nowhere'}"]
    bpe_tokenizer(tmp_path / "nowhere", TEXT)
    assert not [p for p in pipeline_problems(pp, tmp_path) if p.startswith("student.tokenizer")]


def test_retokenised_blocks_spell_the_same_text_truncated_to_the_block(tmp_path: Path, text_file: Path) -> None:
    ds = LM.load_source(f"text:{text_file}", seed=0, val_fraction=0.1, test_fraction=0.1,
                        options={"tokenizer": "byte", "seq_len": 32})
    byte, bpe = ds.load_tokenizer(), corpus.load_tokenizer(str(bpe_tokenizer(tmp_path / "bpe", TEXT)))
    assert not own_tokens.same_tokenizer(byte, bpe) and own_tokens.same_tokenizer(byte, corpus.load_tokenizer("byte"))
    coarse = own_tokens.retokenize(ds, byte, bpe, "bpe")  # fewer tokens: padded, labels -100 past the text
    fine = own_tokens.retokenize(coarse, bpe, byte, "byte")  # and back: cut to the block length
    assert coarse.num_classes == len(bpe) and coarse.features.shape == ds.features.shape
    for row in range(len(ds)):
        n = int((coarse.labels[row] != -100).sum()) + 1
        assert (coarse.labels[row, n - 1:] == -100).all() and n < 32
        assert coarse.labels[row, : n - 1].tolist() == coarse.features[row, 1:n].tolist()
        text = bpe.decode(coarse.features[row, :n].tolist())  # its end-of-sequence ids spelled as "</s>"
        assert text == byte.decode(ds.features[row].tolist())
        assert fine.features[row].tolist() == ds.features[row].tolist()  # the same bytes again, all 32


def test_bits_per_byte_of_a_byte_model_on_ascii_is_log2_perplexity(text_file: Path) -> None:
    torch.manual_seed(0)
    ds = LM.load_source(f"text:{text_file}", seed=0, val_fraction=0.1, test_fraction=0.1,
                        options={"tokenizer": "byte", "seq_len": 32})
    from kdflow.tracks.lm.models import create_causal_lm

    model = create_causal_lm("llama", ds.num_classes, {"layers": 1, "hidden": 16, "heads": 2, "max_positions": 32})
    x, y = ds.features[:6], ds.labels[:6]
    assert evaluation.text_bytes(y, ds.load_tokenizer()) == int((y != -100).sum())  # one byte per token
    bpb = evaluation.bits_per_byte(model, x, y, ds.load_tokenizer())
    assert bpb == pytest.approx(math.log2(evaluation.perplexity(model, x, y)), rel=1e-6)


@pytest.mark.slow
def test_a_student_with_its_own_tokenizer_distills_with_uld(tmp_path: Path, text_file: Path) -> None:
    """Byte-level teacher, BPE student: the student stage trains on its own ids with lm_uld
    against the teacher's byte cache; evaluate reports bits per byte, no id agreement."""
    from schemas.stages import STAGE_ORDER
    from tasks.common import execute_stage

    bpe_tokenizer(tmp_path / "bpe", TEXT)
    pp = parse_params(tiny_lm(f"text:{text_file}", student={"tokenizer": "bpe", "loss": {"name": "lm_uld",
                                                                                          "alpha": 0.5}}))
    for stage in STAGE_ORDER:
        execute_stage(stage, pp, tmp_path)
    art = tmp_path / "artifacts/lm"
    student = LM.load_model(art / "student")
    from transformers import AutoTokenizer

    mine = AutoTokenizer.from_pretrained(art / "student", local_files_only=True)
    assert student.vocab_size == len(mine) < 300  # the student's own vocabulary (the BPE's), its tokenizer saved with it
    history = json.loads((art / "student/history.json").read_text())
    assert history[-1]["train_uld"] < history[0]["train_uld"]  # the ULD term trained, next to its own CE
    assert history[-1]["train_ce"] < history[0]["train_ce"]

    m = json.loads((art / "evaluate/metrics.json").read_text())
    assert "agreement" not in m and "kl_teacher_student" not in m  # ids of two vocabularies are not comparable
    t, s = m["teacher"], m["student"]
    assert t["bits_per_byte"] == pytest.approx(math.log2(t["perplexity"]), rel=1e-6)  # byte teacher, ASCII text
    test = LM.load(art / "prepare").split("test")
    own = own_tokens.retokenize(test, test.load_tokenizer(), mine, "bpe")
    assert m["n_student_test_tokens"] == int((own.labels != -100).sum())
    assert m["student_vocab"] == len(mine) and m["n_test_tokens"] == int((test.labels != -100).sum())
    uniform = m["n_student_test_tokens"] * math.log2(len(mine)) / evaluation.text_bytes(own.labels, mine)
    assert 0 < s["bits_per_byte"] < uniform  # it learned something in its own tokens
    assert m["bits_per_byte_ratio"] == pytest.approx(s["bits_per_byte"] / t["bits_per_byte"])
    assert len(m["samples"]) == 3
