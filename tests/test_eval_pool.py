"""Outcomes seed by seed: failing seeds, the paired (McNemar) comparison of samplers, and
`dpstack pool` over evaluations on disjoint seed ranges, read from the files an
evaluation writes."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpstack.cli import main
from dpstack.sim.eval_pool import PoolError, pool_results, pooled_markdown
from dpstack.sim.eval_report import EpisodeRecord, mcnemar_exact_p, paired_comparisons, seed_sections, summarize
from dpstack.sim.evaluate import RAW_DIR, EvalConfig, write_raw_records, write_results


def _records(seeds: range, failed: set[int], delay: float = 0.0) -> list[EpisodeRecord]:
    return [EpisodeRecord(episode=i, seed=s, success=s not in failed, steps=100, chunk_latency_ms=[5.0],
                          step_latency_ms=[1.0] * 100, extra_latency_ms=delay) for i, s in enumerate(seeds)]


def _evaluation(out: Path, seeds: range, failed: dict[str, set[int]], package: Path, task: str = "can") -> Path:
    """What `dpstack eval` leaves in OUT: raw records per sampler and results.json."""
    cfg = EvalConfig(policy_dir=package, out=out, task=task, episodes=len(seeds), samplers=tuple(failed),
                     seed_base=seeds.start)
    summaries = []
    for sampler, fails in failed.items():
        records = _records(seeds, fails)
        write_raw_records(out / RAW_DIR, sampler, 0.0, records)
        summaries.append(summarize(sampler, records, "lockstep", 20.0))
    write_results(out, cfg, summaries, {"per control step (obs -> action)": {}})
    return out


@pytest.fixture
def package(tmp_path: Path) -> Path:
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "manifest.json").write_text('{"format": "test"}')
    return tmp_path / "policy"


def test_the_exact_mcnemar_p_treats_discordant_seeds_as_coin_flips():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(6, 0) == pytest.approx(2 / 2 ** 6)  # six one way: 2 * (1/2)^6
    assert mcnemar_exact_p(0, 6) == mcnemar_exact_p(6, 0)
    assert mcnemar_exact_p(2, 1) == pytest.approx(1.0)
    assert mcnemar_exact_p(9, 1) == pytest.approx(2 * 11 / 2 ** 10)


def test_a_summary_names_its_failing_seeds_and_pairs_samplers_seed_by_seed():
    seeds = range(10000, 10050)
    ddpm = summarize("ddpm", _records(seeds, {10003, 10014, 10018, 10030, 10041, 10047}), "lockstep", 20.0)
    streaming = summarize("streaming", _records(seeds, {10014}), "lockstep", 20.0)
    assert ddpm.failed_seeds == [10003, 10014, 10018, 10030, 10041, 10047] and ddpm.seeds == list(seeds)
    (pair,) = paired_comparisons([ddpm, streaming])
    assert (pair.a, pair.b, pair.seeds, pair.both, pair.only_a, pair.only_b, pair.neither) == \
        ("ddpm", "streaming", 50, 44, 0, 5, 1)
    assert pair.p_value == pytest.approx(2 / 2 ** 5)
    text = seed_sections([ddpm, streaming], "lockstep")
    assert "- ddpm: 10003, 10014, 10018, 10030, 10041, 10047" in text and "- streaming: 10014" in text
    assert "| ddpm | streaming | 50 | 44 | 0 | 5 | 1 | 0.0625 |" in text
    assert "Samplers compared" not in seed_sections([ddpm], "lockstep")  # one sampler: nothing to pair


def test_samplers_at_different_delays_are_not_paired():
    seeds = range(5)
    a0 = summarize("ddim", _records(seeds, {1}), "lockstep", 20.0)
    a200 = summarize("ddim", _records(seeds, {1, 2, 3}, delay=200.0), "lockstep", 20.0)
    b200 = summarize("rti", _records(seeds, set(), delay=200.0), "lockstep", 20.0)
    assert [(p.a, p.b, p.extra_latency_ms) for p in paired_comparisons([a0, a200, b200])] == [("ddim", "rti", 200.0)]


def test_two_seed_ranges_pool_into_one_table_with_paired_comparisons(tmp_path: Path, package: Path):
    first = _evaluation(tmp_path / "e1", range(100, 110), {"ddpm": {103}, "streaming": {101, 103, 107}}, package)
    second = _evaluation(tmp_path / "e2", range(200, 210), {"ddpm": {205}, "streaming": set()}, package)
    pooled = pool_results([first, second])
    assert pooled.seed_ranges == ["100-109", "200-209"] and pooled.task == "can"
    ddpm, streaming = pooled.samplers
    assert (ddpm.runs, ddpm.successes, ddpm.episodes, ddpm.failed_seeds) == ([(9, 10), (9, 10)], 18, 20, [103, 205])
    assert (streaming.successes, streaming.failed_seeds) == (17, [101, 103, 107])
    (pair,) = paired_comparisons(pooled.samplers)
    assert (pair.seeds, pair.both, pair.only_a, pair.only_b, pair.neither) == (20, 16, 2, 1, 1)
    text = pooled_markdown(pooled)
    assert "| ddpm | 9/10 = 0.90 | 9/10 = 0.90 | 18/20 = 0.90 | [0.70, 0.97] |" in text
    assert "| streaming | 7/10 = 0.70 | 10/10 = 1.00 | 17/20 = 0.85 |" in text
    assert "- ddpm: 103, 205" in text
    per_run = (first / "results.md").read_text()  # each evaluation's own report lists its seeds too
    assert "- streaming: 101, 103, 107" in per_run and "| ddpm | streaming | 10 | 7 | 2 | 0 | 1 | 0.5 |" in per_run


def test_samplers_evaluated_in_separate_runs_on_the_same_seeds_are_paired(tmp_path: Path, package: Path):
    ddim = _evaluation(tmp_path / "ddim", range(100, 110), {"ddim-10": {101, 102, 105}}, package)
    streaming = _evaluation(tmp_path / "streaming", range(100, 110), {"streaming-1": {105}}, package)
    pooled = pool_results([ddim, streaming])
    assert [(s.sampler, s.runs) for s in pooled.samplers] == [("ddim-10", [(7, 10), None]), ("streaming-1", [None, (9, 10)])]
    (pair,) = paired_comparisons(pooled.samplers)
    assert (pair.seeds, pair.both, pair.only_a, pair.only_b, pair.neither) == (10, 7, 0, 2, 1)
    assert "| ddim-10 | 7/10 = 0.70 | - | 7/10 = 0.70 |" in pooled_markdown(pooled)


def test_the_pool_command_writes_the_table_and_refuses_what_cannot_pool(tmp_path: Path, package: Path, capsys):
    first = _evaluation(tmp_path / "e1", range(100, 110), {"rti": {104}}, package)
    second = _evaluation(tmp_path / "e2", range(200, 210), {"rti": set()}, package)
    assert main(["pool", str(first), str(second), "--out", str(tmp_path / "pooled.md")]) == 0
    assert "| rti | 9/10 = 0.90 | 10/10 = 1.00 | 19/20 = 0.95 |" in (tmp_path / "pooled.md").read_text()

    overlapping = _evaluation(tmp_path / "e3", range(105, 115), {"rti": set()}, package)
    with pytest.raises(PoolError, match="ran seed 105 again .*disjoint seeds"):
        pool_results([first, overlapping])
    shorter = _evaluation(tmp_path / "e7", range(500, 510), {"rti": set()}, package)
    (shorter / RAW_DIR / "run.json").write_text('{"max_steps": 100}')  # episodes cut at 100 steps
    with pytest.raises(PoolError, match="max_steps 100"):
        pool_results([first, shorter])
    other_task = _evaluation(tmp_path / "e4", range(300, 310), {"rti": set()}, package, task="lift")
    with pytest.raises(PoolError, match="task 'lift'"):
        pool_results([first, other_task])
    (package / "manifest.json").write_text('{"format": "another export"}')
    retrained = _evaluation(tmp_path / "e5", range(400, 410), {"rti": set()}, package)
    with pytest.raises(PoolError, match="another package"):
        pool_results([first, retrained])

    (tmp_path / "e6").mkdir()
    (tmp_path / "e6" / "results.json").write_text('{"results": [{"successes": 3}]}')
    with pytest.raises(PoolError, match="not written by `dpstack eval`"):
        pool_results([first, tmp_path / "e6"])
    assert main(["pool", str(first), str(tmp_path / "nothing_here")]) == 2
    assert "no results.json" in capsys.readouterr().err
    (second / RAW_DIR / "rti.json").write_text("{not json")  # a damaged record file is named, not a traceback
    with pytest.raises(PoolError, match="episode records of rti"):
        pool_results([first, second])
