"""f2d2-bench: datasets, training, sweeps, metrics, tables and the ``f2d2-bench`` CLI.

From Python, :func:`load_checkpoint` returns a trained model ready for evaluation::

    from bench import load_checkpoint
    from f2d2 import few_step_log_prob, reference_log_prob, sample

    model = load_checkpoint("results/checkpoints/checkerboard/meanflow-f2d2-<key>")
    log_p = few_step_log_prob(model, x, num_steps=1).log_p
"""

from bench.checkpoint import CheckpointError, load_checkpoint

__all__ = ["CheckpointError", "load_checkpoint"]
