"""The end-to-end demo's stages and how each one knows it is done.

Each stage runs the `dpstack` command a user would type (a subprocess, output
shown as it comes) and is checked by looking at its output: a dataset with N
episodes, a checkpoint at the final step, a package whose files verify and
that was exported from that checkpoint, results for every sampler with the
wanted episode count from that package, a report newer than those results.
sim/ reaches the policy only through these commands and the runtime protocol.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from dpstack.core.process import die_with_parent_preexec
from dpstack.demo.report import REPORT_FILE, TABLE_FILE
from dpstack.demo.stages import Stage, run_stages
from dpstack.policy.train_outputs import CHECKPOINT_FILE
from dpstack.runtime.package import MANIFEST, sha256_file
from dpstack.sim.eval_report import SamplerSummary
from dpstack.sim.evaluate import RESULTS_FILE, EvalConfig, dpstack_command, run_eval, unseen_seed_base


class Demo:
    def __init__(self, out: Path, settings: Any, task: str = "lift", mode: str = "lockstep",
                 log: Callable[[str], None] = lambda s: print(s, flush=True)) -> None:
        self.out = Path(out)
        self.s = settings
        self.task = task
        self.mode = mode
        self.log = log
        self.dataset = self.out / "data" / f"{task}.zarr"
        self.train_dir = self.out / "train"
        self.checkpoint = self.train_dir / CHECKPOINT_FILE
        self.policy = self.out / "policy"
        self.eval_dir = self.out / "eval"
        self.report_dir = self.out / "report"

    # ------------------------------------------------------------------ running
    def stages(self) -> list[Stage]:
        s = self.s
        return [
            Stage("collect", f"{s.episodes} scripted-expert {self.task} demonstrations -> {self.dataset}",
                  self.collect_done, self.collect),
            Stage("train", f"{s.train_steps} steps of {s.train_config} ({s.preset} net) -> {self.checkpoint}",
                  self.train_done, self.train),
            Stage("export", f"ONNX policy package -> {self.policy}", self.export_done, self.export),
            Stage("evaluate", f"serve + closed-loop {s.eval_episodes} episodes x {', '.join(s.samplers)} ({self.mode})",
                  self.eval_done, self.evaluate),
            Stage("report", f"table, plots and a rollout video -> {self.report_dir}", self.report_done, self.report),
        ]

    def run(self, force: bool = False) -> list:
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        outcomes = run_stages(self.stages(), self.log, force=force)
        seconds = time.monotonic() - start
        peaks = [o.peak_mb for o in outcomes if o.peak_mb is not None]
        peak = f", peak memory {max(peaks):.0f} MB (largest stage, all its processes)" if peaks else ""
        self.log(f"demo finished in {seconds:.0f} s{peak}; report: {self.report_dir / REPORT_FILE}")
        self.write_run_record(outcomes, seconds)
        table = self.report_dir / TABLE_FILE
        if table.exists():
            self.log("\n" + table.read_text())
        return outcomes

    def write_run_record(self, outcomes: list, seconds: float) -> None:
        """REPORT/run.json: this invocation's wall-clock time and per-stage time and peak memory."""
        if not self.report_dir.exists():
            return
        record = {"seconds": seconds, "stages": [vars(o) for o in outcomes]}
        (self.report_dir / "run.json").write_text(json.dumps(record, indent=2))
        report = self.report_dir / REPORT_FILE
        if report.exists() and any(o.name == "report" and o.status == "ran" for o in outcomes):
            rows = [f"| {o.name} | {o.status} | {o.seconds:.0f} | "
                    f"{'' if o.peak_mb is None else f'{o.peak_mb:.0f}'} |" for o in outcomes]
            report.write_text(report.read_text() + "\n".join([
                "## This run", "", f"Wall clock {seconds:.0f} s. Peak memory: resident memory of the stage's "
                "processes summed (servers and arms run at once).", "",
                "| stage | status | seconds | peak memory (MB) |", "|---|---|---|---|", *rows, ""]))

    def _call(self, *args: str) -> None:
        env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONUNBUFFERED": "1"}
        cmd = dpstack_command(*args)
        self.log("  $ dpstack " + " ".join(args))
        subprocess.run(cmd, check=True, env=env, preexec_fn=die_with_parent_preexec())

    # ------------------------------------------------------------------ 1. collect
    def collect_done(self) -> bool:
        if not self.dataset.exists():
            return False
        from dpstack.data.replay_buffer import ReplayBuffer
        try:
            return ReplayBuffer.open(self.dataset, mode="r").n_episodes >= self.s.episodes
        except Exception:
            return False  # unreadable: let collect resume or fail with its own message

    def collect(self) -> None:
        cameras = ("--cameras", ",".join(self.s.cameras)) if self.s.cameras else ()
        self._call("collect", "--task", self.task, "--episodes", str(self.s.episodes), "--out", str(self.dataset),
                   "--workers", str(self.s.workers), "--recovery", str(self.s.recovery), *cameras)

    # ------------------------------------------------------------------ 2. train
    def checkpoint_step(self) -> int:
        if not self.checkpoint.exists():
            return -1
        from dpstack.policy.checkpoint import read_checkpoint  # orchestration reads the step; no inference here
        try:
            return int(read_checkpoint(self.checkpoint)["step"])
        except Exception:
            return -1

    def train_done(self) -> bool:
        return self.checkpoint_step() >= self.s.train_steps

    def train(self) -> None:
        # The task's shipped config (plain DP + streaming-ladder regimes, so one checkpoint
        # serves every sampler), sized by the demo settings.
        overrides = [f"policy.preset={self.s.preset}", f"train.steps={self.s.train_steps}",
                     f"train.batch_size={self.s.batch_size}", f"train.lr={self.s.lr}",
                     f"train.warmup_steps={min(200, max(1, self.s.train_steps // 10))}",
                     f"train.ckpt_every={max(1, min(500, self.s.train_steps))}",
                     f"train.log_every={max(1, min(25, self.s.train_steps // 10))}",
                     f"train.eval_every={self.s.train_eval_every}", "train.device=cpu"]
        if 0 <= self.checkpoint_step() < self.s.train_steps:
            # An interrupted run continues from its last checkpoint.
            self._call("train", "--dataset", str(self.dataset), "--out", str(self.train_dir), "--resume",
                       "--set", *overrides[1:])
        else:
            self._call("train", "--config", self.s.train_config, "--dataset", str(self.dataset),
                       "--out", str(self.train_dir), "--set", *overrides)

    # ------------------------------------------------------------------ 3. export
    def export_done(self) -> bool:
        manifest = self.policy / MANIFEST
        if not manifest.exists() or not self.checkpoint.exists():
            return False
        from dpstack.runtime.package import PackageError, read_manifest, verify_files
        try:
            m = read_manifest(self.policy)
            verify_files(self.policy, m)
        except (PackageError, ValueError, OSError):
            return False
        # Exported from THIS checkpoint (a retrained one needs a new package), with this row's RTI list.
        return ((m.get("checkpoint") or {}).get("sha256") == sha256_file(self.checkpoint)
                and (m.get("sampler_defaults") or {}).get("rti") == self.s.rti_default)

    def export(self) -> None:
        self._call("export", str(self.checkpoint), "--out", str(self.policy), "--force", "--rti-default", self.s.rti_default)

    # ------------------------------------------------------------------ 4. serve + evaluate
    def package_id(self) -> str:
        return sha256_file(self.policy / MANIFEST)

    def eval_done(self) -> bool:
        path = self.eval_dir / RESULTS_FILE
        if not path.exists() or not (self.policy / MANIFEST).exists():
            return False
        try:
            results = json.loads(path.read_text())
        except ValueError:
            return False
        # a summary with other fields (an older dpstack's) is summarised again from the kept episodes
        names = {f.name for f in fields(SamplerSummary)}
        got = {r["sampler"]: r["episodes"] for r in results.get("results", []) if set(r) == names}
        return (results.get("package_sha256") == self.package_id() and results.get("mode") == self.mode
                and all(got.get(s) == self.s.eval_episodes for s in self.s.samplers))

    def evaluate(self) -> None:
        cfg = EvalConfig(policy_dir=self.policy, out=self.eval_dir, task=self.task, episodes=self.s.eval_episodes,
                         samplers=tuple(self.s.samplers), mode=self.mode, workers=self.s.workers, video=self.s.video,
                         seed_base=unseen_seed_base(self.dataset, self.s.seed_base), max_steps=self.s.max_steps)
        run_eval(cfg, log=self.log)

    # ------------------------------------------------------------------ 5. report
    def report_done(self) -> bool:
        report, results = self.report_dir / REPORT_FILE, self.eval_dir / RESULTS_FILE
        return report.exists() and results.exists() and report.stat().st_mtime >= results.stat().st_mtime

    def report(self) -> None:
        from dpstack.demo.report import write_report
        write_report(self)
