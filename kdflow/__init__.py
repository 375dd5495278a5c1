"""kdflow: declarative, cached and traceable knowledge distillation.

The library in this package is importable without Prefect, DVC or MLflow; only
``kdflow.lineage`` imports MLflow.
"""
from __future__ import annotations

__version__ = "0.1.0"
