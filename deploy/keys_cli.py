"""`dpstack keys`: CurveZMQ key files for the authenticated robot <-> policy-server link.

    dpstack keys generate --out /etc/dpstack/keys --name server      # on the policy server
    dpstack keys generate --out /etc/dpstack/keys --name ur5e        # on the robot computer
    dpstack keys allow --keys /etc/dpstack/keys ur5e.key              # on the server: admit that robot
Copy server.key (public) to the robot and ur5e.key (public) to the server; secret
files (*.key_secret, mode 0600) never leave the machine they were made on.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True, help="one of:")
    g = sub.add_parser("generate", help="write NAME.key and NAME.key_secret")
    g.add_argument("--out", required=True, help="directory for the key files")
    g.add_argument("--name", required=True, help="key name, e.g. server or the robot's name")
    a = sub.add_parser("allow", help="admit a robot: copy its public key into KEYS/robots/")
    a.add_argument("--keys", required=True, help="the server's key directory")
    a.add_argument("public_key", help="the robot's NAME.key file")


def run(args: argparse.Namespace) -> int:
    from dpstack.runtime import auth

    if args.keys_command == "generate":
        try:
            public, secret = auth.generate(args.out, args.name)
        except (FileExistsError, ValueError) as e:
            print(f"dpstack keys: {e}", file=sys.stderr)
            return 2
        print(f"public key: {public}  (share it)\nsecret key: {secret}  (mode 600; keep it on this machine)")
        return 0
    src = Path(args.public_key)
    try:
        auth.load_public(src)
    except (auth.KeyFileError, ValueError, OSError) as e:
        print(f"dpstack keys: {src} is not a public key file: {e}", file=sys.stderr)
        return 2
    if src.name.endswith("_secret"):
        print(f"dpstack keys: {src} is a SECRET key; pass the public NAME.key", file=sys.stderr)
        return 2
    dest = Path(args.keys) / "robots"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest / src.name)
    print(f"allowed {src.name}: {dest / src.name} (restart or reload the server)")
    return 0
