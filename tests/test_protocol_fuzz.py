"""Decoder fuzzing: whatever bytes arrive, decode returns a message or raises
ProtocolError -- never another exception (a server must survive any input)."""
from __future__ import annotations

import math
import time

import msgpack
import numpy as np
import pytest

from dpstack.runtime.client import PolicyClient
from dpstack.runtime.protocol import MESSAGE_TYPES, Error, ErrorCode, Hello, ProtocolError, check_seed, decode, encode
from dpstack.runtime.server import CLIENT_MESSAGES
from echo_server import ECHO_SPEC, echo_info
from server_process import ServerProcess
from test_protocol_messages import all_messages
from test_server_robustness import GoodRobot, raw_socket

# decode's last resort for an exception no check foresaw; a precise check must come first
CATCH_ALL = "undecodable message"


def _decode_or_protocol_error(frames) -> bool:
    try:
        decode(frames)
        return True
    except ProtocolError as e:
        assert not e.message.startswith(CATCH_ALL), e
        return False
    # any other exception propagates and fails the test


def _random_value(rng: np.random.Generator, depth: int = 0):
    kind = rng.integers(0, 10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        edge = [0, 1, -1, 2**32 - 1, 2**32, 2**63 - 1, -2**63, 2**64 - 1, int(rng.integers(-2**62, 2**62))]
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
    # mostly string keys; sometimes an int, bytes, float, bool or nil key, which msgpack carries
    return {(str(k) if isinstance(k, (list, dict)) or rng.random() < 0.8 else k): _random_value(rng, depth + 1)
            for k in (_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4))))}


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


# --------------------------------------------------------------------------- hostile field values
# Each case: a header a fuzzer written from docs/protocol.md would send, and the code it must get.
# None of them may reach the decoder's catch-all ("undecodable message") or the policy.

SEED_MAX = 2**32 - 1
_OBS = {"v": 1, "type": "observation", "seq": 1, "timestamp": 0.0}


def _spec(**over) -> dict:
    spec = ECHO_SPEC.to_dict()
    spec.update(over)
    return spec


def _action(**over) -> dict:
    return _spec(action={**ECHO_SPEC.action.to_dict(), **over})


def _obs_spec(**over) -> dict:
    return _spec(observations=[{**ECHO_SPEC.observations[0].to_dict(), **over}])


def _hello(**over) -> dict:
    return {"v": 1, "type": "hello", "robot_id": "r", "seed": None, "spec": ECHO_SPEC.to_dict(), **over}


def _nested(depth: int) -> object:
    deep: object = 1
    for _ in range(depth):
        deep = [deep]
    return deep


