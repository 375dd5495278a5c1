"""Parent-run naming and the champion alias, against a real MLflow sqlite store (fast)."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdflow.lineage import parent, registry


def test_run_name_says_what_changed() -> None:
    assert parent.run_name("tiny", ["student.loss.temperature=2", "seed=1"], "ab" * 32) == \
        "tiny student.loss.temperature=2 seed=1"
    assert parent.run_name("tiny", [], "0123456789abcdef" * 4) == "tiny @01234567"
    assert parent.run_name("tiny", None, None) == "tiny"
    long = parent.run_name("tiny", ["x=" + "9" * 500], None)
    assert len(long) == parent.MAX_NAME and long.endswith("…")


def test_champion_follows_the_best_accuracy_and_keeps_it_on_ties(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    (tmp_path / "model").mkdir()

    def version(acc: float) -> str:
        v = client.create_model_version("m", source=str(tmp_path / "model")).version
        client.set_model_version_tag("m", v, "kdflow.eval.accuracy", f"{acc:.4f}")
        registry.promote(client, "m", v, acc)
        return str(v)

    first = version(0.5)
    assert str(client.get_model_version_by_alias("m", "champion").version) == first
    second = version(0.7)
    assert str(client.get_model_version_by_alias("m", "champion").version) == second
    version(0.6)  # worse: the champion stays
    version(0.7)  # a tie: the earlier champion stays
    assert str(client.get_model_version_by_alias("m", "champion").version) == second
    assert registry.promote(client, "m", "1", None) is False  # no accuracy (another track): no alias change
    assert str(client.get_model_version_by_alias("m", "champion").version) == second
    with pytest.raises(MlflowException):  # kdflow sets no other alias
        client.get_model_version_by_alias("m", "candidate")
