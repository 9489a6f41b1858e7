"""The robot YAML (deploy/configs/<robot>.yaml) as typed, validated dataclasses.

Every robot constant the bridge and the safety layer use lives in that file:
workspace, speed and acceleration limits, action scaling, servo parameters.
It is read by the shared loader (dpstack.core.typed_yaml), with the same rules as
the training config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from dpstack.core.typed_yaml import ConfigError, find_config, load_yaml

CONFIG_DIR = Path(__file__).parent / "configs"


def _positive(where: str, **values: float) -> None:
    for k, v in values.items():
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{where}.{k} must be a positive number, got {v}")


@dataclass
class UrRtdeOptions:
    lookahead_time: float = 0.1   # servoL lookahead [0.03, 0.2] s
    gain: float = 300.0           # servoL proportional gain [100, 2000]
    velocity: float = 0.5         # servoL speed argument (not used by the controller in servo mode)
    acceleration: float = 0.5     # servoL acceleration argument
    watchdog_min_hz: float = 10.0  # RTDE stops the arm if not kicked this often
    stop_deceleration: float = 2.0  # servoStop deceleration, m/s^2
    gripper: Literal["none", "tool_digital_out"] = "none"
    gripper_output: int = 0       # tool digital output that closes the gripper
    gripper_close_below: float = 0.04  # widths below this close a binary gripper

    def __post_init__(self) -> None:
        if not 0.03 <= self.lookahead_time <= 0.2:
            raise ValueError(f"ur_rtde.lookahead_time must be in [0.03, 0.2], got {self.lookahead_time}")
        if not 100 <= self.gain <= 2000:
            raise ValueError(f"ur_rtde.gain must be in [100, 2000], got {self.gain}")
        _positive("ur_rtde", velocity=self.velocity, acceleration=self.acceleration,
                  watchdog_min_hz=self.watchdog_min_hz, stop_deceleration=self.stop_deceleration)


@dataclass
class FrankyOptions:
    relative_dynamics_factor: float = 0.1  # fraction of Franka's velocity/acceleration/jerk limits
    gripper_speed: float = 0.05            # m/s
    gripper_force: float = 20.0            # N, used when grasping
    gripper_deadband: float = 0.005        # m: smaller width changes are not sent

    def __post_init__(self) -> None:
        if not 0 < self.relative_dynamics_factor <= 1:
            raise ValueError(f"franky.relative_dynamics_factor must be in (0, 1], got {self.relative_dynamics_factor}")
        _positive("franky", gripper_speed=self.gripper_speed, gripper_force=self.gripper_force)


@dataclass
class MujocoArmOptions:
    command_latency_s: float = 0.004  # delay before a command reaches the simulated controller
    position_noise: float = 0.0002   # std of position sensor noise, m
    rotation_noise: float = 0.001    # std of orientation sensor noise, rad
    bandwidth_hz: float = 8.0        # first-order filter on the target: tracking lag
    initial_joints: list[float] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("mujoco", bandwidth_hz=self.bandwidth_hz)
        if self.command_latency_s < 0 or self.position_noise < 0 or self.rotation_noise < 0:
            raise ValueError("mujoco: latency and noise must be >= 0")


@dataclass
class DriverConfig:
    kind: Literal["ur_rtde", "franky", "mujoco"]
    servo_hz: float
    host: str = ""
    # Joint limits (rad) for the safety layer when the vendor link does not report them.
    joint_lower: list[float] = field(default_factory=list)
    joint_upper: list[float] = field(default_factory=list)
    ur_rtde: UrRtdeOptions = field(default_factory=UrRtdeOptions)
    franky: FrankyOptions = field(default_factory=FrankyOptions)
    mujoco: MujocoArmOptions = field(default_factory=MujocoArmOptions)

    def __post_init__(self) -> None:
        _positive("driver", servo_hz=self.servo_hz)
        if self.kind in ("ur_rtde", "franky") and not self.host:
            raise ValueError(f"driver.host is required for driver {self.kind!r}")
        if len(self.joint_lower) != len(self.joint_upper) or any(lo >= hi for lo, hi in zip(self.joint_lower, self.joint_upper)):
            raise ValueError("driver.joint_lower/joint_upper must have equal lengths with lower < upper")


@dataclass
class SafetyConfig:
    workspace_low: tuple[float, float, float]
    workspace_high: tuple[float, float, float]
    max_linear_speed: float       # m/s
    max_angular_speed: float      # rad/s
    max_linear_accel: float       # m/s^2
    max_angular_accel: float      # rad/s^2
    max_step_position: float      # m: an incoming target is pulled to within this of the last command
    max_step_rotation: float      # rad: same for orientation
    gripper_min_width: float
    gripper_max_width: float
    gripper_max_rate: float       # m/s
    watchdog_s: float             # no fresh chunk for this long: the arm is stopped by then
    joint_margin: float = 0.05    # rad kept clear of reported joint limits
    estop_signal: str = "SIGUSR1"  # empty: no signal handler
    estop_keys: bool = True       # 'e' or space on an interactive stdin; 'r' resets
    estop_endpoint: str = ""      # e.g. tcp://127.0.0.1:5599; empty: none

    def __post_init__(self) -> None:
        _positive("safety", max_linear_speed=self.max_linear_speed, max_angular_speed=self.max_angular_speed,
                  max_linear_accel=self.max_linear_accel, max_angular_accel=self.max_angular_accel,
                  max_step_position=self.max_step_position, max_step_rotation=self.max_step_rotation,
                  gripper_max_rate=self.gripper_max_rate, watchdog_s=self.watchdog_s)
        for i, (lo, hi) in enumerate(zip(self.workspace_low, self.workspace_high)):
            if not lo < hi:
                raise ValueError(f"safety.workspace_low[{i}]={lo} must be below workspace_high[{i}]={hi}")
        if not 0 <= self.gripper_min_width < self.gripper_max_width:
            raise ValueError("safety: need 0 <= gripper_min_width < gripper_max_width")
        if self.watchdog_s <= self.stop_time:
            raise ValueError(f"safety.watchdog_s={self.watchdog_s} must exceed the time to brake from full speed "
                             f"({self.stop_time:.3f} s = max speed / max accel)")

    @property
    def stop_time(self) -> float:
        """Time to brake from full speed to rest at the acceleration limits."""
        return max(self.max_linear_speed / self.max_linear_accel, self.max_angular_speed / self.max_angular_accel)


@dataclass
class ObservationSource:
    key: str                 # observation key the policy expects, e.g. robot0_eef_pos
    source: Literal["eef_pos", "eef_quat", "gripper_qpos", "gripper_width", "joint_pos", "camera"]
    camera: str = ""         # camera name when source == camera

    def __post_init__(self) -> None:
        if (self.source == "camera") != bool(self.camera):
            raise ValueError(f"observation {self.key!r}: 'camera' must be set exactly when source is camera")


@dataclass
class SpecConfig:
    """The RobotSpec this robot publishes to the policy server."""

    task: str
    robot: str
    control_hz: float
    observations: list[ObservationSource]

    def __post_init__(self) -> None:
        _positive("spec", control_hz=self.control_hz)
        if not self.observations:
            raise ValueError("spec.observations must list at least one observation")


@dataclass
class ActionConfig:
    """How one policy action maps to a servo target (robosuite's OSC_POSE convention for delta)."""

    mode: Literal["delta", "absolute"]
    dim: int = 7                # position 0:3, rotation vector 3:6, then the gripper
    gripper_dim: int = 6
    position_scale: float = 0.05  # delta: metres per unit action per control step
    rotation_scale: float = 0.5   # delta: radians per unit action per control step
    gripper_open_width: float = 0.08
    gripper_closed_width: float = 0.0
    # robosuite's gripper: -1 opens, +1 closes; the sign is what is executed.

    def __post_init__(self) -> None:
        if self.dim < 7 or not 6 <= self.gripper_dim < self.dim:
            raise ValueError(f"action: dim {self.dim} with gripper_dim {self.gripper_dim} is not pos(3)+rotvec(3)+gripper")
        _positive("action", position_scale=self.position_scale, rotation_scale=self.rotation_scale)


@dataclass
class CameraConfig:
    """One camera of the bridge (deploy/cameras.py). Every frame carries its capture time
    on this computer's monotonic clock; the bridge holds the arm when a frame is older
    than `max_age_s` or the camera's frame counter stops advancing for that long."""

    name: str
    kind: Literal["opencv", "realsense", "mujoco"] = "opencv"
    # opencv: index ("0") or a path/URL; realsense: serial number ("" = the only one);
    # mujoco: a camera of the simulated arm's model (sim/arm_process.py: agentview, eye_in_hand)
    device: str = "0"
    width: int = 84
    height: int = 84
    fps: float = 30.0
    # opencv: frames are stamped this much before they arrive (measure it: docs/deploy.md);
    # realsense and mujoco stamp frames with the device's own capture time instead.
    latency_s: float = 0.0
    max_age_s: float = 0.25   # an older newest frame (or a frozen counter) holds the arm

    def __post_init__(self) -> None:
        _positive(f"camera {self.name!r}", width=self.width, height=self.height, fps=self.fps,
                  max_age_s=self.max_age_s)
        if self.latency_s < 0:
            raise ValueError(f"camera {self.name!r}: latency_s must be >= 0, got {self.latency_s}")
        # A healthy camera's newest frame is up to latency + one frame period old.
        fresh = self.latency_s + 1.0 / self.fps
        if self.max_age_s <= fresh:
            raise ValueError(f"camera {self.name!r}: max_age_s {self.max_age_s} must exceed latency_s + 1/fps "
                             f"({fresh:.3f} s), or every frame counts as stale; raise max_age_s")


@dataclass
class PolicyLinkConfig:
    endpoint: str = "tcp://127.0.0.1:5555"
    server_public_key: str = ""   # path to the server's public key file: enables CurveZMQ
    client_secret_key: str = ""   # path to this robot's secret key file
    action_latency_s: float = 0.0  # commands take this long to act: actions due sooner are stale
    timeout_s: float = 1.0


@dataclass
class BridgeConfig:
    name: str
    driver: DriverConfig
    safety: SafetyConfig
    spec: SpecConfig
    action: ActionConfig
    policy: PolicyLinkConfig = field(default_factory=PolicyLinkConfig)
    cameras: list[CameraConfig] = field(default_factory=list)
    dry_run: bool = False
    max_duration_s: float = 0.0   # 0: run until stopped

    def __post_init__(self) -> None:
        names = {c.name for c in self.cameras}
        if len(names) != len(self.cameras):
            raise ValueError("cameras: two cameras share a name")
        for c in self.cameras:
            if c.kind == "mujoco" and self.driver.kind != "mujoco":
                raise ValueError(f"camera {c.name!r} is rendered by the simulated arm (kind: mujoco), "
                                 f"which needs driver.kind: mujoco, not {self.driver.kind!r}")
        for o in self.spec.observations:
            if o.source == "camera" and o.camera not in names:
                raise ValueError(f"observation {o.key!r} uses camera {o.camera!r} not listed in cameras {sorted(names)}")
        if self.driver.servo_hz < self.spec.control_hz:
            raise ValueError(f"driver.servo_hz {self.driver.servo_hz} is below spec.control_hz {self.spec.control_hz}")
        if not self.action.gripper_closed_width <= self.safety.gripper_max_width or \
                not self.action.gripper_open_width <= self.safety.gripper_max_width:
            raise ValueError("action gripper widths exceed safety.gripper_max_width")


def without_cameras(cfg: BridgeConfig) -> BridgeConfig:
    """A copy of `cfg` that publishes the arm's state only (no camera observations or cameras)."""
    import copy

    out = copy.deepcopy(cfg)
    out.spec.observations = [o for o in out.spec.observations if o.source != "camera"]
    out.cameras = []
    return out


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> BridgeConfig:
    """Load a robot YAML (a bare name like 'sim' is deploy/configs/sim.yaml), plus `a.b=value` overrides."""
    return load_yaml(BridgeConfig, find_config(path, CONFIG_DIR), overrides)


__all__ = ["BridgeConfig", "ConfigError", "load_config"]
