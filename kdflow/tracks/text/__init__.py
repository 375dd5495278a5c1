"""The ``text`` track: text classification with pretrained transformer teachers and small students.

Everything after the data is classification, so this is the ``classify`` track (its logit cache,
losses, selection strategies, training loop) with what differs for text: the dataset artifact
(texts + token ids, tokenised once with the teacher's tokenizer, ``data.py``), its models
(``text_bert``, ``text_gru``, ``text_cnn``, ``text_bag``, ``onnx_encoder``, ``models.py``), BERT models saved as
``save_pretrained`` folders with their tokenizer and class names (``pipeline("text-classification")``
loads them offline), no augmented views, and latency at batch 1 and 64 on real test texts.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdflow.data.dataset import Dataset
from kdflow.data.sources import SOURCES
from kdflow.errors import DataError, ModelError
from kdflow.models import create_model
from kdflow.models.io import SPEC_FILE, load_model, save_model
from kdflow.tracks import TRACKS
from kdflow.tracks.classify import ClassifyTrack
from kdflow.tracks.text import data, evaluation
from kdflow.tracks.text.models import (
    EmbeddingClassifier,
    OnnxEncoderClassifier,
    TermBag,
    TextBert,
    quiet,
)
from kdflow.train.loop import predict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


class TextTrack(ClassifyTrack):
    """Text classification."""

    name = "text"
    summary = ("text classification (BBC News, parquet/CSV texts): MiniLM / ONNX teachers, BERT / BiGRU / CNN / "
               "n-gram bag students; accuracy, F1, ECE, latency b1/b64")
    modalities = ("text",)
    model_default = ()  # only models registered with tracks=("text",)
    views_supported = False
    fidelity_rows = 128  # a transformer teacher's forward is the cost here

    # -- the dataset artifact -----------------------------------------------------------------
    def load_source(self, spec: str, *, seed: int, val_fraction: float, test_fraction: float,
                    options: dict[str, Any]) -> Dataset:
        scheme, _, arg = spec.partition(":")
        owner = SOURCES.meta(scheme).get("track", "classify") if scheme in SOURCES else None
        if owner != self.name:
            known = [n for n in SOURCES.names() if SOURCES.meta(n).get("track") == self.name]
            where = f"is data of track {owner!r}" if owner else "is not a known source"
            raise DataError(f"data.source: {scheme!r} {where}; the text track reads {', '.join(known)}")
        source_options = {k: v for k, v in options.items() if k in data.SOURCE_OPTIONS}
        unknown = sorted(set(options) - set(data.SOURCE_OPTIONS) - set(data.TOKEN_OPTIONS) - {"root"})
        if unknown:
            raise DataError(f"data.options: unknown option(s) {unknown} for the text track "
                            f"(known: {sorted({*data.SOURCE_OPTIONS, *data.TOKEN_OPTIONS})})")
        data.tokenizer_dir(str(options.get("tokenizer", data.DEFAULT_TOKENIZER)), options.get("root"))  # fail fast
        table = SOURCES.get(scheme)(arg, seed=seed, options=source_options)
        return data.build(table, spec=spec, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                          options=options)

    def save(self, ds: Dataset, folder: Path) -> None:
        data.save_text(ds, folder)

    def load(self, folder: Path) -> Dataset:
        return data.load_text(folder)

    def describe(self, ds: Dataset) -> dict[str, Any]:
        return {"num_classes": ds.num_classes, "modality": "text", "input_shape": list(ds.input_shape),
                "track": self.name}

    # -- models -----------------------------------------------------------------------------------
    def model_problems(self, arch: str, args: dict[str, Any], where: str) -> list[str]:
        """Unknown architectures and arguments, and model packages that are not installed."""
        problems = super().model_problems(arch, args, where)
        if problems:
            return problems
        from kdflow.tracks.text.models import onnx_file, resolve_pretrained

        checks = {"pretrained": resolve_pretrained, "model": onnx_file}
        for key, check in checks.items():
            if isinstance(args.get(key), str):
                try:
                    check(args[key])
                except ModelError as exc:
                    problems.append(f"{where}.args.{key}: {exc}")
        return problems

    def create_model(self, arch: str, ds: Dataset, args: dict[str, Any], teacher: Path | None = None) -> nn.Module:
        defaults = {"pad_id": int(ds.meta.get("pad_id", 0))}
        if arch in ("text_gru", "text_cnn", "text_bag"):
            defaults["full_vocab"] = int(ds.meta.get("vocab_size", 30522))
        if arch == "text_bert" and "pretrained" not in args and "init_from_teacher" not in args:
            defaults["vocab_size"] = int(ds.meta.get("vocab_size", 30522))
        extra = {"teacher": teacher} if arch == "text_bert" and "init_from_teacher" in args else {}
        model = create_model(arch, ds.input_shape, ds.num_classes, **{**defaults, **args}, **extra)
        model.kdflow_spec["args"].pop("teacher", None)
        if isinstance(model, EmbeddingClassifier | TermBag):  # the trimmed vocabulary of the training texts
            train = [i for i, s in enumerate(ds.splits) if s == "train"]
            ids = ds.features[train] if train else ds.features
            if isinstance(model, TermBag):  # words are rebuilt from the pieces: their strings are needed
                model.fit_vocabulary(ids, pieces=data.vocabulary_pieces(getattr(ds, "tokenizer_dir", None)))
            else:
                model.fit_vocabulary(ids)
        model.class_names = list(ds.meta.get("class_names", []))
        model.tokenizer_dir = getattr(ds, "tokenizer_dir", None)
        if isinstance(model, TextBert) and int(ds.features.max()) >= model.model.config.vocab_size:
            raise ModelError(f"{arch}: token ids reach {int(ds.features.max())} but the model's vocabulary has "
                             f"{model.model.config.vocab_size}; tokenise with the model's tokenizer "
                             "(data.options.tokenizer)")
        return model

    def load_model(self, folder: Path) -> nn.Module:
        folder = Path(folder)
        spec = json.loads((folder / SPEC_FILE).read_text()) if (folder / SPEC_FILE).is_file() else None
        if spec is None or spec.get("arch") == "text_bert":
            if not (folder / "config.json").is_file():
                raise ModelError(f"{folder}: no model found (model.json or a save_pretrained config.json)")
            from transformers import AutoModelForSequenceClassification

            quiet()
            try:
                hf = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True,
                                                                        trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise ModelError(f"{folder}: not a text-classification model ({exc})") from None
            saved = (spec or {}).get("args", {})
            model = TextBert(hf, int(saved.get("pad_id", hf.config.pad_token_id or 0)), saved.get("max_tokens"),
                             saved.get("head_tokens"))
            model.kdflow_spec = spec or {"arch": "text_bert", "args": {}, "input_shape": [],
                                         "num_classes": hf.config.num_labels}
            return model.eval()
        model = load_model(folder)
        if isinstance(model, OnnxEncoderClassifier):
            model.memoize = False  # a loaded teacher is timed and cached: every text goes through the encoder
        return model

    def save_model(self, model: nn.Module, folder: Path) -> None:
        """BERT: a ``save_pretrained`` folder with the tokenizer and class names (+ ``model.json``);
        the others: kdflow's ``model.safetensors`` + ``model.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not isinstance(model, TextBert):
            save_model(model, folder)
            return
        names = getattr(model, "class_names", None) or []
        config = model.model.config
        if names and len(names) == config.num_labels:
            config.id2label = dict(enumerate(names))
            config.label2id = {n: i for i, n in enumerate(names)}
        model.model.save_pretrained(folder, safe_serialization=True)
        tok = getattr(model, "tokenizer_dir", None)
        for f in TOKENIZER_FILES:
            if tok is not None and (Path(tok) / f).is_file():
                shutil.copy2(Path(tok) / f, folder / f)
        cut = {"max_tokens": model.max_tokens, "head_tokens": model.head_tokens}  # how long texts are cut
        spec = {**model.kdflow_spec, "arch": "text_bert", "args": {"pad_id": model.pad_id, **cut}, "format": "kdflow"}
        (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")

    def views(self, ds: Dataset, k: int, seed: int, augment: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise DataError(f"logits.views: the text track has no augmented views; use logits.views 1 (got {k})")

    def condense_figure(self, ds: Dataset, folder: Path, title: str) -> None:
        return None  # no picture of texts

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, models: dict[str, nn.Module], test: Dataset, *, names: dict[str, str],
                 histories: dict[str, list[dict]], latency_repeats: int, latency_threads: int | None,
                 ece_bins: int, folder: Path) -> dict[str, Any]:
        from kdflow.tracks.classify.evaluation import write_pictures

        logits = {k: predict(m, test.features, batch_size=64) for k, m in models.items()}
        inputs = evaluation.latency_inputs(test.features)
        per = {k: evaluation.model_metrics(models[k], logits[k], test.labels, test.num_classes, inputs=inputs,
                                           repeats=latency_repeats, threads=latency_threads, ece_bins=ece_bins)
               for k in models}
        tokens = float((test.features != int(test.meta.get("pad_id", 0))).sum(1).float().mean()) if len(test) else 0.0
        metrics = evaluation.compare(per, logits, names["teacher"], len(test), tokens)
        metrics["class_names"] = list(test.meta.get("class_names", []))
        write_pictures(folder, names["teacher"], logits, test.labels, test.num_classes, ece_bins, per, histories)
        return metrics

    def summary_rows(self, m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        return evaluation.summary_rows(m)

    def report_section(self, m: dict[str, Any]) -> str:
        return evaluation.report_section(m)


TRACKS.register("text")(TextTrack())
