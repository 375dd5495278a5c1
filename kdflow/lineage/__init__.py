"""MLflow helpers. The only package of kdflow that imports MLflow.

``backends`` (where lineage goes), ``tracker`` (runs per pipeline and stage), ``datasets``
(stage inputs), ``models`` (LoggedModels and the registry), ``query`` (the chain back to the data).
"""
from __future__ import annotations

from kdflow.lineage.backends import TrackingUnavailableError, check_reachable, resolve_tracking_uri
from kdflow.lineage.tracker import NullTracker, Tracker, open_tracker

__all__ = ["NullTracker", "Tracker", "TrackingUnavailableError", "check_reachable", "open_tracker",
           "resolve_tracking_uri"]
