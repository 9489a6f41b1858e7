"""Quaternion maths and servo-rate interpolation (deploy/rotations.py, deploy/interpolate.py)."""
import numpy as np
import pytest

from dpstack.deploy import rotations as R
from dpstack.deploy.interpolate import PoseTrajectory, Waypoint


def about(axis, angle):
    axis = np.asarray(axis, dtype=float)
    return R.from_rotvec(axis / np.linalg.norm(axis) * angle)


def test_rotvec_round_trip_and_matrix_agree():
    rng = np.random.default_rng(0)
    for _ in range(200):
        r = rng.normal(size=3)
        r *= rng.uniform(0, np.pi - 1e-3) / np.linalg.norm(r)
        q = R.from_rotvec(r)
        assert np.isclose(np.linalg.norm(q), 1.0)
        np.testing.assert_allclose(R.to_rotvec(q), r, atol=1e-9)
        assert R.angle_between(R.from_matrix(R.to_matrix(q)), q) < 1e-6
        v = rng.normal(size=3)
        # Rotating a vector with q*v*q^-1 equals the matrix product.
        qv = R.multiply(R.multiply(q, np.r_[v, 0.0]), R.conjugate(q))[:3]
        np.testing.assert_allclose(qv, R.to_matrix(q) @ v, atol=1e-9)


def test_small_angles_are_exact_enough():
    r = np.array([1e-10, -2e-10, 0.0])
    np.testing.assert_allclose(R.to_rotvec(R.from_rotvec(r)), r, atol=1e-15)


def test_error_rotvec_inverts_apply():
    a = about([0, 0, 1], 0.3)
    b = about([1, 1, 0], 1.1)
    e = R.error_rotvec(a, b)
    assert R.angle_between(R.apply_rotvec(a, e), b) < 1e-9


def test_slerp_endpoints_midpoint_and_unit_norm():
    a = about([0, 0, 1], 0.2)
    b = about([0, 0, 1], 1.4)
    np.testing.assert_allclose(R.slerp(a, b, 0.0), a, atol=1e-12)
    np.testing.assert_allclose(R.slerp(a, b, 1.0), b, atol=1e-12)
    np.testing.assert_allclose(R.slerp(a, b, 0.5), about([0, 0, 1], 0.8), atol=1e-12)
    s = np.linspace(0, 1, 11)
    qs = R.slerp(a, b, s)
    np.testing.assert_allclose(np.linalg.norm(qs, axis=-1), 1.0, atol=1e-12)
    # Constant angular speed: equal angles between equal steps.
    steps = [R.angle_between(qs[i], qs[i + 1]) for i in range(10)]
    np.testing.assert_allclose(steps, 0.12, atol=1e-9)


def test_slerp_takes_the_short_arc_for_opposite_sign_quaternions():
    a = about([1, 0, 0], 0.1)
    b = -about([1, 0, 0], 0.3)       # same rotation as +q
    mid = R.slerp(a, b, 0.5)
    assert R.angle_between(mid, about([1, 0, 0], 0.2)) < 1e-9


def test_slerp_of_nearly_identical_rotations_is_finite():
    a = about([0, 1, 0], 0.5)
    b = R.apply_rotvec(a, np.array([0, 1e-9, 0]))
    assert np.all(np.isfinite(R.slerp(a, b, 0.3)))


def test_trajectory_linear_position_slerp_rotation_and_holds_at_ends():
    q0, q1 = about([0, 0, 1], 0.0), about([0, 0, 1], 1.0)
    traj = PoseTrajectory([Waypoint(1.0, np.zeros(3), q0, 0.08), Waypoint(2.0, np.array([0.1, -0.2, 0.3]), q1, 0.0)])
    mid = traj.sample(1.25)
    np.testing.assert_allclose(mid.position, [0.025, -0.05, 0.075], atol=1e-12)
    assert R.angle_between(mid.quat, about([0, 0, 1], 0.25)) < 1e-9
    assert mid.gripper == pytest.approx(0.06)
    np.testing.assert_allclose(traj.sample(0.0).position, 0.0)        # before: first waypoint
    np.testing.assert_allclose(traj.sample(9.0).position, [0.1, -0.2, 0.3])  # after: last, never extrapolated
    assert R.angle_between(traj.sample(9.0).quat, q1) < 1e-12


def test_trajectory_rejects_unordered_times():
    w = Waypoint(1.0, np.zeros(3), R.IDENTITY, 0.0)
    with pytest.raises(ValueError, match="increase"):
        PoseTrajectory([w, Waypoint(1.0, np.ones(3), R.IDENTITY, 0.0)])
