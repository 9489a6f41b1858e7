"""A simulated arm that is a robot to the policy server, nothing more.

The robosuite env (`SimEnv`) plays the real arm; it reaches the policy only
through the runtime's protocol, exactly as a real arm's bridge does:
`PolicyClient` (Hello with the env's RobotSpec, Reset per episode, an
Observation per control step) and `ActionSchedule` (which action of which chunk
is current, stale-action dropping, hold).

Two ways to run the clock:
- lockstep: the sim waits for every reply before stepping. Robot time is sim
  time (step * dt), so latency cannot change what is executed: an exact
  evaluation of the policy.
- realtime: the sim steps on a wall-clock grid at the control rate. Each tick
  it sends the current observation (if the previous one was answered), waits at
  most until the tick's action deadline for a chunk, and executes whatever the
  ActionSchedule says is current. When the policy asked to replan at this tick
  (RTI's replan_after) and its chunk is late, the previous chunk's look-ahead
  runs. A tick misses its deadline when it has no valid action at the action
  deadline (it holds) or its action goes out after that deadline (late: the
  loop lost its core while waiting). A physics step that needs longer than the
  period is an overrun: the world (the simulator) stands still for the excess,
  as it does while a video frame renders, and the schedule resumes from there.
  Overruns are counted, and reported, but they are the simulator's, not
  lateness of the policy or the link.
"""
from __future__ import annotations

import collections
import gc
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dpstack.runtime.endpoint import check_endpoint
from dpstack.runtime.realtime import StallProbe
from dpstack.sim.eval_report import EpisodeRecord
from dpstack.sim.tasks import get_task

log = logging.getLogger(__name__)

MODES = ("lockstep", "realtime")


class ArmError(RuntimeError):
    """The policy link failed in a way retrying will not fix (spec mismatch, no server)."""


