"""Prefect flows: the DAG (``distill``) and its deployments. Orchestration only.

Importing this package sets kdflow's defaults for Prefect settings the user has not set, before
Prefect itself is imported (Prefect reads its settings once, at import).
"""
import os

PREFECT_DEFAULTS = {
    # Prefect's temporary server gets 20 s to answer by default: too little on a busy machine,
    # where `kdflow run` died with "Timed out while attempting to connect to ephemeral Prefect API
    # server". The wait counts only its own sleeps, so this is a lower bound on the wall time.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
}
for _key, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
