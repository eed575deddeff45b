"""The environment a number was produced in: versions, device, git commit."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "torchdiffeq", "clean-fid", "numpy", "pandas", "f2d2-bench")


def quiet_known_warnings() -> None:
    """Silence torch's own deprecation notice, raised when forward-mode AD first registers its
    decompositions with torch.jit.script; it says nothing about this project's code."""
    import warnings

    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The checked-out commit (with '+dirty' for local changes), None outside a git clone."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(name: str = "f2d2-bench") -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda' or 'cuda:N', which must exist.
    Anything else is a ValueError naming the valid forms (torch.device would accept 'mps', 'xla',
    ... that this harness does not support, and raise a RuntimeError on garbage)."""
    if not DEVICE_SPEC.match(spec):
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the machine type."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str | None:
    """The instruction set torch's CPU kernels dispatch to ('AVX512', 'AVX2', 'DEFAULT', ...):
    two CPUs under one model name (a cloud VM's 'AMD EPYC') may run different kernels, whose float
    reductions differ in the last bits."""
    getter = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return getter() if getter is not None else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability(),
        "git_commit": git_commit(),
        "versions": {name: package_version(name) for name in PACKAGES},
    }
