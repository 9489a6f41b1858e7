"""ZeroMQ endpoints as users write them: checked before use, bound with a sentence on failure.

Every socket dpstack binds (the policy server, the bridge's e-stop socket) goes
through `bind`, and every endpoint a user types through `check_endpoint`, so a
missing scheme or a port in use is one sentence, never a ZMQError traceback.
"""
from __future__ import annotations

import errno
import ipaddress

import zmq


class EndpointError(ValueError):
    """An endpoint that cannot be used: no scheme, a port already in use, an address this machine lacks."""


def check_endpoint(endpoint: str) -> str:
    """The endpoint's scheme (tcp, ipc, inproc); EndpointError when it has none."""
    scheme, sep, _ = endpoint.partition("://")
    if not sep or not scheme:
        text = endpoint.strip()
        example = (f"tcp://127.0.0.1:{text}" if text.isdigit() else f"tcp://{text}" if ":" in text
                   else "tcp://HOST:PORT or ipc://PATH")
        raise EndpointError(f"endpoint {endpoint!r} has no scheme; write it as {example}")
    return scheme


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address."""
    scheme = check_endpoint(endpoint)
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = endpoint.partition("://")[2].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", interface names, host names: treat as exposed


def bind(socket: zmq.Socket, endpoint: str) -> str:
    """Bind `socket`; returns the endpoint actually bound (a `*` port resolved)."""
    check_endpoint(endpoint)
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as e:
        if e.errno == errno.EADDRINUSE:
            raise EndpointError(f"{endpoint} is already in use by another process; "
                                "stop that process or choose another port") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.ENODEV):
            raise EndpointError(f"cannot bind {endpoint}: this machine has no such address or interface; "
                                "bind one of its own addresses (or 127.0.0.1)") from None
        raise EndpointError(f"cannot bind {endpoint}: {e.strerror}; write it as tcp://HOST:PORT or ipc://PATH") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)
