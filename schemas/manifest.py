"""Stage manifests: what a stage produced, from what, with which hashes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="Path relative to the stage's output folder.")
    sha256: str = Field(..., description="Hex sha256 of the file's bytes.")
    bytes: int = Field(..., ge=0, description="File size.")


class Manifest(BaseModel):
    """Saved as ``manifest.json`` in every stage output folder."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    pipeline: str
    fingerprint: str
    upstream: dict[str, str] = Field(default_factory=dict, description="Upstream stage -> fingerprint.")
    params: dict[str, Any] = Field(default_factory=dict, description="The params keys this stage read.")
    files: list[FileEntry] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict, description="Headline metrics.")
    info: dict[str, Any] = Field(default_factory=dict, description="Stage-specific results (chosen teacher, cache layout, ...).")
    mlflow_run_id: str | None = None
    kdflow_version: str
    started_at: str
    finished_at: str
    seconds: float = 0.0

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        return cls.model_validate_json((Path(directory) / MANIFEST_FILE).read_text())
