"""The core registries and every name they hold, declared without importing the code behind it.

``kdflow validate``, ``kdflow status`` and a no-op ``kdflow run`` need the registries' names and
metadata (a method's params model, the tracks that offer it, what a loss needs and a cache format
or condenser provides, a source's checks, an architecture's constructor signature), not the
methods themselves, and importing those means importing torch (seconds). So each name is
*declared* here with the module whose import registers it and its metadata (like transformers'
lazy ``_import_structure``); ``REGISTRY.get(name)`` imports that module on first use. The
module's own ``register(...)`` call must repeat the declared metadata, or registering fails
(``kdflow.registry.Registry.register``), and ``tests/test_catalog.py`` imports every module and
checks each declaration against what it registers (names, metadata, ``needs``, ``provides``,
signatures), so the two cannot drift.

Adding a loss, condenser, format, strategy, architecture or source to the core packages: its
file registers it as before, plus one ``declare`` line here (its params model goes to
``schemas/methods.py``). A track registers its own entries when it is imported, as before.
"""
from __future__ import annotations

import ast
import difflib
import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path

from kdflow.registry import Registry
from schemas.methods import (
    CEParams,
    DBRParams,
    HerdingParams,
    KCenterParams,
    KDParams,
    LMCEParams,
    LMJSDParams,
    LMKDDenseParams,
    LMKDParams,
    LMRKLParams,
    LMULDParams,
    MirageParams,
    NoneParams,
    NrrDdParams,
    RandomParams,
    RdedParams,
    TopKKDParams,
)

LOSSES: Registry = Registry("loss")
CONDENSERS: Registry = Registry("condensation method")
FORMATS: Registry = Registry("cache format")
STRATEGIES: Registry = Registry("selection strategy")
MODELS: Registry = Registry("model")
SOURCES: Registry = Registry("data source")
SKLEARN_DATASETS: Registry = Registry("sklearn dataset")

# --- losses: params, tracks, needs (the batch keys it reads), own_inputs (trains on inputs of its own)

CLASSIFY_LIKE = ("classify", "graph", "text")
TOPK_KEYS = ("teacher_logprobs", "teacher_indices", "teacher_tail")

for _name, _params, _tracks, _needs in (
    ("ce", CEParams, CLASSIFY_LIKE, ("y",)),
    ("kd", KDParams, CLASSIFY_LIKE, ("y", "teacher_logits")),
    ("topk_kd", TopKKDParams, CLASSIFY_LIKE, ("y", *TOPK_KEYS)),
    ("dbr", DBRParams, ("classify",), ("y", "y_aug", "d_org", "d_aug")),
    ("lm_ce", LMCEParams, ("lm",), ("y",)),
    ("lm_kd", LMKDParams, ("lm",), ("y", *TOPK_KEYS)),
    ("lm_kd_dense", LMKDDenseParams, ("lm",), ("y", "teacher_logits")),
    ("lm_rkl", LMRKLParams, ("lm",), ("y", *TOPK_KEYS)),
    ("lm_jsd", LMJSDParams, ("lm",), ("y", *TOPK_KEYS)),
    ("lm_uld", LMULDParams, ("lm",), ("y", "teacher_logprobs")),
):
    _module = "kdflow.losses." + ("lm_kd" if _name == "lm_kd_dense" else _name)
    LOSSES.declare(_name, _module, params=_params, tracks=_tracks, needs=_needs, own_inputs=_name == "dbr")

# --- condensation methods: params, tracks, needs_teacher, provides (label extras for the loss)

DBR_PROVIDES = ("y_aug", "d_org", "d_aug", "lam")  # what nrr_dd's stored views add to x and y
for _name, _module, _params, _tracks, _teacher, _provides in (
    ("none", "coreset", NoneParams, CLASSIFY_LIKE, False, ()),
    ("random", "coreset", RandomParams, CLASSIFY_LIKE, False, ()),
    ("herding", "coreset", HerdingParams, CLASSIFY_LIKE, True, ()),
    ("k_center", "coreset", KCenterParams, CLASSIFY_LIKE, True, ()),
    ("rded", "rded", RdedParams, ("classify",), True, ()),
    ("nrr_dd", "nrr_dd", NrrDdParams, ("classify",), True, DBR_PROVIDES),
    ("mirage", "mirage", MirageParams, ("graph",), False, ("weight",)),
):
    CONDENSERS.declare(_name, f"kdflow.condense.{_module}", params=_params, tracks=_tracks, needs_teacher=_teacher,
                       provides=_provides)

