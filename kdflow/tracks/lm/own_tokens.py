"""A student with its own tokenizer (``student.tokenizer``): the teacher's blocks re-tokenised.

The data artifact, the teacher and its per-token cache stay in the teacher's tokens. At the
student stage every teacher block is decoded back to text (segment by segment, split at the
teacher's end-of-sequence ids, which become the student's) and tokenised with the student's
tokenizer: the student trains on its own ids for the same text span, with its own next-token
targets for the CE term.

Alignment (Universal Logit Distillation, Boizard et al. 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss", section 3): the two sequences are
truncated to the shorter one and position t of the student is matched with position t of the
teacher. Here the student's ids are cut to the teacher's block length L (a finer tokenizer
loses the block's end) or padded to it (a coarser one: the padding has no label), so the cached
teacher rows ``[L, k]`` line up with the student's logits ``[L, V_s]`` and a position counts
when both have a next token. ULD compares sorted probabilities, never token ids, so no id map
is needed; losses that compare ids (lm_kd, lm_rkl, lm_jsd, ...) are refused by validate.

Perplexities under two tokenizers are not comparable (a token is a different unit):
``bits_per_byte`` (``evaluation.py``) normalises the summed log-loss by the bytes of text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdflow.tracks.lm.blocks import TokenBlocks
from kdflow.tracks.lm.corpus import IGNORE

# the losses whose terms need no teacher token id in the student's vocabulary
TOKENIZER_FREE_LOSSES = ("lm_uld", "lm_ce")


def same_tokenizer(a: Any, b: Any) -> bool:
    """True when two tokenizers map the same strings to the same ids."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def texts(ids: list[int], tokenizer: Any) -> list[str]:
    """The text segments of a block's ``ids``, split at the tokenizer's end-of-sequence id."""
    eos, out, cur = tokenizer.eos_token_id, [], []
    for i in ids:
        if eos is not None and i == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(i)
    out.append(cur)
    return [tokenizer.decode(seg, skip_special_tokens=True) for seg in out]


def encode(segments: list[str], tokenizer: Any) -> list[int]:
    """The student's ids of ``segments``, its end-of-sequence id between them."""
    eos, ids = tokenizer.eos_token_id, []
    for i, text in enumerate(segments):
        if i and eos is not None:
            ids.append(eos)
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def retokenize(ds: TokenBlocks, source: Any, target: Any, spec: str) -> TokenBlocks:
    """``ds``'s blocks (tokenised with ``source``) re-tokenised with ``target``, same rows, splits
    and block length ``L``: ids cut or padded to ``L``, targets ``-100`` past the last real token."""
    n, length = ds.features.shape
    pad = target.pad_token_id if target.pad_token_id is not None else 0
    x = np.full((n, length), pad, dtype=np.int64)
    y = np.full((n, length), IGNORE, dtype=np.int64)
    for row in range(n):
        ids = encode(texts(ds.features[row].tolist(), source), target)[:length]
        x[row, : len(ids)] = ids
        y[row, : max(len(ids) - 1, 0)] = ids[1:]
    meta = {**ds.meta, "tokenizer": spec, "teacher_tokenizer": ds.meta.get("tokenizer")}
    return TokenBlocks(features=torch.from_numpy(x), labels=torch.from_numpy(y), sample_ids=list(ds.sample_ids),
                       splits=list(ds.splits), num_classes=len(target), modality=ds.modality, meta=meta,
                       tokenizer=target, tokenizer_dir=None, split_rows=dict(ds.split_rows))


def load(spec: str, root: Path) -> Any:
    """The student's tokenizer (``corpus.load_tokenizer``, paths relative to the project root)."""
    from kdflow.tracks.lm.corpus import load_tokenizer

    return load_tokenizer(spec, root)
