"""`dpstack export CHECKPOINT --out POLICY_DIR` and `dpstack export --verify POLICY_DIR`."""
from __future__ import annotations

import argparse
import json
import sys

from dpstack.runtime.samplers import DEFAULT_RTI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="checkpoint to export (or, with --verify, to compare against)")
    parser.add_argument("--out", help="policy package directory to write")
    parser.add_argument("--verify", metavar="POLICY_DIR", help="re-check an existing package instead of exporting")
    parser.add_argument("--force", action="store_true", help="replace an existing package directory")
    parser.add_argument("--weights", choices=("fp32", "int8"), default="fp32",
                        help="int8: quantize the denoiser's MatMul weights (faster on CPU for the dp U-Net; "
                             "held to a looser parity tolerance, so check it in closed loop)")
    parser.add_argument("--rti-default", default=DEFAULT_RTI, metavar="LIST",
                        help="the RTI refinement list that bare `rti` runs with this package, e.g. renoise-20,10,0 "
                             "(RTI-DP picks it per task; default %(default)s, which serves every shipped task)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max abs error allowed between torch and onnxruntime (default 1e-4; 0.1 for --weights int8; "
                             "with --verify, what the package was exported under)")


def run(args: argparse.Namespace) -> int:
    from dpstack.runtime.package import MANIFEST, PackageError
    from dpstack.runtime.verify import VerifyError, verify_onnx_only

    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        if not args.verify:
            raise
        # A robot computer: what can be checked without torch.
        try:
            print(json.dumps(verify_onnx_only(args.verify, args.tolerance or 1e-4, "torch not installed; checked onnx self-consistency only"), indent=2))
        except (VerifyError, PackageError, ValueError) as e:
            print(f"dpstack export: {e}", file=sys.stderr)
            return 1
        print(f"{args.verify}: OK")
        return 0
    from .checkpoint import CheckpointError
    from .export import export_checkpoint, verify_package

    try:
        if args.verify:
            report = verify_package(args.verify, args.checkpoint, args.tolerance)
            print(json.dumps(report, indent=2))
            print(f"{args.verify}: OK")
            return 0
        if not args.checkpoint or not args.out:
            print("dpstack export: need CHECKPOINT and --out POLICY_DIR (or --verify POLICY_DIR)", file=sys.stderr)
            return 2
        out = export_checkpoint(args.checkpoint, args.out, args.tolerance, args.force, args.weights, args.rti_default)
        manifest = json.loads((out / MANIFEST).read_text())
        print(f"wrote {out}: parity max abs error {manifest['export']['parity_max_abs_error']}")
        return 0
    except (VerifyError, PackageError, CheckpointError, ValueError) as e:
        print(f"dpstack export: {e}", file=sys.stderr)
        return 1
