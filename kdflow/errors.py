"""User-facing errors. The CLI prints them on one screen and exits with ``exit_code``."""
from __future__ import annotations


class KdflowError(Exception):
    """Base class of every error a user can act on (bad input, not a bug)."""

    exit_code = 1


class ParamsError(KdflowError):
    """The pipeline file is invalid. ``problems`` lists every ``key.path: message``."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "params") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


class DataError(KdflowError):
    """A dataset is broken: names the column and shows offending rows."""


class ArtifactError(KdflowError):
    """An upstream artifact is missing, altered or from another fingerprint."""


class CacheCorruptError(ArtifactError):
    """A logit-cache shard fails its sha256 or cannot be read."""


class ModelError(KdflowError):
    """A model cannot be built or loaded (unknown registry name, bad checkpoint)."""


class UnknownNameError(KdflowError):
    """A registry lookup failed."""

    exit_code = 2
