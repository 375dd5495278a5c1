"""MLflow helpers. The only package of kdflow that imports MLflow."""
from __future__ import annotations

from kdflow.lineage.tracker import NullTracker, Tracker, open_tracker, resolve_tracking_uri

__all__ = ["NullTracker", "Tracker", "open_tracker", "resolve_tracking_uri"]
