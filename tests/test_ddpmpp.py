"""The authors' DDPM++ UNet (f2d2/ddpmpp.py): size, shapes, per-sample independence, time inputs."""

from __future__ import annotations

import math

import pytest
import torch

from bench.config import ConfigError, ModelConfig
from bench.models import AUTHORS_CIFAR10_MODEL, build_model, build_net
from f2d2.ddpmpp import DDPMppNet, positional_embedding
from f2d2.model import Capabilities

CIFAR = (3, 32, 32)
TINY = dict(data_shape=(3, 4, 4), channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))


# Parameter count, derived by hand ------------------------------------------------------------
#
# From the published configuration (Keely-Ai/F2D2 train.py --arch ddpmpp: model_channels C = 128,
# channel_mult [2, 2, 2], num_blocks 4, attn_resolutions [16], channel_mult_emb 4 -> E = 512,
# channel_mult_noise 1 -> positional features of width C) and EDM's description of a DDPM++ block.
# Layers: conv(i, o, k) = i o k^2 + o; lin(i, o) = i o + o; GroupNorm(c) = 2 c.
# Block(i, o) = GN(i) + conv(i, o, 3) + lin(E, o) [+ lin(E, o) for the step embedding] + GN(o)
#   + conv(o, o, 3) [+ conv(i, o, 1) when i != o or it resamples]
#   [+ GN(o) + conv(o, 3 o, 1) + conv(o, o, 1) with attention].
# With c = 2 C = 256 at every level, the blocks in order (written out, not generated):
#   encoder 32x32: conv(3, C, 3); Block(C, c); 3 x Block(c, c)
#   encoder 16x16: Block(c, c, down); 4 x Block(c, c, attn)
#   encoder  8x8 : Block(c, c, down); 4 x Block(c, c)
#   decoder  8x8 : Block(c, c, attn) (in0); Block(c, c) (in1); 5 x Block(2c, c)
#   decoder 16x16: Block(c, c, up); 4 x Block(2c, c); Block(2c, c, attn)
#   decoder 32x32: Block(c, c, up); 4 x Block(2c, c); Block(c + C, c)   (the last skip is the input conv)
#   output: GN(c) + conv(c, 3, 3); mapping: lin(C, E) + lin(E, E) per time input;
#   head: lin(c 32 32, 128) + lin(128, 64) + lin(64, 1).


def _conv(i: int, o: int, k: int) -> int:
    return i * o * k * k + o


def _lin(i: int, o: int) -> int:
    return i * o + o


def _block(i: int, o: int, times: int, attn: bool = False, resample: bool = False) -> int:
    emb = 4 * 128
    n = 2 * i + _conv(i, o, 3) + times * _lin(emb, o) + 2 * o + _conv(o, o, 3)
    n += _conv(i, o, 1) if (i != o or resample) else 0
    n += (2 * o + _conv(o, 3 * o, 1) + _conv(o, o, 1)) if attn else 0
    return n


def hand_count(head: bool, step: bool) -> int:
    big, c, emb, times = 128, 256, 512, 2 if step else 1
    b = lambda i, o, **kw: _block(i, o, times, **kw)  # noqa: E731
    encoder = (
        _conv(3, big, 3) + b(big, c) + 3 * b(c, c)
        + b(c, c, resample=True) + 4 * b(c, c, attn=True)
        + b(c, c, resample=True) + 4 * b(c, c)
    )
    decoder = (
        b(c, c, attn=True) + b(c, c) + 5 * b(2 * c, c)
        + b(c, c, resample=True) + 4 * b(2 * c, c) + b(2 * c, c, attn=True)
        + b(c, c, resample=True) + 4 * b(2 * c, c) + b(c + big, c)
    )
    total = times * (_lin(big, emb) + _lin(emb, emb)) + encoder + decoder + 2 * c + _conv(c, 3, 3)
    return total + ((_lin(c * 32 * 32, 128) + _lin(128, 64) + _lin(64, 1)) if head else 0)


