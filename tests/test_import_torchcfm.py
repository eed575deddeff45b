"""`f2d2-bench import torchcfm`: a TorchCFM UNet, saved as TorchCFM's CIFAR-10 training script saves
it, converts into a harness checkpoint whose velocity is torchcfm's ``net(t, x)`` and whose exact-ODE
NLL equals an independent torchdiffeq solve through torchcfm's own module; bad files are one
``error:`` line, exit 2, nothing written."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench.checkpoint import CheckpointError, load_checkpoint, read_meta
from bench.cli import app
from f2d2.divergence import Hutchinson
from f2d2.likelihood import Solver, reference_log_prob

torchcfm_unet = pytest.importorskip("torchcfm.models.unet.unet", reason="torchcfm is in the test extra")

REPO = Path(__file__).resolve().parents[1]
SOURCE_NAME = "otcfm_cifar10_weights_step_400000.pt"
CIFAR10 = dict(dim=(3, 32, 32), num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
               num_head_channels=64, attention_resolutions="16", dropout=0.1)  # train_cifar10.py's network
SMALL = dict(CIFAR10, num_res_blocks=1, num_channels=32, channel_mult=[1, 2], num_head_channels=32)  # 2 heads at 16x16
PERTURBATION = 0.02  # added to every parameter: the zero-initialised output, attention and residual
# convolutions become non-zero, so every path of the network reaches the output


def torchcfm_net(options: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torchcfm_unet.UNetModelWrapper(**options)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(PERTURBATION * torch.randn_like(param))
    return net


def save_like_train_cifar10(net: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    """What examples/images/cifar10/train_cifar10.py writes: net, EMA copy, scheduler, Adam, step."""
    ema = copy.deepcopy(net)
    optim = torch.optim.Adam(net.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda step: min(step, 5000) / 5000)
    state = {f"{prefix}{k}": v for k, v in ema.state_dict().items()}
    torch.save({"net_model": net.state_dict(), "ema_model": state, "sched": sched.state_dict(),
                "optim": optim.state_dict(), "step": 400000}, path)
    return path


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def import_file(source: Path, out: Path, *extra: str):
    result = run("import", "torchcfm", str(source), "--out", str(out), "--quiet", *extra)
    assert result.exit_code == 0, result.output + str(result.exception)
    return load_checkpoint(out)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchcfm")
    net = torchcfm_net(SMALL, seed=0)
    source = save_like_train_cifar10(net, root / SOURCE_NAME)
    model = import_file(source, root / "teacher", "--num-head-channels", "32")
    return net.eval(), source, model, root


def test_velocity_equals_torchcfm_net(small):
    net, _, model, _ = small
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.rand(4, 3, 32, 32, generator=gen) - 1
    t = torch.rand(4, generator=gen)
    with torch.no_grad():
        theirs = net(t, x)
        # identical operations in the same order: measured difference 0; 1e-5 allows other kernels
        torch.testing.assert_close(model.velocity(x, t), theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.velocity(x, 0.3), net(torch.tensor(0.3), x), rtol=1e-5, atol=1e-5)
        assert theirs.std() > 0.1  # not the zero output of an untouched initialisation
        # t matters far beyond the tolerance (measured 5e-3: TorchCFM feeds t in [0, 1] to frequencies
        # 1 ... 1e-4), so a time bug (1 - t, t * 1000) cannot pass
        assert float((theirs - net(t.flip(0), x)).abs().max()) > 1e-3


def test_metadata_records_source_variant_and_conventions(small):
    _, source, model, _ = small
    meta = model.meta
    assert (meta["method"], meta["dataset"], meta["data_shape"]) == ("flow-matching", "cifar10", [3, 32, 32])
    assert (meta["kappa"], meta["sigma_0"]) == (2e4, 1.0)
    assert meta["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["source"]["variant"] == "otcfm" and meta["source"]["step"] == 400000
    assert meta["source"]["published_cifar10_architecture"] is False
    assert meta["model"]["arch"] == "adm" and meta["model"]["channel_mult"] == [1, 2]
    assert meta["model"]["num_head_channels"] == 32 and meta["model"]["attn_resolutions"] == [16]
    assert "t = 0 noise, t = 1 data" in meta["conversion"]["conventions"]
    assert not model.capabilities.flow_map and not model.capabilities.divergence_head
    with pytest.raises(CheckpointError, match="no 'model/' weights in this checkpoint"):  # only EMA weights exist
        load_checkpoint(source.parent / "teacher", ema=False)


def test_exact_ode_nll_equals_an_independent_solve_through_torchcfm(small):
    """log p_1(x) = log N(x_0; 0, I) - int_0^1 div v dt, v = torchcfm's net(t, x), with the same fixed
    Hutchinson probes; dopri5 at 1e-3 keeps it fast (the slow test uses 1e-5 at CIFAR-10 size)."""
    net, _, model, _ = small
    x = 2 * torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) - 1  # one image: ~5 s CPU
    ours = reference_log_prob(model.velocity, x, prior_log_prob=model.prior_log_prob, solver=Solver("dopri5", 1e-3, 1e-3),
                              estimator=Hutchinson(1), generator=torch.Generator().manual_seed(3))
    theirs = independent_log_prob(net, x, Hutchinson(1).probes(x, torch.Generator().manual_seed(3)), tol=1e-3)
    # measured: identical to float32 print precision (|log p| ~ 3.5e3 nats); 1e-2 nats = 3e-6 relative
    torch.testing.assert_close(ours.log_p, theirs, rtol=0, atol=1e-2)


def independent_log_prob(net: torch.nn.Module, x: torch.Tensor, probes: torch.Tensor, tol: float) -> torch.Tensor:
    """torchdiffeq from t = 1 to 0 of dx/dt = net(t, x), dl/dt = eps^T (dv/dx) eps (autograd), per probe."""
    from torchdiffeq import odeint

    def rhs(t, state):
        with torch.enable_grad():
            z = state[0].detach().requires_grad_(True)
            v = net(t, z)
            divs = [(torch.autograd.grad(v, z, eps, retain_graph=True)[0] * eps).flatten(1).sum(1) for eps in probes]
        return v.detach(), torch.stack(divs).detach()

    start = (x, torch.zeros(len(probes), x.shape[0]))
    with torch.no_grad():
        xs, ls = odeint(rhs, start, torch.tensor([1.0, 0.0]), method="dopri5", rtol=tol, atol=tol)
    x0, num_dims = xs[-1], x[0].numel()
    log_prior = -0.5 * x0.flatten(1).pow(2).sum(1) - 0.5 * num_dims * math.log(2 * math.pi)
    return (log_prior[None] + ls[-1]).mean(0)


def test_cache_key_follows_the_source_file_not_the_directory(small, tmp_path):
    _, source, model, _ = small
    again = import_file(source, tmp_path / "again", "--num-head-channels", "32")
    assert again.meta["cache_key"] == model.meta["cache_key"]
    other = save_like_train_cifar10(torchcfm_net(SMALL, seed=5), tmp_path / "cfm_cifar10_weights_step_400000.pt")
    third = import_file(other, tmp_path / "other", "--num-head-channels", "32")
    assert third.meta["cache_key"] != model.meta["cache_key"] and third.meta["source"]["variant"] == "cfm"


def test_ddp_prefixed_state_dicts_convert(small, tmp_path):
    net, _, model, _ = small
    source = save_like_train_cifar10(net, tmp_path / "fm_ddp.pt", prefix="module.")
    converted = import_file(source, tmp_path / "out", "--num-head-channels", "32", "--variant", "fm")
    assert converted.meta["conversion"]["stripped_prefix"] == "module."
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(converted.velocity(x, t), model.velocity(x, t), rtol=0, atol=0)


def test_head_split_changes_the_function(small, tmp_path):
    """num_head_channels is not in the weights: 32 (2 heads) and -1 with 1 head must differ."""
    net, source, model, _ = small
    one_head = import_file(source, tmp_path / "one", "--num-head-channels", "-1", "--num-heads", "1")
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        assert (one_head.velocity(x, t) - net(t, x)).abs().max() > 1e-3
        torch.testing.assert_close(model.velocity(x, t), net(t, x), rtol=1e-5, atol=1e-5)


def edit_source(source: Path, target: Path, edit) -> Path:
    obj = torch.load(source, weights_only=True)
    edit(obj)
    torch.save(obj, target)
    return target


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def bad_sources(source: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message fragment)."""
    mnist = torchcfm_unet.UNetModelWrapper(**dict(SMALL, dim=(1, 28, 28)))
    truncated = root / "otcfm_truncated.pt"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    text = root / "otcfm_text.pt"
    text.write_text("not a torch file\n")
    evil = root / "otcfm_evil.pt"
    with open(evil, "wb") as handle:  # protocol 2, torch.save's: the unpickler reaches the global
        pickle.dump({"ema_model": RunsCode()}, handle, protocol=2)
    first = "input_blocks.1.0.in_layers.2.weight"
    return {
        "another shape": (save_like_train_cifar10(mnist, root / "otcfm_mnist.pt"), "expected 3 channels in and out"),
        "missing key": (edit_source(source, root / "otcfm_nokey.pt", lambda o: o.pop("ema_model")), "no 'ema_model' entry"),
        "missing tensor": (edit_source(source, root / "otcfm_notensor.pt", lambda o: o["ema_model"].pop("out.2.bias")),
                           "missing tensor 'out.2.bias'"),
        "wrong shape": (edit_source(source, root / "otcfm_shape.pt",
                                    lambda o: o["ema_model"].__setitem__(first, o["ema_model"][first][:, :16])),
                        f"tensor '{first}' has shape (32, 16, 3, 3), expected (32, 32, 3, 3)"),
        "extra tensor": (edit_source(source, root / "otcfm_extra.pt",
                                     lambda o: o["ema_model"].__setitem__("label_emb.weight", torch.zeros(10, 128))),
                         "class-conditional models (label_emb) are not supported"),
        "unknown tensor": (edit_source(source, root / "otcfm_unknown.pt",
                                       lambda o: o["ema_model"].__setitem__("extra.weight", torch.zeros(3))),
                           "1 tensor(s) of no known role, e.g. 'extra.weight'"),
        "truncated": (truncated, "not a readable torch file (RuntimeError: PytorchStreamReader failed"),
        "not torch": (text, "not a readable torch file"),
        "runs code": (evil, "refused, the file asks to load Python objects (Trying to load unsupported GLOBAL posix.system"),
    }


