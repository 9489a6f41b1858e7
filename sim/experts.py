"""Scripted experts that solve the sim tasks from privileged state (object poses
read from the simulator), producing varied demonstrations.

An expert is a sequence of phases (approach above, descend, grasp, lift, move,
lower, release, retreat). Each phase steers the end effector to a target with a
saturated proportional law in action units. Per episode the expert draws its
own speed, heights, grasp offsets, hold times and action noise from its seed, so
two seeds give different, still successful, demonstrations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dpstack.sim.env import SimEnv

OPEN, CLOSE = -1.0, 1.0
# The gripper pointing straight down (tool z along world -z): a 180 degree turn about x.
_DOWN = np.diag([1.0, -1.0, -1.0])


# ---- small rotation helpers (numpy only) -----------------------------------
def quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_vector(r: np.ndarray) -> np.ndarray:
    """Axis * angle of a rotation matrix."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if np.pi - angle < 1e-3:  # near 180 degrees the antisymmetric part vanishes
        axis = np.sqrt(np.clip((np.diag(r) + 1.0) / 2.0, 0.0, None))
        axis *= np.where(r[np.argmax(axis)] >= 0, 1.0, -1.0)  # signs relative to the largest component
    return axis / np.linalg.norm(axis) * angle


def body_yaw(env: SimEnv, body_id: int) -> float:
    w, x, y, z = env.raw.sim.data.body_xquat[body_id]  # MuJoCo stores w first
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def tool_yaw(rot: np.ndarray) -> float:
    """Yaw of a downward-pointing gripper: the angle `rot_z(angle) @ _DOWN` would have."""
    return float(np.arctan2(rot[1, 0], rot[0, 0]))


def wrap_to(angle: float, period: float) -> float:
    """Equivalent angle within (-period/2, period/2] for a shape symmetric every `period`."""
    return float((angle + period / 2) % period - period / 2)


# NutAssembly geometry (robosuite's pegs_arena.xml and square-nut.xml).
_PEG_HALF_HEIGHT = 0.1
_NUT_HALF_THICKNESS = 0.01
# Gripper yaws (rad) the Panda's wrist reaches pointing down; joint 7 stops near -2.0 and +3.8.
_WRIST_YAW = (-1.7, 3.2)


# ---- phases ----------------------------------------------------------------
@dataclass
class Phase:
    name: str
    target: Callable[[], np.ndarray]  # end-effector position to reach (re-read every step)
    gripper: float
    tol: float = 0.01  # advance once within this distance (m) ...
    min_steps: int = 0  # ... and after at least this many steps
    max_steps: int = 60  # give up waiting and move on
    fast: bool = False  # a transit through free space: allow the higher speed
    yaw: Callable[[], float] | None = None  # gripper yaw to hold; None: the expert's `yaw`
    turn_tol: float = np.inf  # ... and once the gripper's orientation is within this (rad) of its goal
    record: bool = True  # False: steps taken in this phase are not part of the demonstration


