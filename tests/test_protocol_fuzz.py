"""Decoder fuzzing: whatever bytes arrive, decode returns a message or raises
ProtocolError -- never another exception (a server must survive any input)."""
from __future__ import annotations

import msgpack
import numpy as np

from dpstack.runtime.protocol import MESSAGE_TYPES, ProtocolError, decode, encode
from test_protocol_messages import all_messages


def _decode_or_protocol_error(frames) -> bool:
    try:
        decode(frames)
        return True
    except ProtocolError:
        return False
    # any other exception propagates and fails the test


def _random_value(rng: np.random.Generator, depth: int = 0):
    kind = rng.integers(0, 10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        edge = [0, 1, -1, 2**63 - 1, -2**63, 2**64 - 1, int(rng.integers(-2**62, 2**62))]
        return edge[int(rng.integers(0, len(edge)))]
    if kind == 3:
        return float(rng.choice([0.5, -1e308, 1e308, np.nan, np.inf, -np.inf, 3.0]))
    if kind == 4:
        return rng.bytes(int(rng.integers(0, 8)))
    if kind == 5:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x3000, size=int(rng.integers(0, 12))))
    if kind == 6:
        return str(rng.choice(["float32", "uint8", "object", "<f4", "V8", "int64", "", "bool"]))
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {str(_random_value(rng, depth + 1)): _random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def test_random_bytes() -> None:
    rng = np.random.default_rng(0)
    decoded = 0
    for _ in range(2000):
        frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 5)))]
        decoded += _decode_or_protocol_error(frames)
    assert decoded == 0


def test_mutated_valid_messages() -> None:
    rng = np.random.default_rng(1)
    originals = [[bytes(f) for f in encode(m)] for m in all_messages()]
    decoded = 0
    for _ in range(4000):
        frames = [bytearray(f) for f in originals[int(rng.integers(0, len(originals)))]]
        op = rng.integers(0, 5)
        i = int(rng.integers(0, len(frames)))
        if op == 0 and frames[i]:      # flip some bytes
            for j in rng.integers(0, len(frames[i]), size=int(rng.integers(1, 4))):
                frames[i][j] ^= int(rng.integers(1, 256))
        elif op == 1:                  # truncate a frame
            frames[i] = frames[i][: int(rng.integers(0, len(frames[i]) + 1))]
        elif op == 2:                  # drop a frame
            del frames[i]
        elif op == 3:                  # duplicate a frame
            frames.insert(i, frames[i])
        else:                          # append random bytes
            frames[i] += rng.bytes(int(rng.integers(1, 16)))
        decoded += _decode_or_protocol_error([bytes(f) for f in frames])
    assert decoded < 4000  # the mutations did break most messages


def test_random_headers_of_known_types() -> None:
    rng = np.random.default_rng(2)
    types = list(MESSAGE_TYPES)
    for _ in range(3000):
        header = {"v": 1, "type": str(rng.choice(types))}
        for _ in range(int(rng.integers(0, 8))):
            key = str(rng.choice(["seq", "timestamp", "robot_id", "spec", "seed", "session_id", "policy", "start_time",
                                  "dt", "sampler", "compute_ms", "nfe", "code", "message", "reason", "stats", "episode",
                                  "server_time", "arrays", "x"]))
            header[key] = _random_value(rng)
        if rng.random() < 0.5:
            header["arrays"] = [{"name": _random_value(rng), "dtype": _random_value(rng),
                                 "shape": [int(s) for s in rng.integers(-2, 5, size=int(rng.integers(0, 4)))],
                                 "frame": int(rng.integers(-1, 3))} for _ in range(int(rng.integers(0, 3)))]
        frames = [msgpack.packb(header, use_bin_type=True)] + [rng.bytes(int(rng.integers(0, 32))) for _ in range(int(rng.integers(0, 3)))]
        _decode_or_protocol_error(frames)


def test_random_specs_in_hello() -> None:
    rng = np.random.default_rng(3)
    for _ in range(1500):
        spec = {"task": _random_value(rng), "robot": _random_value(rng), "control_hz": _random_value(rng),
                "observations": [{"key": _random_value(rng), "shape": _random_value(rng), "dtype": _random_value(rng),
                                  "names": _random_value(rng)} for _ in range(int(rng.integers(0, 3)))],
                "action": {"shape": _random_value(rng), "gripper_dims": _random_value(rng), "low": _random_value(rng)},
                "extra": _random_value(rng)}
        for k in list(spec):
            if rng.random() < 0.2:
                del spec[k]
        _decode_or_protocol_error([msgpack.packb({"v": 1, "type": "hello", "robot_id": "r", "seed": None, "spec": spec})])


def test_deeply_nested_header() -> None:
    deep: object = 1
    for _ in range(5000):
        deep = [deep]
    try:
        frame = msgpack.packb({"v": 1, "type": "stats", "stats": {"a": deep}})
    except ValueError:  # packer refuses very deep nesting; build the bytes by hand
        frame = b"\x83\xa1v\x01\xa4type\xa5stats\xa5stats\x81\xa1a" + b"\x91" * 5000 + b"\x01"
    _decode_or_protocol_error([frame])
