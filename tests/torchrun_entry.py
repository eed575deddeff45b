"""What each rank runs in the multi-process tests (started by tests/torchrun_helpers.py via torchrun).

    torchrun_entry.py cli ARGS...          the f2d2-bench command line, as the console script runs it
    torchrun_entry.py train OUT NAME...    data-parallel training of the named cases of
                                           tests/torchrun_helpers.py; each rank saves its result in OUT
                                           (NAME "collectives": bench/dist.py's helpers on known
                                           inputs; "resume": a run stopped after a checkpoint and
                                           resumed, and the same run uninterrupted)

With F2D2_TEST_AUDIT=DIR every rank records its file-writing operations (Python audit events) in
DIR/rank<r>.log, so that a test can check which rank wrote what. With F2D2_TEST_PIDS=DIR every rank
writes its pid to DIR/rank<r>.pid (a test kills one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository under test
sys.path.insert(1, str(Path(__file__).resolve().parent))

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.chmod", "os.truncate")


def audit_writes(log_path: Path) -> None:
    log = open(log_path, "w", buffering=1)  # opened before the hook: its writes are not events

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
                log.write(f"open\t{path}\n")
        elif event in WRITE_EVENTS:
            log.write(f"{event}\t{args[0]}\t{args[1] if event == 'os.rename' else ''}\n")

    sys.addaudithook(hook)


def collectives(out: Path) -> None:
    """Known inputs whose results the test computes by hand (rank r holds r-dependent values)."""
    import torch

    from bench import dist

    r = dist.rank()
    index = torch.arange(r, 5, 2)  # rank 0 holds rows 0, 2, 4; rank 1 rows 1, 3: uneven shares
    rows = torch.stack([10.0 * index, -index.double()], dim=1)
    big = torch.tensor([2.0**24, 1.0], dtype=torch.float32)  # float32 cannot hold 2^24 + 1; float64 can
    weight = torch.nn.Parameter(torch.zeros(3))
    unused = torch.nn.Parameter(torch.zeros(2))  # no rank gives it a gradient
    only_one = torch.nn.Parameter(torch.zeros(2))  # only rank 1 gives it a gradient
    weight.grad = torch.full((3,), float(r + 1))
    only_one.grad = torch.ones(2) * 4.0 if r == 1 else None
    agreed = dist.average_gradients([weight, unused, only_one], ok=True)
    refused = dist.average_gradients([torch.nn.Parameter(torch.zeros(1))], ok=r != 1)
    from bench.shards import chunk_seed, map_chunks

    x = torch.arange(9.0)[:, None]  # batches of 2 rows: 0-1 | 2-3 | 4-5 | 6-7 | 8 (rank 0: 0, 2, 4; rank 1: 1, 3)

    def batch(chunk, c):
        draw = torch.randn(len(chunk), generator=torch.Generator().manual_seed(chunk_seed(7, c)))
        return 10.0 * chunk, None, draw, torch.full((len(chunk),), float(r))

    # rank 0 alone (as validation does) while rank 1 waits in a broadcast: no collective may leak out
    alone = None
    if r == 0:
        with dist.alone():
            alone = map_chunks(batch, x, 2)
    alone = dist.broadcast_object(alone)
    from bench.fid import FEATURE_BATCH, feature_stats, sharded_features

    images = torch.randint(0, 256, (2 * FEATURE_BATCH + 37, 3, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    features = sharded_features(toy_features, images)  # 3 batches: rank 0 extracts 2, rank 1 one
    result = {
        "features": torch.from_numpy(features),
        "feature_stats": tuple(torch.from_numpy(a) for a in (feature_stats(features).mu, feature_stats(features).sigma)),
        "mapped": map_chunks(batch, x, 2),
        "mapped_one_batch": map_chunks(batch, x[:2], 2),  # rank 1 holds no batch
        "alone": alone,
        "gathered": dist.gather_indexed(rows, index, 5),
        "sum": dist.sum_float64(big if r == 0 else torch.tensor([1.0, 2.0])),
        "means": dist.mean_scalars({"a": torch.tensor(float(r)), "b": torch.tensor(3.0 * r)}),
        "broadcast": dist.broadcast_object({"from": r}),
        "objects": dist.all_gather_objects(f"rank{r}"),
        "agreed": agreed, "refused": refused,
        "grads": [weight.grad, unused.grad, only_one.grad],
    }
    torch.save(result, out / f"collectives-rank{r}.pt")


def toy_features(k):
    """A deterministic stand-in for a feature network: (N, 3, 4, 4) uint8 -> (N, 6) float64."""
    import torch

    x = k.double().flatten(1) / 255.0
    return torch.stack([x.mean(1), x.std(1), x[:, 0], x[:, -1], (x * x).mean(1), x[:, 5] * x[:, 9]], dim=1).numpy()


class Stop(Exception):
    pass


def resume(out: Path) -> None:
    """The same job twice under run_job: once uninterrupted, once stopped at step 11 (just after
    the step-10 checkpoint) and rerun, which resumes from that checkpoint."""
    from baselines import get_method
    from bench.config import TrainConfig
    from bench.jobs import Job, run_job
    from torchrun_helpers import KAPPA, SIGMA_0, SMALL

    name = "meanflow-f2d2"
    cfg = TrainConfig(steps=14, batch_size=64, warmup_steps=2, checkpoint_every=5, log_every=2)

    def job(root: str) -> Job:
        return Job(name, get_method(name).config, SMALL, cfg, "checkerboard", None, KAPPA, SIGMA_0, None, str(out / root))

    def stop_after_checkpoint(_name, step, _total, _log) -> None:
        if step == 11:
            raise Stop

    run_job(job("full"))
    try:
        run_job(job("cut"), progress=stop_after_checkpoint)
    except Stop:
        pass
    run_job(job("cut"))


def train_cases(out: Path, names: list[str]) -> None:
    import torch

    from bench import dist
    from bench.datasets import Checkerboard
    from bench.train import scored_on_main, train
    from torchrun_helpers import CASES, Poisoned, build_case, scorer

    with dist.process_group(torch.device("cpu")):
        for name in names:
            if name in ("collectives", "resume"):
                {"collectives": collectives, "resume": resume}[name](out)
                continue
            method, state, teacher, cfg = build_case(name)
            poison = CASES[name].get("poison_rank1", ())
            if dist.rank() == 1 and poison:
                method = Poisoned(method, poison)
            on_validate = scored_on_main(scorer) if cfg.validate_every else None
            train(state, method, Checkerboard().train_batch, cfg, teacher=teacher, on_validate=on_validate)
            torch.save(
                {
                    "model": [p.detach() for p in state.model.parameters()],
                    "ema": [p.detach() for p in state.ema.parameters()],
                    "history": state.history, "validation": state.validation,
                    "num_skipped": state.num_skipped, "best_step": state.best["step"] if state.best else None,
                },
                out / f"{name}-rank{dist.rank()}.pt",
            )


def main() -> None:
    rank = os.environ["RANK"]
    if os.environ.get("F2D2_TEST_PIDS"):
        Path(os.environ["F2D2_TEST_PIDS"], f"rank{rank}.pid").write_text(str(os.getpid()))
    if os.environ.get("F2D2_TEST_AUDIT"):
        audit_writes(Path(os.environ["F2D2_TEST_AUDIT"], f"rank{rank}.log"))
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "cli":
        from bench.cli import main as cli_main

        sys.argv = ["f2d2-bench", *args]
        cli_main()
    elif mode == "train":
        train_cases(Path(args[0]), args[1:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
