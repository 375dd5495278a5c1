"""Prefect flows: the DAG (``distill``) and its deployments. Orchestration only."""
