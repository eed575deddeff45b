"""Model selection during training ("when to stop"): score the EMA model on a fixed batch.

Every ``train.validate_every`` steps the scorer reports, in nats, on ``train.num_validation``
validation points (a stream disjoint from the test set):
    val_ref_nll   exact-ODE NLL of the model's instantaneous field (dopri5, exact divergence),
    val_nll_gap   mean over the sweep's NFEs of |mean few-step NLL - val_ref_nll|, the
                  self-consistency the paper warns over-training can lose,
    val_nll@K     the few-step NLL at each NFE K,
    val_quality   a two-sample distance of 1-step samples to the validation points
                  (energy distance for 2D data, the image metric for images).
The training loop keeps the EMA weights that minimise the chosen criterion (train.select).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bench.datasets import Dataset
from bench.metrics import energy_distance
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
    ) -> None:
        self.x = dataset.validation_set(num_points).to(device)
        gen = torch.Generator().manual_seed(VALIDATION_NOISE_SEED)
        self.noise = torch.randn((num_points, *dataset.data_shape), generator=gen).to(device)
        self.nfe = tuple(nfe)
        self.quality = quality or (lambda samples, data: energy_distance(samples.cpu(), data.cpu()))

    @torch.no_grad()
    def __call__(self, state) -> dict:
        model = state.ema.eval()
        ref = -reference_log_prob(model.velocity, self.x, prior_log_prob=model.prior_log_prob).log_p
        record = {"val_ref_nll": ref.mean().item()}
        gaps = []
        for k in self.nfe:
            if model.capabilities.divergence_head:
                few = -few_step_log_prob(model, self.x, k).log_p
            else:
                few = -naive_log_prob(model, self.x, k).log_p
            record[f"val_nll@{k}"] = few.mean().item()
            gaps.append(abs((few - ref).mean().item()))
        record["val_nll_gap"] = sum(gaps) / len(gaps)
        samples = sample(model, model.sigma_0 * self.noise, 1, track_log_p=False).x
        record["val_quality"] = float(self.quality(samples, self.x))
        return record
