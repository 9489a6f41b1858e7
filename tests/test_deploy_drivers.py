"""Vendor drivers against FAKES of the vendor SDKs, and the MuJoCo arm as a real process.

We cannot reach UR or Franka hardware: FakeRtde* and FakeFranky below are test-only
classes with the methods our drivers call (ur_rtde 1.6 and franky-control 2.0 APIs),
recording every call, injected into the drivers. They check that the drivers call the
SDK as documented; they say nothing about the real controllers' behaviour.
The MujocoArm tests start sim/arm_process.py as a real subprocess.
"""
import time
import types

import numpy as np
import pytest

from dpstack.deploy import rotations as R
from dpstack.deploy.config import DriverConfig, FrankyOptions, MujocoArmOptions, UrRtdeOptions
from dpstack.deploy.drivers.base import ArmDriver, Pose
from dpstack.deploy.drivers.franky import FrankyDriver
from dpstack.deploy.drivers.ur_rtde import URRtdeDriver


# ------------------------------------------------------------------ fake ur_rtde
class Recorder:
    def __init__(self, log, name):
        self._log, self._name = log, name

    def __getattr__(self, method):
        def call(*args, **kwargs):
            self._log.append((self._name, method, args))
            return self._answer(method)
        return call

    def _answer(self, method):
        return None


class FakeRtdeControl(Recorder):
    def __init__(self, log, host, freq):
        super().__init__(log, "control")
        log.append(("control", "__init__", (host, freq)))
        self.running = True

    def _answer(self, method):
        if method == "isProgramRunning":
            return self.running
        return True


class FakeRtdeReceive(Recorder):
    def __init__(self, log, host, freq):
        super().__init__(log, "receive")

    def _answer(self, method):
        if method == "getActualTCPPose":
            return [0.1, -0.4, 0.3, np.pi, 0.0, 0.0]
        if method == "getActualQ":
            return [0.0, -1.5, 1.5, -1.5, -1.5, 0.0]
        return True


def fake_rtde_modules(log):
    holder = {}

    def control(host, freq):
        holder["control"] = FakeRtdeControl(log, host, freq)
        return holder["control"]

    return (types.SimpleNamespace(RTDEControlInterface=control),
            types.SimpleNamespace(RTDEReceiveInterface=lambda h, f: FakeRtdeReceive(log, h, f)),
            types.SimpleNamespace(RTDEIOInterface=lambda h: Recorder(log, "io"))), holder


def ur_config(**opts):
    return DriverConfig(kind="ur_rtde", host="10.0.0.2", servo_hz=500,
                        ur_rtde=UrRtdeOptions(lookahead_time=0.1, gain=300, watchdog_min_hz=10,
                                              gripper="tool_digital_out", **opts))


def test_ur_driver_arms_and_kicks_the_rtde_watchdog_and_servos_with_configured_params():
    log = []
    sdk, holder = fake_rtde_modules(log)
    drv = URRtdeDriver(ur_config(), sdk=sdk)
    assert isinstance(drv, ArmDriver)
    drv.connect()
    assert ("control", "__init__", ("10.0.0.2", 500)) in log
    assert ("control", "setWatchdog", (10.0,)) in log
    state = drv.read_state()
    assert R.angle_between(state.pose.quat, R.from_rotvec(np.array([np.pi, 0, 0]))) < 1e-9
    log.clear()
    for i in range(5):
        drv.servo(Pose(np.array([0.1, -0.4, 0.3 + 0.001 * i]), state.pose.quat))
    kicks = [c for c in log if c[1] == "kickWatchdog"]
    servos = [c for c in log if c[1] == "servoL"]
    assert len(kicks) == 5 and len(servos) == 5
    # Each cycle: kick first, then servoL(pose, speed, accel, time, lookahead, gain).
    assert [c[1] for c in log[:2]] == ["kickWatchdog", "servoL"]
    pose, speed, accel, t, lookahead, gain = servos[-1][2]
    np.testing.assert_allclose(pose[:3], [0.1, -0.4, 0.304])
    np.testing.assert_allclose(np.abs(pose[3:]), [np.pi, 0, 0], atol=1e-9)
    assert (t, lookahead, gain) == (pytest.approx(1 / 500), 0.1, 300)
    drv.gripper(0.0)
    drv.gripper(0.0)   # unchanged: not sent again
    drv.gripper(0.08)
    assert [c for c in log if c[1] == "setToolDigitalOut"] == [("io", "setToolDigitalOut", (0, True)),
                                                                ("io", "setToolDigitalOut", (0, False))]


def test_ur_driver_stop_is_servo_stop_and_resuming_reuploads_a_dead_script():
    log = []
    sdk, holder = fake_rtde_modules(log)
    drv = URRtdeDriver(ur_config(stop_deceleration=3.0), sdk=sdk)
    drv.connect()
    drv.stop()
    drv.stop()  # idempotent
    assert [c for c in log if c[1] == "servoStop"] == [("control", "servoStop", (3.0,))]
    holder["control"].running = False   # RTDE watchdog ended the script while stopped
    log.clear()
    drv.servo(Pose(np.array([0.1, -0.4, 0.3]), R.IDENTITY))
    assert [c[1] for c in log] == ["isProgramRunning", "reuploadScript", "setWatchdog", "kickWatchdog",
                                   "kickWatchdog", "servoL"]
    log.clear()
    drv.close()
    assert [c[:2] for c in log] == [("control", "servoStop"), ("control", "stopScript"), ("control", "disconnect"),
                                    ("receive", "disconnect"), ("io", "disconnect")]


