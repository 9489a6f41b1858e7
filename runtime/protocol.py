"""The wire protocol between a robot (client) and a policy server.

A message is a ZeroMQ multipart message: frame 0 is a msgpack map (the header:
protocol version, message type, the message's fields, and a descriptor per
array), frames 1.. are the arrays' raw little-endian C-order bytes. Nothing is
ever pickled: a header can only hold maps, lists, strings and numbers, and an
array is rebuilt from a whitelisted dtype and a checked shape. Every field is
checked for its type and its range when decoded, so no value a peer sends reaches
a policy (numpy) unchecked.

`decode` never raises anything but `ProtocolError` (a code and a message) on bad
input, whatever the bytes; the spec a robot team implements is docs/protocol.md.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence, Union

import msgpack
import numpy as np

from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

PROTOCOL_VERSION = 1

# Little-endian only on the wire; names as numpy spells them.
ALLOWED_DTYPES = ("bool", "uint8", "uint16", "int32", "int64", "float32", "float64")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Seeds are uint32: every numpy seeding API (default_rng, SeedSequence, the legacy
# RandomState) takes them, and so does a robot's C++ or Rust client.
SEED_MAX = 2**32 - 1


class ErrorCode(str, enum.Enum):
    """Error codes carried by `Error` messages (strings on the wire)."""

    BAD_FRAMING = "bad_framing"          # frame structure or msgpack unreadable
    BAD_VERSION = "bad_version"          # protocol version not supported
    BAD_HEADER = "bad_header"            # a header field missing or of the wrong type, or a map key not a string
    BAD_VALUE = "bad_value"              # a field of the right type with a value outside its range
    UNKNOWN_TYPE = "unknown_type"        # message type not known (or not accepted here)
    TOO_LARGE = "too_large"              # message, header, array, frame count or nesting over the limits
    BAD_DTYPE = "bad_dtype"              # dtype not whitelisted or not the declared one
    BAD_SHAPE = "bad_shape"              # shape disagrees with the bytes or the declared spec
    NOT_FINITE = "not_finite"            # NaN or Inf in a float array
    MISSING_KEY = "missing_key"          # an array the spec requires is absent
    UNEXPECTED_KEY = "unexpected_key"    # an array the spec does not declare
    SPEC_MISMATCH = "spec_mismatch"      # Hello: the robot's spec cannot be served by this policy
    NO_SESSION = "no_session"            # no live session for this peer: send Hello again
    OUT_OF_ORDER = "out_of_order"        # observation seq not greater than the previous one
    TOO_MANY_SESSIONS = "too_many_sessions"
    POLICY_ERROR = "policy_error"        # the policy failed on this observation
    INTERNAL = "internal"                # a server bug; the server keeps serving


class ProtocolError(Exception):
    """Bad input on the wire. `code` is an ErrorCode, `message` says what and where."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts; both ends may tighten these."""

    max_message_bytes: int = 16 * 2**20
    max_array_bytes: int = 8 * 2**20
    max_header_bytes: int = 64 * 2**10
    max_arrays: int = 16
    max_ndim: int = 4
    max_string: int = 1024
    max_depth: int = 32   # nesting of maps and lists in the header


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------- fields
# A header field is checked by one of these; each returns the clean value or raises.

def _bad(name: str, what: str, got: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_HEADER, f"field {name!r}: expected {what}, got {type(got).__name__}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_range(name: str, v: int, low: int, high: int) -> int:
    if not low <= v <= high:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"field {name!r}: {v} is not in {low}..{high}")
    return v


def _ints_in(low: int, high: int) -> Callable[[str, Any, Limits], int]:
    """A checker for an int field whose values lie in low..high."""
    def checked(name: str, v: Any, limits: Limits) -> int:
        if not _is_int(v):
            raise _bad(name, "an int", v)
        return _in_range(name, v, low, high)
    return checked


_int = _ints_in(INT64_MIN, INT64_MAX)
_uint = _ints_in(0, INT64_MAX)
_count = _ints_in(1, INT64_MAX)
_seed = _ints_in(0, SEED_MAX)


