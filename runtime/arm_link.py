"""The link between a simulated arm controller (sim/arm_process.py) and its driver
(deploy/drivers/mujoco_arm.py), like the one between a vendor controller and its SDK.

Two ZeroMQ sockets: the controller PUBlishes its state every servo tick (the driver
SUBscribes with CONFLATE, so it always reads the newest), the driver PUSHes commands.
Each message is ONE frame: a msgpack map whose arrays are {dtype, shape, data}
(raw little-endian bytes, dtype whitelisted, shape checked against the byte count).
One frame because CONFLATE keeps only whole single-part messages. No pickle.

It lives in runtime/ because both sim/ and deploy/ speak it and neither may import
the other; it imports neither torch nor mujoco.
"""
from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

ALLOWED_DTYPES = ("float32", "float64", "int64", "uint8", "bool")
MAX_MESSAGE_BYTES = 1 << 20

# Command kinds the controller accepts.
SERVO = "servo"      # pos (3,), quat (4,) x y z w: the Cartesian target for this cycle
GRIPPER = "gripper"  # width: float, metres
STOP = "stop"        # decelerate and hold where the arm is; servo commands resume motion
QUIT = "quit"        # end the controller process
STATE = "state"      # controller -> driver
FRAME = "frame"      # controller -> driver, one per camera socket: name, t, seq, image (H, W, 3) uint8


class LinkError(ValueError):
    """A malformed arm-link message."""


def _pack_array(a: np.ndarray) -> dict[str, Any]:
    a = np.asarray(a)
    if a.dtype.name not in ALLOWED_DTYPES:
        raise LinkError(f"dtype {a.dtype} not in {ALLOWED_DTYPES}")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"__array__": True, "dtype": a.dtype.name, "shape": list(a.shape), "data": np.ascontiguousarray(a).tobytes()}


def _unpack_array(d: dict) -> np.ndarray:
    dtype, shape, data = d.get("dtype"), d.get("shape"), d.get("data")
    if dtype not in ALLOWED_DTYPES or not isinstance(shape, list) or not isinstance(data, bytes):
        raise LinkError("bad array descriptor")
    if len(shape) > 4 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise LinkError(f"bad array shape {shape}")
    dt = np.dtype(dtype).newbyteorder("<")
    if math.prod(shape) * dt.itemsize != len(data):
        raise LinkError(f"shape {shape} {dtype} does not match {len(data)} bytes")
    return np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))


def encode(kind: str, **fields: Any) -> bytes:
    body: dict[str, Any] = {"kind": kind}
    for k, v in fields.items():
        body[k] = _pack_array(v) if isinstance(v, np.ndarray) else v
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes) -> dict[str, Any]:
    """One frame -> a dict with 'kind' and its fields; raises LinkError on anything malformed."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise LinkError(f"message of {len(frame)} bytes over {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:
        raise LinkError(f"not msgpack ({type(e).__name__})") from None
    if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
        raise LinkError("message is not a map with a 'kind'")
    out = {}
    for k, v in body.items():
        out[k] = _unpack_array(v) if isinstance(v, dict) and v.get("__array__") is True else v
    return out