HOSTILE_HEADERS = {
    "hello seed -1": (_hello(seed=-1), ErrorCode.BAD_VALUE),
    "hello seed -2**63": (_hello(seed=-2**63), ErrorCode.BAD_VALUE),
    "hello seed 2**32": (_hello(seed=SEED_MAX + 1), ErrorCode.BAD_VALUE),
    "hello seed 2**63-1": (_hello(seed=2**63 - 1), ErrorCode.BAD_VALUE),
    "hello seed 2**64-1": (_hello(seed=2**64 - 1), ErrorCode.BAD_VALUE),
    "hello seed 1.5": (_hello(seed=1.5), ErrorCode.BAD_HEADER),
    "hello seed NaN": (_hello(seed=float("nan")), ErrorCode.BAD_HEADER),
    "hello seed '7'": (_hello(seed="7"), ErrorCode.BAD_HEADER),
    "hello seed true": (_hello(seed=True), ErrorCode.BAD_HEADER),
    "reset seed -1": ({"v": 1, "type": "reset", "seed": -1}, ErrorCode.BAD_VALUE),
    "reset seed 2**32": ({"v": 1, "type": "reset", "seed": SEED_MAX + 1}, ErrorCode.BAD_VALUE),
    "reset seed 2**64-1": ({"v": 1, "type": "reset", "seed": 2**64 - 1}, ErrorCode.BAD_VALUE),
    "reset seed -2**63": ({"v": 1, "type": "reset", "seed": -2**63}, ErrorCode.BAD_VALUE),
    "reset seed [1]": ({"v": 1, "type": "reset", "seed": [1]}, ErrorCode.BAD_HEADER),
    "observation seq -1": ({**_OBS, "seq": -1}, ErrorCode.BAD_VALUE),
    "observation seq 2**64-1": ({**_OBS, "seq": 2**64 - 1}, ErrorCode.BAD_VALUE),
    "observation timestamp inf": ({**_OBS, "timestamp": float("inf")}, ErrorCode.NOT_FINITE),
    "heartbeat timestamp -inf": ({"v": 1, "type": "heartbeat", "timestamp": float("-inf")}, ErrorCode.NOT_FINITE),
    "heartbeat timestamp NaN": ({"v": 1, "type": "heartbeat", "timestamp": float("nan")}, ErrorCode.NOT_FINITE),
    "version 2**64-1": ({"v": 2**64 - 1, "type": "heartbeat", "timestamp": 0.0}, ErrorCode.BAD_VERSION),
    "descriptor frame 2**64-1": ({**_OBS, "arrays": [{"name": "state", "dtype": "float32", "shape": [4], "frame": 2**64 - 1}]},
                                 ErrorCode.BAD_FRAMING),
    "descriptor dim 2**64-1": ({**_OBS, "arrays": [{"name": "state", "dtype": "float32", "shape": [2**64 - 1], "frame": 1}]},
                               ErrorCode.TOO_LARGE),
    "int key at the top": ({**_OBS, 7: "x"}, ErrorCode.BAD_HEADER),
    "bytes key at the top": ({**_OBS, b"seq": 1}, ErrorCode.BAD_HEADER),
    "none key in spec.extra": (_hello(spec=_spec(extra={None: 1})), ErrorCode.BAD_HEADER),
    "float key in spec.extra": (_hello(spec=_spec(extra={1.5: 1})), ErrorCode.BAD_HEADER),
    "bool key in an array descriptor": ({**_OBS, "arrays": [{True: 1}]}, ErrorCode.BAD_HEADER),
    "spec.extra nested 100 deep": (_hello(spec=_spec(extra={"a": _nested(100)})), ErrorCode.TOO_LARGE),
    "spec control_hz NaN": (_hello(spec=_spec(control_hz=float("nan"))), ErrorCode.NOT_FINITE),
    "spec control_hz inf": (_hello(spec=_spec(control_hz=float("inf"))), ErrorCode.NOT_FINITE),
    "spec control_hz 0": (_hello(spec=_spec(control_hz=0)), ErrorCode.BAD_VALUE),
    "spec control_hz -20": (_hello(spec=_spec(control_hz=-20.0)), ErrorCode.BAD_VALUE),
    "spec control_hz '20'": (_hello(spec=_spec(control_hz="20")), ErrorCode.BAD_HEADER),
    "spec task an int": (_hello(spec=_spec(task=3)), ErrorCode.BAD_HEADER),
    "spec observations a map": (_hello(spec=_spec(observations={"state": [4]})), ErrorCode.BAD_HEADER),
    "spec observation key a list": (_hello(spec=_obs_spec(key=["state"])), ErrorCode.BAD_HEADER),
    "spec observation shape [-4]": (_hello(spec=_obs_spec(shape=[-4])), ErrorCode.BAD_SHAPE),
    "spec observation shape [2**64-1]": (_hello(spec=_obs_spec(shape=[2**64 - 1])), ErrorCode.TOO_LARGE),
    "spec observation shape ['4']": (_hello(spec=_obs_spec(shape=["4"])), ErrorCode.BAD_SHAPE),
    "spec observation shape 5-D": (_hello(spec=_obs_spec(shape=[1, 1, 1, 1, 4])), ErrorCode.BAD_SHAPE),
    "spec observation dtype object": (_hello(spec=_obs_spec(dtype="object")), ErrorCode.BAD_DTYPE),
    "spec observation names [1, 2]": (_hello(spec=_obs_spec(names=[1, 2, 3, 4])), ErrorCode.BAD_HEADER),
    "spec action shape [2, 2]": (_hello(spec=_action(shape=[2, 2])), ErrorCode.BAD_SHAPE),
    "spec action shape [0]": (_hello(spec=_action(shape=[0])), ErrorCode.BAD_SHAPE),
    "spec action gripper dim 3 of 3": (_hello(spec=_action(gripper_dims=[3])), ErrorCode.BAD_VALUE),
    "spec action gripper dim -1": (_hello(spec=_action(gripper_dims=[-1])), ErrorCode.BAD_VALUE),
    "spec action gripper dim 2**64-1": (_hello(spec=_action(gripper_dims=[2**64 - 1])), ErrorCode.BAD_VALUE),
    "spec action low NaN": (_hello(spec=_action(low=[0.0, float("nan"), 0.0])), ErrorCode.NOT_FINITE),
    "spec action high of 2 for 3 dims": (_hello(spec=_action(high=[1.0, 1.0])), ErrorCode.BAD_SHAPE),
    "spec extra a list": (_hello(spec=_spec(extra=[1])), ErrorCode.BAD_HEADER),
    "policy horizon 0": ({"v": 1, "type": "hello_ack", "session_id": "s", "policy": {**echo_info().to_dict(), "horizon": 0}},
                         ErrorCode.BAD_VALUE),
    "policy control_hz 0": ({"v": 1, "type": "hello_ack", "session_id": "s", "policy": {**echo_info().to_dict(), "control_hz": 0.0}},
                            ErrorCode.BAD_VALUE),
    "actions dt 0": ({"v": 1, "type": "actions", "seq": 1, "start_time": 0.0, "dt": 0.0, "sampler": "", "compute_ms": 0.0, "nfe": 0},
                     ErrorCode.BAD_VALUE),
    "actions nfe -1": ({"v": 1, "type": "actions", "seq": 1, "start_time": 0.0, "dt": 0.1, "sampler": "", "compute_ms": 0.0, "nfe": -1},
                       ErrorCode.BAD_VALUE),
}