def _float(name: str, v: Any, limits: Limits) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, "a number", v)
    v = float(v)
    if not math.isfinite(v):
        raise ProtocolError(ErrorCode.NOT_FINITE, f"field {name!r} is {v}")
    return v


def _positive(name: str, v: Any, limits: Limits) -> float:
    v = _float(name, v, limits)
    if v <= 0:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"field {name!r}: must be > 0, got {v}")
    return v


def _str(name: str, v: Any, limits: Limits) -> str:
    if not isinstance(v, str):
        raise _bad(name, "a string", v)
    if len(v) > limits.max_string:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"field {name!r}: string of {len(v)} chars over {limits.max_string}")
    return v


def _infer_flag(name: str, v: Any, limits: Limits) -> bool:
    # optional on the wire: absent means true
    if v is None:
        return True
    if not isinstance(v, bool):
        raise _bad(name, "a bool", v)
    return v


def _map(name: str, v: Any, limits: Limits) -> dict:
    if not isinstance(v, dict):
        raise _bad(name, "a map", v)
    return v


def _list(name: str, v: Any, limits: Limits) -> list:
    if not isinstance(v, list):
        raise _bad(name, "a list", v)
    return v


def _shape(name: str, shape: Any, dtype: str, limits: Limits) -> int:
    """Check an array's shape (wire descriptor or spec); return its size in bytes."""
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"array {name!r}: shape must be a list of at most {limits.max_ndim} dims")
    for s in shape:
        if not _is_int(s) or s < 0:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"array {name!r}: shape {shape} has a bad dimension")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # python ints: no overflow
    if nbytes > limits.max_array_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"array {name!r}: {nbytes} bytes over {limits.max_array_bytes}")
    return nbytes


def _dtype(name: str, v: Any, limits: Limits) -> str:
    v = _str(f"{name}.dtype", v, limits)
    if v not in ALLOWED_DTYPES:
        raise ProtocolError(ErrorCode.BAD_DTYPE, f"array {name!r}: dtype {v!r} not in {ALLOWED_DTYPES}")
    return v


def _optional(check: Callable[[str, Any, Limits], Any]) -> Callable[[str, Any, Limits], Any]:
    def checked(name: str, v: Any, limits: Limits) -> Any:
        return None if v is None else check(name, v, limits)
    return checked


# A spec's arrays are checked as the wire will carry them: a robot whose declared
# observation could never be sent is refused at hello, with the code the array would get.

def _array_spec(name: str, d: Any, limits: Limits, key_required: bool = True) -> None:
    d = _map(name, d, limits)
    key = (_str if key_required else _optional(_str))(f"{name}.key", d.get("key"), limits) or name
    dtype = _dtype(key, d.get("dtype", "float32"), limits)
    _shape(key, d.get("shape"), dtype, limits)
    for n in _list(f"{name}.names", d.get("names", []), limits):
        _str(f"{name}.names[]", n, limits)


def _action_spec(name: str, d: Any, limits: Limits) -> ActionSpec:
    _array_spec(name, d, limits, key_required=False)
    shape = d["shape"]
    if len(shape) != 1 or shape[0] < 1:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"field {name!r}: shape must be [A] with A >= 1, got {shape}")
    for i in _list(f"{name}.gripper_dims", d.get("gripper_dims", []), limits):
        _ints_in(0, shape[0] - 1)(f"{name}.gripper_dims[]", i, limits)
    for bound in ("low", "high"):
        values = [_float(f"{name}.{bound}[]", x, limits) for x in _list(f"{name}.{bound}", d.get(bound, []), limits)]
        if len(values) not in (0, shape[0]):
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"field '{name}.{bound}': {len(values)} bounds for {shape[0]} dims")
    return _from_dict(name, ActionSpec.from_dict, d)


def _from_dict(name: str, parse: Callable[[dict], Any], d: dict) -> Any:
    try:
        return parse(d)
    except Exception as e:  # what the checks above leave (duplicate keys, names vs shape)
        raise ProtocolError(ErrorCode.BAD_HEADER, f"field {name!r}: not valid ({e})") from None


