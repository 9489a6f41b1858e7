"""What one episode did, step by step: the record to read when a seed fails.

A trace holds, per control step, the gripper's position and finger opening, every
object observation robosuite has (privileged: positions, and offsets from the
gripper, even for a camera policy), the action executed, and whether the arm asked
for a new chunk or held. Its summary gives each object's closest approach to the
gripper, how high it was lifted, and the steps at which the gripper was told to close;
its plot shows the approach, the heights and the gripper over time.

    dpstack eval policy --task can --samplers ddim-10 --seed 10014 --episodes 1 --trace --out trace_10014
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpstack.core.files import safe_filename

EEF_POS, GRIPPER_QPOS = "robot0_eef_pos", "robot0_gripper_qpos"


@dataclass
class EpisodeTrace:
    task: str
    sampler: str
    seed: int
    gripper_dims: tuple[int, ...]
    extra_latency_ms: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    success: bool = False

    def add(self, eef_pos: np.ndarray, gripper_qpos: np.ndarray, objects: dict[str, np.ndarray], action: np.ndarray,
            asked: bool, held: bool) -> None:
        """The state the action was chosen in, and what the arm did with it."""
        self.steps.append({"eef_pos": _floats(eef_pos), "gripper_qpos": _floats(gripper_qpos),
                           "objects": {k: _floats(v) for k, v in objects.items()}, "action": _floats(action),
                           "asked": bool(asked), "held": bool(held)})

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": len(self.steps), "success": self.success,
                               "chunks_asked": sum(s["asked"] for s in self.steps),
                               "held_steps": sum(s["held"] for s in self.steps)}
        for name, d in distances(self).items():
            i = int(np.argmin(d))
            out.setdefault("closest_cm", {})[name] = {"cm": round(float(d[i]) * 100, 2), "step": i}
        for name, pos in object_positions(self).items():
            out.setdefault("lifted_cm", {})[name] = round(float(pos[:, 2].max() - pos[0, 2]) * 100, 2)
        grip = gripper_command(self)
        out["gripper_closes_at"] = [i for i in range(len(grip)) if grip[i] > 0 and (i == 0 or grip[i - 1] <= 0)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "sampler": self.sampler, "seed": self.seed, "gripper_dims": list(self.gripper_dims),
                "extra_latency_ms": self.extra_latency_ms, "summary": self.summary(), "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpisodeTrace":
        t = cls(d["task"], d["sampler"], int(d["seed"]), tuple(d["gripper_dims"]), float(d.get("extra_latency_ms", 0.0)),
                list(d["steps"]))
        t.success = bool(d["summary"]["success"])
        return t

    def write(self, directory: Path) -> Path:
        """DIR/<sampler>[_delay<D>ms]_seed<seed>.json and .png; returns the JSON's path."""
        from dpstack.sim.eval_report import write_json_atomic

        delay = f"_delay{self.extra_latency_ms:g}ms" if self.extra_latency_ms else ""
        stem = f"{safe_filename(self.sampler or 'policy')}{delay}_seed{self.seed}"
        path = Path(directory) / f"{stem}.json"
        write_json_atomic(path, self.to_dict())
        trace_plot(self, path.with_suffix(".png"))
        return path


def _floats(x: np.ndarray) -> list[float]:
    return [round(float(v), 5) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def object_positions(trace: EpisodeTrace) -> dict[str, np.ndarray]:
    """Each object's world position at each step, (steps, 3) in m: robosuite's `<object>_pos`
    observations (Can_pos, cube_pos, cubeA_pos, SquareNut_pos), not its offsets between bodies."""
    if not trace.steps:
        return {}
    names = [k for k, v in trace.steps[0]["objects"].items() if k.endswith("_pos") and "_to_" not in k and len(v) == 3]
    return {k[: -len("_pos")]: np.array([s["objects"][k] for s in trace.steps]) for k in names}


def distances(trace: EpisodeTrace) -> dict[str, np.ndarray]:
    """Each object's distance from the gripper at each step (m)."""
    eef = np.array([s["eef_pos"] for s in trace.steps])
    return {name: np.linalg.norm(pos - eef, axis=1) for name, pos in object_positions(trace).items()}


def heights(trace: EpisodeTrace) -> dict[str, np.ndarray]:
    """The gripper's and each object's height at each step (m)."""
    if not trace.steps:
        return {}
    return {"gripper": np.array([s["eef_pos"][2] for s in trace.steps]),
            **{name: pos[:, 2] for name, pos in object_positions(trace).items()}}


def gripper_command(trace: EpisodeTrace) -> np.ndarray:
    """The executed gripper command (the first gripper dimension; > 0 closes)."""
    if not trace.steps or not trace.gripper_dims:
        return np.zeros(0)
    return np.array([s["action"][trace.gripper_dims[0]] for s in trace.steps])


def trace_plot(trace: EpisodeTrace, path: Path) -> Path:
    """Three panels over the episode: distance from the gripper to each object, heights,
    gripper command and finger opening; chunk requests as ticks, held steps in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpstack.sim.eval_report import save_figure

    t = np.arange(len(trace.steps))
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 7.0), sharex=True)
    for name, d in distances(trace).items():
        axes[0].plot(t, d * 100, label=name)
    axes[0].set_ylabel("gripper to object (cm)")
    for name, h in heights(trace).items():
        axes[1].plot(t, h * 100, label=name)
    axes[1].set_ylabel("height (cm)")
    grip = gripper_command(trace)
    if grip.size:
        axes[2].step(t, grip, where="post", label="gripper command (> 0 closes)")
    if trace.steps and len(trace.steps[0]["gripper_qpos"]) == 2:
        opening = np.array([s["gripper_qpos"][0] - s["gripper_qpos"][1] for s in trace.steps])
        axes[2].plot(t, opening / max(1e-9, float(np.abs(opening).max())), label="finger opening (scaled)")
    axes[2].set_ylabel("gripper")
    axes[2].set_xlabel("control step")
    asked = [i for i, s in enumerate(trace.steps) if s["asked"]]
    held = [i for i, s in enumerate(trace.steps) if s["held"]]
    for ax in axes:
        for i in asked:
            ax.axvline(i, color="0.85", lw=0.6, zorder=0)
        for i in held:
            ax.axvline(i, color="tab:red", lw=0.8, alpha=0.5, zorder=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    delay = f" +{trace.extra_latency_ms:g} ms" if trace.extra_latency_ms else ""
    fig.suptitle(f"{trace.task}, {trace.sampler}{delay}, seed {trace.seed}: {'success' if trace.success else 'failure'} "
                 f"in {len(trace.steps)} steps (grey: chunk asked, red: held)")
    return save_figure(fig, path)


def read_trace(path: Path) -> EpisodeTrace:
    return EpisodeTrace.from_dict(json.loads(Path(path).read_text()))