# Worked out: 55,732,739 without step path and head (the flow-matching teacher's SongUNet);
# + 4,662,528 for the step embedding (2 mapping layers, one affine per block: 33 blocks);
# + 33,562,881 for the head (its flatten layer alone has 256 * 1024 * 128 weights).
PAPER_COUNTS = {(True, True): 93_958_148, (False, True): 60_395_267, (False, False): 55_732_739}


def test_the_worked_out_parts_add_up():
    assert hand_count(False, True) - hand_count(False, False) == 128 * 512 + 512 + 512 * 512 + 512 + 33 * (512 * 256 + 256) == 4_662_528
    assert hand_count(True, True) - hand_count(False, True) == 33_562_881


@pytest.mark.parametrize("head, step", list(PAPER_COUNTS))
def test_parameter_count_of_the_paper_configuration_matches_the_hand_count(head, step):
    assert hand_count(head, step) == PAPER_COUNTS[(head, step)]
    caps = Capabilities(flow_map=step, divergence_head=head)
    model = build_model(AUTHORS_CIFAR10_MODEL, CIFAR, caps, kappa=2e4, sigma_0=1.0)
    assert sum(p.numel() for p in model.parameters()) == PAPER_COUNTS[(head, step)]


@pytest.mark.slow  # 64-71 s per pass on the (shared, loaded) 2-core development machine
@pytest.mark.parametrize("head", [True, False])
def test_full_size_forward_and_backward_at_batch_two_on_cpu(head):
    net = build_net(AUTHORS_CIFAR10_MODEL, CIFAR, head)
    gen = torch.Generator().manual_seed(0)
    x, t, s = torch.randn(2, *CIFAR, generator=gen), torch.rand(2, generator=gen), torch.rand(2, generator=gen)
    out = net(x, t, s)
    assert out.u.shape == (2, *CIFAR) and (out.div.shape == (2,) if head else out.div is None)
    loss = out.u.pow(2).mean() + (out.div.pow(2).mean() if head else 0.0)
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing and torch.isfinite(out.u).all()


# Behaviour on a tiny configuration ---------------------------------------------------------------


def _inputs(batch: int = 3, shape=(3, 4, 4)):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, *shape, generator=gen), torch.rand(batch, generator=gen), torch.rand(batch, generator=gen)