def _spec(name: str, v: Any, limits: Limits) -> RobotSpec:
    d = _map(name, v, limits)
    _str(f"{name}.task", d.get("task"), limits)
    _str(f"{name}.robot", d.get("robot"), limits)
    _positive(f"{name}.control_hz", d.get("control_hz"), limits)
    observations = _list(f"{name}.observations", d.get("observations"), limits)
    if len(observations) > limits.max_arrays:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"field '{name}.observations': {len(observations)} over {limits.max_arrays}")
    for o in observations:
        _array_spec(f"{name}.observations[]", o, limits)
    _action_spec(f"{name}.action", d.get("action"), limits)
    _optional(_map)(f"{name}.extra", d.get("extra"), limits)
    return _from_dict(name, RobotSpec.from_dict, d)


def check_seed(seed: int | None) -> int | None:
    """For a sender: the seed a hello or reset may carry (None or 0..SEED_MAX).
    Raises ValueError, so a robot learns of a bad seed before a server refuses it."""
    try:
        return _optional(_seed)("seed", seed, DEFAULT_LIMITS)
    except ProtocolError:
        raise ValueError(f"seed {seed!r} cannot be sent: a seed is an int in 0..{SEED_MAX}, or None") from None


# --------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class PolicyInfo:
    """What the server tells a robot about the policy it will be served by."""

    name: str
    sampler: str            # as the server's operator typed it (e.g. "rti"): what results show
    horizon: int            # Tp: predicted steps
    n_obs_steps: int        # To: observation history the policy conditions on
    n_action_steps: int     # Ta: actions executed per chunk
    control_hz: float
    action: ActionSpec
    sampler_resolved: str = ""  # what that name resolved to (e.g. "rti-renoise-40,15,0"); optional on the wire
    # Seconds the server measured at load for a session's first chunk (streaming and RTI:
    # a full start-up denoise, far longer than a control step); None: not told.
    startup_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "sampler": self.sampler, "sampler_resolved": self.sampler_resolved,
             "horizon": self.horizon, "n_obs_steps": self.n_obs_steps, "n_action_steps": self.n_action_steps,
             "control_hz": self.control_hz, "action": self.action.to_dict()}
        if self.startup_s is not None:  # optional: absent for servers that do not measure it
            d["startup_s"] = self.startup_s
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> "PolicyInfo":
        return cls(name=_str("policy.name", d.get("name"), limits),
                   sampler=_str("policy.sampler", d.get("sampler"), limits),
                   horizon=_count("policy.horizon", d.get("horizon"), limits),
                   n_obs_steps=_count("policy.n_obs_steps", d.get("n_obs_steps"), limits),
                   n_action_steps=_count("policy.n_action_steps", d.get("n_action_steps"), limits),
                   control_hz=_positive("policy.control_hz", d.get("control_hz"), limits),
                   action=_action_spec("policy.action", d.get("action"), limits),
                   sampler_resolved=_optional(_str)("policy.sampler_resolved", d.get("sampler_resolved"), limits) or "",
                   startup_s=_optional(_float)("policy.startup_s", d.get("startup_s"), limits))


def _policy_info(name: str, v: Any, limits: Limits) -> PolicyInfo:
    return PolicyInfo.from_dict(_map(name, v, limits), limits)


class Message:
    """Base of all messages. Subclasses are dataclasses with a wire TYPE, a header
    schema FIELDS (field -> checker) and the names of their array fields."""

    TYPE: ClassVar[str] = ""
    FIELDS: ClassVar[dict[str, Callable[[str, Any, Limits], Any]]] = {}
    ARRAYS: ClassVar[tuple[str, ...]] = ()  # dict-of-arrays field names ("arrays") or single arrays

    def header_fields(self) -> dict[str, Any]:
        out = {}
        for name in self.FIELDS:
            v = getattr(self, name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, (RobotSpec, PolicyInfo)):
                v = v.to_dict()
            out[name] = v
        return out

    def array_fields(self) -> dict[str, np.ndarray]:
        return {}


@dataclass(frozen=True)
class Hello(Message):
    """Robot -> server, first message of a session (and after any reconnect)."""

    TYPE: ClassVar[str] = "hello"
    robot_id: str
    spec: RobotSpec
    seed: int | None = None
    FIELDS: ClassVar = {"robot_id": _str, "spec": _spec, "seed": _optional(_seed)}


