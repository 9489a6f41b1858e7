"""A simulated arm that is a robot to the policy server, nothing more.

The robosuite env (`SimEnv`) plays the real arm; it reaches the policy only
through the runtime's protocol, exactly as a real arm's bridge does:
`PolicyClient` (Hello with the env's RobotSpec, Reset per episode, an
Observation per control step) and `ActionSchedule` (which action of which chunk
is current, stale-action dropping, hold).

Two ways to run the clock:
- lockstep: the sim waits for every reply before stepping. Robot time is sim
  time (step * dt), so compute time cannot change what is executed: an exact
  evaluation of the policy. An extra latency D is then the only latency: each
  answer reaches the arm D after its observation (rounded up to whole periods),
  the arm executes what it has meanwhile, and asks ahead by the slowest delay
  seen so far, as the realtime arm does. Deterministic, so success against
  delay does not depend on how fast this computer is.
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
  lateness of the policy or the link. Rendering the policy's cameras is a
  pause too: a real camera captures beside the robot, not inside its control
  period. `RobotClock` keeps the robot time (scaled, paused) and `TickLedger`
  books what each tick did. `extra_latency_s` holds every answer back that
  long on the robot clock (`DelayLine`), to measure success against delay.

The cameras an image policy observes, and their size, come from its package's
spec (`package_cameras`); nobody types them twice.
"""
from __future__ import annotations

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
from dpstack.sim.delay_line import DelayLine
from dpstack.sim.eval_report import EpisodeRecord
from dpstack.sim.robot_clock import RobotClock
from dpstack.sim.tasks import get_task
from dpstack.sim.tick_ledger import TickLedger
from dpstack.sim.trace import EEF_POS, GRIPPER_QPOS, EpisodeTrace

log = logging.getLogger(__name__)

