"""The ``f2d2-bench`` command line (console script ``bench.cli:main``; also ``python -m bench.cli``).

The app, its error reporting and stop-signal handling live in bench/cli_core.py; the commands in
bench/cli_run.py (sweep, plan, guide), bench/cli_tools.py (table, check, history,
reference-accuracy, methods, datasets) and bench/cli_import.py (import). This module assembles
them and re-exports the names callers use.
"""

from __future__ import annotations

from bench import cli_core
from bench import cli_run, cli_tools  # noqa: F401 - importing them registers their commands
from bench import cli_import
from bench.cli_config import _parse_checkpoints, _parse_methods, _resolve_config, cfg_method_config  # noqa: F401
from bench.cli_core import DEFAULT_OUT, EXIT_USAGE, UserError, app, main  # noqa: F401
from bench.cli_run import guide, plan, sweep  # noqa: F401

cli_import.register(app, cli_core)

if __name__ == "__main__":
    main()
