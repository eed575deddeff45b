"""Model selection during training ("when to stop"): score the EMA model on a fixed batch.

Every ``train.validate_every`` steps the scorer reports, in nats, on ``train.num_validation``
validation points:
    val_ref_nll   exact-ODE NLL of the model's instantaneous field (dopri5, with the sweep's
                  reference divergence estimator),
    val_nll_gap   the mean over the sweep's NFEs of |mean few-step NLL - val_ref_nll|: the
                  self-consistency the paper warns over-training can lose (per-point errors of
                  opposite signs can cancel; the calibration columns measure those),
    val_nll@K     the few-step NLL at each NFE K,
    val_quality   a two-sample distance of 1-step samples to the validation points (energy
                  distance for 2D data, the dataset's Frechet distance for images).
For 2D data the validation points are a stream disjoint from the test set. For images they are
training images (the splits are fixed and small): right for the self-consistency criterion, which
needs no held-out data, but unable to detect over-fitting of the data itself.
The training loop keeps the EMA weights that minimise the chosen criterion (train.select).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bench.datasets import Dataset
from bench.metrics import energy_distance
from f2d2.divergence import parse_estimator
from f2d2.likelihood import few_step_log_prob, naive_log_prob, reference_log_prob
from f2d2.sampling import sample

VALIDATION_NOISE_SEED = 7  # fixed latents for the 1-step samples of every validation


class Scorer:
    """Callable on a :class:`~bench.train.TrainState`; returns the validation record."""

    def __init__(
        self,
        dataset: Dataset,
        num_points: int,
        nfe: tuple[int, ...],
        device: torch.device,
        quality: Callable[[Tensor, Tensor], float] | None = None,
        estimator: str = "exact",
    ) -> None:
        self.x = dataset.validation_set(num_points).to(device)
        gen = torch.Generator().manual_seed(VALIDATION_NOISE_SEED)
        self.noise = torch.randn((num_points, *dataset.data_shape), generator=gen).to(device)
        self.nfe = tuple(nfe)
        self.quality = quality or (lambda samples, data: energy_distance(samples.cpu(), data.cpu()))
        self.estimator = parse_estimator(estimator)

    @torch.no_grad()
    def __call__(self, state) -> dict:
        model = state.ema.eval()
        gen = torch.Generator(device=self.x.device).manual_seed(VALIDATION_NOISE_SEED)
        ref = -reference_log_prob(
            model.velocity, self.x, prior_log_prob=model.prior_log_prob, estimator=self.estimator, generator=gen
        ).log_p
        record = {"val_ref_nll": ref.mean().item()}
        gaps = []
        for k in self.nfe:
            if model.capabilities.divergence_head:
                few = -few_step_log_prob(model, self.x, k).log_p
            else:
                few = -naive_log_prob(model, self.x, k, estimator=self.estimator, generator=gen).log_p
            record[f"val_nll@{k}"] = few.mean().item()
            gaps.append(abs((few - ref).mean().item()))
        record["val_nll_gap"] = sum(gaps) / len(gaps)
        samples = sample(model, model.sigma_0 * self.noise, 1, track_log_p=False).x
        record["val_quality"] = float(self.quality(samples, self.x))
        return record


def image_quality(dataset, cache_dir: str, device: torch.device) -> Callable[[Tensor, Tensor], float] | None:
    """The dataset's Frechet distance as a validation score (None for 2D data)."""
    from bench.fid import quality_for

    quality = quality_for(dataset, cache_dir, None, device)
    if quality is None:
        return None
    return lambda samples, data: quality.metrics(samples.cpu(), kid=False)[0][1]