def _wake(net: DDPMppNet) -> DDPMppNet:
    """Re-draw the layers that start at 1e-5 (each block's second conv, attention projections, the
    output conv): at initialisation they hide most of the dependence on times and neighbours."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.split(".")[-2] in ("conv1", "proj", "out_conv") and name.endswith("weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return net


@pytest.mark.parametrize("train", [False, True])
def test_samples_do_not_interact_per_sample_jacobian_is_block_diagonal(train):
    """d out_i / d x_j = 0 for i != j, for u and the head, with dropout active in train mode.

    Checked with a random projection r of sample i's outputs: r^T J_ij vanishes for all j != i, and
    is nonzero for j = i (if J_ij != 0, r^T J_ij = 0 has probability zero)."""
    torch.manual_seed(0)
    net = _wake(DDPMppNet(**TINY, dropout=0.5, div_head=True)).train(train).double()
    x, t, s = (v.double() for v in _inputs())
    x.requires_grad_(True)
    torch.manual_seed(3)
    out = net(x, t, s)  # one forward: one dropout mask for every projection
    outputs = torch.cat([out.u.flatten(1), out.div[:, None]], dim=1)  # (B, D + 1)
    gen = torch.Generator().manual_seed(4)
    for i in range(len(x)):
        r = torch.randn(outputs.shape[1], generator=gen, dtype=outputs.dtype)
        (grad,) = torch.autograd.grad(outputs[i] @ r, x, retain_graph=True)
        for j in range(len(x)):
            if i == j:
                assert grad[j].abs().max() > 1e-6, "the output must depend on its own input"
            else:
                torch.testing.assert_close(grad[j], torch.zeros_like(grad[j]), rtol=0, atol=0)


def test_head_reads_the_last_full_resolution_decoder_block_and_returns_shape_b():
    torch.manual_seed(0)
    net = DDPMppNet(**TINY, div_head=True).eval()
    x, t, s = _inputs()
    h = net.features(x, t, s)
    assert h.shape == (3, 8, 4, 4)  # channels * channel_mult[0], full resolution
    assert net.div[0].in_features == 8 * 4 * 4
    out = net(x, t, s)
    torch.testing.assert_close(out.div, net.div(h.flatten(1))[:, 0], rtol=0, atol=0)
    assert out.div.shape == (3,)  # (B,), never (B, 1): a (B, 1) head broadcasts to (B, B) in the losses
    gap = DDPMppNet(**TINY, div_head=True, div_pool="gap").eval()
    assert gap.div[0].in_features == 8 and gap(x, t, s).div.shape == (3,)


def test_step_input_is_used_only_when_enabled():
    x, t, s = _inputs()
    torch.manual_seed(0)
    with_step = DDPMppNet(**TINY, step_input=True).eval()
    torch.manual_seed(0)
    without = DDPMppNet(**TINY, step_input=False).eval()
    for net in (with_step, without):
        _wake(net)
    assert (with_step(x, t, s).u - with_step(x, t, t).u).abs().max() > 1e-4
    torch.testing.assert_close(without(x, t, s).u, without(x, t, t).u, rtol=0, atol=0)
    assert (without(x, t, s).u - without(x, s, s).u).abs().max() > 1e-4  # t itself still matters
    assert without.map_layer0_s is None and all(b.affine_s is None for b in without.enc.values() if hasattr(b, "affine_s"))


def test_positional_embedding_matches_the_formula():
    c = torch.tensor([0.0, 2.0])
    emb = positional_embedding(c, 8)  # half = 4 frequencies 10000^(-i/3), i = 0..3
    freqs = [10_000.0 ** (-i / 3) for i in range(4)]
    expected = torch.tensor([[0.0] * 4 + [1.0] * 4, [math.sin(2 * f) for f in freqs] + [math.cos(2 * f) for f in freqs]])
    torch.testing.assert_close(emb, expected, rtol=1e-6, atol=1e-7)


def test_dropout_is_random_in_train_mode_and_off_in_eval_mode():
    torch.manual_seed(0)
    net = _wake(DDPMppNet(**TINY, dropout=0.3))
    x, t, s = _inputs()
    net.train()
    assert (net(x, t, s).u - net(x, t, s).u).abs().max() > 0
    net.eval()
    torch.testing.assert_close(net(x, t, s).u, net(x, t, s).u, rtol=0, atol=0)


def test_configuration_errors_name_the_problem():
    shape = (3, 4, 4)
    ok = ModelConfig(arch="ddpmpp", channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(2,))
    build_net(ok, shape, True)  # 2 is the second level's height: accepted
    with pytest.raises(ConfigError, match=r"attn_resolutions \[3\]"):
        build_net(ModelConfig(**{**vars(ok), "attn_resolutions": (3,)}), shape, True)
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_net(ModelConfig(**{**vars(ok), "channel_mult": (1, 2, 2)}), (3, 6, 6), True)
    build_net(ModelConfig(**{**vars(ok), "channel_mult": (1, 2, 2)}), (3, 8, 8), True)
    with pytest.raises(ConfigError, match="dropout must lie in"):
        build_net(ModelConfig(**{**vars(ok), "dropout": 1.0}), shape, True)
    with pytest.raises(ConfigError, match="apply to arch 'ddpmpp' and 'adm' only"):
        build_net(ModelConfig(arch="unet", dropout=0.1), shape, True)
    with pytest.raises(ConfigError, match="valid: mlp, unet, ddpmpp"):
        build_net(ModelConfig(arch="ddpm"), shape, True)


def test_new_model_options_keep_old_checkpoint_keys():
    from bench.config import key_dict

    assert "dropout" not in key_dict(ModelConfig()) and "attn_resolutions" not in key_dict(ModelConfig())
    assert key_dict(AUTHORS_CIFAR10_MODEL)["attn_resolutions"] == [16]