class WaypointExpert:
    """Base class: subclasses provide `plan()` and the yaw to hold."""

    def __init__(self, env: SimEnv, seed: int, recovery: float = 0.0) -> None:
        if not 0.0 <= recovery <= 1.0:
            raise ValueError(f"recovery must be a fraction in [0, 1], got {recovery}")
        self.env = env
        self.rng = np.random.default_rng(seed)
        # Its own stream, so that adding recoveries leaves every other episode as it was.
        self.recovery_rng = np.random.default_rng([seed, 1])
        self.recovery_rate = recovery
        self.recovers = False
        self.recording = True
        self.phases: list[Phase] = []
        self.index = 0
        self.in_phase = 0

    # Per-episode style, drawn once so an episode is consistent but episodes differ.
    def _draw_style(self) -> None:
        r = self.rng
        self.gain = r.uniform(10.0, 15.0)  # action units per metre of error
        self.vmax = r.uniform(0.45, 0.75)  # near objects
        self.vmax_fast = r.uniform(0.8, 1.0)  # transits through free space
        self.noise = r.uniform(0.02, 0.08)  # std of translation noise, action units
        self.rot_gain = 2.0
        self.approach_height = r.uniform(0.06, 0.12)
        self.grasp_steps = int(r.integers(6, 11))
        self.release_steps = int(r.integers(4, 8))
        self.linger = int(r.integers(5, 16))  # steps recorded after success: show the settled outcome

    def reset(self) -> None:
        self._draw_style()
        self.recovers = bool(self.recovery_rng.random() < self.recovery_rate)
        self.yaw = 0.0
        self.phases = self.plan()
        self.index = 0
        self.in_phase = 0

    def plan(self) -> list[Phase]:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return self.index >= len(self.phases)

    @property
    def phase_name(self) -> str:
        return "done" if self.done else self.phases[self.index].name

    def _eef(self) -> tuple[np.ndarray, np.ndarray]:
        pos = self.env.raw_observation("robot0_eef_pos").astype(np.float64)
        rot = quat_xyzw_to_mat(self.env.raw_observation("robot0_eef_quat"))
        return pos, rot

    def act(self) -> np.ndarray:
        pos, rot = self._eef()
        # Advance through phases whose goal is met (at most one per step).
        if not self.done:
            phase = self.phases[self.index]
            reached = (np.linalg.norm(phase.target() - pos) < phase.tol and self.in_phase >= phase.min_steps
                       and np.linalg.norm(self._turn(phase, rot)) < phase.turn_tol)
            if reached or self.in_phase >= phase.max_steps:
                self.index += 1
                self.in_phase = 0
        if self.done:
            phase = self.phases[-1]
        else:
            phase = self.phases[self.index]
        self.in_phase += 1
        self.recording = phase.record

        action = np.zeros(7)
        vmax = self.vmax_fast if phase.fast else self.vmax
        move = np.clip(self.gain * (phase.target() - pos), -vmax, vmax)
        action[:3] = move + self.rng.normal(0.0, self.noise, 3)
        action[3:6] = np.clip(self.rot_gain * self._turn(phase, rot), -1.0, 1.0)
        action[6] = phase.gripper
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def _turn(self, phase: Phase, rot: np.ndarray) -> np.ndarray:
        """The rotation (axis * angle) from the gripper's orientation to the phase's goal."""
        goal = rot_z(phase.yaw() if phase.yaw else self.yaw) @ _DOWN
        return rotation_vector(goal @ rot.T)

    # Shared building block: go above, descend, close, lift.
    def pick(self, grasp_point: Callable[[], np.ndarray], lift_to: float, descend_tol: float = 0.01,
             approach_turn_tol: float = np.inf) -> list[Phase]:
        above = lambda: grasp_point() + np.array([0.0, 0.0, self.approach_height])
        hold: dict[str, np.ndarray] = {}

        def grasp_target() -> np.ndarray:
            hold.setdefault("p", grasp_point())  # freeze where we grasp, the object will move
            return hold["p"]

        retry = self._missed_grasp(grasp_point, approach_turn_tol) if self.recovers else []
        return retry + [
            Phase("approach", above, OPEN, tol=0.02, max_steps=80, fast=True, turn_tol=approach_turn_tol),
            Phase("descend", grasp_point, OPEN, tol=descend_tol, max_steps=40),
            Phase("grasp", grasp_target, CLOSE, tol=1.0, min_steps=self.grasp_steps),
            Phase("lift", lambda: hold["p"] * np.array([1, 1, 0]) + np.array([0, 0, lift_to]), CLOSE, tol=0.02, max_steps=60, fast=True),
        ]

    def _missed_grasp(self, grasp_point: Callable[[], np.ndarray], approach_turn_tol: float) -> list[Phase]:
        """A recovery episode's start: come down 2.5-5 cm off the grasp point and,
        half the time, close on nothing, unrecorded; then, recorded, open, rise
        straight up and go on with the normal pick. Policies fail by landing that far off
        and never retrying; demonstrations of the retry teach them to."""
        r = self.recovery_rng
        angle, dist = r.uniform(0.0, 2 * np.pi), r.uniform(0.025, 0.05)
        off = np.array([dist * np.cos(angle), dist * np.sin(angle), 0.0])
        miss: dict[str, np.ndarray] = {}

        def miss_point() -> np.ndarray:
            miss.setdefault("p", grasp_point() + off)
            return miss["p"]

        def straight_up() -> np.ndarray:
            miss.setdefault("up", self._eef()[0])
            return np.array([miss["up"][0], miss["up"][1], grasp_point()[2] + self.approach_height])

        close = [Phase("miss_close", miss_point, CLOSE, tol=1.0, min_steps=self.grasp_steps, record=False)]
        return [
            Phase("miss_approach", lambda: miss_point() + np.array([0.0, 0.0, self.approach_height]), OPEN,
                  tol=0.02, max_steps=80, fast=True, turn_tol=approach_turn_tol, record=False),
            Phase("miss_descend", miss_point, OPEN, tol=0.01, max_steps=30, record=False),
            *(close if r.random() < 0.5 else []),  # half the time the fingers stay open
            Phase("retry_rise", straight_up, OPEN, tol=0.02, min_steps=self.release_steps, max_steps=40),
        ]

    def place(self, goal_point: Callable[[], np.ndarray], over: float, retreat: float) -> list[Phase]:
        above = lambda: goal_point() + np.array([0.0, 0.0, over])
        return [
            Phase("move", above, CLOSE, tol=0.03, max_steps=100, fast=True),
            Phase("lower", goal_point, CLOSE, tol=0.01, max_steps=30),
            Phase("release", goal_point, OPEN, tol=1.0, min_steps=self.release_steps),
            Phase("retreat", lambda: goal_point() + np.array([0.0, 0.0, retreat]), OPEN, tol=0.02, max_steps=40),
        ]


