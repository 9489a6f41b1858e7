"""Closed-loop evaluation results: per-episode records in, per-sampler summary out.

`dpstack sim` writes one `EpisodeRecord` per episode; `dpstack eval` and
`dpstack demo` turn them into one `SamplerSummary` per sampler, a markdown table
and a latency plot. Only plain JSON crosses process boundaries.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from dpstack.core.stats import Summary, format_ms, summarize_ms


@dataclass
class EpisodeRecord:
    """What one simulated-arm episode produced."""

    episode: int
    seed: int
    success: bool
    steps: int
    # Per control step: wall time from having the observation to having the action
    # to execute (ms). ~0 when the current chunk still holds an action.
    step_latency_ms: list[float] = field(default_factory=list)
    # Per inference request: observation sent -> its chunk received (ms).
    chunk_latency_ms: list[float] = field(default_factory=list)
    # The server's own compute time for each of those chunks (ms): the rest is transport and queueing.
    chunk_compute_ms: list[float] = field(default_factory=list)
    # Per control step: wall time of the simulated arm's own step (physics and
    # observation, ms); with step latency it accounts for a realtime overrun.
    physics_ms: list[float] = field(default_factory=list)
    # Wall time spent rendering the policy's cameras over the episode (ms); not in
    # physics_ms, and in realtime a pause of the world, as a real camera captures beside the loop.
    render_ms: float = 0.0
    # realtime, per control step: time the hypervisor stole from the VM (10 ms clock
    # ticks) and time the arm's loop waited for a core, from the tick to the end of its
    # step (ms): a miss with either is the computer's, not the policy's.
    steal_ms: list[float] = field(default_factory=list)
    runqueue_ms: list[float] = field(default_factory=list)
    # The steps that missed: [step, tick start, command time] in CLOCK_MONOTONIC seconds
    # (shared by every process, to check a miss against a jitter witness's stalls).
    misses: list[list[float]] = field(default_factory=list)
    # Steps whose deadline was missed: no valid action for the tick existed at its action
    # deadline (the arm held), or its action went out after that deadline (late).
    deadline_misses: int = 0
    held_steps: int = 0
    late_steps: int = 0
    # realtime: steps whose simulation needed longer than the period (the simulated world
    # stood still for the excess; not a miss).
    overruns: int = 0
    # realtime: steps run from the previous chunk's look-ahead because the chunk asked
    # for at that tick came after its deadline (not misses: the arm kept moving on plan).
    lookahead_steps: int = 0
    # Denoiser evaluations the server reported, summed over the episode.
    evaluations: int = 0
    # realtime: the episode's first chunk (RTI and streaming fully denoise there), waited
    # for with the arm at rest before the clock starts (ms; 0 in lockstep).
    start_latency_ms: float = 0.0
    sampler: str = ""            # as typed for the server (e.g. "rti")
    sampler_resolved: str = ""   # what the server resolved it to (e.g. "rti-renoise-40,15,0")
    mode: str = "lockstep"
    hz: float = 20.0
    # realtime: robot time added between each observation's capture and its answer's arrival (ms)
    extra_latency_ms: float = 0.0
    video: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EpisodeRecord":
        known = {f.name for f in fields(cls)}
        missing = [n for n in ("episode", "seed", "success", "steps") if n not in d]
        if missing:
            raise ValueError(f"episode record is missing {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class SamplerSummary:
    """One line of results.json: how one sampler did over all its episodes."""

    sampler: str
    episodes: int
    successes: int
    success_rate: float
    success_ci95: tuple[float, float]
    mean_episode_steps: float
    # summaries (dpstack.core.stats) pooled over the episodes of the EpisodeRecord lists
    # of the same names; start_latency has one value per episode (all 0 in lockstep)
    step_latency: Summary
    chunk_latency: Summary
    physics: Summary
    start_latency: Summary
    chunks: int
    deadline_misses: int
    evaluations_per_step: float
    mode: str
    hz: float
    # what the server resolved `sampler` (the name as typed) to, e.g. rti -> rti-renoise-40,15,0
    sampler_resolved: str = ""
    # the two kinds of deadline miss: no action to run (held), action out after its deadline (late)
    held_steps: int = 0
    late_steps: int = 0
    # steps whose simulation needed longer than the period (the world paused; not misses)
    overruns: int = 0
    lookahead_steps: int = 0
    # realtime: steps the computer stalled (stolen + run-queue time >= STALL_FRACTION of
    # the period), and the deadline misses on such a step or during a stall the jitter
    # witness saw (dpstack eval --witness)
    stalled_steps: int = 0
    stall_misses: int = 0
    # realtime: the delay added to every answer's arrival (dpstack eval --extra-latency-ms)
    extra_latency_ms: float = 0.0
    # the episodes' seeds, and those that failed: what a trace starts from, and what pairs
    # two samplers' outcomes on the same seeds
    seeds: list[int] = field(default_factory=list)
    failed_seeds: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["success_ci95"] = list(self.success_ci95)
        return d


STALL_FRACTION = 0.1


def stalled(record: EpisodeRecord) -> list[int]:
    """Steps of a realtime episode on which the computer, not the loop, took the time."""
    limit = STALL_FRACTION * 1e3 / record.hz
    return [i for i, (s, w) in enumerate(zip(record.steal_ms, record.runqueue_ms)) if s + w >= limit]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sane at 0 and n successes)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, {n}]")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _pooled(lists: Iterable[Sequence[float]]) -> Summary:
    return summarize_ms(itertools.chain.from_iterable(lists))


def stall_misses(record: EpisodeRecord, witness_stalls: Sequence[tuple[float, float]] = ()) -> int:
    """Misses of `record` on a stalled step or overlapping a witnessed stall (start, ms) of
    at least STALL_FRACTION of the period."""
    from dpstack.runtime.jitter import stalled_during

    limit = STALL_FRACTION * 1e3 / record.hz
    witnessed = [(s, ms) for s, ms in witness_stalls if ms >= limit]
    steps = set(stalled(record))
    return sum(1 for step, t0, t1 in record.misses if int(step) in steps or stalled_during(witnessed, t0, t1))


def summarize(sampler: str, records: Sequence[EpisodeRecord], mode: str, hz: float,
              witness_stalls: Sequence[tuple[float, float]] = ()) -> SamplerSummary:
    if not records:
        raise ValueError(f"sampler {sampler!r}: no episodes to summarise")
    delays = {r.extra_latency_ms for r in records}
    if len(delays) > 1:
        raise ValueError(f"sampler {sampler!r}: episodes at different extra latencies {sorted(delays)} in one summary")
    successes = sum(bool(r.success) for r in records)
    steps = sum(r.steps for r in records)
    return SamplerSummary(
        sampler=sampler, sampler_resolved=", ".join(sorted({r.sampler_resolved for r in records} - {""})),
        episodes=len(records), successes=successes,
        success_rate=successes / len(records), success_ci95=wilson_interval(successes, len(records)),
        mean_episode_steps=steps / len(records),
        step_latency=_pooled(r.step_latency_ms for r in records), chunk_latency=_pooled(r.chunk_latency_ms for r in records),
        physics=_pooled(r.physics_ms for r in records), start_latency=summarize_ms(r.start_latency_ms for r in records),
        chunks=sum(len(r.chunk_latency_ms) for r in records),
        deadline_misses=sum(r.deadline_misses for r in records),
        held_steps=sum(r.held_steps for r in records),
        late_steps=sum(r.late_steps for r in records),
        overruns=sum(r.overruns for r in records),
        lookahead_steps=sum(r.lookahead_steps for r in records),
        stalled_steps=sum(len(stalled(r)) for r in records),
        stall_misses=sum(stall_misses(r, witness_stalls) for r in records),
        evaluations_per_step=(sum(r.evaluations for r in records) / steps) if steps else 0.0,
        mode=mode, hz=hz, extra_latency_ms=delays.pop(),
        seeds=sorted(int(r.seed) for r in records), failed_seeds=sorted(int(r.seed) for r in records if not r.success))


def load_records(paths: Iterable[Path]) -> list[EpisodeRecord]:
    records = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        records.extend(EpisodeRecord.from_dict(d) for d in data["episodes"])
    return records


def markdown_table(summaries: Sequence[SamplerSummary]) -> str:
    """One row per summary; an extra-latency column when any summary has one."""
    delays = any(s.extra_latency_ms for s in summaries)
    lines = ["| sampler | resolved |" + (" extra latency (ms) |" if delays else "") + " success | 95% CI | episodes "
             "| mean steps | step latency p50 / p99 (ms) "
             "| chunk latency p50 / p99 (ms) | evals/step | deadline misses (held / late) | look-ahead steps "
             "| sim overruns | stalled steps (misses there) |",
             "|---|---|" + ("---|" if delays else "") + "---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lo, hi = s.success_ci95
        delay = f" {s.extra_latency_ms:g} |" if delays else ""
        lines.append(f"| {s.sampler} | {s.sampler_resolved} |{delay} {s.success_rate:.2f} | [{lo:.2f}, {hi:.2f}] | {s.episodes} | "
                     f"{s.mean_episode_steps:.1f} | {format_ms(s.step_latency['p50_ms'])} / {format_ms(s.step_latency['p99_ms'])} | "
                     f"{format_ms(s.chunk_latency['p50_ms'])} / {format_ms(s.chunk_latency['p99_ms'])} | "
                     f"{s.evaluations_per_step:.2f} | {s.deadline_misses} ({s.held_steps} / {s.late_steps}) | {s.lookahead_steps} "
                     f"| {s.overruns} | {s.stalled_steps} ({s.stall_misses}) |")
    return "\n".join(lines) + "\n"


class SeedOutcomes(Protocol):
    """What a paired comparison reads: a sampler's seeds and the ones it failed."""

    sampler: str
    extra_latency_ms: float
    seeds: list[int]
    failed_seeds: list[int]


