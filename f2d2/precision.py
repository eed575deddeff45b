"""Mixed precision inside the losses: which computations stay in float32 under autocast.

A training loop may run a loss under ``torch.autocast`` (bf16 or fp16). The network calls that
produce predictions (the outputs that carry gradients) then run in the reduced precision; the
computations whose rounding would bias the F2D2 terms do not (:func:`full_precision`):

- the stop-gradient divergence targets sg[div w(x_t, t)] / kappa (Hutchinson or exact VJPs),
- Shortcut's targets from two half jumps, u* and D* (arXiv:2410.12557; arXiv:2512.02636 Sec. 3),
- every forward-mode JVP: MeanFlow's du/dt and dD/dt (its prediction then comes from a separate
  reduced-precision forward) and LSD's d_s Phi and d_s D (whose JVP is also the prediction, so LSD's
  off-diagonal rows run entirely in float32), and LSD's endpoint field and divergence.

Without autocast (the default) every helper here is a no-op and the losses run as before, bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def autocast_active(like: Tensor) -> bool:
    """True when autocast is on for the device of ``like`` (never on devices without autocast, e.g. 'meta')."""
    kind = like.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def full_precision(like: Tensor) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on the device of ``like``; a no-op when it is not on.

    Inside it, tensors created from float32 inputs stay float32; inputs coming from reduced-precision
    network calls must be cast with :func:`as_float32` by the caller.
    """
    if not autocast_active(like):
        return contextlib.nullcontext()
    return torch.autocast(device_type=like.device.type, enabled=False)


def as_float32(value: Tensor, like: Tensor) -> Tensor:
    """``value`` in the dtype of ``like`` (float32 training data) if autocast left it in bf16/fp16."""
    return value if value.dtype == like.dtype else value.to(like.dtype)
