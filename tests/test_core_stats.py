"""The one timing summary (dpstack/core/stats.py) every JSON report uses."""
from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest

from dpstack.core.stats import format_ms, summarize_ms


def test_summary_of_known_values():
    s = summarize_ms(range(1, 101))  # 1..100 ms
    assert list(s) == ["n", "mean_ms", "p50_ms", "p99_ms", "max_ms"]
    assert s["n"] == 100 and s["mean_ms"] == 50.5 and s["max_ms"] == 100.0
    assert s["p50_ms"] == 50.5                      # between the two middle values
    assert s["p99_ms"] == pytest.approx(99.01)      # linear between the 99th and 100th


def test_seconds_scale_to_milliseconds_from_any_iterable():
    s = summarize_ms(deque([0.001, 0.003, 0.002]), scale=1e3)
    assert (s["n"], s["p50_ms"], s["max_ms"]) == (3, pytest.approx(2.0), pytest.approx(3.0))
    assert summarize_ms(np.array([4.0]))["p99_ms"] == 4.0


def test_no_values_keep_the_keys_and_stay_json():
    s = summarize_ms([])
    assert s == {"n": 0, "mean_ms": None, "p50_ms": None, "p99_ms": None, "max_ms": None}
    assert json.loads(json.dumps(s)) == s
    assert format_ms(s["p50_ms"]) == "-" and format_ms(1.234) == "1.23" and format_ms(1.234, ".1f") == "1.2"
