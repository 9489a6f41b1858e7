"""Wire protocol: every message round-trips; every kind of bad input is a ProtocolError."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from dpstack.runtime.protocol import (ALLOWED_DTYPES, PROTOCOL_VERSION, ActionReply, Bye, Error, ErrorCode, Heartbeat,
                              HeartbeatAck, Hello, HelloAck, Limits, Observation, PolicyInfo, ProtocolError,
                              Reset, ResetAck, Stats, StatsRequest, check_actions, check_arrays, decode, encode)
from echo_server import ECHO_SPEC, echo_info, echo_observation


def _same(a, b) -> None:
    assert type(a) is type(b)
    for name in a.FIELDS:
        assert getattr(a, name) == getattr(b, name), name
    fa, fb = a.array_fields(), b.array_fields()
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape
        np.testing.assert_array_equal(fa[k], fb[k])


def all_messages() -> list:
    rng = np.random.default_rng(1)
    return [
        Hello("arm-1", ECHO_SPEC, seed=7),
        Hello("arm-2", ECHO_SPEC),
        HelloAck("abc123", echo_info()),
        HelloAck("abc124", echo_info(startup_s=0.8)),
        Observation(3, 12.25, echo_observation(rng)),
        Observation(4, 0.0, {}, infer=False),
        ActionReply(3, 12.25, 0.05, rng.normal(size=(8, 3)).astype(np.float32), "streaming", 1.5, 1),
        ActionReply(9, 1.0, 0.1, rng.normal(size=(1, 7)), "ddim", 0.0, 10),
        ActionReply(10, 1.0, 0.05, rng.normal(size=(15, 7)).astype(np.float32), "rti-renoise-20,8,0", 2.0, 3, replan_after=1),
        Reset(seed=5), Reset(), ResetAck(2),
        Heartbeat(123.5), HeartbeatAck(123.5, 1.7e9),
        Error(ErrorCode.BAD_SHAPE.value, "state: shape (3,)", seq=4), Error("internal", "x"),
        Bye("done"), StatsRequest(), Stats({"chunks": 3, "compute": {"n": 1, "p50_ms": 1.0}}),
    ]


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: m.TYPE)
def test_round_trip(msg) -> None:
    frames = encode(msg)
    _same(decode(frames), msg)
    # also from zmq-like frames exposing .buffer (the server decodes zmq.Frame objects)
    class F:
        def __init__(self, b): self.buffer = memoryview(bytes(b))
    _same(decode([F(f) for f in frames]), msg)


def test_arrays_keep_dtype_shape_and_layout() -> None:
    arrays = {dt: (np.arange(6).reshape(2, 3) % 2).astype(dt) for dt in ALLOWED_DTYPES}
    arrays["fortran"] = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    arrays["scalar"] = np.array(2.5)
    arrays["big_endian"] = np.arange(4, dtype=">f8")
    out = decode(encode(Observation(1, 0.0, arrays)), Limits(max_arrays=16)).arrays
    for k, a in arrays.items():
        assert out[k].shape == a.shape and out[k].dtype.name == a.dtype.name
        np.testing.assert_array_equal(out[k], a)
        assert out[k].flags.writeable and out[k].flags.c_contiguous


def test_header_is_msgpack_with_documented_fields() -> None:
    obs = Observation(5, 1.5, {"state": np.zeros(4, np.float32)})
    frames = encode(obs)
    header = msgpack.unpackb(frames[0])
    assert header == {"v": PROTOCOL_VERSION, "type": "observation", "seq": 5, "timestamp": 1.5, "infer": True,
                      "arrays": [{"name": "state", "dtype": "float32", "shape": [4], "frame": 1}]}
    assert bytes(frames[1]) == np.zeros(4, "<f4").tobytes()


def test_infer_flag_is_optional_on_the_wire() -> None:
    h = _header()
    assert "infer" not in h and decode(_frames(h, GOOD)).infer is True


def test_encode_refuses_object_arrays() -> None:
    with pytest.raises(ProtocolError) as e:
        encode(Observation(1, 0.0, {"x": np.array([object()])}))
    assert e.value.code is ErrorCode.BAD_DTYPE


# ---------------------------------------------------------------- malformed input

def _header(**over) -> dict:
    h = {"v": PROTOCOL_VERSION, "type": "observation", "seq": 1, "timestamp": 0.5,
         "arrays": [{"name": "state", "dtype": "float32", "shape": [4], "frame": 1}]}
    h.update(over)
    return {k: v for k, v in h.items() if v is not ...}


def _frames(header: dict, *data: bytes) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *data]


GOOD = np.ones(4, np.float32).tobytes()

BAD_CASES = {
    "empty message": ([], ErrorCode.BAD_FRAMING),
    "random header": ([b"\xc1\xff\x00garbage"], ErrorCode.BAD_FRAMING),
    "header not a map": ([msgpack.packb([1, 2, 3])], ErrorCode.BAD_FRAMING),
    "wrong version": (_frames(_header(v=2), GOOD), ErrorCode.BAD_VERSION),
    "missing version": (_frames(_header(v=...), GOOD), ErrorCode.BAD_VERSION),
    "version as bool": (_frames(_header(v=True), GOOD), ErrorCode.BAD_VERSION),
    "unknown type": (_frames(_header(type="teleport"), GOOD), ErrorCode.UNKNOWN_TYPE),
    "type not a string": (_frames(_header(type=[1]), GOOD), ErrorCode.UNKNOWN_TYPE),
    "seq as string": (_frames(_header(seq="1"), GOOD), ErrorCode.BAD_HEADER),
    "seq negative": (_frames(_header(seq=-1), GOOD), ErrorCode.BAD_VALUE),
    "seq as bool": (_frames(_header(seq=True), GOOD), ErrorCode.BAD_HEADER),
    "infer not a bool": (_frames(_header(infer=1), GOOD), ErrorCode.BAD_HEADER),
    "timestamp missing": (_frames(_header(timestamp=...), GOOD), ErrorCode.BAD_HEADER),
    "timestamp NaN": (_frames(_header(timestamp=float("nan")), GOOD), ErrorCode.NOT_FINITE),
    "arrays not a list": (_frames(_header(arrays={"a": 1}), GOOD), ErrorCode.BAD_HEADER),
    "descriptor not a map": (_frames(_header(arrays=[3]), GOOD), ErrorCode.BAD_HEADER),
    "pickle dtype": (_frames(_header(arrays=[{"name": "state", "dtype": "object", "shape": [4], "frame": 1}]), GOOD), ErrorCode.BAD_DTYPE),
    "complex dtype": (_frames(_header(arrays=[{"name": "state", "dtype": "complex64", "shape": [2], "frame": 1}]), GOOD), ErrorCode.BAD_DTYPE),
    "shape vs bytes": (_frames(_header(arrays=[{"name": "state", "dtype": "float32", "shape": [5], "frame": 1}]), GOOD), ErrorCode.BAD_SHAPE),
    "negative dim": (_frames(_header(arrays=[{"name": "state", "dtype": "float32", "shape": [-4], "frame": 1}]), GOOD), ErrorCode.BAD_SHAPE),
    "shape not a list": (_frames(_header(arrays=[{"name": "state", "dtype": "float32", "shape": "4", "frame": 1}]), GOOD), ErrorCode.BAD_SHAPE),
    "too many dims": (_frames(_header(arrays=[{"name": "state", "dtype": "float32", "shape": [1, 1, 1, 1, 4], "frame": 1}]), GOOD), ErrorCode.BAD_SHAPE),
    "huge shape": (_frames(_header(arrays=[{"name": "state", "dtype": "float64", "shape": [2**40, 2**40], "frame": 1}]), GOOD), ErrorCode.TOO_LARGE),
    "frame index out of range": (_frames(_header(arrays=[{"name": "state", "dtype": "float32", "shape": [4], "frame": 2}]), GOOD), ErrorCode.BAD_FRAMING),
    "frame index zero": (_frames(_header(arrays=[{"name": "state", "dtype": "float32", "shape": [4], "frame": 0}]), GOOD), ErrorCode.BAD_FRAMING),
    "frame used twice": (_frames(_header(arrays=[{"name": "a", "dtype": "float32", "shape": [4], "frame": 1},
                                                 {"name": "b", "dtype": "float32", "shape": [4], "frame": 1}]), GOOD), ErrorCode.BAD_FRAMING),
    "undescribed frame": (_frames(_header(), GOOD, GOOD), ErrorCode.BAD_FRAMING),
    "truncated frame": (_frames(_header(), GOOD[:-3]), ErrorCode.BAD_SHAPE),
    "missing frame": (_frames(_header()), ErrorCode.BAD_FRAMING),
    "NaN in array": (_frames(_header(), np.array([0, np.nan, 0, 0], np.float32).tobytes()), ErrorCode.NOT_FINITE),
    "Inf in array": (_frames(_header(), np.array([0, 0, -np.inf, 0], np.float32).tobytes()), ErrorCode.NOT_FINITE),
    "too many frames": ([msgpack.packb(_header())] + [b""] * 40, ErrorCode.TOO_LARGE),
    "hello without spec": (_frames({"v": 1, "type": "hello", "robot_id": "r", "seed": None}), ErrorCode.BAD_HEADER),
    "hello with broken spec": (_frames({"v": 1, "type": "hello", "robot_id": "r", "seed": None,
                                        "spec": {"task": 1, "robot": "x", "control_hz": "fast", "observations": 5}}), ErrorCode.BAD_HEADER),
    "hello spec with bad action": (_frames({"v": 1, "type": "hello", "robot_id": "r", "seed": None,
                                            "spec": {**ECHO_SPEC.to_dict(), "action": {"shape": [2, 2]}}}), ErrorCode.BAD_SHAPE),
    "arrays on a reset": (_frames({"v": 1, "type": "reset", "seed": 1, "arrays": _header()["arrays"]}, GOOD), ErrorCode.UNEXPECTED_KEY),
    "actions 1-D": (_frames({"v": 1, "type": "actions", "seq": 1, "start_time": 0.0, "dt": 0.1, "sampler": "", "compute_ms": 0.0, "nfe": 0,
                             "arrays": [{"name": "actions", "dtype": "float32", "shape": [4], "frame": 1}]}, GOOD), ErrorCode.BAD_SHAPE),
    "actions integer": (_frames({"v": 1, "type": "actions", "seq": 1, "start_time": 0.0, "dt": 0.1, "sampler": "", "compute_ms": 0.0, "nfe": 0,
                                 "arrays": [{"name": "actions", "dtype": "int32", "shape": [1, 4], "frame": 1}]}, GOOD), ErrorCode.BAD_SHAPE),
    "replan_after past the chunk": (_frames({"v": 1, "type": "actions", "seq": 1, "start_time": 0.0, "dt": 0.1, "sampler": "", "compute_ms": 0.0,
                                             "nfe": 0, "replan_after": 2,
                                             "arrays": [{"name": "actions", "dtype": "float32", "shape": [1, 4], "frame": 1}]}, GOOD), ErrorCode.BAD_VALUE),
    "replan_after zero": (_frames({"v": 1, "type": "actions", "seq": 1, "start_time": 0.0, "dt": 0.1, "sampler": "", "compute_ms": 0.0,
                                   "nfe": 0, "replan_after": 0,
                                   "arrays": [{"name": "actions", "dtype": "float32", "shape": [1, 4], "frame": 1}]}, GOOD), ErrorCode.BAD_VALUE),
    "long string": (_frames({"v": 1, "type": "bye", "reason": "x" * 5000}), ErrorCode.TOO_LARGE),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=str)
def test_bad_input_is_a_protocol_error_with_its_code(case) -> None:
    frames, code = BAD_CASES[case]
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code is code, e.value


def test_limits_are_enforced() -> None:
    small = Limits(max_message_bytes=1000, max_array_bytes=100, max_header_bytes=200)
    with pytest.raises(ProtocolError) as e:
        decode(encode(Observation(1, 0.0, {"x": np.zeros(30, np.float32)})), small)
    assert e.value.code is ErrorCode.TOO_LARGE and "'x'" in e.value.message
    with pytest.raises(ProtocolError) as e:
        decode(encode(Observation(1, 0.0, {"x": np.zeros(10, np.float32), "y": np.zeros(20, np.float32),
                                           "z": np.zeros(20, np.float32), "w": np.zeros(20, np.float32)})),
               Limits(max_message_bytes=250))
    assert e.value.code is ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError) as e:
        decode(encode(Stats({"k" * 300: 1})), small)
    assert e.value.code is ErrorCode.TOO_LARGE and "header" in e.value.message
    # default total limit: 16 MiB
    with pytest.raises(ProtocolError) as e:
        decode(encode(Observation(1, 0.0, {f"a{i}": np.zeros(2**20, np.float64) for i in range(3)})))
    assert e.value.code is ErrorCode.TOO_LARGE


def test_accept_restricts_message_types() -> None:
    with pytest.raises(ProtocolError) as e:
        decode(encode(HelloAck("s", echo_info())), accept=(Hello, Observation))
    assert e.value.code is ErrorCode.UNKNOWN_TYPE


def test_check_arrays_against_spec() -> None:
    rng = np.random.default_rng(0)
    good = echo_observation(rng)
    check_arrays(good, ECHO_SPEC.observations)
    cases = {
        ErrorCode.MISSING_KEY: {"state": good["state"]},
        ErrorCode.UNEXPECTED_KEY: {**good, "extra": np.zeros(1, np.float32)},
        ErrorCode.BAD_SHAPE: {**good, "state": np.zeros(3, np.float32)},
        ErrorCode.BAD_DTYPE: {**good, "image": good["image"].astype(np.float32)},
    }
    for code, arrays in cases.items():
        with pytest.raises(ProtocolError) as e:
            check_arrays(arrays, ECHO_SPEC.observations)
        assert e.value.code is code


def test_check_actions_against_spec() -> None:
    check_actions(ActionReply(1, 0.0, 0.05, np.zeros((4, 3), np.float32)), ECHO_SPEC.action)
    for reply in (ActionReply(1, 0.0, 0.05, np.zeros((4, 7), np.float32)),
                  ActionReply(1, 0.0, 0.0, np.zeros((4, 3), np.float32))):
        with pytest.raises(ProtocolError):
            check_actions(reply, ECHO_SPEC.action)


def test_policy_info_round_trip() -> None:
    info = echo_info()
    assert PolicyInfo.from_dict(info.to_dict()) == info
    # startup_s is optional: absent from a server that does not measure it, a number otherwise
    assert "startup_s" not in info.to_dict() and PolicyInfo.from_dict(info.to_dict()).startup_s is None
    told = echo_info(startup_s=0.8)
    assert PolicyInfo.from_dict(told.to_dict()).startup_s == 0.8
    with pytest.raises(ProtocolError):
        PolicyInfo.from_dict({**told.to_dict(), "startup_s": "slow"})


def test_policy_info_carries_the_typed_sampler_name_and_what_it_resolved_to() -> None:
    from dataclasses import replace

    info = replace(echo_info(), sampler="rti", sampler_resolved="rti-renoise-20,8,0")
    assert PolicyInfo.from_dict(info.to_dict()) == info
    older = info.to_dict()
    del older["sampler_resolved"]  # a server from before the field: still understood
    assert PolicyInfo.from_dict(older).sampler_resolved == ""