@dataclass
class ArmConfig:
    task: str = "lift"
    connect: str = "tcp://127.0.0.1:5555"
    mode: str = "lockstep"
    hz: float | None = None              # None: the task's control rate
    episodes: int = 1
    seed: int = 10_000                   # episode i uses seed + i
    max_steps: int | None = None         # None: the task's episode length
    robot_id: str = "sim-arm"
    cameras: tuple[str, ...] = ()        # cameras the policy observes
    reply_timeout_s: float = 30.0        # lockstep: a reply slower than this fails the run
    action_deadline: float = 0.8         # realtime: wait for a chunk until this fraction of the period
    # realtime: when the current chunk still has a (look-ahead) action for this tick, wait
    # for the chunk just asked for only this long, so the tick still fits its period
    fresh_deadline: float = 0.5
    video_episodes: int = 0              # render the first N episodes to MP4
    video_dir: Path | None = None
    video_size: int = 160
    video_camera: str = "agentview"
    sampler_label: str = ""              # filled from the server's HelloAck when empty: the name as typed there
    sampler_resolved: str = ""           # filled from the HelloAck: what that name resolved to

    def __post_init__(self) -> None:
        get_task(self.task)  # an unknown task is refused here, before any process or connection
        check_endpoint(self.connect)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        for name in ("action_deadline", "fresh_deadline"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a fraction of the period in (0, 1], got {getattr(self, name)}")
        if self.video_episodes and self.video_dir is None:
            raise ValueError("video_episodes needs a video_dir")


class FrameRecorder:
    """Offscreen renders of one camera, for episode videos only (costly on a CPU)."""

    def __init__(self, env, camera: str, size: int) -> None:
        from robosuite.utils.binding_utils import MjRenderContextOffscreen

        self.env, self.camera, self.size = env, camera, size
        if getattr(env.raw.sim, "_render_context_offscreen", None) is None:
            MjRenderContextOffscreen(env.raw.sim, device_id=-1)  # attaches itself to the sim
        self.frames: list[np.ndarray] = []

    def capture(self) -> None:
        frame = self.env.raw.sim.render(camera_name=self.camera, width=self.size, height=self.size)
        self.frames.append(np.ascontiguousarray(frame[::-1]))  # OpenGL rows bottom-up -> upright

    def write(self, path: Path, fps: float) -> Path:
        from dpstack.data.video import write_mp4
        return write_mp4(np.stack(self.frames), path, fps)


def _monotonic_at(perf_time: float) -> float:
    """A time.perf_counter() instant on CLOCK_MONOTONIC, the clock other processes share."""
    return time.monotonic() - (time.perf_counter() - perf_time)


def _policy_obs(obs: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {k: obs[k] for k in keys}


class SimArm:
    """One simulated arm connected to one policy server."""

    def __init__(self, config: ArmConfig, progress: Callable[[EpisodeRecord], None] | None = None) -> None:
        from dpstack.runtime.action_schedule import ActionSchedule
        from dpstack.runtime.client import PolicyClient
        from dpstack.sim.env import SimEnv

        self.config = config
        self.env = SimEnv(config.task, seed=config.seed, cameras=config.cameras, max_steps=config.max_steps)
        self.spec = self.env.spec
        self.hz = float(config.hz or self.spec.control_hz)
        if self.hz <= 0:
            raise ValueError(f"hz must be positive, got {self.hz}")
        if abs(self.hz - self.spec.control_hz) > 1e-6 and config.mode == "lockstep":
            log.warning("lockstep ignores --hz %.1f: sim time advances at the task's %.1f Hz whatever the wall clock",
                        self.hz, self.spec.control_hz)
        self.sim_dt = 1.0 / self.spec.control_hz
        self.client = PolicyClient(config.connect, self.spec, config.robot_id, seed=config.seed,
                                   timeout_s=max(config.reply_timeout_s, 1.0))
        self.schedule = ActionSchedule(self.spec.action)
        self.progress = progress
        self.probe = StallProbe()  # this (the loop's) thread's scheduling, for realtime records

    # ------------------------------------------------------------------ session
    def connect(self, timeout_s: float = 30.0) -> None:
        if not self.client.wait_ready(timeout_s):
            if self.client.fatal is not None:
                raise ArmError(self.client.refusal())
            raise ArmError(f"could not open a session with {self.config.connect}: no answer within {timeout_s:.0f} s")
        info = self.client.policy
        if not self.config.sampler_label and info is not None:
            self.config.sampler_label = info.sampler
            self.config.sampler_resolved = info.sampler_resolved

    def _reset(self, seed: int) -> dict[str, np.ndarray]:
        obs = self.env.reset(seed=seed)
        self.schedule.reset()
        self.client.reset(seed)
        # Wait for the ResetAck so the server's history is empty before the first observation.
        before = self.client.episode
        deadline = time.perf_counter() + self.config.reply_timeout_s
        while self.client.episode == before and time.perf_counter() < deadline:
            self.client.poll(0.01)
        if self.client.episode == before:
            raise ArmError("server did not acknowledge the episode reset")
        return obs

    def run(self) -> list[EpisodeRecord]:
        self.connect()
        records = []
        try:
            if self.config.mode == "realtime":
                self._warm_up(self.config.seed)
            for i in range(self.config.episodes):
                record = self.run_episode(i, self.config.seed + i)
                records.append(record)
                if self.progress is not None:
                    self.progress(record)
        finally:
            self.client.close()
        return records

    def close(self) -> None:
        self.client.close()
        self.env.close()
        self.probe.close()

    # ------------------------------------------------------------------ episodes
    def run_episode(self, episode: int, seed: int) -> EpisodeRecord:
        recorder = None
        if episode < self.config.video_episodes:
            recorder = FrameRecorder(self.env, self.config.video_camera, self.config.video_size)
        obs = self._reset(seed)
        record = EpisodeRecord(episode=episode, seed=seed, success=False, steps=0, sampler=self.config.sampler_label,
                               sampler_resolved=self.config.sampler_resolved, mode=self.config.mode, hz=self.hz)
        if recorder is not None:
            recorder.capture()
        if self.config.mode == "lockstep":
            self._lockstep(obs, record, recorder)
        else:
            gc.collect()  # between episodes, untimed, instead of at a random tick
            gc.disable()
            try:
                self._realtime(obs, record, recorder)
            finally:
                gc.enable()
        if recorder is not None:
            name = f"{self.config.sampler_label or 'policy'}_ep{episode:03d}_seed{seed}.mp4"
            record.video = str(recorder.write(Path(self.config.video_dir) / name, self.spec.control_hz))
        return record

    def _warm_up(self, seed: int) -> None:
        """One untimed chunk and a few physics steps before the first realtime episode, so
        first-call costs (allocations, lazy initialisation in the env and the server) do
        not land on a timed tick."""
        obs = self._reset(seed)
        reply = self.client.request(self._observation(obs), 0.0, self.config.reply_timeout_s)
        if reply is None:
            raise ArmError(self._link_problem("the warm-up observation got no reply"))
        for action in reply.actions[:3]:
            self.env.step(action)
        gc.collect()
        gc.freeze()  # the env and the link stay put: later collections scan only what episodes allocate

    def _observation(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _policy_obs(obs, self.spec.obs_keys)

    def _step_env(self, action: np.ndarray, record: EpisodeRecord, recorder: FrameRecorder | None) -> tuple[dict, bool]:
        start = time.perf_counter()
        obs, _, done, info = self.env.step(action)
        record.physics_ms.append((time.perf_counter() - start) * 1e3)
        record.steps += 1
        self._render_s = 0.0
        if recorder is not None:
            start = time.perf_counter()
            recorder.capture()
            self._render_s = time.perf_counter() - start
        if info["success"]:
            record.success = True
            return obs, True  # stop early: the task is solved
        return obs, done

    def _lockstep(self, obs: dict, record: EpisodeRecord, recorder: FrameRecorder | None) -> None:
        done = False
        while not done:
            now = record.steps * self.sim_dt  # robot clock = sim clock
            arrays = self._observation(obs)
            start = time.perf_counter()
            if self.schedule.remaining(now, before_replan=True) == 0:
                # Chunk used up (or at its replan point): this observation asks for the next one.
                reply = self.client.request(arrays, now, self.config.reply_timeout_s)
                if reply is None:
                    raise ArmError(self._link_problem("lockstep observation got no reply"))
                record.chunk_latency_ms.append((time.perf_counter() - start) * 1e3)
                record.chunk_compute_ms.append(reply.compute_ms)
                record.evaluations += reply.nfe
                self.schedule.offer(reply)
            elif not self.client.send_history(arrays, now):
                # Keeps a To > 1 history at control rate between chunks.
                raise ArmError(self._link_problem("policy link not ready for a history observation"))
            decision = self.schedule.next(now)
            record.step_latency_ms.append((time.perf_counter() - start) * 1e3)
            if decision.hold:
                record.held_steps += 1
                record.deadline_misses += 1
                record.misses.append([record.steps, _monotonic_at(start), time.monotonic()])
            obs, done = self._step_env(decision.action, record, recorder)

    def _realtime(self, obs: dict, record: EpisodeRecord, recorder: FrameRecorder | None) -> None:
        # Robot time is in the task's seconds (what the policy's chunk times mean);
        # --hz sets how fast it runs on the wall clock (hz below the task rate = slow motion).
        scale = self.hz / self.spec.control_hz
        # Episode start: the arm is at rest after the reset, so its first chunk (a full
        # denoise for RTI and streaming) is waited for before the clock starts, as a real
        # arm would wait before moving; its latency is recorded, not counted as a miss.
        start = time.perf_counter()
        reply = self.client.request(self._observation(obs), 0.0, self.config.reply_timeout_s)
        if reply is None:
            raise ArmError(self._link_problem("the episode's first observation got no reply"))
        record.start_latency_ms = (time.perf_counter() - start) * 1e3
        record.evaluations += reply.nfe
        self.schedule.offer(reply)
        wall0 = time.perf_counter()
        in_flight: dict[int, float] = {}  # seq -> wall time sent
        recent: collections.deque[float] = collections.deque(maxlen=20)  # chunk latencies, robot seconds

        def clock() -> float:
            return (time.perf_counter() - wall0) * scale

        def receive(until: float) -> None:
            """Take chunks until robot time `until` (at least one poll)."""
            while True:
                reply = self.client.poll(max(0.0, (until - clock()) / scale))
                if reply is not None:
                    if reply.seq in in_flight:
                        latency = time.perf_counter() - in_flight.pop(reply.seq)
                        record.chunk_latency_ms.append(latency * 1e3)
                        record.chunk_compute_ms.append(reply.compute_ms)
                        recent.append(latency * scale)
                    record.evaluations += reply.nfe
                    self.schedule.offer(reply)
                    return
                if clock() >= until:
                    return

        done = False
        k = 0
        while not done:
            tick = k * self.sim_dt
            while clock() < tick:
                receive(tick)  # idle until the tick, receiving meanwhile
            self.probe.read()  # stalls while idle cost nothing: count from the tick on
            if self.client.fatal is not None:
                raise ArmError(self._link_problem("policy link failed"))
            # Ask for the next chunk early enough that it arrives before this one runs
            # out (lead = recent latency in ticks); otherwise history only.
            lead = math.ceil(max(recent, default=0.0) / self.sim_dt)
            arrays = self._observation(obs)
            due = self.schedule.remaining(tick, before_replan=True)
            asked = None  # seq of a chunk asked for this tick that this tick's action should come from
            if k == 0:
                pass  # this observation was the episode-start request
            elif not self.client.busy and due <= lead:
                sent = time.perf_counter()  # before sending: the thread may lose its core right after
                seq = self.client.send_observation(arrays, tick)
                if seq is not None:
                    in_flight = {seq: sent}
                    asked = seq if due == 0 else None
            else:
                self.client.send_history(arrays, tick)
            # With no action for this tick, wait for one until the action deadline, then hold.
            # When the policy wanted to replan now (RTI) and the current chunk's look-ahead
            # covers the tick, wait for the chunk just asked for only until fresh_deadline.
            deadline = tick + self.config.action_deadline * self.sim_dt
            fresh_deadline = tick + min(self.config.fresh_deadline, self.config.action_deadline) * self.sim_dt

            def wait_until() -> float | None:
                if self.schedule.remaining(tick) == 0:
                    return deadline
                fresh = asked is None or (self.schedule.current_seq or -1) >= asked
                return None if fresh else fresh_deadline

            until = wait_until()
            while until is not None and clock() < until:
                receive(until)
                until = wait_until()
            if asked is not None and (self.schedule.current_seq or -1) < asked:
                record.lookahead_steps += int(self.schedule.remaining(tick) > 0)
            decision = self.schedule.next(tick)
            commanded = clock()
            record.step_latency_ms.append(max(0.0, commanded - tick) / scale * 1e3)
            # The tick's deadline is missed when it has no action to run, or when its action
            # goes out after the deadline (the loop lost its core while waiting).
            late = commanded > deadline
            missed = decision.hold or late
            record.held_steps += int(decision.hold)
            record.late_steps += int(late and not decision.hold)
            record.deadline_misses += int(missed)
            if missed:  # from the tick's start to its command, on the clock every process shares
                record.misses.append([k, _monotonic_at(wall0 + tick / scale), _monotonic_at(wall0 + commanded / scale)])
            obs, done = self._step_env(decision.action, record, recorder)
            steal_ms, runqueue_ms = self.probe.read()
            record.steal_ms.append(steal_ms)
            record.runqueue_ms.append(runqueue_ms)
            # Rendering is for people, not part of the robot: stop the clock while it ran.
            wall0 += self._render_s
            # The simulator is the world. When it needs longer than the period to compute one,
            # the world stands still meanwhile (on a real arm it moves on while the bridge
            # waits): the excess is a pause, counted as an overrun, not lateness of the next tick.
            behind = clock() - (tick + self.sim_dt)
            if behind > 0:
                record.overruns += 1
                wall0 += behind / scale
            k += 1

    def _link_problem(self, what: str) -> str:
        errors = "; ".join(f"{e.code}: {e.message}" for e in list(self.client.errors)[-3:])
        return f"{what} ({self.config.connect}){': ' + errors if errors else ''}"