MODES = ("lockstep", "realtime")
TICK_EPS = 1e-9  # lockstep: an answer due at a tick's time arrives at that tick


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
    first_episode: int = 0               # start at this episode (a resumed run: the earlier ones are done)
    max_steps: int | None = None         # None: the task's episode length
    robot_id: str = "sim-arm"
    cameras: tuple[str, ...] = ()        # cameras the policy observes
    image_size: tuple[int, int] | None = None  # their (height, width); None: the task's default
    extra_latency_s: float = 0.0         # robot seconds added to every answer's arrival
    reply_timeout_s: float = 30.0        # lockstep: a reply slower than this fails the run
    action_deadline: float = 0.8         # realtime: wait for a chunk until this fraction of the period
    # realtime: when the current chunk still has a (look-ahead) action for this tick, wait
    # for the chunk just asked for only this long, so the tick still fits its period
    fresh_deadline: float = 0.5
    video_episodes: int = 0              # render the first N episodes to MP4
    video_dir: Path | None = None
    video_size: int = 160
    video_camera: str = "agentview"
    trace_dir: Path | None = None        # a step-by-step trace of every episode goes here (sim/trace.py)
    sampler_label: str = ""              # filled from the server's HelloAck when empty: the name as typed there
    sampler_resolved: str = ""           # filled from the HelloAck: what that name resolved to

    def __post_init__(self) -> None:
        get_task(self.task)  # an unknown task is refused here, before any process or connection
        check_endpoint(self.connect)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if not 0 <= self.first_episode <= self.episodes:
            raise ValueError(f"first_episode must be in 0..{self.episodes}, got {self.first_episode}")
        for name in ("action_deadline", "fresh_deadline"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a fraction of the period in (0, 1], got {getattr(self, name)}")
        if self.video_episodes and self.video_dir is None:
            raise ValueError("video_episodes needs a video_dir")
        if not 0 <= self.extra_latency_s < math.inf:  # NaN too: it would never arrive
            raise ValueError(f"extra latency must be a finite number >= 0, got {self.extra_latency_s * 1e3:g} ms")


def package_cameras(policy_dir: Path) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """The cameras (and their height, width) a policy package observes, from its spec."""
    from dpstack.runtime.package import describe, read_manifest
    from dpstack.sim.env import spec_cameras

    spec, *_ = describe(read_manifest(policy_dir))
    return spec_cameras(spec)


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


def _policy_obs(obs: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {k: obs[k] for k in keys}


class SimArm:
    """One simulated arm connected to one policy server."""

    def __init__(self, config: ArmConfig, progress: Callable[[EpisodeRecord], None] | None = None) -> None:
        from dpstack.runtime.action_schedule import ActionSchedule
        from dpstack.runtime.client import PolicyClient
        from dpstack.sim.env import SimEnv
        from dpstack.sim.tasks import DEFAULT_IMAGE_SIZE

        self.config = config
        self.env = SimEnv(config.task, seed=config.seed, cameras=config.cameras, max_steps=config.max_steps,
                          image_size=config.image_size or DEFAULT_IMAGE_SIZE)
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
        self.delayed: DelayLine = DelayLine(config.extra_latency_s)  # answers on their way to the arm
        self.render_s = 0.0  # wall seconds the last step spent rendering cameras
        self.progress = progress
        self.probe = StallProbe()  # this (the loop's) thread's scheduling, for realtime records
        self.trace: EpisodeTrace | None = None  # the running episode's, when tracing
        self.asked_at_tick = -1.0  # realtime: the tick of the last chunk asked for

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
        self.env.take_render_seconds()  # the reset's renders belong to no step
        self.schedule.reset()
        self.delayed.clear()
        self.asked_at_tick = -1.0
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
            if self.config.mode == "realtime" and self.config.first_episode < self.config.episodes:
                self._warm_up(self.config.seed + self.config.first_episode)
            for i in range(self.config.first_episode, self.config.episodes):
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
                               sampler_resolved=self.config.sampler_resolved, mode=self.config.mode, hz=self.hz,
                               extra_latency_ms=self.config.extra_latency_s * 1e3)
        if recorder is not None:
            recorder.capture()
        if self.config.trace_dir is not None:
            self.trace = EpisodeTrace(self.config.task, self.config.sampler_label, seed, self.spec.action.gripper_dims,
                                      self.config.extra_latency_s * 1e3)
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
        if self.trace is not None:
            self.trace.success = record.success
            self.trace.write(self.config.trace_dir)
            self.trace = None
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

    def _traced(self, action: np.ndarray, asked: bool, held: bool) -> None:
        """Add this step to the episode's trace: the state the action was chosen in, and the action."""
        if self.trace is not None:
            self.trace.add(self.env.raw_observation(EEF_POS), self.env.raw_observation(GRIPPER_QPOS),
                           self.env.object_observations(), action, asked, held)

    def _step_env(self, action: np.ndarray, record: EpisodeRecord) -> tuple[dict, bool]:
        start = time.perf_counter()
        obs, _, done, info = self.env.step(action)
        self.render_s = self.env.take_render_seconds()
        record.render_ms += self.render_s * 1e3
        record.physics_ms.append((time.perf_counter() - start - self.render_s) * 1e3)
        record.steps += 1
        if info["success"]:
            record.success = True
            return obs, True  # stop early: the task is solved
        return obs, done

    def _lockstep(self, obs: dict, record: EpisodeRecord, recorder: FrameRecorder | None) -> None:
        lead = 0  # ticks ahead to ask for the next chunk: the slowest delayed answer so far
        done = False
        while not done:
            now = record.steps * self.sim_dt  # robot clock = sim clock
            arrays = self._observation(obs)
            start, start_shared = time.perf_counter(), time.monotonic()
            for asked_at, reply in self.delayed.pop_due(now + TICK_EPS):
                lead = max(lead, round((now - asked_at) / self.sim_dt))
                self.schedule.offer(reply)
            asked = not self.delayed and self.schedule.remaining(now, before_replan=True) <= lead
            if asked:
                # Chunk (nearly) used up, or at its replan point: this observation asks for the next one.
                reply = self.client.request(arrays, now, self.config.reply_timeout_s)
                if reply is None:
                    raise ArmError(self._link_problem("lockstep observation got no reply"))
                record.chunk_latency_ms.append((time.perf_counter() - start) * 1e3)
                record.chunk_compute_ms.append(reply.compute_ms)
                record.evaluations += reply.nfe
                if record.steps == 0:
                    self.schedule.offer(reply)  # the arm at rest waits for its first chunk, as in realtime
                else:
                    self.delayed.push((now, reply), now)
                    for _, arrived in self.delayed.pop_due(now + TICK_EPS):  # no extra latency: here at once
                        self.schedule.offer(arrived)
            elif not self.client.send_history(arrays, now):
                # Keeps a To > 1 history at control rate between chunks.
                raise ArmError(self._link_problem("policy link not ready for a history observation"))
            decision = self.schedule.next(now)
            record.step_latency_ms.append((time.perf_counter() - start) * 1e3)
            if decision.hold:
                record.held_steps += 1
                record.deadline_misses += 1
                record.misses.append([record.steps, start_shared, time.monotonic()])
            self._traced(decision.action, asked, decision.hold)
            obs, done = self._step_env(decision.action, record)
            if recorder is not None:
                recorder.capture()

    def _realtime(self, obs: dict, record: EpisodeRecord, recorder: FrameRecorder | None) -> None:
        self._first_chunk(obs, record)
        clock = RobotClock(self.hz / self.spec.control_hz)  # --hz below the task's rate: slow motion
        ledger = TickLedger(record, clock)
        done = False
        k = 0
        while not done:
            tick = k * self.sim_dt
            while clock.now() < tick:
                self._receive(clock, ledger, tick)  # idle until the tick, receiving meanwhile
            self.probe.read()  # stalls while idle cost nothing: count from the tick on
            if self.client.fatal is not None:
                raise ArmError(self._link_problem("policy link failed"))
            asked = self._send(tick, obs, clock, ledger) if k > 0 else None  # tick 0 sent the first chunk's
            deadline = tick + self.config.action_deadline * self.sim_dt
            self._wait_for_action(tick, deadline, asked, clock, ledger)
            lookahead = asked is not None and not self._adopted(asked) and self.schedule.remaining(tick) > 0
            decision = self.schedule.next(tick)
            ledger.commanded(k, tick, deadline, decision.hold, lookahead)
            self._traced(decision.action, k == 0 or self.asked_at_tick == tick, decision.hold)
            obs, done = self._step_env(decision.action, record)
            clock.pause(self.render_s)  # the cameras rendered: the world stood still meanwhile
            if recorder is not None:
                with clock.paused():  # rendering is for people, not part of the robot
                    recorder.capture()
            # The simulator is the world. When it needs longer than the period to compute one,
            # the world stands still meanwhile (on a real arm it moves on while the bridge
            # waits): the excess is a pause, counted as an overrun, not lateness of the next tick.
            ledger.finished(*self.probe.read(), overrun=clock.pause_past(tick + self.sim_dt))
            k += 1

    # ------------------------------------------------------------------ realtime pieces
    def _first_chunk(self, obs: dict, record: EpisodeRecord) -> None:
        """Episode start: the arm is at rest after the reset, so its first chunk (a full
        denoise for RTI and streaming) is waited for before the clock starts, as a real
        arm would wait before moving; its latency is recorded, not counted as a miss."""
        start = time.perf_counter()
        reply = self.client.request(self._observation(obs), 0.0, self.config.reply_timeout_s)
        if reply is None:
            raise ArmError(self._link_problem("the episode's first observation got no reply"))
        record.start_latency_ms = (time.perf_counter() - start) * 1e3
        record.evaluations += reply.nfe
        self.schedule.offer(reply)

    def _receive(self, clock: RobotClock, ledger: TickLedger, until: float) -> None:
        """Wait for a chunk until robot time `until` (one poll) and offer it to the schedule,
        once the extra latency has passed (at once without one)."""
        due = self.delayed.next_due()
        wait = min(until, due) if due is not None else until
        reply = self.client.poll(max(0.0, clock.wall_s(wait - clock.now())))
        if reply is not None:
            self.delayed.push(reply, clock.now())
        for reply in self.delayed.pop_due(clock.now()):
            ledger.answered(reply)
            self.schedule.offer(reply)

    def _send(self, tick: float, obs: dict, clock: RobotClock, ledger: TickLedger) -> int | None:
        """Send the tick's observation: it asks for the next chunk early enough that the chunk
        arrives before the current one runs out (lead = recent latency in ticks), otherwise
        it is history only. Returns the seq of a chunk asked for that this tick's action
        should come from (the current chunk is at its end or replan point), else None."""
        arrays = self._observation(obs)
        due = self.schedule.remaining(tick, before_replan=True)
        if self.client.busy or self.delayed or due > ledger.lead(self.sim_dt):  # one answer on its way at a time
            self.client.send_history(arrays, tick)
            return None
        sent = clock.wall()  # before sending: the thread may lose its core right after
        seq = self.client.send_observation(arrays, tick)
        if seq is None:
            return None
        ledger.asked(seq, sent)
        self.asked_at_tick = tick
        return seq if due == 0 else None

    def _wait_for_action(self, tick: float, deadline: float, asked: int | None, clock: RobotClock,
                         ledger: TickLedger) -> None:
        until = self._wait_until(tick, deadline, asked)
        while until is not None and clock.now() < until:
            self._receive(clock, ledger, until)
            until = self._wait_until(tick, deadline, asked)

    def _wait_until(self, tick: float, deadline: float, asked: int | None) -> float | None:
        """How long this tick still waits for a chunk (robot time), None: not at all.
        With no action for the tick, until the action deadline (then it holds). When the
        policy wanted to replan now (RTI) and the current chunk's look-ahead covers the
        tick, for the chunk just asked for only until the fresh deadline."""
        if self.schedule.remaining(tick) == 0:
            return deadline
        if asked is None or self._adopted(asked):
            return None
        return tick + min(self.config.fresh_deadline, self.config.action_deadline) * self.sim_dt

    def _adopted(self, seq: int) -> bool:
        """The schedule runs chunk `seq` or a newer one."""
        return (self.schedule.current_seq or -1) >= seq

    def _link_problem(self, what: str) -> str:
        errors = "; ".join(f"{e.code}: {e.message}" for e in list(self.client.errors)[-3:])
        return f"{what} ({self.config.connect}){': ' + errors if errors else ''}"
