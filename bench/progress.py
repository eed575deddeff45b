"""Progress output for long work: rich progress bars with ETA, fed across worker processes."""

from __future__ import annotations

import queue as queue_module

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bench.sweep import Reporter


class SilentReporter(Reporter):
    def __enter__(self) -> SilentReporter:
        return self

    def __exit__(self, *exc) -> None:
        return None


class RichReporter(Reporter):
    """One bar per training job (step, loss, ETA) and a line per stage, on stderr."""

    def __init__(self) -> None:
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
        self._queue = None
        self._manager = None
        self._started = False

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, *exc) -> None:
        if self._started:  # a stopped-but-never-used Progress still prints a newline
            self.progress.stop()
        if self._manager is not None:
            self._manager.shutdown()

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
