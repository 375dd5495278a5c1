"""The params models of the registered losses and condensation methods (``student.loss``,
``condense``), one per method, whose ``name`` / ``method`` literal is the registry name.

They live here, apart from the methods' code, so validating a pipeline needs neither torch nor
the methods' modules: ``kdflow/catalog.py`` declares each registry name with its params model,
and the method's file imports its model from here and registers with it (the registry checks
that both say the same). A loss or condenser of a track's own may keep its model next to its
code.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from schemas.base import Section


def temperature_field() -> Any:
    """The softening temperature knob of the KD losses (one definition)."""
    return Field(4.0, gt=0, le=100, description="Softmax temperature T (KD terms are scaled by T^2).")


def alpha_field() -> Any:
    """The distillation weight knob of the KD losses (one definition)."""
    return Field(0.9, ge=0, le=1, description="Weight of the distillation term; 1 - alpha weighs cross-entropy.")


def lm_temperature_field() -> Any:
    """The softening temperature knob of the LM divergences (default 1: LM caches are usually
    written and distilled at T = 1)."""
    return Field(1.0, gt=0, le=100,
                 description="Softmax temperature T (the divergence is scaled by T^2).")


def ipc_field() -> Any:
    """The ``ipc`` knob of the methods that keep or make samples per class (one definition)."""
    return Field(10, ge=1, le=1_000_000, description="Samples (or synthetic images) per class.")


# --- losses (kdflow/losses/<name>.py) ----------------------------------------------------------

class CEParams(Section):
    name: Literal["ce"] = Field("ce", description="Cross-entropy with the hard labels (no teacher signal).")


class KDParams(Section):
    name: Literal["kd"] = Field("kd", description="Hinton KD on dense teacher logits (logits.format dense).")
    temperature: float = temperature_field()
    alpha: float = alpha_field()


class TopKKDParams(Section):
    name: Literal["topk_kd"] = Field(
        "topk_kd", description="KD on a top-k cache's k classes plus a tail bucket (logits.format topk or topk_q8)."
    )
    temperature: float = temperature_field()
    alpha: float = alpha_field()


class DBRParams(Section):
    name: Literal["dbr"] = Field(
        "dbr", description="NRR-DD distance labels on the stored mixed views (needs condense.method nrr_dd)."
    )
    beta: float = Field(
        1.0, ge=0, le=10_000, description="Weight of the distance-matching term (its temperature is the one stored by nrr_dd)."
    )


class TokenKDParams(Section):
    """The knobs every per-token KD loss shares; a subclass narrows ``name`` to its own literal."""

    name: str
    temperature: float = lm_temperature_field()
    alpha: float = alpha_field()


class LMCEParams(Section):
    name: Literal["lm_ce"] = Field(
        "lm_ce",
        description="Next-token cross-entropy only (no teacher): the LM baseline; trains teachers.",
    )


class LMKDParams(TokenKDParams):
    name: Literal["lm_kd"] = Field(
        "lm_kd", description="Token-level forward KL on a per-token top-k cache plus a tail "
                             "bucket (logits.format topk or topk_q8)."
    )


class LMKDDenseParams(TokenKDParams):
    name: Literal["lm_kd_dense"] = Field(
        "lm_kd_dense", description="Token-level forward KL on dense per-token teacher logits "
                                   "(logits.format dense)."
    )


class LMRKLParams(TokenKDParams):
    name: Literal["lm_rkl"] = Field(
        "lm_rkl", description="Token-level reverse KL(student || teacher) on a per-token top-k "
                              "cache plus a tail bucket (logits.format topk or topk_q8)."
    )


class LMJSDParams(TokenKDParams):
    name: Literal["lm_jsd"] = Field(
        "lm_jsd", description="Token-level generalised JSD(beta) (GKD) on a per-token top-k "
                              "cache plus a tail bucket (logits.format topk or topk_q8)."
    )
    beta: float = Field(
        0.5, ge=0, le=1, description="Teacher weight in the mixture M = beta*P + (1-beta)*Q; "
                                     "0 is forward KL(teacher||student), 1 is reverse KL."
    )


class LMULDParams(Section):
    name: Literal["lm_uld"] = Field(
        "lm_uld", description="Universal Logit Distillation: L1 distance of the sorted student "
                              "and teacher probabilities per token; works across tokenizers "
                              "(logits.format topk or topk_q8)."
    )
    temperature: float = Field(
        1.0, gt=0, le=100, description="Softmax temperature of the student only (the teacher "
                                       "stays at the capture temperature); not rescaled by T^2."
    )
    alpha: float = alpha_field()


# --- condensation methods (kdflow/condense/) -----------------------------------------------

class NoneParams(Section):
    method: Literal["none"] = Field("none", description="Keep the whole training split.")


class RandomParams(Section):
    method: Literal["random"] = Field("random", description="Samples drawn uniformly per class.")
    ipc: int = ipc_field()


class HerdingParams(Section):
    method: Literal["herding"] = Field("herding", description="Herding in the teacher's feature space.")
    ipc: int = ipc_field()


class KCenterParams(Section):
    method: Literal["k_center"] = Field("k_center", description="Greedy k-center in the teacher's feature space.")
    ipc: int = ipc_field()


class CropParams(Section):
    """The crop-discovery knobs rded and nrr_dd share (each narrows ``method`` to its name)."""

    method: str
    ipc: int = ipc_field()
    factor: int | None = Field(
        None, ge=1, le=16,
        description="Each synthetic image is a factor x factor grid of real crops; unset: by resolution "
        "(1 below 128 px, 2 from 128 px up, as the official RDED scripts).",
    )
    crops_per_image: int = Field(5, ge=1, le=1000, description="Random-resized crops scored per real image.")
    images_per_class: int = Field(300, ge=1, le=1_000_000, description="Real images per class used as crop sources.")
    scale_min: float = Field(0.08, gt=0, le=1, description="Smallest crop area as a fraction of the image.")
    scale_max: float = Field(1.0, gt=0, le=1, description="Largest crop area as a fraction of the image.")

    @model_validator(mode="after")
    def _scale_range(self) -> CropParams:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must be <= scale_max ({self.scale_max})")
        return self


class RdedParams(CropParams):
    method: Literal["rded"] = Field("rded", description="Stitched confident crops with the teacher's soft labels.")


class NrrDdParams(CropParams):
    method: Literal["nrr_dd"] = Field(
        "nrr_dd", description="RDED-style crops refined outside the teacher's critical regions, with DBR label extras."
    )
    cam_pool: float = Field(
        0.5, gt=0, le=1, description="Share of crops (highest CAM ratio) eligible before low confidence picks."
    )
    correct_only: bool = Field(
        True, description="Prefer crops the teacher classifies correctly before picking the least confident."
    )
    eps: float = Field(
        0.5, ge=0, le=2, description="CAM threshold of the refinement mask max(0, eps - CAM); 0 freezes all pixels."
    )
    iterations: int = Field(100, ge=0, le=100_000, description="Refinement steps on the non-critical pixels.")
    lr: float = Field(
        0.05, gt=0, le=1000, description="Step size eta of the masked gradient step x <- x - M * eta * grad."
    )
    bn_weight: float = Field(1.0, ge=0, le=10_000, description="Weight of the BatchNorm-statistics matching term.")
    temperature: float = Field(1.0, gt=0, le=100, description="Softmax temperature of the stored DBR distances.")
    views: int = Field(
        300, ge=1, le=10_000,
        description="DBR views (mixup + crop) whose two teacher distances are stored per image; the student trains on view (epoch - 1) % views (set it to the student's epochs for a fresh view every epoch).",
    )
    view_scale_min: float = Field(0.5, gt=0, le=1, description="Smallest crop area share of a DBR view.")
    view_scale_max: float = Field(1.0, gt=0, le=1, description="Largest crop area share of a DBR view.")
    view_flip: bool = Field(True, description="Mirror DBR views left-right with probability 1/2.")

    @model_validator(mode="after")
    def _view_scale_range(self) -> NrrDdParams:
        if self.view_scale_min > self.view_scale_max:
            raise ValueError(f"view_scale_min ({self.view_scale_min}) must be <= view_scale_max ({self.view_scale_max})")
        return self


class MirageParams(Section):
    method: Literal["mirage"] = Field("mirage", description="Frequent computation-tree sets per class (graphs).")
    hops: int = Field(2, ge=0, le=10, description="Depth of the computation trees (match the GNN's number of layers).")
    thresholds: int | list[int] | None = Field(
        None, description="Absolute support threshold per class (one int for all classes); null: automatic (target_graphs)."
    )
    target_graphs: int | None = Field(
        None, ge=1, le=1_000_000, description="Automatic thresholds aim at about this many condensed graphs in all (with thresholds null)."
    )
    frequency: Literal["weight", "uniform"] = Field(
        "weight", description="Weigh each condensed graph's loss by its support (frequency-proportional), or uniformly."
    )
    max_set_size: int | None = Field(None, ge=1, le=1000, description="Largest tree set mined (null: no bound).")

    @field_validator("thresholds")
    @classmethod
    def _positive_thresholds(cls, value: int | list[int] | None) -> int | list[int] | None:
        values = [value] if isinstance(value, int) else (value or [])
        if any(v < 1 for v in values) or value == []:
            raise ValueError(f"mirage thresholds must be integers >= 1, one per class or one for all (got {value})")
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> MirageParams:
        if (self.thresholds is None) == (self.target_graphs is None):
            raise ValueError("mirage: give exactly one of 'thresholds' (per class) or 'target_graphs' (automatic)")
        return self
