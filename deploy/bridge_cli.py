"""`dpstack bridge --config deploy/configs/<robot>.yaml`: run the real-robot bridge.

    dpstack bridge --config sim --dry-run --duration 10     # compute everything, command nothing
    dpstack bridge --config ur5e --connect tcp://gpu-box:5555
E-stop: `kill -USR1 <pid>`, 'e' or space + Enter on the terminal, or
`python -m dpstack.deploy.estop tcp://127.0.0.1:5599 estop`; reset with 'r' or `... reset`.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from dpstack.runtime import realtime


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="robot YAML (path, or a name in deploy/configs: sim, ur5e, franka)")
    p.add_argument("--connect", dest="endpoint", default=None, metavar="ENDPOINT",
                   help="policy server endpoint to dial (overrides the YAML's policy.endpoint)")
    p.add_argument("--endpoint", dest="endpoint", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override robot YAML values, e.g. --set safety.max_linear_speed=0.1 (the YAML's checks still apply)")
    p.add_argument("--dry-run", action="store_true", help="compute everything, command nothing (logs what it would send)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: the YAML's, 0 = until stopped)")
    p.add_argument("--robot-id", default=None, help="name this robot gives the server (default: the YAML's name)")
    p.add_argument("--out", dest="summary", default=None, metavar="FILE", help="also write the run summary as JSON here")
    p.add_argument("--summary", dest="summary", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, not only warnings and errors")
    p.add_argument("--check-cameras", type=float, default=None, metavar="SECONDS",
                   help="only watch the YAML's cameras for SECONDS and report each one's frame rate, frame age "
                        "and health (no policy link; the arm is started only for cameras it renders)")
    p.add_argument("--save-frames", default=None, metavar="DIR",
                   help="with --check-cameras: write every new frame to DIR, named by arrival and capture time (ms)")
    realtime.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    if not realtime.apply_from_args(args, "dpstack bridge"):  # before any thread starts: threads inherit it
        return 2
    from dpstack.core.process import EXIT_INTERRUPTED
    from dpstack.deploy.bridge import Bridge
    from dpstack.deploy.config import ConfigError, load_config
    from dpstack.deploy.drivers import make_driver
    from dpstack.runtime import auth
    from dpstack.runtime.client import PolicyClient
    from dpstack.runtime.endpoint import EndpointError, check_endpoint

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("deploy").setLevel(logging.INFO)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"dpstack bridge: {e}", file=sys.stderr)
        return 2
    if args.check_cameras is not None:
        return check_cameras(cfg, args.check_cameras, args.save_frames)
    endpoint = args.endpoint or cfg.policy.endpoint
    try:
        check_endpoint(endpoint)
    except EndpointError as e:
        print(f"dpstack bridge: policy endpoint: {e}", file=sys.stderr)
        return 2
    security = None
    link = cfg.policy
    if link.server_public_key or link.client_secret_key:
        if not (link.server_public_key and link.client_secret_key):
            print("dpstack bridge: policy.server_public_key and policy.client_secret_key go together", file=sys.stderr)
            return 2
        try:
            security = auth.curve_client(link.client_secret_key, link.server_public_key)
        except (auth.KeyFileError, ValueError) as e:
            print(f"dpstack bridge: {e}", file=sys.stderr)
            return 2
    else:
        from dpstack.runtime.server import is_loopback_endpoint
        if not is_loopback_endpoint(endpoint):
            logging.getLogger("deploy").warning("policy link to %s is NOT authenticated: set policy.server_public_key "
                                                "and policy.client_secret_key (dpstack keys generate)", endpoint)

    from dpstack.deploy.cameras import start_cameras
    driver = make_driver(cfg.driver, cfg.cameras)
    try:
        cameras = start_cameras(cfg.cameras, driver)
    except (RuntimeError, ImportError) as e:   # a camera that cannot open: nothing has moved yet
        print(f"dpstack bridge: {e}", file=sys.stderr)
        return 2
    from dpstack.deploy.bridge import robot_spec
    client = PolicyClient(endpoint, robot_spec(cfg), args.robot_id or cfg.name, timeout_s=link.timeout_s,
                          security=security)
    bridge = Bridge(cfg, driver, client, dry_run=True if args.dry_run else None, cameras=cameras)
    stop = {"flag": False}

    def on_term(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    duration = cfg.max_duration_s if args.duration is None else args.duration
    summary = None
    status = 0
    try:
        bridge.start()
        if bridge.estop_endpoint:
            print(f"e-stop socket: {bridge.estop_endpoint}", flush=True)
        print(f"bridge running ({'DRY RUN' if bridge.dry_run else 'LIVE'}); policy at {endpoint}", flush=True)
        summary = bridge.run(duration_s=duration, should_stop=lambda: stop["flag"])
    except EndpointError as e:  # the e-stop socket could not bind: no bridge without its e-stop
        print(f"dpstack bridge: safety.estop_endpoint: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stopped as on SIGTERM, but the exit status says a person interrupted it
        summary = bridge.summary()
        status = EXIT_INTERRUPTED
    finally:
        bridge.close()
        client.close()
        for cam in cameras.values():
            cam.stop()
    text = json.dumps(summary, indent=2, sort_keys=True)
    print("summary " + text, flush=True)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text + "\n")
    refusal = client.refusal()
    if refusal is not None:
        print(f"dpstack bridge: {refusal}; serve a policy trained on the observations {args.config} publishes "
              "(docs/deploy.md, 'A policy the bridge can serve') or make its spec: section match the policy",
              file=sys.stderr)
        return 1
    return status


def check_cameras(cfg, seconds: float, save_dir: str | None) -> int:
    """`--check-cameras`: report the configured cameras; status 1 when one is unfit to feed a policy."""
    import os

    from dpstack.deploy import cameras as cams
    from dpstack.deploy.drivers import make_driver

    if not cfg.cameras:
        print(f"dpstack bridge: {cfg.name} lists no cameras", file=sys.stderr)
        return 2
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
    rendered = any(c.kind == "mujoco" for c in cfg.cameras)
    driver = make_driver(cfg.driver, cfg.cameras) if rendered else None
    running = {}
    try:
        running = cams.start_cameras(cfg.cameras, driver)
        if driver is not None:
            driver.connect()   # the simulated arm renders its cameras
        report = cams.check_cameras(running, seconds, save_dir)
    except (RuntimeError, ImportError) as e:
        print(f"dpstack bridge: {e}", file=sys.stderr)
        return 2
    finally:
        for cam in running.values():
            cam.stop()
        if driver is not None:
            driver.close()
    print(json.dumps(report, indent=2, sort_keys=True), flush=True)
    bad = [f"{name}: {r['verdict']}" for name, r in report.items() if r["verdict"] != "ok"]
    if bad:
        print("dpstack bridge: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0