# --- logit cache formats: provides (the batch keys a format decodes to)

for _name, _provides in (("dense", ("teacher_logits",)), ("topk", TOPK_KEYS), ("topk_q8", TOPK_KEYS),
                         ("topk_packed", TOPK_KEYS), ("topk_adaptive", TOPK_KEYS)):
    FORMATS.declare(_name, "kdflow.cache.formats", provides=_provides)

# --- teacher-selection strategies

STRATEGIES.declare("val_accuracy", "kdflow.select.val_accuracy")
STRATEGIES.declare("probe", "kdflow.select.probe")

# --- architectures: tracks (default: classify), signature (the function whose parameters the
# constructor arguments bind to, read from the module's source by ``signature``)

for _name, _module in (("mlp", "mlp"), ("tiny_mlp", "mlp"), ("convnet", "convnet"), ("tiny_convnet", "convnet"),
                       ("convnet3", "convnet"), ("resnet", "resnet")):
    MODELS.declare(_name, f"kdflow.models.{_module}", signature=_name)
for _name in ("gcn", "gin", "gat"):
    MODELS.declare(_name, "kdflow.models.gnn", tracks=("graph",), signature="build")
MODELS.declare("tiny_gcn", "kdflow.models.gnn", tracks=("graph",), signature="tiny_gcn")


