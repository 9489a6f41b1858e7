"""CurveZMQ authentication for the policy link (torch-free; used by server, client and bridge).

Key files are ZeroMQ certificates as `zmq.auth.create_certificates` writes them:
NAME.key (public, shareable) and NAME.key_secret (secret, mode 0600).
Layout on the policy server:   keys/server.key_secret, keys/robots/<robot>.key  (allowed robots)
Layout on a robot computer:    keys/<robot>.key_secret, keys/server.key         (the server's public key)

The server side starts a ZAP authenticator thread (zmq.auth.thread.ThreadAuthenticator)
that admits only clients whose public key is in the allowed directory; an
unauthenticated (plain) peer or an unlisted key never completes the handshake.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SocketSecurity = Callable[[zmq.Socket], None]


class KeyFileError(ValueError):
    """A key file is missing, unreadable or too widely readable."""


def require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; install pyzmq from its wheels")


def generate(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into out_dir (secret file 0600); refuse to overwrite."""
    require_curve()
    out = Path(out_dir)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r}: use a plain file name like 'server' or 'ur5e'")
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise FileExistsError(f"{p} exists; remove it first if you mean to replace this key")
    out.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never world-readable, not even for an instant
    try:
        public_file, secret_file = zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    return Path(public_file), Path(secret_file)


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file; refuses one readable by group/others."""
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"{p}: no such secret key file")
    # What it holds first: a public key in its place is the likelier mistake than its mode.
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except ValueError:
        raise KeyFileError(f"{p}: holds no key; give this machine's NAME.key_secret from `dpstack keys generate`") from None
    if secret is None:
        raise KeyFileError(f"{p}: holds no secret key; give this machine's NAME.key_secret, not a public NAME.key")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{p}: secret key is readable by others (mode {mode:o}); chmod 600 {p}")
    return public, secret


def load_public(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"{p}: no such public key file")
    public, _ = zmq.auth.load_certificate(str(p))
    return public


class CurveServer:
    """Callable that makes a server socket a CURVE server admitting only listed clients.

    Pass an instance as runtime.server.ServerConfig.security; call stop() at shutdown.
    """

    def __init__(self, server_secret_file: str | Path, allowed_dir: str | Path):
        require_curve()
        self.public, self.secret = load_secret(server_secret_file)
        self.allowed_dir = Path(allowed_dir)
        if not self.allowed_dir.is_dir():
            raise KeyFileError(f"{self.allowed_dir}: no directory of allowed client public keys")
        self.n_allowed = len(list(self.allowed_dir.glob("*.key")))
        if self.n_allowed == 0:
            raise KeyFileError(f"{self.allowed_dir}: holds no *.key files; no robot could connect")
        self.authenticator: ThreadAuthenticator | None = None

    def __call__(self, socket: zmq.Socket) -> None:
        if self.authenticator is None:
            self.authenticator = ThreadAuthenticator(socket.context)
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=str(self.allowed_dir))
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def reload(self) -> None:
        """Re-read the allowed keys (after adding or removing a robot)."""
        if self.authenticator is not None:
            self.authenticator.configure_curve(domain="*", location=str(self.allowed_dir))

    def stop(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


def curve_client(client_secret_file: str | Path, server_public_file: str | Path) -> SocketSecurity:
    """A function configuring a client socket (before connect) to authenticate with these keys."""
    require_curve()
    public, secret = load_secret(client_secret_file)
    server_public = load_public(server_public_file)

    def configure(socket: zmq.Socket) -> None:
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_serverkey = server_public

    return configure


def server_security_from_dir(keys_dir: str | Path, name: str = "server") -> CurveServer:
    """The standard layout: keys_dir/NAME.key_secret and allowed robots in keys_dir/robots/."""
    d = Path(keys_dir)
    return CurveServer(d / f"{name}.key_secret", d / "robots")
