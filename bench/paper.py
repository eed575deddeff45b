"""The 'paper' profile: the authors' CIFAR-10 recipe (Keely-Ai/F2D2) in this harness's terms.

Their pipeline has three stages, each a run of their train.py (EDM's training loop) launched by a
script: the flow-matching teacher (run_fm.sh, ``--precond=fm``), Shortcut-Distill from that teacher
(run_sc.sh, ``--precond=sc``) and Shortcut-Distill-F2D2 resumed from Shortcut-Distill (run_ll.sh,
``--precond=ll``). Here they are the methods ``flow-matching``, ``shortcut-distill`` and
``shortcut-distill-f2d2-fwd`` (forward-only training, as theirs), the last warm-started from the
second's EMA weights (``train.init_from``). Every constant below names where it comes from; how our
settings map onto theirs, and where they differ, is in the README ("The paper profile").

Conversions (they follow from how the two codes count and normalise):
- Rows: their Shortcut losses use every image of a batch of B twice, for a flow row and for a
  bootstrap row with fresh noise. Our Shortcut splits one batch into the two row kinds
  (``bootstrap_fraction`` 0.5), so our batch is 2 B rows, the same network evaluations per step.
  Steps are theirs (duration / B, rounded up, as their loop stops at the first step past it);
  image-counted ramps are doubled so that they span the same steps.
- Loss normalisation: their terms are ``F.mse_loss`` means over all elements (the velocity terms
  divide by the 3 x 32 x 32 = 3072 pixels, the divergence terms do not) and are summed; ours are
  per-row sums over pixels averaged over all rows. ``loss_scale`` 1/3072 (teacher) and 2/3072
  (Shortcut stages, whose two row kinds share one mean) and divergence weights 3072 make our
  gradient equal to theirs, so their clipping threshold (0.01) and RAdam's eps apply unchanged.
"""

from __future__ import annotations

import math

from bench.config import EvalConfig, SweepConfig, TrainConfig
from bench.models import AUTHORS_CIFAR10_MODEL

AUTHORS_REPOSITORY = "Keely-Ai/F2D2"
AUTHORS_LR = 1e-4  # run_fm.sh, run_sc.sh, run_ll.sh: --lr=0.0001
AUTHORS_BETAS, AUTHORS_EPS = (0.9, 0.999), 1e-8  # train.py: optimizer_kwargs betas=[0.9, 0.999], eps=1e-8
AUTHORS_LR_RAMPUP_IMAGES = 10_000_000  # train.py: --lr_rampup 10 (Mimg) -> lr_rampup_kimg
AUTHORS_EMA_HALFLIFE_IMAGES = 50_000_000  # train.py: --ema 50 (Mimg) -> ema_halflife_kimg
AUTHORS_EMA_RAMPUP_RATIO = 0.05  # training/experimental/training_loop.py: ema_rampup_ratio default
AUTHORS_GRAD_CLIP = 0.01  # training_loop.py: clip_grad_norm_(net.parameters(), 0.01)
AUTHORS_BATCH = {"fm": 512, "sc": 512, "ll": 256}  # --batch of run_fm.sh, run_sc.sh, run_ll.sh
AUTHORS_DURATION_IMAGES = {"fm": 300_000_000, "sc": 300_000_000, "ll": 30_000_000}  # --duration (Mimg)
AUTHORS_TF32 = False  # train.py --tf32 default False -> training_loop sets cuda.matmul and cudnn allow_tf32 to it
AUTHORS_KAPPA = 2e4  # training/experimental/loss.py: div_teacher / 20000.0
AUTHORS_FM_LOGIT_MEAN, AUTHORS_FM_LOGIT_STD = 1.2, 1.2  # loss.py FMLoss: sigma = exp(N(-1.2, 1.2^2)), t = 1/(1+sigma)
NUM_PIXELS = 3 * 32 * 32  # the element count their velocity MSE averages over
SHORTCUT_ROWS_PER_IMAGE = 2  # loss.py ShortcutLoss/LikelihoodLoss: a flow row and a bootstrap row per image
PAPER_METHODS = ("flow-matching", "shortcut-distill", "shortcut-distill-f2d2-fwd")
CHECKPOINT_EVERY = 2000  # bookkeeping only (a 56-94M-parameter checkpoint is about 1-1.5 GB)


