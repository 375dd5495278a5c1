"""The stage graph, written once: stages, what each reads, the role of each input, its outputs.

Everything else derives from here: the order the flow runs the stages in, each stage's
fingerprint inputs, ``dvc.yaml`` (``kdflow dvc-yaml``), the MLflow dataset contexts and the
stages whose models are logged. A stage's *code* is not listed: it is the import closure of
``tasks/<stage>.py`` and of the pipeline's track, computed in ``tasks/common.py``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Input:
    """An upstream stage a stage reads, and how it uses it (shown by MLflow next to the dataset)."""

    stage: str
    role: str = "input"


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline.

    Attributes:
        name: stage name (``tasks/<name>.py``, ``artifacts/<pipeline>/<name>/``).
        section: the params section ``tasks.<name>.run`` receives.
        inputs: upstream stages with their roles.
        params: the params keys the stage's fingerprint covers (dotted).
        probe_params: keys read only by the ``probe`` selection strategy.
        models: the role of the models the stage writes (``teacher``/``student``), if any.
        metrics: a file of the output DVC shows as metrics (``dvc metrics``).
        plots: a folder of the output DVC shows as plots.
    """

    name: str
    section: str
    inputs: tuple[Input, ...] = ()
    params: tuple[str, ...] = ()
    probe_params: tuple[str, ...] = ()
    models: str | None = None
    metrics: str | None = None
    plots: str | None = None

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(i.stage for i in self.inputs)

    def role(self, upstream: str) -> str:
        return next((i.role for i in self.inputs if i.stage == upstream), "input")


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("prepare", "data", (), ("track", "seed", "data")),
    StageSpec("teachers", "teachers", (Input("prepare", "training"),), ("track", "seed", "teachers"),
              models="teacher"),
    StageSpec("select", "select", (Input("prepare", "training"), Input("teachers", "candidates")),
              ("track", "seed", "select"), probe_params=("student.arch", "student.args")),
    StageSpec("condense", "condense", (Input("prepare", "training"), Input("select", "choice"),
                                       Input("teachers", "teacher")), ("track", "seed", "condense")),
    StageSpec("logits", "logits", (Input("condense", "training"), Input("select", "choice"),
                                   Input("teachers", "teacher")), ("track", "seed", "logits")),
    StageSpec("student", "student", (Input("prepare", "validation"), Input("condense", "training"),
                                     Input("logits", "teacher signal"), Input("teachers", "initialisation")),
              ("track", "seed", "student"),
              models="student"),
    StageSpec("evaluate", "evaluate", (Input("prepare", "test"), Input("teachers", "teacher"),
                                       Input("select", "choice"), Input("student", "student")),
              ("track", "evaluate"), metrics="metrics.json", plots="plots"),
]}
STAGE_ORDER: list[str] = list(STAGES)
MODEL_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES.values() if s.models)


def role(stage: str, upstream: str) -> str:
    """How ``stage`` uses ``upstream``'s output (``input`` when not declared)."""
    spec = STAGES.get(stage)
    return spec.role(upstream) if spec else "input"
