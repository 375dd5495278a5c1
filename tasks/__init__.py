"""One module per pipeline stage, each exposing ``run(params, ctx) -> Manifest``."""
