"""Models the harness did not train, given to a sweep as ``--checkpoint NAME=package.module:loader``.

The loader is a function of yours, importable from the Python path, called without arguments; it
returns an :class:`f2d2.model.FlowMap` (your network wrapped with its capabilities, kappa and
sigma_0; see the protocol in ``f2d2/model.py``). The sweep evaluates it under the row name NAME,
beside the registered methods, with the same metrics and flags. Evaluation cells of such a model
are never cached: the harness cannot tell whether the weights behind a loader changed.
Loading imports (and so runs) your module, as ``model.arch: "package.module:factory"`` does.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from bench.checkpoint import CheckpointError

LOADER_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_loader_spec(text: str) -> bool:
    """'package.module:function' that is not an existing path."""
    return bool(LOADER_SPEC.match(text)) and not Path(text).exists()


def import_attribute(spec: str, what: str = "loader"):
    """The object named by 'package.module:attr'; a CheckpointError names what failed."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an import can fail in many ways; each is the user's input
        raise CheckpointError(f"{what} {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})") from None
    if not hasattr(module, attr):
        raise CheckpointError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


@dataclass(frozen=True)
class UserModel:
    """A model from a user's loader function, evaluated under the row name ``method``."""

    method: str
    spec: str

    def status(self) -> str:
        return "loader"

    def load(self, data_shape: tuple[int, ...], device="cpu"):
        """Call the loader and check what it returns against the FlowMap protocol."""
        from f2d2.model import FlowMap

        loader = import_attribute(self.spec)
        if not callable(loader):
            raise CheckpointError(f"loader {self.spec!r} is not callable")
        try:
            model = loader()
        except Exception as err:
            raise CheckpointError(f"loader {self.spec!r} failed: {type(err).__name__}: {err}") from None
        if not isinstance(model, FlowMap):
            raise CheckpointError(
                f"loader {self.spec!r} returned {type(model).__name__}; it must return an f2d2.model.FlowMap "
                "(wrap your network: FlowMap(net, Capabilities(...), kappa=..., sigma_0=...))"
            )
        if tuple(model.data_shape) != tuple(data_shape):
            raise CheckpointError(f"loader {self.spec!r}: model data shape {tuple(model.data_shape)} does not match the dataset's {tuple(data_shape)}")
        model.meta.setdefault("method", self.method)
        return model.to(device).eval()
