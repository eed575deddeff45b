"""Progress output for long work, on stderr (stdout carries the results).

- stderr is a terminal: rich progress bars (one per training job: step, loss, ETA) and stage lines.
- stderr is not a terminal (CI logs, SLURM output files, ``2> log``): plain lines, so a log shows
  a slow job from a stuck one: a line when a stage starts and when it ends (with its duration);
  per training job a start line, then a line once ``LOG_INTERVAL_S`` seconds or ``LOG_FRACTION``
  of its steps have passed since its last line, whichever comes first (step, total, loss, rate,
  ETA), and an end line; stages without step counts (evaluating a method, the exact reference) get a "still
  running" line after ``LOG_INTERVAL_S`` seconds without output.
The test is on stderr because that is where progress goes: ``sweep > table.md`` on a terminal
keeps the bars, ``sweep 2> progress.log`` gets lines. ``--quiet`` turns both off, and only the
main process of a distributed run (``RANK`` 0 or unset, see :func:`is_main_process`) reports.
Training workers send (name, step, total, log) through a queue that ``drain`` empties.
"""

from __future__ import annotations

import math
import queue as queue_module
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from bench.sweep import Reporter

LOG_INTERVAL_S = 30.0  # at most this long between two lines of a running stage
LOG_FRACTION = 0.10  # and a line at least every 10 % of a training job's steps
HEARTBEAT_POLL_S = 1.0  # how often the heartbeat thread looks at the clock


def is_main_process() -> bool:
    """Rank 0 of a torchrun / torch.distributed launch (a single process is its own rank 0)."""
    from bench import dist

    return dist.is_main()


def make_reporter(quiet: bool = False, *, enabled: bool | None = None, stream: TextIO | None = None) -> Reporter:
    """The reporter for a command: silent if ``quiet`` or not ``enabled`` (default: the main
    process), rich bars if ``stream`` (default stderr) is a terminal, plain lines otherwise."""
    enabled = is_main_process() if enabled is None else enabled
    if quiet or not enabled:
        return SilentReporter()
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return RichReporter() if isatty is not None and isatty() else LogReporter(stream)


class SilentReporter(Reporter):
    def __enter__(self) -> SilentReporter:
        return self

    def __exit__(self, *exc) -> None:
        return None


class _WorkerQueue(Reporter):
    """A multiprocessing queue that training workers feed; ``drain`` hands it to train_progress."""

    _queue = None
    _manager = None

    def queue(self):
        if self._queue is None:
            from multiprocessing import get_context

            self._manager = get_context("spawn").Manager()
            self._queue = self._manager.Queue()
        return self._queue

    def drain(self) -> None:
        if self._queue is None:
            return
        while True:
            try:
                name, step, total, log = self._queue.get_nowait()
            except queue_module.Empty:
                return
            self.train_progress(name, step, total, log)

    def _shutdown(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()


class RichReporter(_WorkerQueue):
    """One bar per training job (step, loss, ETA) and a line per stage, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4g}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.tasks: dict[str, int] = {}
        self._started = False

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, *exc) -> None:
        if self._started:  # a stopped-but-never-used Progress still prints a newline
            self.progress.stop()
        self._shutdown()

    def _start(self) -> None:
        if not self._started:
            self.progress.start()
            self._started = True

    def stage(self, text: str) -> None:
        self._start()
        self.progress.console.print(text, style="bold", markup=False, highlight=False)

    def train_progress(self, name: str, step: int, total: int, log: dict) -> None:
        self._start()
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(f"train {name}", total=total, loss=float("nan"))
        self.progress.update(self.tasks[name], completed=step, loss=log.get("loss", float("nan")))


def duration(seconds: float) -> str:
    """'12.3 s', '3m05s', '1h02m' (a log line's durations and ETAs)."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass
class _Job:
    first_step: int
    first_s: float
    last_line_s: float
    last_line_step: int


class LogReporter(_WorkerQueue):
    """Plain progress lines for logs (see the module docstring for the cadence).

    Args:
        stream: where lines go (default stderr). interval_s, fraction: the cadence.
        clock: seconds, monotonic (tests pass a fake one). heartbeat: run a thread that calls
            :meth:`tick` every ``HEARTBEAT_POLL_S`` seconds (tests call ``tick`` themselves).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interval_s: float = LOG_INTERVAL_S,
        fraction: float = LOG_FRACTION,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s, self.fraction, self.clock = interval_s, fraction, clock
        self.start_s = clock()
        self.last_line_s = self.start_s
        self.jobs: dict[str, _Job] = {}
        self.current: tuple[str, float] | None = None  # (stage text, start time)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True) if heartbeat else None

    def __enter__(self) -> LogReporter:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        if exc_type is None:
            self._end_stage()
        self._shutdown()

    def _line(self, text: str, now: float) -> None:
        elapsed = int(now - self.start_s)
        self.stream.write(f"[{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}] {text}\n")
        self.stream.flush()
        self.last_line_s = now

    def _end_stage(self) -> None:
        with self._lock:
            if self.current is not None:
                text, began = self.current
                now = self.clock()
                self._line(f"done: {text.split(':')[0]} ({duration(now - began)})", now)
                self.current = None

    def stage(self, text: str) -> None:
        self._end_stage()
        with self._lock:
            now = self.clock()
            self.current = (text, now)
            self._line(f"stage: {text}", now)

    def train_progress(self, name: str, step: int, total: int, log: dict) -> None:
        with self._lock:
            now = self.clock()
            loss = log.get("loss", math.nan)
            job = self.jobs.get(name)
            if job is None:
                self.jobs[name] = _Job(step, now, now, step)
                self._line(f"train {name}: started, step {step}/{total}, loss {loss:.4g}", now)
                return
            rate = (step - job.first_step) / (now - job.first_s) if now > job.first_s else math.nan
            if step >= total:
                spent = now - job.first_s
                self._line(f"train {name}: done, {total}/{total} steps, {duration(spent)} ({rate:.3g} steps/s), loss {loss:.4g}", now)
                del self.jobs[name]
                return
            every = max(1, math.ceil(self.fraction * total))
            if now - job.last_line_s >= self.interval_s or step - job.last_line_step >= every:
                eta = (total - step) / rate if rate > 0 else math.nan
                self._line(
                    f"train {name}: step {step}/{total} ({100 * step / total:.0f}%), loss {loss:.4g}, "
                    f"{rate:.3g} steps/s, ETA {duration(eta)}", now,
                )
                job.last_line_s, job.last_line_step = now, step

    def tick(self) -> None:
        """A 'still running' line if the current stage has been silent for ``interval_s``."""
        with self._lock:
            now = self.clock()
            if self.current is None or now - self.last_line_s < self.interval_s:
                return
            text, began = self.current
            running = ", ".join(self.jobs) or text.split(":")[0]
            self._line(f"still running: {running} ({duration(now - began)} in this stage)", now)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_POLL_S):
            self.tick()