@dataclass(frozen=True)
class HelloAck(Message):
    TYPE: ClassVar[str] = "hello_ack"
    session_id: str
    policy: PolicyInfo
    FIELDS: ClassVar = {"session_id": _str, "policy": _policy_info}


@dataclass(frozen=True)
class Observation(Message):
    """One observation step, robot clock `timestamp` in seconds.

    infer=False: history only -- the policy records it (so a To>1 history stays at
    control rate while an earlier inference is in flight) and nothing is replied
    unless it is refused."""

    TYPE: ClassVar[str] = "observation"
    seq: int
    timestamp: float
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    infer: bool = True
    FIELDS: ClassVar = {"seq": _uint, "timestamp": _float, "infer": _infer_flag}

    def array_fields(self) -> dict[str, np.ndarray]:
        return dict(self.arrays)


@dataclass(frozen=True)
class ActionReply(Message):
    """Server -> robot: the chunk for observation `seq`. Action i is meant for
    robot time start_time + i * dt.

    replan_after: the policy wants a new observation after this many actions (RTI:
    1); the rest of the chunk is its look-ahead, executed only if the next chunk is
    late. None: after the whole chunk."""

    TYPE: ClassVar[str] = "actions"
    seq: int
    start_time: float
    dt: float
    actions: np.ndarray
    sampler: str = ""
    compute_ms: float = 0.0
    nfe: int = 0
    replan_after: int | None = None
    FIELDS: ClassVar = {"seq": _uint, "start_time": _float, "dt": _positive, "sampler": _str,
                        "compute_ms": _float, "nfe": _uint, "replan_after": _optional(_uint)}

    def array_fields(self) -> dict[str, np.ndarray]:
        return {"actions": self.actions}


@dataclass(frozen=True)
class Reset(Message):
    """Robot -> server: a new episode begins; the policy forgets its history."""

    TYPE: ClassVar[str] = "reset"
    seed: int | None = None
    FIELDS: ClassVar = {"seed": _optional(_seed)}


@dataclass(frozen=True)
class ResetAck(Message):
    TYPE: ClassVar[str] = "reset_ack"
    episode: int
    FIELDS: ClassVar = {"episode": _uint}


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    timestamp: float
    FIELDS: ClassVar = {"timestamp": _float}


@dataclass(frozen=True)
class HeartbeatAck(Message):
    TYPE: ClassVar[str] = "heartbeat_ack"
    timestamp: float      # echo of the heartbeat's
    server_time: float    # server's wall clock, for people reading logs
    FIELDS: ClassVar = {"timestamp": _float, "server_time": _float}


@dataclass(frozen=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    seq: int | None = None   # the observation it answers, when there is one
    FIELDS: ClassVar = {"code": _str, "message": _str, "seq": _optional(_int)}

    @classmethod
    def from_exception(cls, e: ProtocolError, seq: int | None = None) -> "Error":
        return cls(code=e.code.value, message=e.message, seq=seq)


@dataclass(frozen=True)
class Bye(Message):
    """Either side: the session ends (no reply)."""

    TYPE: ClassVar[str] = "bye"
    reason: str = ""
    FIELDS: ClassVar = {"reason": _str}


@dataclass(frozen=True)
class StatsRequest(Message):
    TYPE: ClassVar[str] = "stats_request"
    FIELDS: ClassVar = {}


@dataclass(frozen=True)
class Stats(Message):
    TYPE: ClassVar[str] = "stats"
    stats: Mapping[str, Any]
    FIELDS: ClassVar = {"stats": _map}  # plain data for people (keys are strings, as everywhere)


MESSAGE_TYPES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Hello, HelloAck, Observation, ActionReply, Reset, ResetAck, Heartbeat,
                        HeartbeatAck, Error, Bye, StatsRequest, Stats)
}

Frame = Union[bytes, bytearray, memoryview, Any]  # also zmq.Frame (has .buffer)


# --------------------------------------------------------------------------- encode

