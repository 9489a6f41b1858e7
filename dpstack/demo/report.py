"""The demo's report folder: report.md, the plots and one rollout video, from the
outputs the earlier stages left (nothing is recomputed here)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from dpstack.policy.train_outputs import LOSS_PLOT_FILE
from dpstack.sim.eval_report import SamplerSummary, markdown_table, seed_sections
from dpstack.sim.evaluate import LATENCY_PLOT_FILE, RAW_DIR, RESULTS_FILE

REPORT_FILE = "report.md"
TABLE_FILE = "table.md"
VIDEO_FILE = "rollout.mp4"


def _summaries(results: dict[str, Any]) -> list[SamplerSummary]:
    out = []
    for r in results["results"]:
        r = dict(r)
        r["success_ci95"] = tuple(r["success_ci95"])
        out.append(SamplerSummary(**r))
    return out


def pick_video(raw_dir: Path) -> Path | None:
    """A successful recorded rollout if there is one (best sampler first), else any recorded one."""
    candidates = []
    for f in sorted(raw_dir.glob("*.json")):
        data = json.loads(f.read_text())
        if "sampler" not in data:
            continue  # raw/run.json (evaluate.RUN_KEY_FILE): the run's settings, not a sampler's episodes
        for ep in data["episodes"]:
            if ep.get("video") and Path(ep["video"]).exists():
                candidates.append((not ep["success"], ep["steps"], Path(ep["video"])))
    return min(candidates)[2] if candidates else None


def write_report(demo: Any) -> Path:
    """Write demo.report_dir/{report.md, table.md, loss.png, latency.png, rollout.mp4}."""
    out: Path = demo.report_dir
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((demo.eval_dir / RESULTS_FILE).read_text())
    summaries = _summaries(results)
    table = markdown_table(summaries)
    (out / TABLE_FILE).write_text(table)

    figures = []
    for src, name, caption in ((demo.train_dir / LOSS_PLOT_FILE, LOSS_PLOT_FILE, "Training loss"),
                               (demo.eval_dir / LATENCY_PLOT_FILE, LATENCY_PLOT_FILE,
                                "Latency per sampler: per control step and per chunk request")):
        if src.exists():
            shutil.copyfile(src, out / name)
            figures.append(f"![{caption}]({name})\n\n*{caption}.*\n")
    video = pick_video(demo.eval_dir / RAW_DIR)
    video_line = "No rollout was recorded."
    if video is not None:
        shutil.copyfile(video, out / VIDEO_FILE)
        video_line = f"[{VIDEO_FILE}]({VIDEO_FILE}): {video.stem}."

    s = demo.s
    lines = [
        f"# dpstack demo: {demo.task}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Closed loop, {results['mode']} mode: every episode ran a "
        "simulated arm (robosuite) as a separate process talking to a `dpstack serve` process over ZeroMQ.",
        "",
        "## Settings",
        "",
        f"- demonstrations: {s.episodes} scripted-expert episodes"
        f"{f', {s.recovery:.0%} of them retrying after a missed grasp' if s.recovery else ''} ({demo.dataset})",
        f"- policy: 1-D U-Net, preset `{s.preset}`, {s.train_steps} training steps, batch {s.batch_size}, "
        f"lr {s.lr} ({demo.checkpoint})",
        f"- package: {demo.policy}",
        f"- evaluation: {s.eval_episodes} episodes per sampler, seeds from {results.get('seed_base')} "
        "(never used in training), the same seeds for every sampler",
        "",
        "## Results",
        "",
        "Success with its 95% Wilson interval. Step latency: the arm's wall time per control step from having "
        "its observation to having the action to execute (near zero while a chunk still holds actions). "
        "Chunk latency: observation sent -> action chunk received, transport included. Evals/step: denoiser "
        "evaluations per control step. Timings are from this machine, with every process sharing its cores.",
        "",
        table,
        seed_sections(summaries, results['mode'], level=3),
        "## Plots",
        "",
        *figures,
        "## Rollout",
        "",
        video_line,
        "",
    ]
    (out / REPORT_FILE).write_text("\n".join(lines))
    return out / REPORT_FILE
