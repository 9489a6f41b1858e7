"""A thin, seeded wrapper around a robosuite task that speaks RobotSpec.

Observations are float32 state vectors (and uint8 HWC images, upright, when
cameras are requested); actions are the task robot's 7-D delta pose + gripper.
Quaternions in them (found by robosuite's observable names) are sign-continuous
within an episode: see dpstack.core.quaternion.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Sequence

import numpy as np

from dpstack.core.interrupt import shielded
from dpstack.core.quaternion import QuaternionContinuity, quaternion_layout
from dpstack.core.spec import ArraySpec, RobotSpec
from dpstack.sim.tasks import DEFAULT_IMAGE_SIZE, TaskDef, get_task

_ROBOSUITE_LOGGER = "robosuite_logs"


def _quiet_robosuite() -> None:
    """Keep robosuite's logger to errors only.

    robosuite logs a macro-file warning at import and one warning per unused
    controller part at every env creation; none of them is actionable here. A
    filter (not a level) is used because robosuite resets the level on import.
    """
    logger = logging.getLogger(_ROBOSUITE_LOGGER)
    if not any(getattr(f, "_dpstack", False) for f in logger.filters):
        def errors_only(record: logging.LogRecord) -> bool:
            return record.levelno >= logging.ERROR
        errors_only._dpstack = True  # type: ignore[attr-defined]
        logger.addFilter(errors_only)


def import_robosuite():
    _quiet_robosuite()
    os.environ.setdefault("MUJOCO_GL", "egl")
    import robosuite
    return robosuite


IMAGE_SUFFIX = "_image"


def image_key(camera: str) -> str:
    return f"{camera}{IMAGE_SUFFIX}"


def spec_cameras(spec: RobotSpec) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """The cameras a spec's image observations come from, and their (height, width);
    None when it has no images. ValueError when the sim cannot render them as asked."""
    images = [o for o in spec.observations if o.is_image]
    for o in images:
        if not o.key.endswith(IMAGE_SUFFIX) or o.shape[2] != 3 or o.dtype != "uint8":
            raise ValueError(f"observation {o.key!r} ({o.shape} {o.dtype}) is not a camera the simulator renders; "
                             f"it renders <camera>{IMAGE_SUFFIX} as (height, width, 3) uint8")
    sizes = {tuple(o.shape[:2]) for o in images}
    if len(sizes) > 1:
        raise ValueError(f"the policy's cameras have different sizes {sorted(sizes)}; the simulator renders one size")
    return tuple(o.key[:-len(IMAGE_SUFFIX)] for o in images), (sizes.pop() if sizes else None)


@functools.lru_cache(maxsize=None)
def task_cameras(task: str) -> tuple[str, ...]:
    """The cameras a task's scene has (builds its env once, without rendering)."""
    env = SimEnv(task)
    try:
        return tuple(env.raw.sim.model.camera_names)
    finally:
        env.close()


def check_cameras(task: str, cameras: Sequence[str]) -> None:
    """ValueError naming the first camera the task's scene lacks."""
    have = task_cameras(task)
    for cam in cameras:
        if cam not in have:
            raise ValueError(f"the policy needs camera {cam!r}, which task {task!r} cannot render "
                             f"(its cameras: {', '.join(have)})")


def _skip_reflections(sim: Any) -> None:
    """Render the cameras without the table's mirror pass. Software GL draws the whole
    scene a second time for it: the cameras render 2.2x faster without it, and at 84x84
    frames differ by about one grey level (docs/datasets.md)."""
    import mujoco
    sim._render_context_offscreen.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


