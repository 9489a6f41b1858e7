"""The `dpstack` command. Subcommands live in their own packages and are
imported only when needed, so a robot computer without torch or mujoco can
still run `dpstack serve` and `dpstack bridge`.

Each subcommand module provides `add_arguments(parser)` and `run(args) -> int`;
it imports heavy dependencies inside `run`, never at module level.

Stopping, one rule for every command:
- Ctrl-C (SIGINT) means a person interrupted the command. It stops in order,
  keeps what finished (train saves a resumable checkpoint, sim writes its finished
  episodes, eval keeps its finished jobs, serve says Bye to its robots, the bridge
  stops the arm), and exits 130 (EXIT_INTERRUPTED, the shell's 128 + SIGINT).
- SIGTERM is how a service manager (systemd's KillSignal, deploy/systemd/) stops the
  long-running services: `serve` and `bridge` stop in the same order and exit 0, a
  normal end, so `Restart=on-failure` leaves them stopped. Every other command
  treats SIGTERM as Ctrl-C: it stops in order (eval stops its servers and arms)
  and exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
from dataclasses import dataclass

from dpstack import __version__
from dpstack.core import interrupt
from dpstack.core.process import EXIT_INTERRUPTED


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    extra: str  # the pip extra that brings its dependencies


COMMANDS: dict[str, Command] = {
    "collect": Command("dpstack.sim.collect_cli", "collect demonstrations with a scripted expert in simulation", "sim"),
    "data": Command("dpstack.data.cli", "inspect, convert, describe, edit and render demonstration datasets", "data"),
    "train": Command("dpstack.policy.train_cli", "train a diffusion policy on a dataset", "train"),
    "export": Command("dpstack.policy.export_cli", "export a checkpoint to an ONNX policy package", "train"),
    "serve": Command("dpstack.runtime.serve_cli", "serve a policy package over ZeroMQ", "runtime"),
    "sim": Command("dpstack.sim.arm_cli", "run a simulated arm against a policy server", "sim"),
    "eval": Command("dpstack.sim.eval_cli", "closed-loop evaluation of a policy package", "sim"),
    "pool": Command("dpstack.sim.eval_pool_cli", "pool evaluations of one package: seed ranges added up, samplers compared seed by seed", "sim"),
    "bench": Command("dpstack.bench_cli", "benchmarks: sampler latency, fleet serving, training throughput, transport, servo jitter", "train"),
    "bridge": Command("dpstack.deploy.bridge_cli", "run the real-robot bridge", "deploy"),
    "record": Command("dpstack.deploy.record_cli", "teleoperate the arm through the bridge and record demonstrations",
                      "deploy"),
    "keys": Command("dpstack.deploy.keys_cli", "generate CurveZMQ keys for authenticated links", "deploy"),
    "demo": Command("dpstack.demo.cli", "end-to-end demo: collect, train, export, serve, evaluate", "all"),
}


def _install_hint(command: str, missing: str | None, extra: str) -> str:
    return f"dpstack {command}: missing module {missing!r}; install it with: pip install 'dpstack[{extra}]'"


@dataclass(frozen=True)
class Unavailable:
    """Stands in for a command whose module cannot be imported: it stays in --help and, when run,
    says which extra to install."""
    message: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.description = self.message

    def run(self, args: argparse.Namespace) -> int:
        print(self.message, file=sys.stderr)
        return 3


def _load(name: str):
    """The command's module, or an Unavailable naming the extra that brings what it lacks."""
    cmd = COMMANDS[name]
    try:
        return importlib.import_module(cmd.module)
    except ModuleNotFoundError as e:
        return Unavailable(_install_hint(name, e.name, cmd.extra))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpstack",
        description="dpstack: datasets, training, ONNX runtime, simulation and deployment for robot diffusion policies.",
        epilog="Run `dpstack COMMAND --help` for the options of one command.")
    parser.add_argument("--version", action="version", version=f"dpstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="the command to run:")
    for name, cmd in COMMANDS.items():
        module = _load(name)
        unavailable = f" (unavailable: pip install 'dpstack[{cmd.extra}]')" if isinstance(module, Unavailable) else ""
        p = sub.add_parser(name, help=cmd.help + unavailable, description=cmd.help)
        module.add_arguments(p)
        p.set_defaults(_module=module, _extra=cmd.extra)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not isinstance(getattr(args, "_module", None), Unavailable):  # it takes any options
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    # SIGTERM stops a batch command as Ctrl-C does (in order, children too); serve and
    # bridge install their own SIGTERM handler.
    previous = interrupt.install(signal.SIGINT, signal.SIGTERM)
    try:
        return int(args._module.run(args) or 0)
    except ModuleNotFoundError as e:
        print(_install_hint(args.command, e.name, args._extra), file=sys.stderr)
        return 3
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"dpstack {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        interrupt.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
