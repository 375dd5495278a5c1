"""Typed stage outputs: what each stage records in its manifest's ``info`` and downstream reads.

A stage returns ``ctx.manifest(info=<model>)``; a downstream stage reads ``ctx.output("select")``
and gets the model back, validated, so no task imports another task to interpret its output.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Output(BaseModel):
    """Base of the stage outputs (unknown keys kept: older manifests stay readable)."""

    model_config = ConfigDict(extra="allow")


class Prepared(Output):
    """prepare: what the dataset artifact holds."""

    modality: str
    num_classes: int = Field(..., description="Classes (0 when the track has no classes).")
    input_shape: list[int] = Field(default_factory=list)
    track: str = "classify"


class Candidate(Output):
    """One teacher candidate."""

    origin: str = Field(..., description="trained | checkpoint")
    val_accuracy: float | None = None
    params: int = 0
    bytes: int = 0


class Teachers(Output):
    """teachers: every candidate by name."""

    candidates: dict[str, Candidate]


class Selection(Output):
    """select: the chosen teachers (best first) and their weights."""

    teachers: list[str]
    weights: list[float]
    strategy: str
    ranking: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def best(self) -> str:
        return self.teachers[0]

    def chosen(self) -> list[tuple[str, float]]:
        return list(zip(self.teachers, self.weights))


class Condensed(Output):
    """condense: the method and the teacher it used."""

    method: str
    teacher: str


class TeacherCache(Output):
    """One chosen teacher's cache in the logits output."""

    teacher: str
    weight: float
    dir: str = Field(..., description="Folder of the cache inside the logits output ('' for the output itself).")
    cache: dict[str, Any] = Field(..., description="The cache's cache.json.")
    cache_key: str
    shards_computed: list[str] = Field(default_factory=list, description="Shard files this run computed (the rest were reused).")


class Logits(Output):
    """logits: one cache per chosen teacher, best ranked first."""

    views: int = 1
    teachers: list[TeacherCache]
    teacher_names: list[str] = Field(default_factory=list, description="The chosen teachers, best first (for lineage).")


class SeedRun(Output):
    """One of the students ``student.seeds`` trains."""

    seed: int
    dir: str = Field(".", description="Its folder in the stage output ('.': the stage's model, the first seed).")
    best_epoch: int = 0
    best_val: float = 0.0
    epochs_run: int = 0
    resumed_from: int | None = None


class Student(Output):
    """student: how training went (of the first seed's student, the stage's model)."""

    best_epoch: int
    resumed_from: int | None = None
    stopped_early: bool = False
    rounds: list[dict[str, Any]] = Field(default_factory=list, description="On-policy rounds: students' weights digests before/after, the grades' sha256.")
    seeds: list[SeedRun] = Field(default_factory=list, description="Every seed's student, the first being the stage's model.")


class Evaluated(Output):
    """evaluate: the teacher it compared the student with."""

    teacher: str


OUTPUTS: dict[str, type[Output]] = {
    "prepare": Prepared, "teachers": Teachers, "select": Selection, "condense": Condensed,
    "logits": Logits, "student": Student, "evaluate": Evaluated,
}
