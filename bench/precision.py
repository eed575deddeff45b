"""Speed levers of the training step: autocast precision, a gradient scaler, TF32, torch.compile.

``train.precision``:
- 'fp32' (default): no autocast; the training step is what it always was, bit for bit.
- 'bf16': ``torch.autocast(dtype=torch.bfloat16)`` around the loss (forward passes and the loss
  terms); backward follows the recorded dtypes; parameters, gradients, optimizer state and EMA stay
  float32. Works on CPU (tested here) and on CUDA GPUs with bf16 support (Ampere and later).
- 'fp16': ``torch.autocast(dtype=torch.float16)`` plus a ``torch.amp.GradScaler``: the loss is
  multiplied by a running scale before backward, gradients are unscaled before clipping, and a step
  whose gradients overflow is skipped while the scale is lowered (counted in ``num_skipped``; the
  scaler's state is saved with checkpoints). Runs on CPU too (tested here, slowly: CPUs have little
  float16 arithmetic); the CUDA path is the same code and has not been run on a GPU here.

What stays float32 under bf16/fp16 (f2d2/precision.py): the divergence targets sg[div w] / kappa,
Shortcut's half-jump targets u* and D*, every JVP (MeanFlow's targets; LSD's off-diagonal rows,
whose JVP is also the prediction), LSD's endpoint field, the mean loss and everything after it
(gradients, clipping, optimizer, EMA). Validation and all evaluation never run under autocast.

``train.tf32`` (CUDA only; no effect on CPU): True enables TF32 for float32 matmuls and cuDNN
convolutions during training, False disables both, None (default) leaves PyTorch's defaults
(matmuls off, cuDNN convolutions on). The previous settings are restored after training, so that
evaluation in the same process runs as configured before. Untested here (no GPU).

``train.compile``: ``nn.Module.compile()`` of the trained network in place (state-dict names are
unchanged, so checkpoints are the same format); the EMA and teacher networks stay eager. Not part
of the cache key (it changes rounding, not the recipe). Tested on CPU with the MLP (needs a C++
compiler for inductor); CUDA untested.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from bench.config import ConfigError, TrainConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a precision the device cannot run, before any training starts."""
    if cfg.precision == "fp32":
        return
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"train.precision {cfg.precision!r}: no autocast on device {device.type!r}; use fp32")
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision 'bf16': this GPU has no bfloat16 support; use fp16 or fp32")


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The context of the training step's loss: autocast in ``cfg.precision``, or nothing for fp32."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[cfg.precision])


def make_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (float16's range needs one); None otherwise."""
    return torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None


@contextlib.contextmanager
def tf32_mode(enabled: bool | None) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions inside the block (None: leave them), restored after."""
    if enabled is None:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def compile_network(model: torch.nn.Module) -> None:
    """Compile the network's forward in place (``nn.Module.compile``): parameter names are kept."""
    model.net.compile()