# msgpack can carry what a Python dict cannot: unhashable keys, and nesting past the packer's limit.
HOSTILE_BYTES = {
    "list key": (b"\x83\xa1v\x01\xa4type\xa5reset\x91\x01\x02", ErrorCode.BAD_HEADER),
    "map key": (b"\x83\xa1v\x01\xa4type\xa5reset\x81\xa1a\x01\x02", ErrorCode.BAD_HEADER),
    "nested 5000 deep": (b"\x83\xa1v\x01\xa4type\xa5stats\xa5stats\x81\xa1a" + b"\x91" * 5000 + b"\x01", ErrorCode.TOO_LARGE),
}


def _frames_of(header: dict) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True)]


def hostile_cases(server: bool = False) -> dict[str, tuple[list[bytes], ErrorCode]]:
    """Every hostile case as frames -> the code it must get; `server`: the code a server
    answers (it refuses the types only a server sends before reading their fields)."""
    client_types = {m.TYPE for m in CLIENT_MESSAGES}
    cases = {name: (_frames_of(h), ErrorCode.UNKNOWN_TYPE if server and h["type"] not in client_types else code)
             for name, (h, code) in HOSTILE_HEADERS.items()}
    cases.update({name: ([b], code) for name, (b, code) in HOSTILE_BYTES.items()})
    return cases


@pytest.mark.parametrize("case", list(hostile_cases()), ids=str)
def test_hostile_field_value_gets_its_precise_code(case) -> None:
    frames, code = hostile_cases()[case]
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code is code, e.value
    assert not e.value.message.startswith(CATCH_ALL), e.value


@pytest.mark.parametrize("seed", [0, 1, SEED_MAX])
def test_seeds_at_the_ends_of_the_range_are_accepted(seed) -> None:
    assert decode(_frames_of(_hello(seed=seed))).seed == seed
    assert decode(_frames_of({"v": 1, "type": "reset", "seed": seed})).seed == seed


def test_random_hostile_values_never_reach_the_catch_all_and_what_decodes_is_in_range() -> None:
    rng = np.random.default_rng(4)
    fields = {"hello": ["robot_id", "spec", "seed"], "reset": ["seed"], "observation": ["seq", "timestamp", "infer"],
              "heartbeat": ["timestamp"], "bye": ["reason"], "stats_request": []}
    decoded = 0
    for _ in range(3000):
        mtype = str(rng.choice(list(fields)))
        header = _hello() if mtype == "hello" else {"v": 1, "type": mtype, "seq": 1, "timestamp": 0.0, "reason": ""}
        for name in fields[mtype]:
            if rng.random() < 0.5:
                header[name] = _random_value(rng)
        if mtype == "hello" and rng.random() < 0.5:  # a hostile value deep inside an otherwise good spec
            spec = header["spec"] = ECHO_SPEC.to_dict()
            part = spec if rng.random() < 0.4 else spec["action"] if rng.random() < 0.5 else spec["observations"][0]
            part[str(rng.choice(list(part)))] = _random_value(rng)
        try:
            msg = decode(_frames_of(header))
        except ProtocolError as e:
            assert not e.message.startswith(CATCH_ALL), (header, e)
            continue
        decoded += 1
        seed = getattr(msg, "seed", None)
        assert seed is None or 0 <= seed <= SEED_MAX, header
        assert 0 <= getattr(msg, "seq", 0) < 2**63, header
        if isinstance(msg, Hello):
            assert msg.spec.control_hz > 0 and math.isfinite(msg.spec.control_hz), header
    assert 0 < decoded < 3000


