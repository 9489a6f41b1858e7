"""`dpstack serve POLICY_DIR`: serve an exported policy package over ZeroMQ.

Each robot that says Hello gets its own PolicyRunner (history, sampler state)
over the one loaded package; the onnxruntime sessions are shared.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from dpstack.runtime import realtime


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("policy_dir", metavar="POLICY_DIR", help="exported policy package (manifest.json + ONNX files)")
    p.add_argument("--sampler", default="streaming",
                   help="ddpm-N, ddim-N, rti (the package's list, else rti-renoise-40,15,0), rti[-renoise]-K1,K2,.. or streaming[-E] (default: streaming)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ endpoint; loopback only unless --insecure (tcp://127.0.0.1:* picks a free port)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind WITHOUT authentication (trusted networks only)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="CurveZMQ: serve only robots whose public keys are in DIR/robots/, with DIR/<server-key>.key_secret "
                        "(dpstack keys generate/allow); allows a non-loopback bind")
    p.add_argument("--server-key", default="server", help="name of the server's key pair in --keys DIR (default: server)")
    p.add_argument("--session-timeout", type=float, default=30.0, help="drop a robot's session after this many idle seconds")
    p.add_argument("--stats-interval", type=float, default=30.0, help="log server metrics every this many seconds")
    p.add_argument("--max-sessions", type=int, default=32, help="robots served at once (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--scheduling", choices=("batched", "serial"), default="batched",
                   help="batched: one denoiser call per round for every robot, round robin per connection; "
                        "serial: one robot's whole chunk at a time, in arrival order (default: %(default)s)")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="batched: wait this long for more robots before each round's denoiser call (default: 0, "
                        "run with what is waiting when the previous call ends)")
    p.add_argument("--providers", default="", help="comma-separated onnxruntime providers (default: TensorRT>CUDA>CPU)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (every module, not only sessions and stats)")
    realtime.add_arguments(p)


def build_factory(policy_dir: str, sampler: str, threads: int = 2, providers: tuple[str, ...] = ()):
    """(factory, policy spec, PolicyInfo) for a package: each session a fresh PolicyRunner."""
    from dpstack.runtime.package import SessionOptions, load_package
    from dpstack.runtime.policy import PolicyRunner, measure_startup_s
    from dpstack.runtime.protocol import PolicyInfo
    from dpstack.runtime.samplers import SamplerConfig

    package = load_package(policy_dir, options=SessionOptions(intra_op_threads=threads, providers=providers))
    config = SamplerConfig.parse(sampler)
    # The robot must publish what the encoder reads, not every key of the training dataset.
    spec = package.spec.with_observations(package.obs_keys)
    probe = PolicyRunner(package, config)  # builds the sampler once: a bad choice fails before binding
    # Results show the name as typed ("rti"), with what it resolved to beside it.
    info = PolicyInfo(name=str(package.manifest.get("name") or package.path.name), sampler=sampler.strip(),
                      sampler_resolved=probe.sampler.name, horizon=package.horizon, n_obs_steps=package.n_obs_steps,
                      n_action_steps=package.n_action_steps, control_hz=spec.control_hz, action=spec.action,
                      startup_s=measure_startup_s(probe))  # robots allow this for a session's first chunk

    def factory(robot_spec):
        return PolicyRunner(package, config)
    return factory, spec, info


def run(args: argparse.Namespace) -> int:
    if not realtime.apply_from_args(args, "dpstack serve"):  # before any thread starts: threads inherit it
        return 2
    from dpstack.runtime.package import PackageError
    from dpstack.core.process import EXIT_INTERRUPTED
    from dpstack.runtime.endpoint import EndpointError
    from dpstack.runtime.server import InsecureBind, PolicyServer, ServerConfig, run_until_signalled

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dpstack.runtime.server").setLevel(logging.INFO)  # sessions and periodic stats
    providers = tuple(p for p in args.providers.split(",") if p)
    try:
        factory, spec, info = build_factory(args.policy_dir, args.sampler, args.threads, providers)
    except (PackageError, ValueError) as e:
        print(f"dpstack serve: {e}", file=sys.stderr)
        return 2
    security = None
    if args.keys:
        from dpstack.runtime import auth
        try:
            security = auth.server_security_from_dir(args.keys, args.server_key)
        except (auth.KeyFileError, ValueError) as e:
            print(f"dpstack serve: {e}", file=sys.stderr)
            return 2
    try:
        config = ServerConfig(bind=args.bind, insecure=args.insecure, session_timeout_s=args.session_timeout,
                              stats_interval_s=args.stats_interval, max_sessions=args.max_sessions, security=security,
                              scheduling=args.scheduling, batch_window_ms=args.batch_window_ms)
        server = PolicyServer(factory, spec, info, config)
    except (InsecureBind, EndpointError, ValueError) as e:
        print(f"dpstack serve: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_until_signalled(server)
    finally:
        if security is not None:
            security.stop()
    print("summary " + json.dumps(summary, sort_keys=True), flush=True)
    return EXIT_INTERRUPTED if summary["stopped_by"] == "SIGINT" else 0  # SIGTERM: a service stop