@dataclass
class PairedComparison:
    """Two samplers on the seeds both ran: where their outcomes differ, and whether that
    difference could be chance (exact McNemar test: the discordant seeds as fair coin flips)."""

    a: str
    b: str
    extra_latency_ms: float
    seeds: int
    both: int       # seeds both solved
    only_a: int
    only_b: int
    neither: int
    p_value: float  # two-sided


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under 'no difference' each discordant seed is a fair coin."""
    from scipy.stats import binomtest

    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(min(only_a, only_b), n, 0.5).pvalue)


def paired_comparisons(summaries: Sequence[SeedOutcomes]) -> list[PairedComparison]:
    """Every pair of samplers at the same extra latency, compared seed by seed on the seeds
    both ran (in lockstep the same seed is the same episode up to the policy's choices)."""
    out = []
    for a, b in itertools.combinations(summaries, 2):
        shared = set(a.seeds) & set(b.seeds)
        if a.extra_latency_ms != b.extra_latency_ms or not shared:
            continue
        fail_a, fail_b = set(a.failed_seeds) & shared, set(b.failed_seeds) & shared
        only_a, only_b = len(fail_b - fail_a), len(fail_a - fail_b)
        neither = len(fail_a & fail_b)
        out.append(PairedComparison(a.sampler, b.sampler, a.extra_latency_ms, len(shared),
                                    len(shared) - only_a - only_b - neither, only_a, only_b, neither,
                                    mcnemar_exact_p(only_a, only_b)))
    return out


def paired_table(summaries: Sequence[SeedOutcomes]) -> str:
    """Markdown: one row per pair of samplers on shared seeds, with the exact McNemar p."""
    pairs = paired_comparisons(summaries)
    if not pairs:
        return ""
    delays = any(p.extra_latency_ms for p in pairs)
    lines = ["| A | B |" + (" extra latency (ms) |" if delays else "") + " seeds | both solve | only A | only B "
             "| neither | p (exact McNemar) |",
             "|---|---|" + ("---|" if delays else "") + "---|---|---|---|---|---|"]
    for p in pairs:
        delay = f" {p.extra_latency_ms:g} |" if delays else ""
        lines.append(f"| {p.a} | {p.b} |{delay} {p.seeds} | {p.both} | {p.only_a} | {p.only_b} | {p.neither} | {p.p_value:.3g} |")
    return "\n".join(lines) + "\n"


def seed_sections(summaries: Sequence[SeedOutcomes], mode: str, level: int = 2) -> str:
    """Markdown sections (headings of `level`) of the outcomes seed by seed: each sampler's
    failing seeds (the seeds to trace) and, for two or more samplers, their paired comparison."""
    h = "#" * level
    again = " Each fails again when rerun in lockstep." if mode == "lockstep" else ""
    failed = "".join(f"- {s.sampler}" + (f" +{s.extra_latency_ms:g} ms" if s.extra_latency_ms else "")
                     + f": {', '.join(map(str, s.failed_seeds)) or 'none'}\n" for s in summaries)
    text = f"{h} Failing seeds\n\nThe seeds to trace.{again}\n\n{failed}"
    if pairs := paired_table(summaries):
        text += (f"\n{h} Samplers compared on the same seeds\n\nOnly A: seeds A solved and B failed. "
                 "A small p says the difference is unlikely to be chance on these seeds.\n\n" + pairs)
    return text


def latency_plot(panels: Mapping[str, Mapping[str, Sequence[float]]], path: Path, title: str = "latency") -> Path:
    """One panel per latency kind (e.g. per step, per chunk): a box + strip per sampler, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(panels.values()), {}))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 1.7 * max(1, len(names)) * len(panels), 4.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (label, latencies) in zip(axes[0], panels.items()):
        # log axis: clamp to 1 us so ~0 waits (action already queued) stay visible
        data = [np.maximum(np.asarray(latencies.get(n, ()), dtype=np.float64), 1e-3) for n in names]
        ax.boxplot([d if d.size else np.array([np.nan]) for d in data], showfliers=False)
        for i, d in enumerate(data, start=1):
            if d.size:
                ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d, s=3, alpha=0.25)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(label)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def delay_curves(summaries: Sequence[SamplerSummary]) -> dict[str, list[SamplerSummary]]:
    """Per sampler (in first-seen order), its summaries in order of extra latency."""
    curves: dict[str, list[SamplerSummary]] = {}
    for s in summaries:
        curves.setdefault(s.sampler, []).append(s)
    return {name: sorted(points, key=lambda s: s.extra_latency_ms) for name, points in curves.items()}


def delay_table(summaries: Sequence[SamplerSummary]) -> str:
    """Success rate [95% CI] per sampler (rows) and extra latency (columns), with held steps per episode."""
    delays = sorted({s.extra_latency_ms for s in summaries})
    lines = ["| sampler | " + " | ".join(f"+{d:g} ms" for d in delays) + " |", "|---|" + "---|" * len(delays)]
    for name, points in delay_curves(summaries).items():
        at = {s.extra_latency_ms: s for s in points}
        cells = []
        for d in delays:
            s = at.get(d)
            cells.append("" if s is None else f"{s.success_rate:.2f} [{s.success_ci95[0]:.2f}, {s.success_ci95[1]:.2f}], "
                         f"held {s.held_steps / max(1, s.episodes):.1f}/ep")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def delay_plot(summaries: Sequence[SamplerSummary], path: Path, title: str = "success against extra latency") -> Path:
    """Success rate against extra latency, one line per sampler, 95% Wilson intervals as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves = delay_curves(summaries)
    span = max((s.extra_latency_ms for s in summaries), default=0.0) or 1.0
    for i, (name, points) in enumerate(curves.items()):
        # a small sideways offset per sampler keeps overlapping intervals readable
        x = np.array([s.extra_latency_ms for s in points]) + (i - (len(curves) - 1) / 2) * 0.01 * span
        y = np.array([s.success_rate for s in points])
        err = np.array([[s.success_rate - s.success_ci95[0] for s in points],
                        [s.success_ci95[1] - s.success_rate for s in points]])
        ax.errorbar(x, y, yerr=np.maximum(err, 0.0), marker="o", capsize=3, label=name)
    ax.set_xlabel("extra latency (ms, robot time)")
    ax.set_ylabel("success rate (95% CI)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename so a crash never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    tmp.replace(path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a report figure as PNG (creating its folder) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
