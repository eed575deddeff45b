"""Plain progress lines for logs (stderr not a terminal): cadence with a fake clock, stage lines,
the heartbeat, which reporter a command gets, and a tiny sweep end to end with ``--record``."""

from __future__ import annotations

import io
import json
import queue
import re

import pytest
from typer.testing import CliRunner

import bench.progress
from bench.cli import app
from bench.progress import LogReporter, RichReporter, SilentReporter, make_reporter


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def reporter(**kwargs) -> tuple[LogReporter, FakeClock, io.StringIO]:
    clock, stream = FakeClock(), io.StringIO()
    return LogReporter(stream, clock=clock, heartbeat=False, **kwargs), clock, stream


def steps_printed(text: str, name: str) -> list[int]:
    return [int(s) for s in re.findall(rf"train {name}: (?:started, )?step (\d+)/", text)]


def feed(rep: LogReporter, clock: FakeClock, name: str, total: int, seconds_per_step: float, first: int = 1) -> None:
    for step in range(first, total + 1):
        clock.t = (step - first) * seconds_per_step
        rep.train_progress(name, step, total, {"loss": 1.0 / step})


def test_a_line_every_tenth_of_the_steps_when_that_comes_first():
    rep, clock, stream = reporter()
    feed(rep, clock, "fast", 100, 1.0)  # 10 % = 10 steps = 10 s < 30 s
    assert steps_printed(stream.getvalue(), "fast") == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91]
    assert stream.getvalue().splitlines()[-1] == "[0:01:39] train fast: done, 100/100 steps, 1m39s (1 steps/s), loss 0.01"


def test_a_line_every_interval_when_that_comes_first():
    rep, clock, stream = reporter()
    feed(rep, clock, "slow", 1000, 1.0)  # 10 % = 100 steps = 100 s > 30 s
    assert steps_printed(stream.getvalue(), "slow") == list(range(1, 1000, 30))
    line = stream.getvalue().splitlines()[1]
    # 30 steps in 30 s after the first report: 1 step/s, (1000 - 31) s to go
    assert line == "[0:00:30] train slow: step 31/1000 (3%), loss 0.03226, 1 steps/s, ETA 16m09s"


def test_cadence_boundaries_are_inclusive():
    rep, clock, stream = reporter(interval_s=30.0, fraction=0.1)
    rep.train_progress("a", 1, 1000, {"loss": 1.0})
    clock.t = 29.999
    rep.train_progress("a", 2, 1000, {"loss": 1.0})  # neither 30 s nor 100 steps: silent
    clock.t = 30.0
    rep.train_progress("a", 3, 1000, {"loss": 1.0})  # exactly 30 s
    rep.train_progress("a", 102, 1000, {"loss": 1.0})  # 99 steps, 0 s: silent
    rep.train_progress("a", 103, 1000, {"loss": 1.0})  # exactly 100 steps
    assert steps_printed(stream.getvalue(), "a") == [1, 3, 103]


def test_stage_lines_heartbeat_and_worker_queue():
    from bench.sweep import _QueueProgress

    rep, clock, stream = reporter()
    with rep:
        rep.stage("training (toy): a [missing]")
        rep._queue = queue.Queue()  # what the spawn Manager's queue does, without a process
        forward = _QueueProgress(rep._queue)
        for step in range(1, 301):  # a worker reports every 50 steps; the parent drains meanwhile
            clock.t = step * 0.01
            forward("a", step, 300, {"loss": 0.5})
            rep.drain()
        clock.t = 10.0
        rep.stage("evaluating a at NFE 1, 2")
        clock.t = 39.999
        rep.tick()
        clock.t = 40.0
        rep.tick()
        clock.t = 45.5
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines == [
        "stage: training (toy): a [missing]",
        "train a: started, step 50/300, loss 0.5",
        "train a: step 100/300 (33%), loss 0.5, 100 steps/s, ETA 2.0 s",
        "train a: step 150/300 (50%), loss 0.5, 100 steps/s, ETA 1.5 s",
        "train a: step 200/300 (67%), loss 0.5, 100 steps/s, ETA 1.0 s",
        "train a: step 250/300 (83%), loss 0.5, 100 steps/s, ETA 0.5 s",
        "train a: done, 300/300 steps, 2.5 s (100 steps/s), loss 0.5",
        "done: training (toy) (10.0 s)",
        "stage: evaluating a at NFE 1, 2",
        "still running: evaluating a at NFE 1, 2 (30.0 s in this stage)",
        "done: evaluating a at NFE 1, 2 (35.5 s)",
    ]