class LiftExpert(WaypointExpert):
    def plan(self) -> list[Phase]:
        env = self.env.raw
        cube = env.cube_body_id
        self.yaw = wrap_to(body_yaw(self.env, cube), np.pi / 2)
        offset = np.array([*self.rng.uniform(-0.006, 0.006, 2), self.rng.uniform(-0.008, 0.0)])
        grasp = lambda: env.sim.data.body_xpos[cube] + offset
        lift_to = env.table_offset[2] + self.rng.uniform(0.12, 0.2)
        return self.pick(grasp, lift_to)


class CanExpert(WaypointExpert):
    def plan(self) -> list[Phase]:
        env = self.env.raw
        can = env.obj_body_id["Can"]
        self.yaw = self.rng.uniform(-0.3, 0.3)  # a cylinder: any yaw grasps
        offset = np.array([*self.rng.uniform(-0.005, 0.005, 2), self.rng.uniform(-0.01, 0.005)])
        grasp = lambda: env.sim.data.body_xpos[can] + offset
        # Success needs the can inside the target bin's quarter of the bin box. Aim
        # at the part of that quarter nearest the robot: its far corner is out of reach.
        target = env.object_to_id["can"]
        lo = np.array([env.bin2_pos[0] - (env.bin_size[0] / 2 if target in (0, 2) else 0.0),
                       env.bin2_pos[1] - (env.bin_size[1] / 2 if target < 2 else 0.0)])
        goal_xy = lo + self.rng.uniform([0.04, 0.04], [0.08, 0.08])
        lift_to = env.bin2_pos[2] + self.rng.uniform(0.2, 0.24)
        release_z = env.bin2_pos[2] + self.rng.uniform(0.1, 0.13)
        goal = lambda: np.array([goal_xy[0], goal_xy[1], release_z])
        return self.pick(grasp, lift_to) + self.place(goal, over=lift_to - release_z, retreat=0.1)


class StackExpert(WaypointExpert):
    def plan(self) -> list[Phase]:
        env = self.env.raw
        a, b = env.cubeA_body_id, env.cubeB_body_id
        self.yaw = wrap_to(body_yaw(self.env, a), np.pi / 2)
        offset = np.array([*self.rng.uniform(-0.004, 0.004, 2), self.rng.uniform(-0.006, 0.0)])
        grasp = lambda: env.sim.data.body_xpos[a] + offset
        lift_to = env.table_offset[2] + self.rng.uniform(0.12, 0.16)
        # cubeA (half size 0.02) lands on cubeB (half size 0.025): centre 0.045 above B's.
        drop = self.rng.uniform(0.05, 0.06)
        goal = lambda: env.sim.data.body_xpos[b] + np.array([0.0, 0.0, drop])
        return self.pick(grasp, lift_to) + self.place(goal, over=0.05, retreat=0.08)


def square_nut_carry_yaw(nut_yaw: float, gripper_yaw: float) -> float:
    """The gripper yaw that turns a held square nut (world yaw `nut_yaw`, in a gripper
    at `gripper_yaw`) square to the peg's faces with the least turn, among the yaws
    that keep the handle off the peg's far side (out of the arm's reach there) and the
    wrist inside its joint range."""
    squared = gripper_yaw + wrap_to(-nut_yaw, np.pi / 2)
    turns = [squared + k * np.pi / 2 - gripper_yaw for k in range(-4, 5)]
    ok = [t for t in turns if np.cos(nut_yaw + t) < 0.5 and _WRIST_YAW[0] <= gripper_yaw + t <= _WRIST_YAW[1]]
    return gripper_yaw + min(ok, key=abs)


