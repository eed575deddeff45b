"""torch.distributed behind a tiny interface, so that training and evaluation read the same at any
world size.

Launched by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in
the environment), :func:`process_group` initialises the default process group (NCCL on CUDA with
device ``cuda:LOCAL_RANK``, gloo on CPU) and destroys it on every exit path. Without torchrun it
does nothing, and every function here is trivial at world size 1: call sites never test whether
they run distributed.

Rank, world size and local rank are those of the initialised group; before initialisation (the
command line validates its options first) they are read from torchrun's environment, so that only
rank 0 reports an error. Collectives need the group: one called at world size > 1 outside
:func:`process_group` raises.

Every collective turns the error a dead peer causes (gloo: "Connection reset by peer") into
:class:`PeerLost`, whose message says what happened and how to resume.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

# Collectives wait this long for the slowest rank (torch's NCCL default is 10 min): rank 0 alone
# validates and writes checkpoints while the others wait at a barrier.
TIMEOUT = datetime.timedelta(minutes=30)
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


class PeerLost(RuntimeError):
    """A collective failed because another rank died or became unreachable."""


class LaunchError(ValueError):
    """An option that cannot work with how the processes were launched (one line, exit 2)."""


def launched() -> bool:
    """True when started by torchrun (its environment variables are set)."""
    return all(name in os.environ for name in LAUNCHER_VARS)


def _initialized() -> bool:
    """A process group exists (torch builds without distributed support have none)."""
    return tdist.is_available() and tdist.is_initialized()


def _env_int(name: str, default: int) -> int:
    return int(os.environ[name]) if launched() else default


_ALONE: list[bool] = [False]  # inside alone(): this process computes as a world of one


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Work that rank 0 does by itself while the others wait (validation during training): inside,
    rank() is 0 and world_size() 1, so sharded evaluation code runs unsharded and issues no
    collective that the waiting ranks would never join."""
    previous, _ALONE[0] = _ALONE[0], True
    try:
        yield
    finally:
        _ALONE[0] = previous


def rank() -> int:
    if _ALONE[0]:
        return 0
    return tdist.get_rank() if _initialized() else _env_int("RANK", 0)


def world_size() -> int:
    if _ALONE[0]:
        return 1
    return tdist.get_world_size() if _initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched() else 1


def is_main() -> bool:
    """Rank 0: the one process that prints, writes files and checkpoints."""
    return rank() == 0


def backend() -> str | None:
    return tdist.get_backend() if _initialized() else None


def rank_device(device: torch.device) -> torch.device:
    """This rank's device for the requested one, checked against the launch.

    One GPU per local rank: ``cuda`` (or ``auto`` resolved to it) becomes ``cuda:LOCAL_RANK``.
    Raises :class:`LaunchError` if a node has fewer GPUs than local ranks or if an explicit
    ``cuda:N`` would put several local ranks on one GPU."""
    if device.type != "cuda" or not launched():
        return device
    count, local = torch.cuda.device_count(), local_world_size()
    if count < local:
        raise LaunchError(f"--device cuda under torchrun needs one GPU per local rank: {local} local ranks, {count} GPU(s)")
    if device.index is not None and local > 1:
        raise LaunchError(f"--device {device} pins one GPU for {local} local ranks; use --device cuda (rank i uses cuda:LOCAL_RANK)")
    return device if device.index is not None else torch.device("cuda", local_rank())


def cpu_threads() -> int:
    """Torch threads for one rank on a CPU node: the cores shared evenly by the local ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size())


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Initialise the default process group from torchrun's environment for the duration of the
    block (nothing without torchrun), and destroy it however the block ends: normally, by an
    exception, or by KeyboardInterrupt/SIGTERM raised in it (bench/cli.py turns SIGTERM into one).
    CUDA ranks get NCCL and ``torch.cuda.set_device(device)``; CPU ranks get gloo and, with several
    ranks on the node, :func:`cpu_threads` torch threads each."""
    if not launched() or _initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif local_world_size() > 1:
        torch.set_num_threads(cpu_threads())
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        tdist.destroy_process_group()


# Words in the errors torch raises when a peer is gone (gloo: "Read error ... Connection reset by
# peer", "Connection closed by peer"; NCCL: DistBackendError; store: "Timed out ...").
PEER_ERRORS = ("connection", "peer", "timed out", "timeout", "broken pipe", "socket", "nccl")


def _collective(what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except (RuntimeError, tdist.DistError) as err:
        lost = isinstance(err, tdist.DistError) or any(word in str(err).lower() for word in PEER_ERRORS)
        if isinstance(err, PeerLost) or not lost:
            raise
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())  # gloo prefixes its source file and line
        cause = (re.split(r"\.\s", text, maxsplit=1)[0] if text else type(err).__name__)[:200]
        raise PeerLost(
            f"rank {rank()} of {world_size()} lost contact with the other ranks during {what} ({cause}); "
            "another rank has probably died (see the launcher's summary). Rerun the same command to resume "
            "from the last checkpoint, at this or another world size."
        ) from None


def _comm_device() -> torch.device:
    """Where collective buffers must live: the rank's GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait until every rank arrives (e.g. until rank 0 has written a checkpoint)."""
    if world_size() > 1:
        _collective("a barrier", tdist.barrier)