class SimEnv:
    """One robosuite environment for a registered task.

    The same seed gives the same initial state, and with the same actions the
    same trajectory. `reset(seed)` reseeds; `reset()` continues the stream.
    """

    def __init__(self, task: str | TaskDef, seed: int | None = 0, cameras: Sequence[str] = (),
                 image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE, max_steps: int | None = None) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        self.cameras = tuple(cameras)
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.image_hw = (int(h), int(w))
        self.max_steps = int(max_steps or self.task.max_steps)
        if self.cameras:
            check_cameras(self.task.name, self.cameras)  # robosuite's own error names no camera
        robosuite = import_robosuite()
        # robosuite reads its IMAGE_CONVENTION macro when it builds the camera sensors:
        # "opengl" (its default) renders the bottom row first, "opencv" the top row first.
        from robosuite import macros
        self._flip_rows = macros.IMAGE_CONVENTION == "opengl"
        robot = self.task.robot
        controller = robosuite.load_composite_controller_config(controller=robot.controller, robot=robot.name)
        self.raw = robosuite.make(
            self.task.env_name,
            robots=robot.name,
            controller_configs=controller,
            has_renderer=False,
            has_offscreen_renderer=bool(self.cameras),
            use_camera_obs=bool(self.cameras),
            camera_names=list(self.cameras) or "agentview",
            camera_heights=self.image_hw[0],
            camera_widths=self.image_hw[1],
            control_freq=self.task.control_hz,
            horizon=self.max_steps,
            ignore_done=True,  # episode length is ours to enforce (max_steps)
            hard_reset=False,  # reloading the model per episode costs ~1 s and changes nothing we use
            reward_shaping=False,
            seed=self.task.model_seed,
            **dict(self.task.env_kwargs),
        )
        if self.cameras:
            _skip_reflections(self.raw.sim)
        self._steps = 0
        self._last_raw: dict[str, Any] = {}
        self._render_s = 0.0
        for cam in self.cameras:
            self._time_renders(image_key(cam))
        self.spec = self._build_spec(self.raw.reset())
        self._quaternions = QuaternionContinuity(quaternion_layout(self.spec.observations))
        # The first reset() starts from `seed` (None: unseeded, different every time).
        self._pending_seed = seed
        if seed is None:
            self.raw.rng.bit_generator.state = np.random.default_rng().bit_generator.state

    def _time_renders(self, key: str) -> None:
        """Add the time robosuite spends rendering observation `key` to `take_render_seconds`."""
        observable = self.raw._observables[key]
        render = observable._sensor

        @functools.wraps(render)  # keeps robosuite's sensor marks (__modality__)
        def timed(obs_cache):
            start = time.perf_counter()
            try:
                return render(obs_cache)
            finally:
                self._render_s += time.perf_counter() - start

        observable.set_sensor(timed)

    def take_render_seconds(self) -> float:
        """Wall seconds spent rendering camera observations since the last call."""
        seconds, self._render_s = self._render_s, 0.0
        return seconds

    # ---- spec -----------------------------------------------------------
    def _object_observables(self) -> list[tuple[str, Any]]:
        """robosuite's enabled object observables, in the order object-state concatenates them."""
        return [(name, o) for name, o in self.raw._observables.items()
                if o.modality == "object" and o.is_enabled() and o.is_active()]

    def _object_state_names(self) -> tuple[str, ...]:
        """Per-dimension names for robosuite's concatenated object-state, in its order."""
        names: list[str] = []
        for name, observable in self._object_observables():
            n = int(np.asarray(observable.obs).size)
            names.extend([name] if n == 1 else [f"{name}[{i}]" for i in range(n)])
        return tuple(names)

    def _build_spec(self, raw_obs: dict[str, Any]) -> RobotSpec:
        obs_specs: list[ArraySpec] = []
        robot_names = self.task.robot.state_obs
        for key in self.task.obs_keys:
            if key not in raw_obs:
                raise KeyError(f"task {self.task.name}: robosuite gives no observation {key!r}")
            size = int(np.asarray(raw_obs[key]).size)
            names = robot_names.get(key) or (self._object_state_names() if key == "object-state" else ())
            if len(names) != size:
                names = ()
            obs_specs.append(ArraySpec(key=key, shape=(size,), dtype="float32", names=names))
        for cam in self.cameras:
            obs_specs.append(ArraySpec(key=image_key(cam), shape=(*self.image_hw, 3), dtype="uint8"))
        return RobotSpec(task=self.task.name, robot=self.task.robot.name, control_hz=self.task.control_hz,
                         observations=tuple(obs_specs), action=self.task.robot.action,
                         extra={"env_name": self.task.env_name, "controller": self.task.robot.controller,
                                "max_steps": self.max_steps})

    # ---- stepping -------------------------------------------------------
    def _convert(self, raw_obs: dict[str, Any]) -> dict[str, np.ndarray]:
        self._last_raw = raw_obs
        out = {key: np.array(raw_obs[key], dtype=np.float32).reshape(-1) for key in self.task.obs_keys}  # own copies: continued in place
        for cam in self.cameras:
            # Always upright (row 0 = top of the scene), whichever convention robosuite renders in.
            img = np.asarray(raw_obs[image_key(cam)], dtype=np.uint8)
            out[image_key(cam)] = np.ascontiguousarray(img[::-1] if self._flip_rows else img)
        return self._quaternions(out)

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is None:
            seed, self._pending_seed = self._pending_seed, None
        else:
            self._pending_seed = None
        if seed is not None:
            # Reseed in place: robosuite's placement samplers and robot init hold this generator.
            self.raw.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self._steps = 0
        self._quaternions.reset()
        with shielded():  # Ctrl-C waits for robosuite's compiled controller to return
            raw = self.raw.reset()
        return self._convert(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        spec = self.spec.action
        if action.shape != spec.shape:
            raise ValueError(f"action: expected shape {spec.shape}, got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action: contains NaN or Inf")
        action = np.clip(action, spec.low, spec.high)
        with shielded():
            raw_obs, reward, _, info = self.raw.step(action)
        self._steps += 1
        success = self.success()
        info = dict(info, success=success, steps=self._steps)
        done = self._steps >= self.max_steps
        return self._convert(raw_obs), float(reward), done, info

    def success(self) -> bool:
        return bool(self.raw._check_success())

    @property
    def steps(self) -> int:
        return self._steps

    def raw_observation(self, key: str) -> np.ndarray:
        """A robosuite observation from the last step (privileged: for experts, not policies)."""
        return np.asarray(self._last_raw[key])

    def object_observations(self) -> dict[str, np.ndarray]:
        """Every object observation from the last step by name, e.g. Can_pos and
        Can_to_robot0_eef_pos (privileged: for traces, not policies)."""
        return {name: np.asarray(self._last_raw[name]) for name, _ in self._object_observables() if name in self._last_raw}

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "SimEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
