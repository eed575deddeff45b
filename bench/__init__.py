"""f2d2-bench: datasets, training, sweeps, metrics, tables and the ``f2d2-bench`` CLI.

From Python, :func:`load_checkpoint` returns a trained model and :func:`evaluate` turns any flow
model into the result rows a sweep writes (a pandas DataFrame)::

    from bench import evaluate, load_checkpoint

    model = load_checkpoint("runs/checkpoints/checkerboard/meanflow-f2d2-<key>")
    frame = evaluate(model, dataset="checkerboard", nfe=[1, 2, 4, 8])
"""

from bench.checkpoint import CheckpointError, load_checkpoint
from bench.config import ConfigError


def __getattr__(name: str):
    # evaluate pulls in pandas and the metrics; importing bench alone stays light
    if name in ("evaluate", "prepare"):
        from bench import api

        return getattr(api, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")


__all__ = ["CheckpointError", "ConfigError", "evaluate", "load_checkpoint", "prepare"]
