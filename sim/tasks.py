"""Simulated task definitions: the only place robot and controller constants live.

Each task names its robosuite environment, robot, controller, control rate,
episode length, the observation keys it publishes and the scripted expert that
solves it. Everything else in sim/ reads these values from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from dpstack.core.spec import ActionSpec


@dataclass(frozen=True)
class RobotDef:
    """An arm as robosuite builds it, with the action space our policies use."""

    name: str
    controller: str  # robosuite composite controller preset
    action: ActionSpec
    # Names of the robot's per-step state observations (robosuite keys -> per-dim names).
    state_obs: Mapping[str, tuple[str, ...]]


# Panda with robosuite's BASIC preset: OSC_POSE arm taking deltas (+-1 maps to
# +-0.05 m and +-0.5 rad per step) plus a binary gripper (-1 open, +1 close).
PANDA = RobotDef(
    name="Panda",
    controller="BASIC",
    action=ActionSpec(
        key="action", shape=(7,), dtype="float32",
        names=("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"),
        gripper_dims=(6,), low=(-1.0,) * 7, high=(1.0,) * 7,
    ),
    state_obs={
        "robot0_eef_pos": ("x", "y", "z"),
        "robot0_eef_quat": ("qx", "qy", "qz", "qw"),
        "robot0_gripper_qpos": ("finger_left", "finger_right"),
    },
)


@dataclass(frozen=True)
class TaskDef:
    name: str
    env_name: str  # robosuite environment class name
    robot: RobotDef
    expert: str | None  # class name in sim.experts; None: no scripted expert yet
    max_steps: int  # episode length limit at control_hz
    control_hz: float = 20.0
    # Per-step state keys published as observations, robot ones first.
    obs_keys: tuple[str, ...] = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object-state")
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # robosuite draws some model geometry (e.g. Lift's cube size) when it builds the
    # model. Building every env from one fixed seed keeps the scene identical across
    # processes, so an episode seed alone fixes the initial state.
    model_seed: int = 0

    def expert_class(self) -> type:
        if self.expert is None:
            raise ValueError(f"task {self.name!r} has no scripted expert yet; "
                             f"tasks with one: {', '.join(n for n, t in TASKS.items() if t.expert)}")
        # Imported lazily so reading the registry costs nothing.
        from dpstack.sim import experts
        return getattr(experts, self.expert)


TASKS: dict[str, TaskDef] = {
    "lift": TaskDef(name="lift", env_name="Lift", robot=PANDA, expert="LiftExpert", max_steps=200),
    "can": TaskDef(name="can", env_name="PickPlaceCan", robot=PANDA, expert="CanExpert", max_steps=400),
    "stack": TaskDef(name="stack", env_name="Stack", robot=PANDA, expert="StackExpert", max_steps=400),
    "square": TaskDef(name="square", env_name="NutAssemblySquare", robot=PANDA, expert="SquareExpert", max_steps=400),
}

DEFAULT_CAMERAS: tuple[str, ...] = ("agentview", "robot0_eye_in_hand")
DEFAULT_IMAGE_SIZE: int = 84


def get_task(name: str) -> TaskDef:
    """The registered task; ValueError naming the known ones (a user typed the name)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