def sum_float64(values: Tensor) -> Tensor:
    """Elementwise sum over ranks, accumulated in float64; returns a float64 tensor on the device
    of ``values`` (its copy in float64 at world size 1). For sums that feed a metric."""
    total = values.detach().to(torch.float64)
    if world_size() == 1:
        return total
    buffer = total.to(_comm_device())
    _collective("a float64 all-reduce", lambda: tdist.all_reduce(buffer))
    return buffer.to(values.device)


def mean_scalars(values: dict[str, Tensor]) -> dict[str, float]:
    """Mean over ranks of named scalar tensors (e.g. the loss terms to log), summed in float64."""
    names = list(values)
    if not names:
        return {}
    stacked = torch.stack([values[name].detach().to(torch.float64).reshape(()) for name in names])
    means = (sum_float64(stacked) / world_size()).tolist()
    return dict(zip(names, means))


def average_gradients(parameters: Iterable[torch.nn.Parameter], ok: bool) -> bool:
    """Replace each ``.grad`` by its mean over ranks, in place; return True only if every rank's
    step was ``ok`` (a finite loss), so that all ranks take the same skip decision.

    One all-reduce of one flat buffer: the gradients (zeros where a rank has none), one presence
    count per parameter (a parameter no rank touched keeps ``grad = None``, as in one process, so
    that Adam leaves it alone) and the count of failed ranks. At world size 1 nothing is touched.
    """
    if world_size() == 1:
        return ok
    params = [p for p in parameters if p.requires_grad]
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise TypeError(f"average_gradients needs one parameter dtype, got {sorted(map(str, dtypes))}")
    dtype, device = params[0].dtype, _comm_device()
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype) for p in params]
    flags = [float(p.grad is not None) for p in params] + [float(not ok)]
    flat = torch.cat([*pieces, torch.tensor(flags, dtype=dtype, device=device)])
    _collective("the gradient all-reduce", lambda: tdist.all_reduce(flat))
    num_failed = int(flat[-1].item())
    if num_failed:
        return False
    present, offset = flat[-1 - len(params):-1], 0
    for i, p in enumerate(params):
        size = p.numel()
        if present[i] > 0:
            p.grad = (flat[offset:offset + size] / world_size()).view_as(p).to(p.device)
        offset += size
    return True


def broadcast_tensors_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s values (e.g. freshly initialised weights)."""
    if world_size() == 1:
        return
    for tensor in tensors:
        buffer = tensor.detach().to(_comm_device())
        _collective("a broadcast", lambda b=buffer: tdist.broadcast(b, src))
        tensor.data.copy_(buffer)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable, small: a record, a decision) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    _collective("an object broadcast", lambda: tdist.broadcast_object_list(box, src, device=_comm_device()))
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective("an object gather", lambda: tdist.all_gather_object(out, obj))
    return out


def shard(num_items: int) -> range:
    """This rank's share of items 0 .. num_items - 1: every world_size-th one, starting at its rank
    (balanced for equal-cost items such as evaluation batches)."""
    return range(rank(), num_items, world_size())


def gather_indexed(values: Tensor, index: Tensor, num_items: int) -> Tensor:
    """Rows computed by different ranks, put together in index order, on every rank.

    Args:
        values: (n_r, *shape) the rows this rank computed (n_r may differ between ranks, or be 0).
        index: (n_r,) their global indices in 0 .. num_items - 1.
        num_items: total number of rows; every index must be held by exactly one rank.

    Returns:
        (num_items, *shape) on the device of ``values``, row ``index[j]`` being ``values[j]``
        (at world size 1: ``values`` itself reordered by ``index``).
    """
    if values.shape[0] != index.shape[0]:
        raise ValueError(f"gather_indexed: {values.shape[0]} rows but {index.shape[0]} indices")
    if world_size() == 1:
        all_rows, all_index = values, index.to(values.device, torch.long)
    else:
        all_rows, all_index = _gather_padded(values, index)
    covered = torch.zeros(num_items, dtype=torch.long, device=all_index.device)
    inside = bool(((all_index >= 0) & (all_index < num_items)).all())
    if inside:
        covered.index_add_(0, all_index, torch.ones_like(all_index))
    if not inside or all_index.shape[0] != num_items or not bool((covered == 1).all()):
        raise ValueError(f"gather_indexed: the ranks' indices do not cover 0 .. {num_items - 1} exactly once")
    out = torch.empty_like(all_rows)
    out[all_index] = all_rows
    return out.to(values.device)


def _gather_padded(values: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' rows and indices, concatenated in rank order (all_gather needs equal shapes:
    each rank pads to the longest share, and the padding is cut off again)."""
    device = _comm_device()
    counts = [int(n) for n in all_gather_objects(int(values.shape[0]))]
    width = max(counts)
    rows = torch.zeros((width, *values.shape[1:]), dtype=values.dtype, device=device)
    rows[: values.shape[0]] = values.to(device)
    ids = torch.full((width,), -1, dtype=torch.long, device=device)
    ids[: index.shape[0]] = index.to(device, torch.long)
    all_rows = [torch.empty_like(rows) for _ in counts]
    all_ids = [torch.empty_like(ids) for _ in counts]
    _collective("a gather of rows", lambda: tdist.all_gather(all_rows, rows))
    _collective("a gather of indices", lambda: tdist.all_gather(all_ids, ids))
    return (
        torch.cat([r[:n] for r, n in zip(all_rows, counts)]).to(values.device),
        torch.cat([i[:n] for i, n in zip(all_ids, counts)]).to(values.device),
    )
