"""Success against inference delay, the pieces that need no processes: the delay line,
the evaluation's delay settings and jobs, and the success-vs-delay table and plot."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpstack.sim.delay_line import DelayLine
from dpstack.sim.eval_report import EpisodeRecord, delay_plot, delay_table, markdown_table, summarize
from dpstack.sim.evaluate import EvalConfig, arm_argv, parse_delays, split_jobs


def test_an_item_comes_out_its_delay_after_it_went_in_in_order():
    line: DelayLine[str] = DelayLine(0.2)
    line.push("a", now=1.0)
    line.push("b", now=1.05)
    assert line.next_due() == pytest.approx(1.2) and len(line) == 2
    assert line.pop_due(1.19) == []
    assert line.pop_due(1.2) == ["a"]
    assert line.pop_due(2.0) == ["b"] and line.next_due() is None and not line


def test_no_delay_hands_an_item_straight_through_and_a_cleared_line_forgets():
    line: DelayLine[int] = DelayLine(0.0)
    line.push(1, now=5.0)
    assert line.pop_due(5.0) == [1]
    slow: DelayLine[int] = DelayLine(1.0)
    slow.push(2, now=0.0)
    slow.clear()  # a new episode: the last one's answers never arrive
    assert slow.pop_due(10.0) == []
    with pytest.raises(ValueError, match=">= 0"):
        DelayLine(-0.1)
    with pytest.raises(ValueError, match="finite"):
        DelayLine(float("nan"))


def test_bad_delays_are_refused_in_one_sentence(tmp_path: Path):
    cfg = lambda **kw: EvalConfig(policy_dir=tmp_path, out=tmp_path, **kw)  # noqa: E731
    assert cfg(mode="realtime", extra_latency_ms=(0, 50)).extra_latency_ms == (0.0, 50.0)
    assert cfg(mode="lockstep", extra_latency_ms=(0, 50)).extra_latency_ms == (0.0, 50.0)
    with pytest.raises(ValueError, match=">= 0"):
        cfg(mode="realtime", extra_latency_ms=(-5,))
    with pytest.raises(ValueError, match="finite"):  # a NaN delay would hold every answer forever
        cfg(mode="lockstep", extra_latency_ms=(0, float("nan")))
    with pytest.raises(ValueError, match="twice"):
        cfg(mode="realtime", extra_latency_ms=(50, 50.0))
    assert parse_delays("0,50, 100,200") == (0.0, 50.0, 100.0, 200.0)
    with pytest.raises(ValueError, match="'50ms' is not a number"):
        parse_delays("0,50ms")


def test_every_sampler_runs_every_episode_at_every_delay_on_the_same_seeds(tmp_path: Path):
    jobs = split_jobs(("ddim", "streaming"), episodes=5, workers=2, video=1, raw_dir=tmp_path, delays_ms=(0.0, 100.0))
    for sampler in ("ddim", "streaming"):
        for delay in (0.0, 100.0):
            mine = [j for j in jobs if j.sampler == sampler and j.delay_ms == delay]
            assert sorted(i for j in mine for i in range(j.first, j.first + j.count)) == list(range(5))
        assert sum(j.video for j in jobs if j.sampler == sampler) == 1  # one video per sampler, not per delay
    assert len({j.out for j in jobs}) == len(jobs)
    # a run without delays keeps the layout earlier runs left (so they resume)
    assert {j.out.parent for j in jobs if not j.delay_ms} == {tmp_path / "ddim", tmp_path / "streaming"}
    assert [j.sampler for j in jobs][:4] == ["ddim"] * 4  # one server's jobs together
    cfg = EvalConfig(policy_dir=tmp_path / "pkg", out=tmp_path, mode="realtime", extra_latency_ms=(0.0, 100.0))
    delayed = next(j for j in jobs if j.delay_ms)
    argv = arm_argv(cfg, delayed, "tcp://127.0.0.1:1", tmp_path)
    assert argv[argv.index("--extra-latency-ms") + 1] == "100"
    assert argv[argv.index("--policy") + 1] == str(tmp_path / "pkg")  # the arm reads its cameras there
    assert "--extra-latency-ms" not in arm_argv(cfg, jobs[0], "tcp://127.0.0.1:1", tmp_path)


def _summary(sampler: str, delay: float, successes: int, n: int = 10):
    records = [EpisodeRecord(i, 10_000 + i, i < successes, 20, held_steps=int(delay // 50), mode="realtime",
                             extra_latency_ms=delay) for i in range(n)]
    return summarize(sampler, records, "realtime", 20.0)


def test_the_delay_table_and_plot_have_a_line_per_sampler_with_its_interval(tmp_path: Path):
    summaries = [_summary("ddim", 0, 9), _summary("ddim", 200, 4), _summary("streaming", 0, 10),
                 _summary("streaming", 200, 9)]
    assert summaries[1].extra_latency_ms == 200.0
    table = delay_table(summaries)
    assert table.splitlines()[0] == "| sampler | +0 ms | +200 ms |"
    assert "| ddim | 0.90 [0.60, 0.98], held 0.0/ep | 0.40 [0.17, 0.69], held 4.0/ep |" in table
    assert "| streaming | 1.00 [0.72, 1.00]" in table
    assert "| extra latency (ms) |" in markdown_table(summaries)
    assert "extra latency" not in markdown_table(summaries[:1])  # no delays, no column
    png = delay_plot(summaries, tmp_path / "delay.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_episodes_at_different_delays_are_never_pooled():
    records = [EpisodeRecord(0, 1, True, 5, extra_latency_ms=0.0), EpisodeRecord(1, 2, True, 5, extra_latency_ms=50.0)]
    with pytest.raises(ValueError, match="different extra latencies"):
        summarize("ddim", records, "realtime", 20.0)
