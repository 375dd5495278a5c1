"""The ``graph`` track: graph classification (TU datasets, GNNs, Mirage).

Graphs are stored as concatenated node features, edge index and per-graph offsets
(``GraphFeatures``) in the dataset artifact; everything else is classification, so this track
is the ``classify`` track with what differs for graphs: its data, its models (``tracks:
("graph",)`` in the model registry), no augmented views, and latency timed on real test graphs
(a graph's shape alone does not define an input).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdflow.errors import DataError
from kdflow.tracks import TRACKS
from kdflow.tracks.classify import ClassifyTrack
from kdflow.tracks.classify.evaluation import BATCHES

if TYPE_CHECKING:
    import torch

    from kdflow.data.dataset import Dataset


class GraphTrack(ClassifyTrack):
    """Graph classification."""

    name = "graph"
    summary = "graph classification (TU datasets): GCN/GIN/GAT, Mirage condensation; accuracy, F1, ECE, latency"
    modalities = ("graph",)
    model_default = ()  # only models registered with tracks=("graph",)
    views_supported = False

    def views(self, ds: Dataset, k: int, seed: int, augment: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise DataError(f"logits.views: augmented views are defined for images and sequences; graphs take "
                        f"logits.views 1 (got {k})")

    def latency_inputs(self, test: Dataset) -> dict[int, Any]:
        """Real test graphs, repeated to fill each batch."""
        if len(test) == 0:
            return {}
        import torch

        return {b: test.features[torch.arange(b) % len(test)] for b in BATCHES}


TRACKS.register("graph")(GraphTrack())