# ------------------------------------------------------------------ fake franky
class FakeFranky:
    """The parts of `franky` the driver uses, recording calls in .log."""

    def __init__(self):
        self.log = []
        log = self.log

        class Affine:
            def __init__(self, translation, quaternion):
                self.translation = np.asarray(translation)
                self.quaternion = np.asarray(quaternion)

        class CartesianMotion:
            def __init__(self, target, reference):
                self.target, self.reference = target, reference

        class Robot:
            def __init__(self, host):
                log.append(("Robot", host))
                self._factor = None

            @property
            def relative_dynamics_factor(self):
                return self._factor

            @relative_dynamics_factor.setter
            def relative_dynamics_factor(self, v):
                log.append(("relative_dynamics_factor", v))
                self._factor = v

            def recover_from_errors(self):
                log.append(("recover_from_errors",))

            def move(self, motion, asynchronous=False):
                log.append(("move", motion, asynchronous))

            def stop(self):
                log.append(("stop",))

            @property
            def current_cartesian_state(self):
                pose = types.SimpleNamespace(end_effector_pose=Affine([0.4, 0.0, 0.3], [1.0, 0.0, 0.0, 0.0]))
                return types.SimpleNamespace(pose=pose)

            @property
            def current_joint_state(self):
                return types.SimpleNamespace(position=np.zeros(7))

        class Gripper:
            max_width = 0.08
            width = 0.08

            def __init__(self, host):
                log.append(("Gripper", host))

            def move_async(self, width, speed):
                log.append(("move_async", width, speed))

            def grasp_async(self, width, speed, force, epsilon_inner, epsilon_outer):
                log.append(("grasp_async", width, speed, force))

        self.Affine, self.CartesianMotion, self.Robot, self.Gripper = Affine, CartesianMotion, Robot, Gripper
        self.ReferenceType = types.SimpleNamespace(Absolute="Absolute", Relative="Relative")


def test_franky_driver_sets_dynamics_and_streams_absolute_async_cartesian_motions():
    franky = FakeFranky()
    cfg = DriverConfig(kind="franky", host="172.16.0.2", servo_hz=125,
                       franky=FrankyOptions(relative_dynamics_factor=0.15, gripper_speed=0.04, gripper_force=15.0))
    drv = FrankyDriver(cfg, sdk=franky)
    assert isinstance(drv, ArmDriver)
    info = drv.connect()
    assert ("Robot", "172.16.0.2") in franky.log and ("relative_dynamics_factor", 0.15) in franky.log
    assert info.gripper_max_width == 0.08
    state = drv.read_state()
    np.testing.assert_allclose(state.pose.position, [0.4, 0.0, 0.3])
    franky.log.clear()
    target = Pose(np.array([0.41, 0.01, 0.29]), np.array([1.0, 0.0, 0.0, 0.0]))
    drv.servo(target)
    (name, motion, asynchronous), = franky.log
    assert name == "move" and asynchronous is True and motion.reference == "Absolute"
    np.testing.assert_allclose(motion.target.translation, target.position)
    np.testing.assert_allclose(motion.target.quaternion, target.quat)
    franky.log.clear()
    drv.gripper(0.08)   # open: move
    drv.gripper(0.079)  # inside the deadband: nothing
    drv.gripper(0.0)    # close: grasp, so an object in the way is not an error
    assert franky.log == [("move_async", 0.08, 0.04), ("grasp_async", 0.0, 0.04, 15.0)]
    franky.log.clear()
    drv.stop()
    drv.servo(target)   # resuming after a stop recovers from errors first
    assert [e[0] for e in franky.log] == ["stop", "recover_from_errors", "move"]


# ------------------------------------------------------------------ MujocoArm: a real process
@pytest.mark.parametrize("servo_hz", [125, 500])
def test_mujoco_arm_process_tracks_a_servo_target_and_reports_timestamped_state(servo_hz):
    from dpstack.deploy.drivers.mujoco_arm import MujocoArm

    cfg = DriverConfig(kind="mujoco", servo_hz=servo_hz, mujoco=MujocoArmOptions(bandwidth_hz=8.0, command_latency_s=0.004))
    drv = MujocoArm(cfg)
    info = drv.connect()
    try:
        assert drv.process.alive() and info.joint_lower.shape == (7,)
        s0 = drv.read_state()
        goal = s0.pose.position + np.array([0.03, -0.02, 0.04])
        stamps, errs = [], []
        next_t = time.monotonic()
        for i in range(int(1.2 * servo_hz)):
            drv.servo(Pose(goal, s0.pose.quat))
            s = drv.read_state()
            stamps.append(s.t)
            errs.append(np.linalg.norm(s.pose.position - goal))
            next_t += 1.0 / servo_hz
            time.sleep(max(0.0, next_t - time.monotonic()))
        stamps = np.array(stamps)
        assert np.all(np.diff(stamps) >= 0)                       # timestamps never go back
        assert abs(stamps[-1] - time.monotonic()) < 0.1          # on this computer's monotonic clock
        # The state keeps refreshing (the rate itself is a benchmark: `dpstack bench servo`;
        # an oversubscribed 2-core machine got 34 fresh samples of 600 at 500 Hz).
        assert len(np.unique(stamps)) >= 10
        assert errs[0] > 0.05                                     # it starts away from the goal ...
        assert errs[-1] < 0.003                                   # ... and tracks it with lag, not instantly
        assert np.argmax(np.array(errs) < 0.01) > 0.05 * servo_hz
        assert drv.last_raw["servo_count"] > 0.25 * servo_hz
        # stop: the controller brakes and holds where it is.
        drv.stop()
        time.sleep(0.3)
        held = drv.read_state().pose.position
        time.sleep(0.3)
        assert np.linalg.norm(drv.read_state().pose.position - held) < 0.003
        assert drv.last_raw["mode"] == "stopped"
    finally:
        drv.close()
    assert drv.process is None