def test_no_end_line_when_the_stage_failed():
    rep, clock, stream = reporter()
    with pytest.raises(RuntimeError), rep:
        rep.stage("training")
        raise RuntimeError
    assert "done:" not in stream.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_which_reporter(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert isinstance(make_reporter(False, stream=io.StringIO()), LogReporter)
    assert isinstance(make_reporter(False, stream=Terminal()), RichReporter)
    assert isinstance(make_reporter(True, stream=io.StringIO()), SilentReporter)
    assert isinstance(make_reporter(False, enabled=False, stream=io.StringIO()), SilentReporter)
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)  # torchrun's environment (bench.dist reads it before the group starts)
    monkeypatch.setenv("RANK", "1")  # torchrun: only rank 0 reports
    assert isinstance(make_reporter(False, stream=io.StringIO()), SilentReporter)
    assert isinstance(make_reporter(False, enabled=True, stream=io.StringIO()), LogReporter)
    monkeypatch.setenv("RANK", "0")
    assert isinstance(make_reporter(False, stream=io.StringIO()), LogReporter)


TINY = """
methods: [flow-matching]
nfe: [1, 2]
teacher_train: {steps: 200, batch_size: 64, warmup_steps: 10, checkpoint_every: 1000}
eval: {num_test: 64, num_samples: 64, batch_size: 64, num_repeats: 1}
"""


def test_tiny_sweep_logs_at_the_stated_cadence_and_records_its_history(tmp_path, monkeypatch):
    """Two clock seconds per training step (the only clock reads during training are the progress
    calls): the teacher's 200 steps get a line every 30 s = 15 steps (before 10 % = 20 steps; the
    other regime is tested above). Then --record appended the sweep's entry."""
    from bench.config import stable_hash
    from bench.history import config_hash_of, entry_frame, read_history
    from bench.tables import read_rows

    class StepClock(FakeClock):
        def __call__(self) -> float:
            self.t += 2.0
            return self.t

    real = bench.progress.make_reporter
    monkeypatch.setattr(bench.progress, "make_reporter", lambda quiet: real(quiet) if quiet else LogReporter(clock=StepClock(), heartbeat=False))
    config, out, history = tmp_path / "tiny.yaml", tmp_path / "out", tmp_path / "h" / "history.jsonl"
    config.write_text(TINY)
    args = ["sweep", "--profile", "ci", "--config", str(config), "--out", str(out), "--jobs", "1", "--record", str(history)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    log = result.stderr
    assert steps_printed(log, "flow-matching") == list(range(1, 200, 15))
    assert "train flow-matching: done, 200/200 steps" in log
    stages = [line.split("] ", 1)[1] for line in log.splitlines() if re.match(r"\[[\d:]+\] (stage|done):", line)]
    assert [s.split(":")[0] for s in stages] == ["stage", "done", "stage", "done", "stage", "done"]
    assert stages[-2:] == ["stage: evaluating flow-matching at NFE 1, 2", "done: evaluating flow-matching at NFE 1, 2 (2.0 s)"]
    assert "train flow-matching:" not in result.stdout and "stage:" not in result.stdout  # progress on stderr only

    entries, bad = read_history(history)
    assert bad == 0 and len(entries) == 1
    entry = entries[0]
    assert entry["config_hash"] == config_hash_of(out / "checkerboard") and entry["profile"] == "ci"
    env = json.loads((out / "checkerboard" / "env.json").read_text())
    assert entry["machine"]["cpu_model"] == env["cpu_model"] and entry["machine"]["cpu_capability"] == env["cpu_capability"]
    recorded, written = entry_frame(entry), read_rows(str(out / "checkerboard" / "results.csv"))
    assert len(recorded) == len(written) and recorded["value"].equals(written["value"])

    quiet = CliRunner().invoke(app, [*args, "--quiet"])  # reuses everything; no progress at all
    assert quiet.exit_code == 0 and quiet.stderr == "" and len(read_history(history)[0]) == 2
    from bench.cli import _resolve_config

    assert entry["config_hash"] == stable_hash(_resolve_config(None, "ci", config, None, None))
    assert read_history(history)[0][1]["config_hash"] == entry["config_hash"]


def test_record_path_is_checked_before_any_work(tmp_path):
    (tmp_path / "dir").mkdir()
    result = CliRunner().invoke(app, ["sweep", "--profile", "ci", "--out", str(tmp_path / "out"), "--record", str(tmp_path / "dir")])
    assert result.exit_code == 2 and result.stderr.startswith("error: --record") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()
