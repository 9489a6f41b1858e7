"""The demo's report folder: report.md, the plots and one rollout video, from the
outputs the earlier stages left (nothing is recomputed here)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from dpstack.sim.eval_report import SamplerSummary, markdown_table


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
            continue  # raw/run.json: the run's settings, not a sampler's episodes
        for ep in data["episodes"]:
            if ep.get("video") and Path(ep["video"]).exists():
                candidates.append((not ep["success"], ep["steps"], Path(ep["video"])))
    return min(candidates)[2] if candidates else None


def write_report(demo: Any) -> Path:
    """Write demo.report_dir/{report.md, table.md, loss.png, latency.png, rollout.mp4}."""
    out: Path = demo.report_dir
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((demo.eval_dir / "results.json").read_text())
    summaries = _summaries(results)
    table = markdown_table(summaries)
    (out / "table.md").write_text(table)

    figures = []
    for src, name, caption in ((demo.train_dir / "loss.png", "loss.png", "Training loss"),
                               (demo.eval_dir / "latency.png", "latency.png", "Latency per sampler: per control step and per chunk request")):
        if src.exists():
            shutil.copyfile(src, out / name)
            figures.append(f"![{caption}]({name})\n\n*{caption}.*\n")
    video = pick_video(demo.eval_dir / "raw")
    video_line = "No rollout was recorded."
    if video is not None:
        shutil.copyfile(video, out / "rollout.mp4")
        video_line = f"[rollout.mp4](rollout.mp4): {video.stem}."

    s = demo.s
    lines = [
        f"# dpstack demo: {demo.task}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Closed loop, {results['mode']} mode: every episode ran a "
        "simulated arm (robosuite) as a separate process talking to a `dpstack serve` process over ZeroMQ.",
        "",
        "## Settings",
        "",
        f"- demonstrations: {s.episodes} scripted-expert episodes ({demo.dataset})",
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
        "## Plots",
        "",
        *figures,
        "## Rollout",
        "",
        video_line,
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
