"""f2d2: flow maps with a divergence head, in pure torch.

Conventions (one for the whole project; see docs in README.md and METHOD.md):

- Time t in [0, 1]. **t = 0 is noise, t = 1 is data.** The prior is p_0 = N(0, sigma_0^2 I), with
  sigma_0 stored with every model.
- Linear interpolant x_t = (1 - t) x_0 + t x_1, conditional velocity x_1 - x_0.
- Flow map from time t to time s (either order): Phi(x, t, s) = x + (s - t) u(x, t, s), with
  u(x, t, t) = v(x, t) the instantaneous velocity. s > t samples, s < t evaluates likelihoods.
- Divergence head D(x, t, s), one scalar per sample, the kappa-scaled average divergence of v along
  the trajectory through x at time t:
  (s - t) kappa D(x, t, s) = int_t^s div v(x_tau, tau) dtau, hence D(x, t, t) = div v(x, t) / kappa.
- Log-density along a jump: log p_s(Phi(x, t, s)) = log p_t(x) - (s - t) kappa D(x, t, s).

Peers with other conventions (MeanFlow puts data at t = 0) are converted at the boundary only.

References:
    X. Ai, Y. He, A. Gu, R. Salakhutdinov, J. Z. Kolter, N. M. Boffi, M. Simchowitz. "Joint
    Distillation for Fast Likelihood Evaluation and Sampling in Flow-based Models", ICLR 2026,
    arXiv:2512.02636.
"""

from f2d2.divergence import Exact, Hutchinson, divergence
from f2d2.likelihood import (
    LogProb,
    few_step_log_prob,
    naive_log_prob,
    reference_log_prob,
)
from f2d2.model import Capabilities, FlowMap, FlowMapNet, FlowMapOutput
from f2d2.sampling import Samples, sample
from f2d2.units import bits_per_dim

__all__ = [
    "Capabilities",
    "Exact",
    "FlowMap",
    "FlowMapNet",
    "FlowMapOutput",
    "Hutchinson",
    "LogProb",
    "Samples",
    "bits_per_dim",
    "divergence",
    "few_step_log_prob",
    "naive_log_prob",
    "reference_log_prob",
    "sample",
]
