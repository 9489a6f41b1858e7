"""CurveZMQ on the policy link: real sockets on 127.0.0.1, the real PolicyServer
serving the TEST EchoPolicy (runtime/testing.py) with runtime/auth.py's CURVE setup.
"""
import logging
import stat
import threading

import numpy as np
import pytest
import zmq

from dpstack.deploy import keys_cli
from dpstack.runtime import auth
from dpstack.runtime.protocol import Hello, HelloAck, decode, encode
from dpstack.runtime.server import InsecureBind, PolicyServer, ServerConfig, check_bind
from echo_server import ECHO_SPEC, EchoPolicy, echo_info


@pytest.fixture()
def keys(tmp_path):
    server_dir, robot_dir = tmp_path / "server", tmp_path / "robot"
    auth.generate(server_dir, "server")
    auth.generate(robot_dir, "arm1")        # listed
    auth.generate(robot_dir, "intruder")    # not listed
    (server_dir / "robots").mkdir()
    (server_dir / "robots" / "arm1.key").write_bytes((robot_dir / "arm1.key").read_bytes())
    return server_dir, robot_dir


@pytest.fixture()
def curve_server(keys):
    server_dir, _ = keys
    ctx = zmq.Context()
    security = auth.server_security_from_dir(server_dir)
    server = PolicyServer(lambda spec: EchoPolicy(), ECHO_SPEC, echo_info(),
                          ServerConfig(bind="tcp://127.0.0.1:*", security=security), context=ctx)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set, 20), daemon=True)
    thread.start()
    yield server, ctx
    stop.set()
    thread.join(5)
    server.close()
    security.stop()
    ctx.term()


def hello_roundtrip(ctx, endpoint, configure=None, timeout_ms=1500):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    # A refused handshake can leave the DEALER with no peer, and a send without a peer blocks.
    s.setsockopt(zmq.SNDTIMEO, timeout_ms)
    if configure is not None:
        configure(s)
    s.connect(endpoint)
    try:
        s.send_multipart(encode(Hello("arm1", ECHO_SPEC)))
        if not s.poll(timeout_ms):
            return None
        return decode(s.recv_multipart())
    except zmq.Again:  # the send timed out: refused
        return None
    finally:
        s.close(0)


def test_listed_robot_is_served(curve_server, keys):
    server, ctx = curve_server
    server_dir, robot_dir = keys
    reply = hello_roundtrip(ctx, server.endpoint, auth.curve_client(robot_dir / "arm1.key_secret", server_dir / "server.key"))
    assert isinstance(reply, HelloAck)


def test_unauthenticated_peer_is_refused(curve_server):
    server, ctx = curve_server
    assert hello_roundtrip(ctx, server.endpoint) is None
    assert server.stats()["messages"].get("hello", 0) == 0


def test_unlisted_key_is_refused(curve_server, keys):
    server, ctx = curve_server
    server_dir, robot_dir = keys
    reply = hello_roundtrip(ctx, server.endpoint, auth.curve_client(robot_dir / "intruder.key_secret", server_dir / "server.key"))
    assert reply is None
    assert server.stats()["messages"].get("hello", 0) == 0


def test_a_client_with_the_wrong_server_key_is_refused(curve_server, keys):
    server, ctx = curve_server
    _, robot_dir = keys
    # A man in the middle would present its own key: the client must not talk to it.
    reply = hello_roundtrip(ctx, server.endpoint, auth.curve_client(robot_dir / "arm1.key_secret", robot_dir / "intruder.key"))
    assert reply is None


def test_a_refused_bind_names_keys_first_and_insecure_last():
    with pytest.raises(InsecureBind) as refused:
        check_bind("tcp://0.0.0.0:5555")
    message = str(refused.value)
    assert "--keys" in message and "dpstack keys generate" in message
    assert message.index("--keys") < message.index("--insecure")
    assert message.rstrip(".").endswith("--insecure")
    assert "deploy issue" not in message


def test_without_keys_only_loopback_binds_unless_insecure():
    check_bind("tcp://127.0.0.1:5555")
    with pytest.raises(InsecureBind):
        check_bind("tcp://0.0.0.0:5555")
    check_bind("tcp://0.0.0.0:5555", authenticated=True)
    check_bind("tcp://0.0.0.0:5555", insecure=True)


