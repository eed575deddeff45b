"""The ``f2d2-bench`` command line: the app, error reporting and stop signals (the commands live in
bench/cli_run.py, bench/cli_tools.py and bench/cli_import.py; bench/cli.py assembles them).

Errors a user can cause (bad options, unknown names, missing files, bad checkpoints or configs)
print one line on stderr and exit with status 2, without a traceback and before writing anything.
The option parser's own errors get the same one-line form in :func:`main` (the console script).
Ctrl-C and SIGTERM print one line too and exit with 130 and 143, whatever exception the signal
surfaced as: torch's C++ can turn the KeyboardInterrupt raised inside a tensor constructor into a
ValueError ("could not determine the shape of object type ..."), so :func:`main` records every stop
signal it receives and reports the stop, never the side effect.

Under torchrun (``torchrun --nproc_per_node N $(which f2d2-bench) sweep ...``) the commands run on
every rank inside :func:`bench.dist.process_group`; rank 0 alone prints progress, errors and the
stop line, and writes files. A rank that loses its peers says so on its own line and exits 1.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Benchmark few-step flow models with fast likelihoods (F2D2).",
)

EXIT_USAGE = 2

DEFAULT_OUT = "runs"  # ignored by git: a sweep never rewrites the committed results/ unless asked to


class UserError(Exception):
    """An error to report as one line, without a traceback."""


EXIT_PEER_LOST = 1


def _fail(message: str) -> None:
    from bench import dist

    if _STOP_SIGNALS:  # an error caused by Ctrl-C / SIGTERM arriving mid-call is the stop, not bad input
        raise typer.Exit(_say_stopped(_STOP_SIGNALS[0]))
    if dist.is_main():  # every rank finds the same bad option: one line, from rank 0
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)

def _peer_lost():
    from bench.dist import PeerLost

    return PeerLost

def _lost(err: Exception) -> None:
    """A rank whose peers died says so on its own line (unless it is being stopped), exit 1."""
    if not _STOP_SIGNALS:
        typer.echo(f"error: {err}", err=True)
    raise typer.Exit(_say_stopped(_STOP_SIGNALS[0]) if _STOP_SIGNALS else EXIT_PEER_LOST)

def _user_errors():
    from bench.checkpoint import CheckpointError
    from bench.config import ConfigError
    from bench.datasets import DataError
    from bench.fid import WeightsError

    return (UserError, ConfigError, CheckpointError, DataError, WeightsError, PermissionError, FileNotFoundError, NotADirectoryError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop request), raised where the main process is so
    that it cleans up exactly as after Ctrl-C: training workers stopped, no temporary files."""


_STOP_SIGNALS: list[int] = []  # the stop signals received so far (main installs the handler)

_STOP_REPORTED: list[bool] = []


def _on_stop_signal(signum, frame) -> None:
    import signal

    _STOP_SIGNALS.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

def _interrupted(err: KeyboardInterrupt) -> None:
    import signal

    signum = _STOP_SIGNALS[0] if _STOP_SIGNALS else signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
    raise typer.Exit(_say_stopped(signum))

def _say_stopped(signum: int) -> int:
    """Ctrl-C or SIGTERM: one line instead of a traceback; returns the shell's status (128 + signal).
    Every file is written by rename, so what is on disk is complete; finished checkpoints and
    evaluation cells are reused by the rerun, an unfinished training resumes from its last save."""
    import signal

    from bench import dist

    if not _STOP_REPORTED and dist.is_main():
        what = "terminated" if signum == signal.SIGTERM else "interrupted"
        typer.echo(
            f"{what}: every file on disk is complete; rerun the same command to resume "
            "(finished models and evaluation cells are reused)",
            err=True,
        )
        _STOP_REPORTED.append(True)
    return 128 + signum

def _reporter(quiet: bool):
    """Bars on a terminal, plain lines in logs, nothing with --quiet or off rank 0 (bench/progress.py)."""
    from bench.progress import make_reporter

    return make_reporter(quiet)

def main() -> None:
    from bench.env import quiet_known_warnings

    quiet_known_warnings()
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_stop_signal)
    command = typer.main.get_command(app)
    try:
        status = command.main(standalone_mode=False)
    except typer.TyperException as err:  # the parser's usage errors: one line, as for our own
        context = getattr(err, "ctx", None)
        if type(err).__name__ != "NoArgsIsHelpError":  # a bare `f2d2-bench` has printed its help
            where = f" (see '{context.command_path} --help')" if context is not None else ""
            typer.echo(f"error: {err.format_message()}{where}", err=True)
        raise SystemExit(getattr(err, "exit_code", EXIT_USAGE)) from None
    except typer.Abort:
        if not _STOP_SIGNALS:
            typer.echo("aborted", err=True)
            raise SystemExit(1) from None
    except Exception:
        if not _STOP_SIGNALS:
            raise
        status = None  # a stop signal surfaced as another exception (torch: ValueError): reported below
    if _STOP_SIGNALS:  # also when typer turned an interrupt outside a command's handler into 130
        raise SystemExit(_say_stopped(_STOP_SIGNALS[0]))
    raise SystemExit(status if isinstance(status, int) else 0)