def _wire_array(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.name not in ALLOWED_DTYPES:
        raise ProtocolError(ErrorCode.BAD_DTYPE, f"array {name!r}: dtype {a.dtype} not in {ALLOWED_DTYPES}")
    # (not ascontiguousarray: it turns 0-d arrays into 1-d)
    return a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)


def encode(msg: Message) -> list[bytes | memoryview]:
    """Message -> multipart frames. Raises ProtocolError on an unsendable array dtype."""
    header = {"v": PROTOCOL_VERSION, "type": msg.TYPE, **msg.header_fields()}
    frames: list[bytes | memoryview] = [b""]
    descriptors = []
    for name, a in msg.array_fields().items():
        a = _wire_array(name, a)
        descriptors.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "frame": len(frames)})
        frames.append(memoryview(a).cast("B") if a.size else b"")
    if descriptors:
        header["arrays"] = descriptors
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


# --------------------------------------------------------------------------- decode

def _buffer(frame: Frame) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes its bytes as .buffer
    return memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf


def _read_array(d: Any, frames: Sequence[memoryview], limits: Limits) -> tuple[str, int, np.ndarray]:
    if not isinstance(d, dict):
        raise ProtocolError(ErrorCode.BAD_HEADER, "array descriptor is not a map")
    name = _str("arrays[].name", d.get("name"), limits)
    dtype = _dtype(name, d.get("dtype"), limits)
    shape = d.get("shape")
    nbytes = _shape(name, shape, dtype, limits)
    index = d.get("frame")
    if not _is_int(index):
        raise _bad(f"{name}.frame", "an int", index)
    if not 1 <= index < len(frames):
        raise ProtocolError(ErrorCode.BAD_FRAMING, f"array {name!r}: frame {index} not in 1..{len(frames) - 1}")
    dt = np.dtype(dtype).newbyteorder("<")
    buf = frames[index]
    if buf.nbytes != nbytes:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"array {name!r}: shape {shape} {dtype} needs {nbytes} bytes, frame has {buf.nbytes}")
    # Copy: the result owns aligned memory, independent of the zmq frame.
    a = np.frombuffer(buf, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=True)
    if a.dtype == np.bool_:
        a = a.view(np.uint8) != 0  # any non-zero byte is True; keeps bools canonical
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ProtocolError(ErrorCode.NOT_FINITE, f"array {name!r} contains NaN or Inf")
    return name, index, a


def decode(frames: Sequence[Frame], limits: Limits = DEFAULT_LIMITS,
           accept: Sequence[type[Message]] | None = None) -> Message:
    """Multipart frames -> a Message. Raises only ProtocolError, whatever the input.

    `accept` restricts the message types this end takes (others: UNKNOWN_TYPE).
    """
    try:
        return _decode(frames, limits, accept)
    except ProtocolError:
        raise
    except Exception as e:  # a decoder bug must still not take a server down
        raise ProtocolError(ErrorCode.BAD_FRAMING, f"undecodable message ({type(e).__name__}: {e})") from None


def _string_keyed_map(pairs: list[tuple[Any, Any]]) -> dict:
    for k, _ in pairs:
        if type(k) is not str:
            shown = repr(k) if isinstance(k, (int, float, type(None))) else type(k).__name__
            raise ProtocolError(ErrorCode.BAD_HEADER, f"a map key is {shown}; keys must be strings")
    return dict(pairs)


