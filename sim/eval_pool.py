"""Pool evaluations of one package into one table.

One 50-seed range can be lucky; results on two disjoint ranges cannot both be. This reads
the `dpstack eval` folders of such runs (their raw per-episode records, so runs of any age
pool): a sampler's runs on disjoint seeds add up to one row, and samplers evaluated in
separate runs on the same seeds are compared seed by seed. It refuses runs of different
packages, tasks, modes, rates or episode limits, and a sampler run twice on a seed. Per
sampler (and extra latency): each run's success, the pooled success with its 95% Wilson
interval, the pooled failing seeds, and the samplers' paired comparison on shared seeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dpstack.sim.eval_report import load_records, seed_sections, wilson_interval
from dpstack.sim.evaluate import RAW_DIR, RESULTS_FILE, RUN_KEY_FILE, raw_records_path


class PoolError(ValueError):
    """Evaluations that cannot be pooled, with the reason."""


@dataclass
class PooledSampler:
    sampler: str
    extra_latency_ms: float
    runs: list[tuple[int, int] | None]  # (successes, episodes) per pooled folder; None: not run there
    seeds: list[int] = field(default_factory=list)
    failed_seeds: list[int] = field(default_factory=list)

    @property
    def episodes(self) -> int:
        return len(self.seeds)

    @property
    def successes(self) -> int:
        return len(self.seeds) - len(self.failed_seeds)

    @property
    def success_ci95(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)


@dataclass
class PooledEval:
    dirs: list[Path]
    task: str
    mode: str
    package_sha256: str | None
    seed_ranges: list[str]  # per folder, "first-last"
    samplers: list[PooledSampler]


def _read(d: Path) -> dict:
    """results.json, with the episode limit from raw/run.json (the settings the records belong to)."""
    try:
        data = json.loads((Path(d) / RESULTS_FILE).read_text())
    except FileNotFoundError:
        raise PoolError(f"{d}: no {RESULTS_FILE}; point at the --out folder of a finished `dpstack eval`") from None
    except ValueError as e:
        raise PoolError(f"{d}/{RESULTS_FILE} is not valid JSON ({e})") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "sampler" in r for r in rows):
        raise PoolError(f"{d}/{RESULTS_FILE} has no list of sampler results: not written by `dpstack eval`")
    try:
        data["max_steps"] = json.loads((Path(d) / RAW_DIR / RUN_KEY_FILE).read_text()).get("max_steps")
    except (OSError, ValueError, AttributeError):
        data["max_steps"] = None
    return data


def pool_results(dirs: Sequence[Path]) -> PooledEval:
    if len(dirs) < 1:
        raise PoolError("nothing to pool: give one or more `dpstack eval` folders")
    results = [_read(d) for d in dirs]
    first = results[0]
    for d, r in zip(dirs[1:], results[1:]):
        if r.get("package_sha256") != first.get("package_sha256"):
            raise PoolError(f"{d} evaluated another package than {dirs[0]} (manifest sha256 "
                            f"{str(r.get('package_sha256'))[:12]} against {str(first.get('package_sha256'))[:12]}): "
                            "only evaluations of one package pool")
        for key in ("task", "mode", "hz", "max_steps"):
            if r.get(key) != first.get(key):
                raise PoolError(f"{d} has {key} {r.get(key)!r} but {dirs[0]} has {first.get(key)!r}: "
                                "only evaluations of one task, mode, rate and episode limit pool")
    pooled: dict[tuple[str, float], PooledSampler] = {}
    ranges = []
    for i, (d, r) in enumerate(zip(dirs, results)):
        run_seeds: set[int] = set()
        for row in r["results"]:
            key = (row["sampler"], float(row.get("extra_latency_ms", 0.0)))
            path = raw_records_path(Path(d) / RAW_DIR, *key)
            try:
                records = load_records([path])
            except (OSError, ValueError, KeyError) as e:
                raise PoolError(f"{d}: the episode records of {key[0]} are missing or unreadable ({path}: {e})") from None
            if not records:
                raise PoolError(f"{d}: {path} holds no episodes")
            p = pooled.setdefault(key, PooledSampler(key[0], key[1], [None] * len(dirs)))
            seeds = [int(x.seed) for x in records]
            again = sorted(set(seeds) & set(p.seeds))
            if again:
                raise PoolError(f"{d}: {key[0]} ran seed {again[0]} again ({len(again)} seeds in all); "
                                "pooled evaluations must use disjoint seeds (dpstack eval --seed)")
            failed = [int(x.seed) for x in records if not x.success]
            p.runs[i] = (len(seeds) - len(failed), len(seeds))
            p.seeds = sorted(p.seeds + seeds)
            p.failed_seeds = sorted(p.failed_seeds + failed)
            run_seeds.update(seeds)
        ranges.append(f"{min(run_seeds)}-{max(run_seeds)}" if run_seeds else "none")
    return PooledEval(list(map(Path, dirs)), first["task"], first["mode"], first.get("package_sha256"), ranges,
                      list(pooled.values()))


def pooled_table(p: PooledEval) -> str:
    delays = any(s.extra_latency_ms for s in p.samplers)
    lines = ["| sampler |" + (" extra latency (ms) |" if delays else "")
             + "".join(f" {d.name} (seeds {r}) |" for d, r in zip(p.dirs, p.seed_ranges)) + " pooled | 95% CI |",
             "|---|" + ("---|" if delays else "") + "---|" * len(p.seed_ranges) + "---|---|"]
    for s in p.samplers:
        runs = "".join(f" {run[0]}/{run[1]} = {run[0] / run[1]:.2f} |" if run else " - |" for run in s.runs)
        lo, hi = s.success_ci95
        delay = f" {s.extra_latency_ms:g} |" if delays else ""
        lines.append(f"| {s.sampler} |{delay}{runs} {s.successes}/{s.episodes} = {s.successes / s.episodes:.2f} "
                     f"| [{lo:.2f}, {hi:.2f}] |")
    return "\n".join(lines) + "\n"


def pooled_markdown(p: PooledEval) -> str:
    sha = (p.package_sha256 or "unknown")[:12]
    head = (f"# Pooled closed-loop evaluation: {p.task}, {p.mode}\n\nPackage manifest sha256 {sha}; "
            f"{len(p.dirs)} evaluations: {', '.join(map(str, p.dirs))}.\n\n")
    return head + pooled_table(p) + "\n" + seed_sections(p.samplers, p.mode)