def authors_steps(stage: str) -> int:
    """Optimizer steps of a stage: their duration over their batch, rounded up (the loop runs until
    the images seen reach the duration)."""
    return math.ceil(AUTHORS_DURATION_IMAGES[stage] / AUTHORS_BATCH[stage])


def _stage(stage: str, rows_per_image: int, loss_scale: float) -> TrainConfig:
    return TrainConfig(
        steps=authors_steps(stage), batch_size=AUTHORS_BATCH[stage] * rows_per_image, lr=AUTHORS_LR,
        optimizer="radam", betas=AUTHORS_BETAS, eps=AUTHORS_EPS, lr_schedule="edm",
        lr_rampup_images=AUTHORS_LR_RAMPUP_IMAGES * rows_per_image,
        ema_halflife_images=float(AUTHORS_EMA_HALFLIFE_IMAGES * rows_per_image), ema_rampup_ratio=AUTHORS_EMA_RAMPUP_RATIO,
        grad_clip=AUTHORS_GRAD_CLIP, loss_scale=loss_scale, grad_nan_to_num=True, tf32=AUTHORS_TF32,
        checkpoint_every=CHECKPOINT_EVERY,
    )


TEACHER_TRAIN = _stage("fm", 1, 1.0 / NUM_PIXELS)
SHORTCUT_DISTILL_TRAIN = _stage("sc", SHORTCUT_ROWS_PER_IMAGE, SHORTCUT_ROWS_PER_IMAGE / NUM_PIXELS)
F2D2_TRAIN = _stage("ll", SHORTCUT_ROWS_PER_IMAGE, SHORTCUT_ROWS_PER_IMAGE / NUM_PIXELS)
F2D2_OVERRIDES = {
    "steps": F2D2_TRAIN.steps, "batch_size": F2D2_TRAIN.batch_size, "init_from": "shortcut-distill", "init_weights": "ema",
}

_SHORTCUT = {"bootstrap_fraction": 1 / SHORTCUT_ROWS_PER_IMAGE, "num_levels": 7, "target_model": "model", "euler_smallest": False}
METHOD_OPTIONS = {
    "flow-matching": {"time_sampler": "logit_normal", "logit_mean": AUTHORS_FM_LOGIT_MEAN, "logit_std": AUTHORS_FM_LOGIT_STD},
    "shortcut-distill": _SHORTCUT,
    # also reaches shortcut-distill-f2d2-fwd (NAME-fwd inherits NAME's options)
    "shortcut-distill-f2d2": {
        **_SHORTCUT,
        "divergence": {"estimator": "hutchinson:1", "weight_diag": float(NUM_PIXELS), "weight_offdiag": float(NUM_PIXELS)},
    },
}


def paper_config(evaluation: EvalConfig) -> SweepConfig:
    """The paper profile for CIFAR-10, evaluated with ``evaluation`` (the cifar10 profile's FID protocol)."""
    return SweepConfig(
        dataset="cifar10",
        methods=PAPER_METHODS,
        nfe=(1, 2, 4, 8),
        kappa=AUTHORS_KAPPA,
        model=AUTHORS_CIFAR10_MODEL,
        teacher_train=TEACHER_TRAIN,
        train=SHORTCUT_DISTILL_TRAIN,
        eval=evaluation,
        method_options=METHOD_OPTIONS,
        # both names: the paper's forward-only variant and ours with trained backward maps
        train_overrides={"shortcut-distill-f2d2": F2D2_OVERRIDES, "shortcut-distill-f2d2-fwd": F2D2_OVERRIDES},
    )
