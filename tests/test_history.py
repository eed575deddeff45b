"""Result history: entries round-trip, concurrent appends from two processes, the baseline that
``check --history`` picks, and the trajectory (table and trend figure) of ``f2d2-bench history``."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.check import Rule
from bench.cli import EXIT_USAGE, app
from bench.history import (
    HistoryError, append_entry, baseline_entry, class_text, config_hash_of, entry_frame, judge_steps, machine_class,
    read_history, record, same_class, select_series, trajectories, trajectory_table,
)

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "results" / "ci" / "checkerboard"
MACHINE = {"cpu_model": "CPU A", "device": "cpu", "device_name": "cpu (CPU A, 2 threads)", "torch": "2.0", "python": "3.11"}


def entry(values: dict, *, commit="c0", config="h1", machine=MACHINE, sha="s0", flags=None) -> dict:
    """A synthetic history entry; values: (method, nfe) -> nll_nats value (stderr 0.01)."""
    flags = flags or {}
    rows = [["toy", m, k, "nll_nats", v, 0.01, flags.get((m, k), ""), "exact", 100] for (m, k), v in values.items()]
    return {"schema": 1, "date": "2026-01-01T00:00:00+00:00", "commit": commit, "machine": machine, "profile": "ci",
            "config_hash": config, "dataset": "toy", "results_sha256": sha,
            "columns": ["dataset", "method", "nfe", "metric", "value", "stderr", "flag", "estimator", "num_points"], "rows": rows}


def test_entries_round_trip_with_nonfinite_values(tmp_path):
    path = tmp_path / "h" / "history.jsonl"  # the directory is created
    append_entry(path, entry({("a", 1): 1.5}))
    from bench.history import _cell

    e = entry({("a", 1): 2.5, ("a", 2): 0.0})
    e["rows"][1][4], e["rows"][1][5] = _cell(float("inf")), _cell(float("nan"))
    append_entry(path, e)
    entries, bad = read_history(path)
    assert bad == 0 and len(entries) == 2 and all(line.startswith("{") for line in path.read_text().splitlines())
    frame = entry_frame(entries[1])
    assert frame["value"].tolist()[0] == 2.5 and math.isinf(frame["value"].tolist()[1])
    assert math.isnan(frame["stderr"].tolist()[1]) and frame["nfe"].dtype.kind == "i"


def test_a_line_cut_short_by_a_killed_writer_does_not_swallow_the_next_entry(tmp_path):
    path = tmp_path / "history.jsonl"
    append_entry(path, entry({("a", 1): 1.0}, commit="first"))
    with open(path, "a") as handle:
        handle.write('{"schema": 1, "commit": "killed", "rows": [[')  # no newline
    append_entry(path, entry({("a", 1): 2.0}, commit="third"))
    entries, bad = read_history(path)
    assert [e["commit"] for e in entries] == ["first", "third"] and bad == 1


WRITER = """
import sys, time
from pathlib import Path
from bench.history import append_entry
path, who, other, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
payload = who * 70_000  # one entry is larger than a pipe buffer or a page
append_entry(path, {"who": who, "seq": 0, "payload": payload, "columns": [], "rows": []})
while f'"who":"{other}"' not in path.read_text():  # both writers are now in their loops
    time.sleep(0.001)
for i in range(1, n):
    append_entry(path, {"who": who, "seq": i, "payload": payload, "columns": [], "rows": []})
