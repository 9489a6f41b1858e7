"""`dpstack record --config ROBOT --out STORE --device keyboard|spacemouse|replay`:
teleoperate the arm through the bridge and record demonstrations into a dataset.

    dpstack record --config sim --out demos.zarr                       # keyboard in this terminal
    dpstack record --config ur5e --out demos.zarr --device spacemouse
    dpstack record --config sim --out again.zarr --device replay --replay demos.zarr
The safety layer, watchdog and e-stop are the bridge's. Keys: n start an episode,
y keep it, x discard it, h home the arm; space or e pulls the e-stop, r resets it;
Q quits. An existing STORE recorded with the same robot spec is appended to.
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
    p.add_argument("--out", required=True, metavar="STORE", help="dataset to record into (created, or appended to)")
    p.add_argument("--device", choices=["keyboard", "spacemouse", "replay"], default="keyboard",
                   help="what drives the arm (default: keyboard)")
    p.add_argument("--replay", metavar="PATH", default=None,
                   help="replay device: a dpstack store, a .npy (T, A) or (E, T, A), or a .json list of episodes")
    p.add_argument("--replay-key", default="action", help="replay device: the store key to play (default: action)")
    p.add_argument("--episodes", type=int, default=0, help="stop after keeping this many episodes (0: until quit)")
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override robot YAML values, e.g. --set safety.max_linear_speed=0.1")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, not only warnings and errors")
    realtime.add_arguments(p)


def _device(args: argparse.Namespace, cfg, estop):
    from dpstack.deploy import teleop

    if args.device == "replay":
        if not args.replay:
            raise teleop.DeviceError("--device replay needs --replay PATH (a store, .npy or .json of actions)")
        return teleop.ReplayDevice(teleop.load_replay(args.replay, args.replay_key, cfg.action.dim))
    if args.device == "spacemouse":
        keys = teleop.KeyboardDevice(estop) if sys.stdin is not None and sys.stdin.isatty() else None
        return teleop.SpaceMouseDevice(estop, keyboard=keys)
    return teleop.KeyboardDevice(estop)


def run(args: argparse.Namespace) -> int:
    if not realtime.apply_from_args(args, "dpstack record"):
        return 2
    from dpstack.core.process import EXIT_INTERRUPTED
    from dpstack.data.replay_buffer import DatasetAttrs
    from dpstack.deploy.bridge import Bridge
    from dpstack.deploy.cameras import start_cameras
    from dpstack.deploy.config import ConfigError, load_config
    from dpstack.deploy.drivers import make_driver
    from dpstack.deploy.estop import EStop
    from dpstack.deploy.record import RecordError, Session, StatusLine, open_store
    from dpstack.deploy.teleop import KEY_HELP, DeviceError, TeleopSource
    from dpstack.runtime.endpoint import EndpointError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def fail(message: str) -> int:
        print(f"dpstack record: {message}", file=sys.stderr)
        return 2

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return fail(str(e))
    if cfg.dry_run:
        return fail(f"{args.config} sets dry_run: true, and a recording needs the arm to move; "
                    "pass --set dry_run=false")
    estop = EStop()
    try:
        device = _device(args, cfg, estop)
    except DeviceError as e:
        return fail(str(e))
    if args.device != "replay":
        cfg.safety.estop_keys = False   # the teleop keyboard owns the terminal and pulls the e-stop itself
    try:
        device.start()
    except DeviceError as e:
        return fail(str(e))

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.__setitem__("flag", True))
    status, summary, cameras, session = 0, None, {}, None
    bridge = None
    try:
        driver = make_driver(cfg.driver, cfg.cameras)
        cameras = start_cameras(cfg.cameras, driver)
        source = TeleopSource(device, cfg.action)
        bridge = Bridge(cfg, driver, source=source, dry_run=False, estop=estop, cameras=cameras)
        bridge.start()
        source.home_pose = bridge.safety.commanded   # where it started, inside the workspace box
        spec = bridge.spec
        attrs = DatasetAttrs(task=spec.task, control_hz=spec.control_hz, spec=spec, source="human",
                             extra={"robot": cfg.name, "driver": bridge.info.name, "device": device.name,
                                    "recorded_by": "dpstack record"})
        store = open_store(args.out, attrs)
        session = Session(bridge, source, store, StatusLine(), max_episodes=args.episodes)
        if bridge.estop_endpoint:
            print(f"e-stop socket: {bridge.estop_endpoint}", flush=True)
        print(f"recording into {args.out} ({store.n_episodes} episodes there) with the {device.name} device",
              flush=True)
        if device.name != "replay":
            print(KEY_HELP, flush=True)
        summary = session.run(should_stop=lambda: stop["flag"])
    except (RecordError, DeviceError) as e:
        status = fail(str(e))
    except EndpointError as e:  # the e-stop socket could not bind: no recording without its e-stop
        status = fail(f"safety.estop_endpoint: {e}")
    except KeyboardInterrupt:   # Ctrl-C: kept episodes are written, the one in progress is not
        summary = {**bridge.summary(), **session.figures()} if session is not None else None
        status = EXIT_INTERRUPTED
    finally:
        device.close()
        if bridge is not None:
            bridge.close()
        if session is not None:
            session.store.close()
        for cam in cameras.values():
            cam.stop()
    if summary is not None:
        text = json.dumps(summary, indent=2, sort_keys=True)
        print("summary " + text, flush=True)
        if summary.get("write_error"):
            print(f"dpstack record: {summary['write_error']}; the episodes before it are in {args.out}",
                  file=sys.stderr)
            return 1
    return status
