"""Evaluation sharded by batch: the same numbers at any world size.

Every per-point computation of an evaluation (reference and few-step likelihoods, samples, the
proposal of the mass estimate, feature extraction for FID/FD) runs in batches of
``eval.batch_size`` rows. Under torchrun, batch c goes to rank c mod W (:func:`bench.dist.shard`),
each rank computes its batches exactly as one process would, and the per-row results are gathered
in row order on every rank (:func:`bench.dist.gather_indexed`). So:

- every batch is solved exactly as in one process: an adaptive solver's steps depend on the whole
  batch it integrates, so splitting a batch across ranks would change the reference numbers and
  its NFE count; the batch is the unit of sharding, never split;
- random draws inside a batch (Hutchinson probes) come from a generator seeded by (seed, batch
  index) (:func:`chunk_seed`), never from a stream shared across batches, so they do not depend on
  which rank computes the batch, nor on the order; the reference's probes come from a stream of
  their own, independent of the few-step estimate's (shared probes correlate the two Monte-Carlo
  errors, and a calibration against the reference then looks better than it is);
- samples use per-sample seeds (bench/measure.py ``per_sample_noise``), so they are independent of
  batching altogether.

Every rank then holds every row and computes the same metrics from them; rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

from bench import dist

CHUNK_SEED_STRIDE = 7919  # batch c draws its probes from seed + c * stride; batch 0 from the seed itself


def chunk_seed(seed: int, chunk: int, stream: str = "") -> int:
    """The generator seed of batch ``chunk`` (batch 0 keeps ``seed``, the one-batch behaviour).
    A named ``stream`` is a separate family of seeds (a 63-bit hash of stream, seed and chunk), so
    two consumers of one batch draw unrelated numbers."""
    return hashed_seed(stream, seed, chunk) if stream else seed + CHUNK_SEED_STRIDE * chunk


def hashed_seed(*parts: object) -> int:
    """A 63-bit seed from the sha256 of 'f2d2-bench/part/part/...': distinct parts give unrelated
    streams (named evaluation streams here, training streams per rank in bench/train.py)."""
    digest = hashlib.sha256("/".join(["f2d2-bench", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


Columns = tuple[Tensor | None, ...]


def map_chunks(fn: Callable[[Tensor, int], Columns], x: Tensor, size: int) -> Columns:
    """``fn(batch, batch_index)`` -> a tuple of per-row tensors (first dimension = batch rows) or
    None, applied to the batches of x (``size`` rows each) this rank owns; each column gathered in
    row order on every rank. A column that is None for one batch must be None for all."""
    num = len(x)
    starts = list(range(0, num, size))
    mine = dist.shard(len(starts))
    outputs, index = [], []
    for c in mine:
        chunk = x[starts[c] : starts[c] + size]
        outputs.append(fn(chunk, c))
        index.append(torch.arange(starts[c], starts[c] + len(chunk)))
    template = _template(outputs)
    columns = []
    for j, spec in enumerate(template):
        if spec is None:
            columns.append(None)
            continue
        dtype, shape = spec
        mine_rows = [out[j] for out in outputs]
        values = torch.cat(mine_rows) if mine_rows else torch.empty((0, *shape), dtype=dtype, device=x.device)
        ids = torch.cat(index) if index else torch.empty(0, dtype=torch.long)
        columns.append(dist.gather_indexed(values, ids, num))
    return tuple(columns)


def _template(outputs: list[Columns]) -> tuple:
    """(dtype, row shape) of every column, or None for an absent one, agreed across ranks (a rank
    without a batch learns them from the others)."""
    local = None if not outputs else tuple(None if t is None else (t.dtype, tuple(t.shape[1:])) for t in outputs[0])
    known = [spec for spec in dist.all_gather_objects(local) if spec is not None]
    if not known:
        raise ValueError("map_chunks: no rank holds a batch (empty input)")
    return known[0] if local is None else local