# --------------------------------------------------------------------------- the same against a real server

def _tally(replies: dict[str, int], frames: list) -> str:
    msg = decode(frames)
    key = getattr(msg, "code", msg.TYPE)
    replies[key] = replies.get(key, 0) + 1
    return key


def test_server_gives_each_hostile_case_its_code_and_no_internal_error_under_fuzzing() -> None:
    rng = np.random.default_rng(5)
    with ServerProcess() as server:
        robot = GoodRobot(server.endpoint, "good-fuzz", seed=2)
        hostile = [raw_socket(server.endpoint) for _ in range(4)]
        for sock in hostile:  # sessions, so a reset or an observation reaches the session's policy
            sock.send_multipart(encode(Hello(f"hostile-{id(sock)}", ECHO_SPEC)))
            assert decode(sock.recv_multipart()).TYPE == "hello_ack"
        # each case in turn: the code it gets from the server is the decoder's (hello replaces the session)
        for name, (frames, code) in hostile_cases(server=True).items():
            hostile[0].send_multipart(frames)
            reply = decode(hostile[0].recv_multipart())
            assert isinstance(reply, Error) and reply.code == code.value, (name, reply)
        robot.step()

        # then a flood over four connections: the table, random hostile values in every client message,
        # and good hellos/resets mixed in so session paths are reached; a good robot is served throughout
        catalogue = list(hostile_cases().values())
        replies: dict[str, int] = {}
        fields = {"hello": ["robot_id", "seed", "spec"], "reset": ["seed"], "observation": ["seq", "timestamp", "infer"],
                  "heartbeat": ["timestamp"], "stats_request": [], "bye": ["reason"]}
        n_sent = 0
        for burst in range(30):
            for i in range(100):
                sock = hostile[int(rng.integers(0, len(hostile)))]
                kind = rng.random()
                if kind < 0.3:
                    frames = catalogue[int(rng.integers(0, len(catalogue)))][0]
                elif kind < 0.4:
                    frames = encode(Hello(f"hostile-{id(sock)}", ECHO_SPEC, seed=int(rng.integers(0, 2**32))))
                elif kind < 0.5:
                    frames = [msgpack.packb({"v": 1, "type": "reset", "seed": _random_value(rng)}, use_bin_type=True)]
                else:
                    mtype = str(rng.choice(list(fields)))
                    header = {"v": 1, "type": mtype, "robot_id": "hostile", "spec": ECHO_SPEC.to_dict(), "seq": 10**9 + n_sent,
                              "timestamp": 0.0, "reason": ""}
                    for name in fields[mtype]:
                        if rng.random() < 0.6:
                            header[name] = _random_value(rng)
                    frames = _frames_of(header)
                sock.send_multipart(frames)
                n_sent += 1
            for sock in hostile:  # drain what has come back (bye and good hello_acks aside, all are errors)
                while sock.poll(20):
                    _tally(replies, sock.recv_multipart())
            robot.step()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            ready = [s for s in hostile if s.poll(50)]
            if not ready and sum(replies.values()) > 0.8 * n_sent:
                break
            for sock in ready:
                _tally(replies, sock.recv_multipart())
        robot.step()
        stats = robot.client.request_stats(2.0)
        for sock in hostile:
            sock.close()
        robot.client.close()
    assert n_sent == 3000
    assert replies.get(ErrorCode.INTERNAL.value, 0) == 0, replies
    assert stats is not None and stats["errors"].get(ErrorCode.INTERNAL.value, 0) == 0, stats["errors"]
    assert sum(stats["errors"].values()) > 1500, stats["errors"]
    assert robot.n_ok == 32


def test_a_robot_learns_of_a_seed_no_server_takes_before_sending_it() -> None:
    assert check_seed(None) is None and check_seed(0) == 0 and check_seed(SEED_MAX) == SEED_MAX
    for seed in (-1, SEED_MAX + 1, 2**64 - 1, 1.5, True):
        with pytest.raises(ValueError, match=f"0..{SEED_MAX}"):
            check_seed(seed)
        with pytest.raises(ValueError, match=f"0..{SEED_MAX}"):
            PolicyClient("tcp://127.0.0.1:1", ECHO_SPEC, "r", seed=seed)