class SquareExpert(WaypointExpert):
    """Nut on peg: grasp the nut by its handle, carry it with its square hole
    turned to the peg's faces, hold it over the peg, lower it onto the peg and
    let go. From the grasp on, the targets steer the nut's centre (read every
    step), not the gripper, so the nut's offset in the hand does not matter."""

    def plan(self) -> list[Phase]:
        env = self.env.raw
        nut = env.obj_body_id["SquareNut"]
        handle = env.object_site_ids[env.nut_to_id["square"]]
        peg = env.sim.data.body_xpos[env.peg1_body_id].copy()
        peg_top = peg[2] + _PEG_HALF_HEIGHT
        # The fingers close across the handle: gripper yaw = nut yaw (either way round).
        self.yaw = wrap_to(body_yaw(self.env, nut), np.pi)
        # Grasp the handle 4-10 mm past its middle: nearer the ring a finger can land on the ring's wall.
        along, across = self.rng.uniform(0.004, 0.010), self.rng.uniform(-0.002, 0.002)
        # The finger pads reach 4.5 mm below the grip point: this puts them over the
        # handle's whole 2 cm height, clear of the table.
        grasp_dz = self.rng.uniform(-0.005, -0.001)

        def grasp() -> np.ndarray:
            c, s = np.cos(body_yaw(self.env, nut)), np.sin(body_yaw(self.env, nut))
            return env.sim.data.site_xpos[handle] + np.array([along * c - across * s, along * s + across * c, grasp_dz])

        lift_to = peg_top + self.rng.uniform(0.06, 0.09)
        hover = peg_top + _NUT_HALF_THICKNESS + self.rng.uniform(0.02, 0.04)  # nut centre height over the peg
        let_go = env.table_offset[2] + self.rng.uniform(0.055, 0.07)  # nut centre height at release
        turn: dict[str, float] = {}

        def carry_yaw() -> float:
            # Frozen once the nut is in the hand, where it sits as the gripper grasped it.
            if "yaw" not in turn:
                turn["yaw"] = square_nut_carry_yaw(body_yaw(self.env, nut), tool_yaw(self._eef()[1]))
            return turn["yaw"]

        def nut_to(goal: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
            """The gripper target that brings the nut's centre to `goal`."""
            return lambda: goal() + self._eef()[0] - env.sim.data.body_xpos[nut]

        over_peg = lambda: np.array([peg[0], peg[1], hover])
        on_peg = lambda: np.array([peg[0], peg[1], let_go])
        hold: dict[str, np.ndarray] = {}

        def stay() -> np.ndarray:
            hold.setdefault("p", self._eef()[0])
            return hold["p"]

        # Descend only once turned to the handle: a finger still turning lands on the nut.
        return self.pick(grasp, lift_to, descend_tol=0.004, approach_turn_tol=0.08) + [
            Phase("move", nut_to(over_peg), CLOSE, tol=0.02, max_steps=100, fast=True, yaw=carry_yaw),
            Phase("align", nut_to(over_peg), CLOSE, tol=0.004, min_steps=self.settle_steps, max_steps=30, yaw=carry_yaw),
            Phase("insert", nut_to(on_peg), CLOSE, tol=0.008, max_steps=40, yaw=carry_yaw),
            Phase("release", stay, OPEN, tol=1.0, min_steps=self.release_steps, yaw=carry_yaw),
            Phase("retreat", lambda: stay() + np.array([0.0, 0.0, 0.1]), OPEN, tol=0.02, max_steps=40, yaw=carry_yaw),
        ]

    def _draw_style(self) -> None:
        super()._draw_style()
        self.settle_steps = int(self.rng.integers(3, 8))
        # The fingers travel further to close on the 3 cm handle than on Lift's cube:
        # lifting after 6 steps pulled the handle out of half-closed fingers.
        self.grasp_steps = int(self.rng.integers(10, 15))


def make_expert(env: SimEnv, seed: int, recovery: float = 0.0) -> WaypointExpert:
    """The task's expert; `recovery` is the fraction of its episodes that show a retry after a missed grasp."""
    return env.task.expert_class()(env, seed, recovery)


@dataclass
class ExpertEpisode:
    seed: int
    success: bool
    steps: dict[str, np.ndarray]  # per-step observations + "action" + "reward", all length T
    recovery: bool = False  # started from a deliberately missed grasp


def run_expert_episode(env: SimEnv, seed: int, extra_steps: int | None = None,
                       recovery: float = 0.0) -> ExpertEpisode:
    """Reset `env` with `seed`, let the task's expert act until success (plus
    `extra_steps`, by default the expert's own random linger) or the step limit,
    and return the recorded steps.

    Each row pairs the observation with the action taken from it. In a recovery
    episode (see `make_expert`) the deliberate miss is not recorded: the
    demonstration starts at the missed grasp.
    """
    obs = env.reset(seed=seed)
    expert = make_expert(env, seed, recovery)
    expert.reset()
    if extra_steps is None:
        extra_steps = expert.linger
    rows: dict[str, list[np.ndarray]] = {k: [] for k in (*obs, "action", "reward")}
    success, after = False, 0
    done = False
    while not done:
        action = expert.act()
        next_obs, reward, done, info = env.step(action)
        if expert.recording:
            for k, v in obs.items():
                rows[k].append(v)
            rows["action"].append(action)
            rows["reward"].append(np.float32(reward))
        obs = next_obs
        if info["success"]:
            success = True
        if success:
            after += 1
            if after > extra_steps:
                break
    steps = {k: np.stack(v) for k, v in rows.items()}
    return ExpertEpisode(seed=seed, success=success, steps=steps, recovery=expert.recovers)