def is_import_path(name: str) -> bool:
    """``package.module:Name``: a user's model class (or factory) instead of a registered name."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr) and all(p.isidentifier() for p in [*module.split("."), *attr.split(".")])


def _module_file(module: str) -> Path:
    base = Path(__file__).resolve().parent.parent.joinpath(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"


_REQUIRED = inspect.Parameter.empty


@functools.cache
def _source_signature(module: str, function: str) -> inspect.Signature | None:
    """The parameters of ``def function`` in ``module``'s source (its first definition, at any
    depth), without importing the module; defaults are placeholders (only their presence counts)."""
    tree = ast.parse(_module_file(module).read_text())
    node = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == function), None)
    if node is None:
        return None
    a, P = node.args, inspect.Parameter
    positional = [*a.posonlyargs, *a.args]
    first_default = len(positional) - len(a.defaults)
    params = [P(arg.arg, P.POSITIONAL_ONLY if i < len(a.posonlyargs) else P.POSITIONAL_OR_KEYWORD,
                default=_REQUIRED if i < first_default else ...) for i, arg in enumerate(positional)]
    if a.vararg is not None:
        params.append(P(a.vararg.arg, P.VAR_POSITIONAL))
    params += [P(arg.arg, P.KEYWORD_ONLY, default=_REQUIRED if d is None else ...)
               for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg is not None:
        params.append(P(a.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


def signature(registry: Registry, name: str) -> inspect.Signature:
    """The call signature of ``registry``'s entry ``name``: read from its module's source while
    that module is not imported (declared ``signature`` metadata), else from the object."""
    module, function = registry.declared(name), registry.meta(name).get("signature")
    if module is not None and function is not None:
        found = _source_signature(module, function)
        if found is not None:
            return found
    return inspect.signature(registry.get(name))


# --- data sources: track (default classify), modality, path (the argument is a path), check (what
# `kdflow validate` finds wrong: unknown dataset names, missing files and folders)

SPEC_EXAMPLES = "sklearn:digits, mnist1d, idx:<dir>, parquet:<file>, tu:<NAME>"
TU_ROOT_ENV = "KDFLOW_TU_ROOT"


def resolve_source(spec: str, root: Path) -> str:
    """Make a relative ``idx:``/``parquet:`` path (or that of a source registered with
    ``path=True``) absolute against the project root."""
    kind, sep, rest = spec.partition(":")
    is_path = kind in ("idx", "parquet") or (kind in SOURCES and SOURCES.meta(kind).get("path", False))
    if sep and rest and is_path and not Path(rest).is_absolute():
        return f"{kind}:{(Path(root) / rest).resolve()}"
    return spec


def resolve_options(options: dict, root: Path) -> dict:
    """Make a relative ``root`` option (the tu source's data folder) absolute against the project root."""
    out = dict(options)
    if isinstance(out.get("root"), str) and not Path(out["root"]).expanduser().is_absolute():
        out["root"] = str((Path(root) / out["root"]).resolve())
    return out


def sklearn_problems(arg: str, options: dict, root: Path) -> list[str]:
    if (arg or "digits") in SKLEARN_DATASETS:
        return []
    close = difflib.get_close_matches(arg, SKLEARN_DATASETS.names(), n=1)
    hint = f"did you mean 'sklearn:{close[0]}'? " if close else ""
    return [f"data.source: unknown sklearn dataset {arg!r}; {hint}(known: {', '.join(SKLEARN_DATASETS.names())})"]


def sklearn_modality(arg: str) -> str:
    return "image" if (arg or "digits") == "digits" else "tabular"


def path_check(kind: str) -> Callable[[str, dict, Path], list[str]]:
    """The ``check`` of a source whose argument is a file or folder (relative: to the project root)."""
    def check(arg: str, options: dict, root: Path) -> list[str]:
        path = Path(resolve_source(f"{kind}:{arg}", root).partition(":")[2]).expanduser()
        return [] if arg and path.exists() else [f"data.source: {kind} path not found: {path}"]

    return check


def folder_check(scheme: str) -> Callable[[str, dict, Path], list[str]]:
    """The ``check`` of a source whose argument is a folder (relative: to the project root)."""
    def check(arg: str, options: dict, root: Path) -> list[str]:
        path = Path(arg).expanduser()
        path = path if path.is_absolute() else Path(root) / path
        return [] if arg and path.is_dir() else [f"data.source: {scheme} folder not found: {path}"]

    return check


def tu_problems(arg: str, options: dict, root: Path) -> list[str]:
    if not arg:
        return [f"data.source: the tu source needs a dataset name, e.g. tu:MUTAG ({SPEC_EXAMPLES})"]
    base = resolve_options(options, root).get("root") or os.environ.get(TU_ROOT_ENV)
    if not base:
        return [(f"data.options.root: where the TU files are (<root>/{arg}/raw/{arg}_A.txt); "
                 f"set data.options.root or ${TU_ROOT_ENV}")]
    folder = Path(base).expanduser() / arg
    if not (folder / "raw").is_dir() and not folder.is_dir() and not options.get("download", False):
        return [f"data.options.root: no TU dataset folder {folder / 'raw'} (and download is off)"]
    return []


SOURCES.declare("sklearn", "kdflow.data.sources", check=sklearn_problems, modality=sklearn_modality)
SOURCES.declare("mnist1d", "kdflow.data.sources", modality="sequence")
SOURCES.declare("idx", "kdflow.data.sources", check=path_check("idx"), modality="image")
SOURCES.declare("parquet", "kdflow.data.sources", check=path_check("parquet"), modality="tabular")
SOURCES.declare("tu", "kdflow.data.sources", track="graph", check=tu_problems, modality="graph")
SOURCES.declare("imagefolder", "kdflow.data.folders", path=True, check=folder_check("imagefolder"), modality="image")
SOURCES.declare("hfdisk", "kdflow.data.folders", path=True, check=folder_check("hfdisk"))
for _name in ("digits", "iris", "wine", "breast_cancer"):
    SKLEARN_DATASETS.declare(_name, "kdflow.data.sources")


CORE: tuple[Registry, ...] = (LOSSES, CONDENSERS, FORMATS, STRATEGIES, MODELS, SOURCES, SKLEARN_DATASETS)
