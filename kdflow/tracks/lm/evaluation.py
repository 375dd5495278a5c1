"""Language-model evaluation: perplexity, per-token KL and agreement, generation speed, samples."""
from __future__ import annotations

import math
import time
from html import escape
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.models import count_params, model_bytes
from kdflow.report import fmt, table
from kdflow.train.device import eval_mode

IGNORE = -100


def _batches(x: torch.Tensor, batch_size: int):  # noqa: ANN202
    for i in range(0, len(x), batch_size):
        yield slice(i, i + batch_size)


def perplexity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 8,
               device: torch.device | None = None) -> float:
    """``exp`` of the mean next-token cross-entropy over the labelled positions of ``y``."""
    device = device or next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for s in _batches(x, batch_size):
            logits = model(x[s].to(device)).float()  # [B, L, V]
            labels = y[s].to(device).long()  # [B, L]
            nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE).sum())
    return math.exp(total / max(count, 1))


def text_bytes(y: torch.Tensor, tokenizer: Any) -> int:
    """UTF-8 bytes of the text the labelled targets of ``y`` ``[N, L]`` spell (each special
    token, e.g. end-of-sequence between documents, counts as one byte)."""
    special = set(tokenizer.all_special_ids)
    total = 0
    for row in y.tolist():
        ids = [i for i in row if i != IGNORE]
        total += len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
        total += sum(1 for i in ids if i in special)
    return total


def bits_per_byte(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tokenizer: Any, *,
                  batch_size: int = 8) -> float:
    """Summed next-token log-loss in bits over the labelled positions, per byte of their text
    (``text_bytes``): comparable across tokenizers, unlike perplexity. For a byte-level
    tokenizer on ASCII text it is ``log2(perplexity)``."""
    count = int((y != IGNORE).sum())
    nats = math.log(perplexity(model, x, y, batch_size=batch_size)) * count
    return nats / math.log(2) / max(text_bytes(y, tokenizer), 1)


def compare_tokens(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   batch_size: int = 8) -> dict[str, float]:
    """Mean per-token KL(teacher || student) and top-1 agreement over labelled positions."""
    kl_sum, agree, count = 0.0, 0, 0
    with eval_mode(teacher), eval_mode(student), torch.inference_mode():
        for s in _batches(x, batch_size):
            mask = y[s] != IGNORE  # [B, L]
            p = F.log_softmax(teacher(x[s]).float()[mask], dim=-1)  # [T, V]
            q = F.log_softmax(student(x[s]).float()[mask], dim=-1)  # [T, V]
            kl_sum += float((p.exp() * (p - q)).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            count += int(mask.sum())
    return {"kl_teacher_student": kl_sum / max(count, 1), "agreement": agree / max(count, 1)}


def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``prompt`` ``[1, P]`` by ``new_tokens`` tokens (``[1, P + n]``)."""
    with eval_mode(model), torch.inference_mode():
        return model.generate(prompt.long(), max_new_tokens=new_tokens, do_sample=False,
                                    attention_mask=torch.ones_like(prompt), pad_token_id=0)


def tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Greedy generation speed at batch 1 (median of ``repeats``, after one warm-up)."""
    generate(model, prompt, 2)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, prompt, new_tokens)
        times.append((time.perf_counter() - start) / max(out.shape[1] - prompt.shape[1], 1))
    times.sort()
    return 1.0 / times[len(times) // 2]


def model_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prompt: torch.Tensor, *,
                  new_tokens: int, repeats: int) -> dict[str, float]:
    return {"perplexity": perplexity(model, x, y), "params": count_params(model), "bytes": model_bytes(model),
            "tokens_per_s_b1": tokens_per_second(model, prompt, new_tokens, repeats)}


def summary_rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    t, s, c = m["teacher"], m["student"], m["compression"]
    own = "bits_per_byte" in s  # two tokenizers: perplexities in different units
    rows = [("bits per byte", f"{t['bits_per_byte']:.4f}", f"{s['bits_per_byte']:.4f}",
             f"{s['bits_per_byte'] / t['bits_per_byte']:.2f}x")] if own else []
    rows += [("perplexity (own tokens)" if own else "perplexity", f"{t['perplexity']:.3f}", f"{s['perplexity']:.3f}",
              "-" if own else f"{s['perplexity'] / t['perplexity']:.2f}x"),
            ("params", f"{t['params']:,}", f"{s['params']:,}", f"{c['params_ratio']:.1f}x"),
            ("bytes", f"{t['bytes']:,}", f"{s['bytes']:,}", f"{c['bytes_ratio']:.1f}x"),
            ("tokens/s b1", f"{t['tokens_per_s_b1']:.1f}", f"{s['tokens_per_s_b1']:.1f}", f"{c['speedup_b1']:.1f}x")]
    return rows


def report_section(m: dict[str, Any]) -> str:
    html = table(["", f"teacher ({m['teacher'].get('name', '?')})", "student", "student / teacher"],
                 [list(r) for r in summary_rows(m)], numeric=(1, 2, 3))
    shown = [f"{label} {fmt(m[k])}" for k, label in (("kl_teacher_student", "KL(teacher || student) per token"),
                                                       ("agreement", "top-1 token agreement"),
                                                       ("n_test_tokens", "test tokens")) if k in m]
    html += "\n<p>" + escape(" · ".join(shown)) + "</p>"
    samples = m.get("samples", [])
    if samples:
        rows = [[s["prompt"], s["teacher"], s["student"]] for s in samples]
        html += "\n<h3>Samples (greedy)</h3>\n" + table(["prompt", "teacher", "student"], rows)
    return html
