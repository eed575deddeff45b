"""Table rendering: the paper layout's ranking rules, the backward and guidance layouts."""

from __future__ import annotations

import math

import pytest

from bench.cells import Row
from bench.tables import Cell, paper_table, ranks, render, rows_frame


def test_ranks_lower_is_better_with_statistical_ties():
    values = {"a": Cell(1.0, 0.01), "b": Cell(1.02, 0.01), "c": Cell(2.0, 0.01), "d": Cell(2.01, 0.01), "e": Cell(5.0, 0.01)}
    assert ranks(values) == {"a": 1, "b": 1, "c": 2, "d": 2}


def test_ranks_likelihoods_by_distance_to_the_teacher_and_skip_naive_and_invalid():
    values = {
        "optimistic": Cell(3.0, 0.001, "", "f2d2-trained"),  # far below the teacher's 3.5
        "close": Cell(3.52, 0.001, "", "f2d2-trained"),
        "closer_naive": Cell(3.5, 0.001, "", "naive/exact"),
        "invalid": Cell(3.49, 0.001, "invalid", "f2d2-trained"),
        "second": Cell(3.7, 0.001, "", "f2d2-first_order"),
    }
    assert ranks(values, target=3.5) == {"close": 1, "second": 2}


def frame(rows):
    return rows_frame([Row("toy", m, k, metric, v, se, flag, est) for m, k, metric, v, se, flag, est in rows])


def test_paper_table_marks_and_caption():
    rows = []
    for k in (1, 2):
        rows += [
            ("flow-matching", k, "nll_nats", 9.0, 0.01, "", "naive/exact"),
            ("flow-matching", k, "energy_distance", 0.5, 0.001, "", ""),
            ("flow-matching", k, "nll_teacher_nats", 3.5, 0.01, "", "dopri5/exact"),
            ("a-f2d2", k, "nll_nats", 3.51, 0.001, "", "f2d2-trained"),
            ("a-f2d2", k, "energy_distance", 0.1, 0.001, "", ""),
            ("b-f2d2", k, "nll_nats", 3.0, 0.001, "invalid", "f2d2-trained"),
            ("b-f2d2", k, "energy_distance", 0.2, 0.001, "", ""),
            ("b-f2d2-fwd", k, "nll_nats", 3.4, 0.001, "", "f2d2-first_order"),
            ("b-f2d2-fwd", k, "energy_distance", 0.3, 0.001, "", ""),
        ]
    text = paper_table(frame(rows))
    lines = text.splitlines()
    assert lines[0].startswith("| method | NLL @2 | ED @2 | NLL @1 | ED @1 |")
    assert "| a-f2d2 | **3.510** | **0.1000** | **3.510** | **0.1000** |" in text
    assert "| b-f2d2 | 3.000 † | <u>0.2000</u> |" in text
    assert "b-f2d2-fwd" not in text  # forward-only copies belong to the backward layout
    assert "Teacher reference NLL 3.500" in text
    latex = paper_table(frame(rows), "latex")
    assert r"\textbf{3.510}" in latex and r"\textcolor{gray}{3.000}" in latex
    csv = paper_table(frame(rows), "csv")
    assert csv.splitlines()[0].startswith("method,nll_nats@2,nll_nats@2_flag")


def test_backward_and_guidance_layouts():
    rows = []
    for k in (1, 2):
        rows += [
            ("m-f2d2", k, "nll_nats", 3.6, 0.01, "", "f2d2-trained"),
            ("m-f2d2", k, "nll_first_order_nats", 3.1, 0.01, "", "f2d2-first_order"),
            ("m-f2d2", k, "nll_ref_nats", 3.55, 0.01, "", "dopri5/exact"),
            ("m-f2d2-fwd", k, "nll_nats", 2.9, 0.01, "", "f2d2-first_order"),
            ("m-f2d2-fwd", k, "nll_ref_nats", 3.6, 0.01, "", "dopri5/exact"),
            ("m-f2d2", k, "energy_distance", 0.2, math.nan, "", ""),
            ("m-f2d2", k, "network_calls_forward", k, math.nan, "", ""),
            ("m-f2d2", k, "network_calls_backward", 0, math.nan, "", ""),
            ("m-f2d2+guided@0.1", k, "energy_distance", 0.15, math.nan, "", ""),
            ("m-f2d2+guided@0.1", k, "network_calls_forward", k + 1, math.nan, "", ""),
            ("m-f2d2+guided@0.1", k, "network_calls_backward", 1, math.nan, "", ""),
        ]
    back = render(frame(rows), "backward", "markdown")
    assert "| m-f2d2 | 1 | +0.050 | -0.450 | -0.700 |" in back
    guide = render(frame(rows), "guidance", "markdown")
    assert "| m-f2d2+guided@0.1 | 0.15 | 2+1 | 0.15 | 3+1 |" in guide
    with pytest.raises(ValueError, match="markdown only"):
        render(frame(rows), "wide", "latex")