@pytest.fixture(scope="module")
def bad(small):
    _, source, _, root = small
    (root / "bad").mkdir(exist_ok=True)
    return bad_sources(source, root / "bad")


@pytest.mark.parametrize("case", ["another shape", "missing key", "missing tensor", "wrong shape", "extra tensor",
                                  "unknown tensor", "truncated", "not torch", "runs code"])
def test_bad_sources_are_one_error_line_exit_2_nothing_written(bad, case, tmp_path):
    source, message = bad[case]
    out = tmp_path / "parent" / "teacher"
    result = run("import", "torchcfm", str(source), "--out", str(out), "--num-head-channels", "32")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "parent").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--variant", "si"], "unknown variant 'si'; valid: otcfm, cfm (icfm), fm"),
        (["--num-head-channels", "48"], "64 attention channels are not a multiple of num_head_channels 48"),
    ],
)
def test_bad_options_are_one_error_line(small, args, message, tmp_path):
    _, source, _, _ = small
    result = run("import", "torchcfm", str(source), "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_variant_comes_from_the_name_or_the_option(small, tmp_path):
    _, source, _, _ = small
    renamed = tmp_path / "weights.pt"
    renamed.write_bytes(source.read_bytes())
    result = run("import", "torchcfm", str(renamed), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "cannot tell the variant from the file name; pass --variant" in result.stderr
    assert import_file(renamed, tmp_path / "fm", "--variant", "fm", "--num-head-channels", "32").meta["source"]["variant"] == "fm"


def test_out_must_be_new_or_empty(small, tmp_path):
    _, source, _, _ = small
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = run("import", "torchcfm", str(source), "--out", str(tmp_path / "full"))
    assert result.exit_code == 2 and "exists and is not an empty directory" in result.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert import_file(source, tmp_path / "empty", "--num-head-channels", "32").meta["method"] == "flow-matching"


def cli_process(args: list[str], cwd: Path, block_torchcfm: bool = False) -> subprocess.CompletedProcess:
    """The console script's ``main`` in a fresh interpreter (one torch thread), optionally with
    torchcfm made unimportable."""
    block = "import sys; sys.modules['torchcfm'] = None; " if block_torchcfm else "import sys; "
    code = block + "sys.argv = ['f2d2-bench', *sys.argv[1:]]; from bench.cli import main; main()"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_real_processes_refuse_code_and_truncation_and_work_without_torchcfm(small, bad, tmp_path):
    _, source, model, _ = small
    for case in ("runs code", "truncated"):
        done = cli_process(["import", "torchcfm", str(bad[case][0]), "--out", str(tmp_path / case)], tmp_path)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / case).exists()
    assert not (tmp_path / "PWNED").exists()  # the pickle's os.system never ran
    done = cli_process(["import", "torchcfm", str(source), "--out", str(tmp_path / "ok"), "--num-head-channels", "32"],
                       tmp_path, block_torchcfm=True)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "variant otcfm" in done.stdout
    assert read_meta(tmp_path / "ok")["sha256"] == model.meta["sha256"]  # the same converted weights


def test_teacher_option_is_a_flow_matching_checkpoint_that_keeps_the_methods(small):
    from bench.cli import UserError, _resolve_config
    from bench.profiles import default_config

    _, _, model, root = small
    teacher = root / "teacher"
    cfg = _resolve_config("checkerboard", "default", None, None, None, None, None, teacher=teacher)
    assert cfg.checkpoints == {"flow-matching": str(teacher)} and cfg.methods == default_config("checkerboard").methods
    with pytest.raises(UserError, match="--teacher and --checkpoint flow-matching=... both name the teacher"):
        _resolve_config("checkerboard", "default", None, None, None, [f"flow-matching={teacher}"], None, teacher=teacher)


def test_an_imported_teacher_serves_distill_students_and_keys_their_cache(small, tmp_path):
    """plan_jobs with the teacher provided: the distill student points at it, its cache key follows
    the teacher's source (same file elsewhere: same key; another file: another key), and it trains."""
    from dataclasses import replace

    from bench.config import ModelConfig, TrainConfig
    from bench.datasets import get_dataset
    from bench.jobs import run_job
    from bench.profiles import default_config
    from bench.sweep import Provided, plan_jobs
    from test_images import write_cifar

    _, source, _, root = small
    write_cifar(tmp_path, as_archive=False)
    dataset = get_dataset("cifar10", str(tmp_path))
    base = replace(default_config("cifar10"), methods=("flow-matching", "shortcut-distill"),
                   model=ModelConfig(arch="unet", channels=8, channel_mult=(1,), num_res_blocks=1),
                   train=TrainConfig(steps=2, batch_size=4, warmup_steps=1))

    def student(teacher: Path):
        cfg = replace(base, checkpoints={"flow-matching": str(teacher)})
        sources = plan_jobs(cfg, dataset, str(tmp_path), tmp_path / "cache", dataset.kappa, dataset.sigma_0)
        assert isinstance(sources["flow-matching"], Provided)
        return sources["shortcut-distill"]

    job = student(root / "teacher")
    assert job.teacher_dir == str(root / "teacher")
    assert job.identity()["teacher"] == read_meta(root / "teacher")["cache_key"]
    import_file(source, tmp_path / "same", "--num-head-channels", "32")
    other_file = save_like_train_cifar10(torchcfm_net(SMALL, seed=9), tmp_path / "fm_cifar10_weights_step_1.pt")
    import_file(other_file, tmp_path / "other", "--num-head-channels", "32")
    assert student(tmp_path / "same").key == job.key != student(tmp_path / "other").key
    directory = run_job(job)
    trained = read_meta(directory)
    assert trained["complete"] and trained["step"] == 2 and trained["teacher_dir"] == str(root / "teacher")


@pytest.mark.slow
def test_published_cifar10_network_converts_exactly(tmp_path):
    """The full 35.7M-parameter network of train_cifar10.py: velocity and exact-ODE NLL (dopri5, 1e-5)."""
    net = torchcfm_net(CIFAR10, seed=0).eval()
    source = save_like_train_cifar10(net, tmp_path / SOURCE_NAME)
    model = import_file(source, tmp_path / "teacher")
    assert model.meta["source"]["published_cifar10_architecture"] is True
    x = 2 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) - 1
    t = torch.rand(2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, t), net(t, x), rtol=1e-5, atol=1e-5)
    ours = reference_log_prob(model.velocity, x, prior_log_prob=model.prior_log_prob, estimator=Hutchinson(1),
                              generator=torch.Generator().manual_seed(3))
    theirs = independent_log_prob(net, x, Hutchinson(1).probes(x, torch.Generator().manual_seed(3)), tol=1e-5)
    torch.testing.assert_close(ours.log_p, theirs, rtol=0, atol=1e-2)