def test_keys_generate_cli_writes_a_0600_secret_and_refuses_to_overwrite(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    keys_cli.add_arguments(parser)
    assert keys_cli.run(parser.parse_args(["generate", "--out", str(tmp_path), "--name", "ur5e"])) == 0
    secret = tmp_path / "ur5e.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public, sec = auth.load_secret(secret)
    assert auth.load_public(tmp_path / "ur5e.key") == public and len(sec) == 40
    assert keys_cli.run(parser.parse_args(["generate", "--out", str(tmp_path), "--name", "ur5e"])) == 2
    assert "exists" in capsys.readouterr().err
    # allow: copies the PUBLIC key into keys/robots, refuses a secret one.
    assert keys_cli.run(parser.parse_args(["allow", "--keys", str(tmp_path / "srv"), str(tmp_path / "ur5e.key")])) == 0
    assert (tmp_path / "srv" / "robots" / "ur5e.key").is_file()
    assert keys_cli.run(parser.parse_args(["allow", "--keys", str(tmp_path / "srv"), str(secret)])) == 2


def test_a_world_readable_secret_is_refused(tmp_path):
    _, secret = auth.generate(tmp_path, "loose")
    secret.chmod(0o644)
    with pytest.raises(auth.KeyFileError, match="chmod 600"):
        auth.load_secret(secret)


def test_a_public_key_given_as_the_secret_key_is_named_as_such(tmp_path):
    # Its mode (0644) is right for a public key: the complaint must be about what it holds, not chmod.
    public, _ = auth.generate(tmp_path, "arm1")
    with pytest.raises(auth.KeyFileError, match="holds no secret key"):
        auth.load_secret(public)


def test_policy_client_with_curve_keys_gets_a_session_and_chunks(curve_server, keys, caplog):
    from dpstack.runtime.client import PolicyClient
    from echo_server import echo_observation

    server, ctx = curve_server
    server_dir, robot_dir = keys
    client = PolicyClient(server.endpoint, ECHO_SPEC, "arm1", timeout_s=1.0, context=ctx,
                          security=auth.curve_client(robot_dir / "arm1.key_secret", server_dir / "server.key"))
    try:
        reply = client.request(echo_observation(np.random.default_rng(0)), timestamp=1.0, timeout_s=5.0)
        assert reply is not None and reply.actions.shape == (8, 3)
    finally:
        client.close()
    plain = PolicyClient(server.endpoint, ECHO_SPEC, "arm2", timeout_s=0.5, context=ctx)
    with caplog.at_level(logging.WARNING, logger="dpstack.runtime.client"):
        try:
            assert not plain.wait_ready(1.5)
        finally:
            plain.close()
    # Silence is all a CURVE server gives a plain client: the warning says keys may be why.
    assert any("no answer to Hello" in r.message and "keys" in r.message for r in caplog.records), caplog.text


def test_dpstack_serve_with_keys_serves_only_listed_robots(tmp_path, keys):
    """`dpstack serve PKG --keys DIR` in a real process (tiny hand-built ONNX package)."""
    import sys

    from dpstack.runtime.client import PolicyClient
    from runtime_tiny_package import SPEC, write_tiny_package
    from server_process import ServerProcess

    server_dir, robot_dir = keys
    pkg = write_tiny_package(tmp_path / "tiny")
    cmd = [sys.executable, "-m", "dpstack.cli", "serve", str(pkg), "--bind", "tcp://127.0.0.1:*",
           "--keys", str(server_dir), "--sampler", "ddim-2"]
    with ServerProcess(command=cmd) as server:
        listed = PolicyClient(server.endpoint, SPEC, "arm1", timeout_s=1.0,
                              security=auth.curve_client(robot_dir / "arm1.key_secret", server_dir / "server.key"))
        plain = PolicyClient(server.endpoint, SPEC, "arm2", timeout_s=0.5)
        try:
            assert listed.wait_ready(10.0)
            assert not plain.wait_ready(1.5)
        finally:
            listed.close()
            plain.close()