def _nested_within(v: Any, levels: int) -> bool:
    if isinstance(v, (dict, list)):
        if levels == 0:
            return False
        return all(_nested_within(x, levels - 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def _decode(frames: Sequence[Frame], limits: Limits, accept: Sequence[type[Message]] | None) -> Message:
    if len(frames) == 0:
        raise ProtocolError(ErrorCode.BAD_FRAMING, "empty message")
    if len(frames) > limits.max_arrays + 1:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(frames)} frames, at most {limits.max_arrays + 1}")
    bufs = [_buffer(f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    if total > limits.max_message_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {total} bytes over {limits.max_message_bytes}")
    if bufs[0].nbytes > limits.max_header_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header of {bufs[0].nbytes} bytes over {limits.max_header_bytes}")
    try:
        # msgpack bounds every string/array/map length by the buffer size itself. Maps come
        # as key-value pairs, so a key that is not a string is refused before it is hashed.
        header = msgpack.unpackb(bufs[0], raw=False, strict_map_key=False, object_pairs_hook=_string_keyed_map,
                                 use_list=True)
    except ProtocolError:
        raise
    except msgpack.StackError:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header nested deeper than {limits.max_depth} levels") from None
    except Exception as e:
        raise ProtocolError(ErrorCode.BAD_FRAMING, f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_FRAMING, f"header is a {type(header).__name__}, not a map")
    if not _nested_within(header, limits.max_depth):
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header nested deeper than {limits.max_depth} levels")
    version = header.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version!r} not supported; this end speaks {PROTOCOL_VERSION}")
    mtype = header.get("type")
    cls = MESSAGE_TYPES.get(mtype) if isinstance(mtype, str) else None
    if cls is None or (accept is not None and cls not in accept):
        shown = mtype if isinstance(mtype, str) and len(mtype) <= 64 else type(mtype).__name__
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"message type {shown!r} not accepted here")

    values = {name: check(name, header.get(name), limits) for name, check in cls.FIELDS.items()}

    descriptors = header.get("arrays", [])
    if not isinstance(descriptors, list):
        raise ProtocolError(ErrorCode.BAD_HEADER, "field 'arrays': expected a list")
    arrays: dict[str, np.ndarray] = {}
    used: set[int] = set()
    for d in descriptors:
        name, index, a = _read_array(d, bufs, limits)
        if name in arrays or index in used:
            raise ProtocolError(ErrorCode.BAD_FRAMING, f"array {name!r}: duplicate name or frame {index}")
        arrays[name] = a
        used.add(index)
    if len(used) != len(bufs) - 1:
        raise ProtocolError(ErrorCode.BAD_FRAMING, f"{len(bufs) - 1} data frames but {len(used)} arrays described")

    if cls is Observation:
        values["arrays"] = arrays
    elif cls is ActionReply:
        if set(arrays) != {"actions"}:
            raise ProtocolError(ErrorCode.MISSING_KEY, f"actions message needs exactly one array 'actions', got {sorted(arrays)}")
        a = arrays["actions"]
        if a.ndim != 2 or a.shape[0] == 0 or a.dtype.kind != "f":
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"array 'actions' must be float (n>0, A), got {a.shape} {a.dtype}")
        values["actions"] = a
        if values["replan_after"] is not None:
            _in_range("replan_after", values["replan_after"], 1, len(a))  # at most the chunk's length
    elif arrays:
        raise ProtocolError(ErrorCode.UNEXPECTED_KEY, f"message {cls.TYPE!r} carries no arrays, got {sorted(arrays)}")
    return cls(**values)


# --------------------------------------------------------------------------- spec checks

def check_arrays(arrays: Mapping[str, np.ndarray], specs: Sequence[ArraySpec]) -> None:
    """Raise ProtocolError unless `arrays` holds exactly the declared arrays, each of
    the declared shape and dtype."""
    declared = {s.key: s for s in specs}
    for name in arrays:
        if name not in declared:
            raise ProtocolError(ErrorCode.UNEXPECTED_KEY, f"array {name!r} not declared; spec has {sorted(declared)}")
    for key, s in declared.items():
        if key not in arrays:
            raise ProtocolError(ErrorCode.MISSING_KEY, f"array {key!r} missing")
        a = arrays[key]
        if a.dtype != np.dtype(s.dtype):
            raise ProtocolError(ErrorCode.BAD_DTYPE, f"array {key!r}: dtype {a.dtype}, spec says {s.dtype}")
        if a.shape != s.shape:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"array {key!r}: shape {a.shape}, spec says {s.shape}")


def check_actions(reply: ActionReply, action: ActionSpec) -> None:
    """Raise ProtocolError unless the chunk's actions are (n, action dim)."""
    if reply.actions.shape[1:] != action.shape:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"actions: shape {reply.actions.shape}, spec says (n, {action.dim})")
    if reply.dt <= 0:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"actions: dt must be positive, got {reply.dt}")
