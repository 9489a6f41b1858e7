"""Resumable pipelines: a list of stages, each knowing how to tell it is already done.

`dpstack demo` is such a pipeline. A stage is skipped when its `done()` check
says its output is there and complete (dataset with N episodes, checkpoint at
the final step, a package that verifies, ...), so an interrupted run resumes
where it stopped. Checks look at outputs, never at a separate "done" marker,
so a half-written output is redone rather than trusted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from dpstack.demo.peak_memory import PeakMemory


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    done: Callable[[], bool]
    run: Callable[[], None]


@dataclass
class StageOutcome:
    name: str
    status: str  # "skipped" (already done) or "ran"
    seconds: float
    peak_mb: float | None = None  # resident memory of this process and its children, summed (Linux)


class StageFailed(RuntimeError):
    """A stage ran but its output check still fails afterwards."""


def run_stages(stages: list[Stage], log: Callable[[str], None] = print, force: bool = False) -> list[StageOutcome]:
    """Run the stages in order, skipping the ones whose output is already there."""
    outcomes: list[StageOutcome] = []
    for i, stage in enumerate(stages, start=1):
        head = f"[{i}/{len(stages)}] {stage.name}"
        if not force and stage.done():
            log(f"{head}: already done, skipping ({stage.description})")
            outcomes.append(StageOutcome(stage.name, "skipped", 0.0))
            continue
        log(f"{head}: {stage.description}")
        start = time.monotonic()
        with PeakMemory() as memory:
            stage.run()
        seconds = time.monotonic() - start
        if not stage.done():
            raise StageFailed(f"stage {stage.name!r} finished but its output is not complete")
        peak = f", peak memory {memory.peak_mb:.0f} MB" if memory.peak_mb is not None else ""
        log(f"{head}: done in {seconds:.1f} s{peak}")
        outcomes.append(StageOutcome(stage.name, "ran", seconds, memory.peak_mb))
    return outcomes