"""


def test_two_processes_appending_at_once_do_not_corrupt_the_file(tmp_path):
    path, num = tmp_path / "history.jsonl", 150
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), who, other, str(num)], env=env)
             for who, other in (("a", "b"), ("b", "a"))]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    entries, bad = read_history(path)
    assert bad == 0 and len(entries) == 2 * num
    for who in "ab":
        mine = [e for e in entries if e["who"] == who]
        assert [e["seq"] for e in mine] == list(range(num))  # each writer's entries whole and in order
        assert all(e["payload"] == who * 70_000 for e in mine)
    order = [e["who"] for e in entries]
    assert order.index("b") < len(order) - order[::-1].index("a") - 1  # they really overlapped


def test_baseline_is_the_last_entry_of_the_same_config_and_machine_class_other_than_the_run_itself():
    other_cpu = MACHINE | {"cpu_model": "CPU B"}
    other_torch = MACHINE | {"torch": "2.1"}
    one_thread = MACHINE | {"device_name": "cpu (CPU A, 1 threads)"}  # same class: threads do not matter
    entries = [
        entry({("a", 1): 1.0}, commit="c1", sha="s1"),
        entry({("a", 1): 2.0}, commit="c2", sha="s2", machine=one_thread),
        entry({("a", 1): 3.0}, commit="c3", sha="s3", config="h2"),
        entry({("a", 1): 4.0}, commit="c4", sha="s4", machine=other_cpu),
        entry({("a", 1): 5.0}, commit="c5", sha="s5", machine=other_torch),
        entry({("a", 1): 6.0}, commit="c6", sha="s6"),  # the run under test, recorded by sweep --record
    ]
    cls = machine_class(MACHINE)
    assert baseline_entry(entries, "h1", cls)[0] == 5
    assert baseline_entry(entries, "h1", cls, own=("c6", "s6"))[0] == 1
    assert baseline_entry(entries, "h1", cls, own=("c6", "s-other"))[0] == 5  # same commit, other results
    assert baseline_entry(entries, "h2", cls)[0] == 2
    assert baseline_entry(entries, "h1", machine_class(other_cpu))[0] == 3
    with pytest.raises(HistoryError, match="no earlier entry with config hash h3"):
        baseline_entry(entries, "h3", cls)
    with pytest.raises(HistoryError, match="no earlier entry"):
        baseline_entry(entries[2:3], "h2", cls, own=("c3", "s3"))


def test_machine_class_is_the_rule_of_test_regression():
    import importlib.util

    import torch

    from bench.env import environment

    spec = importlib.util.spec_from_file_location("test_regression_rule", ROOT / "tests" / "test_regression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    here = environment(torch.device("cpu"))  # what a sweep on this machine writes to env.json
    committed = json.loads((CI / "env.json").read_text())
    this_machine = committed | {"cpu_model": here["cpu_model"], "versions": here["versions"]}
    assert module.same_machine_kind(this_machine) and same_class(machine_class(this_machine), machine_class(here))
    edits = [{"cpu_model": "Other"}, {"versions": {**here["versions"], "torch": "0.0"}}, {"device": "cuda:0"},
             {"cpu_capability": "NOT-" + str(here["cpu_capability"])}]
    for edit in edits:
        env = this_machine | edit
        assert not module.same_machine_kind(env) and not same_class(machine_class(env), machine_class(here)), edit


def test_the_cpu_instruction_set_splits_a_model_name_and_an_unrecorded_one_matches_any():
    """Two VMs both called 'AMD EPYC' may run torch's AVX2 or AVX-512 kernels (last bits differ);
    env.json files written before the instruction set was recorded still match by name."""
    avx2, avx512, unknown = (machine_class(MACHINE | {"cpu_capability": c}) for c in ("AVX2", "AVX512", None))
    assert same_class(avx2, avx2) and not same_class(avx2, avx512) and not same_class(avx512, avx2)
    assert same_class(unknown, avx2) and same_class(avx512, unknown)
    assert not same_class(unknown, machine_class(MACHINE | {"cpu_model": "CPU B"}))  # only the ISA is a wildcard
    assert "CPU A (AVX2) / torch 2.0 / cpu" == class_text(avx2) and class_text(unknown) == "CPU A / torch 2.0 / cpu"
    entries = [entry({("a", 1): 1.0}, commit="c1", machine=MACHINE | {"cpu_capability": "AVX2"}),
               entry({("a", 1): 2.0}, commit="c2", machine=MACHINE | {"cpu_capability": "AVX512"}),
               entry({("a", 1): 3.0}, commit="c3", machine=MACHINE)]  # an entry from before the field
    assert baseline_entry(entries[:2], "h1", avx2)[0] == 0 and baseline_entry(entries[:2], "h1", avx512)[0] == 1
    assert baseline_entry(entries, "h1", avx2)[0] == 2
    assert select_series(entries[:2], show_all=False) == [1]
    # the last entry did not record its ISA: the series follows the newest that did (AVX512), never both
    assert select_series(entries + [entries[1], entries[2]], show_all=False) == [1, 2, 3, 4]
    assert select_series([entries[2], entries[0], entries[1], entries[2]], show_all=False) == [0, 2, 3]
    assert select_series([entries[2], entries[2]], show_all=False) == [0, 1]  # nobody recorded one


def test_trajectory_judges_each_entry_against_the_previous_one_at_the_tolerance():
    # nll_nats: abs 0.25, sigmas 0 -> a step of exactly 0.25 passes, 0.25 + 2^-20 regresses
    rule = Rule("nll_*", abs=0.25, sigmas=0.0)
    values = [1.0, 1.25, 1.5 + 2.0**-20, 1.0]
    entries = [entry({("a", 1): v, ("b", 2): 2.0}, flags={("b", 2): "optimistic"} if i == 2 else {}) for i, v in enumerate(values)]
    metric, traj = trajectories(entries, list(range(4)), None, None, None)
    assert metric == "nll_nats" and len(traj) == 8
    judged = judge_steps(traj, metric, (rule,))
    a = judged[judged.method == "a"]
    assert a["regressed"].tolist() == [False, False, True, True]  # the last step moved down by 0.5
    higher = judge_steps(traj, metric, (Rule("nll_*", worse="higher", abs=0.25, sigmas=0.0),))
    assert higher[higher.method == "a"]["regressed"].tolist() == [False, False, True, False]  # down is better
    b = judged[judged.method == "b"]
    assert b["flagged"].tolist() == [False, False, True, False] and not b["regressed"].any()
    header, rows, legend = trajectory_table(judged, entries, last=3)
    assert header[3:6] == ["#1", "#2", "#3"] and len(legend) == 3
    assert rows[0][:7] == ["toy", "a", "1", "1.25", "1.5", "1", "-0.5"] and rows[0][-1] == "regressed"
    assert rows[1][4] == "2 optimistic" and rows[1][-1] == "ok"
    _, only_b = trajectories(entries, [0, 3], None, "b", 2)
    assert only_b["entry"].tolist() == [0, 3]
    with pytest.raises(HistoryError, match="no rows of metric 'fid'"):
        trajectories(entries, [0], "fid", None, None)


def ci_copy(tmp_path: Path, name: str, delta: float = 0.0, env_edit=None) -> Path:
    out = tmp_path / name
    shutil.copytree(CI, out)
    rows = pd.read_csv(out / "results.csv")
    rows.loc[rows.metric == "nll_nats", "value"] += delta
    rows.to_csv(out / "results.csv", index=False)
    if env_edit:
        env = json.loads((out / "env.json").read_text())
        env_edit(env)
        (out / "env.json").write_text(json.dumps(env))
    return out


def test_check_and_history_commands_on_recorded_results(tmp_path):
    from bench.config import stable_hash
    from bench.profiles import default_config

    history = tmp_path / "history.jsonl"
    assert config_hash_of(CI) == stable_hash(default_config("checkerboard", "ci"))
    old = ci_copy(tmp_path, "old", env_edit=lambda env: env.update(git_commit="old"))
    other = ci_copy(tmp_path, "other", 5.0, lambda env: env.update(cpu_model="Elsewhere", git_commit="x"))
    new = ci_copy(tmp_path, "new", 1.0, lambda env: env.update(git_commit="new"))
    for out in (old, other, new):  # new's own entry last, as after `sweep --record`
        record(history, out, config_hash_of(out), "ci")
    run = CliRunner().invoke
    result = run(app, ["check", str(new), "--history", str(history), "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 1, result.output  # against `old` (+1 nat on every NLL), not itself or `other`
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert "entry #0 (commit old" in verdict["baseline"] and verdict["counts"]["regressed"] == 36
    again = run(app, ["check", str(old), "--history", str(history)])  # the last entry other than its own: `new`
    assert again.exit_code == 1 and "entry #2 (commit new" in again.stdout
    same = run(app, ["check", str(new), "--baseline", str(new / "results.csv"), "--history", str(history)])
    assert same.exit_code == EXIT_USAGE
    lone = run(app, ["check", str(other), "--history", str(history)])
    assert lone.exit_code == EXIT_USAGE and "no earlier entry" in lone.stderr

    plot = tmp_path / "trend.png"
    shown = run(app, ["history", str(history), "--method", "meanflow-f2d2", "--plot", str(plot)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "nll_nats over 2 of 3 entries" in shown.stdout and "regressed" in shown.stdout  # #0 -> #2: +1 nat
    import matplotlib.image

    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    everything = run(app, ["history", str(history), "--all", "--nfe", "1"], env={"COLUMNS": "200"})
    assert "over 3 of 3 entries" in everything.stdout and " 8.1" in everything.stdout  # `other`: +5 nats


@pytest.mark.parametrize(
    "args, needle",
    [(["MISSING"], "not found"), (["H", "--last", "0"], "--last"), (["H", "--metric", "fid"], "no rows of metric"),
     (["H", "--plot", "DIR"], "is a directory")],
)
def test_history_usage_errors(tmp_path, args, needle):
    append_entry(tmp_path / "h.jsonl", entry({("a", 1): 1.0}))
    (tmp_path / "DIR").mkdir()
    names = {"H": tmp_path / "h.jsonl", "MISSING": tmp_path / "missing.jsonl", "DIR": tmp_path / "DIR"}
    result = CliRunner().invoke(app, ["history", *[str(names.get(a, a)) for a in args]])
    assert result.exit_code == EXIT_USAGE
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
