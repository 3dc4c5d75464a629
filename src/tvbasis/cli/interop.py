"""Subcommands between tvbasis stores and other tools' formats: ``import-tvb``, ``export-tvb`` (the paper's
released bases, uiuctml/TaskVectorBasis)."""

from __future__ import annotations

import argparse
from typing import Any

from tvbasis.cli.common import FT_HELP, finish, json_flag, pairs
from tvbasis.interop import export_tvb, import_tvb
from tvbasis.io import human_bytes


def cmd_import_tvb(args: argparse.Namespace) -> int:
    store = import_tvb(args.folder, args.pretrained, args.out, finetuned=pairs(args.finetuned, "--finetuned") or None,
                       dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force)
    from tvbasis.store.notes import error_warnings, unknown_errors
    s = store.summary()
    unknown = set(unknown_errors(store))

    def text() -> None:
        print(f"wrote {s['method']} store {store.root} from {args.folder}: M = {store.M} bases for T = {store.T} "
              f"tasks ({', '.join(store.task_names)}), {human_bytes(s['bytes_on_disk'])} on disk")
        if not unknown:
            print("relative reconstruction errors: " + ", ".join(f"{t} {e:.4f}" for t, e in s["rel_errors"].items()))
        else:
            print("the folder holds no task vectors: Gram matrix and cosines are those of the reconstructions and "
                  "the reconstruction errors are unknown (give --finetuned NAME=DIR for every task to measure them)")

    return finish(args, text, {"store": str(store.root), "folder": str(args.folder), "method": s["method"],
                               "M": store.M, "T": store.T, "tasks": store.task_names,
                               "bytes_on_disk": s["bytes_on_disk"],
                               "rel_errors": {t: (None if t in unknown else e) for t, e in s["rel_errors"].items()}},
                  [w for w in error_warnings(store) if not w.startswith("the relative errors of")])


def cmd_export_tvb(args: argparse.Namespace) -> int:
    out = export_tvb(args.store, args.out, force=args.force, model=args.model or "")
    files = ["basis_vectors.pt", "method_info.json",
             "pca_components.pt" if (out / "pca_components.pt").exists() else "AWB.pt"]
    return finish(args, f"wrote {out} in the layout of uiuctml/TaskVectorBasis ({files[0]}, {files[1]} and "
                  f"{files[2]})", {"out": str(out), "store": str(args.store), "files": files})


def register(sub: Any) -> None:
    s = sub.add_parser("import-tvb", help="turn a basis folder of the paper's code (uiuctml/TaskVectorBasis) into a store",
                       description="Read a basis folder as released by the paper's authors (basis_vectors.pt, "
                       "method_info.json, and AWB.pt for AutoencoderBasisMethod or pca_components.pt for "
                       "PCABasisMethod; torch.load with weights_only=True) and write a tvbasis store of the "
                       "pretrained model. Task names are method_info.json's dataset order.")
    s.add_argument("folder", metavar="DIR")
    s.add_argument("--pretrained", required=True,
                   help="the pretrained model the basis was built from (a state dict with the basis's tensor names)")
    s.add_argument("--finetuned", action="append", metavar="NAME=PATH",
                   help="optional, for every task: " + FT_HELP + "; makes the Gram matrix and the "
                   "reconstruction errors exact")
    s.add_argument("--out", required=True, help="the store directory to write")
    s.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the stored bases "
                   "(default: the folder's)")
    s.add_argument("--max-shard-size", default="5GB")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    json_flag(s)
    s.set_defaults(fn=cmd_import_tvb)

    s = sub.add_parser("export-tvb", help="write a store as a basis folder of the paper's code",
                       description="Write an autoencoder or pca store (or a cluster store with a linear inner merge, "
                       "or random-sample, in the autoencoder layout) as basis_vectors.pt, method_info.json and "
                       "AWB.pt / pca_components.pt, as uiuctml/TaskVectorBasis saves and loads them.")
    s.add_argument("store")
    s.add_argument("--out", required=True, help="the folder to write")
    s.add_argument("--model", help="model name recorded in the metadata (e.g. ViT-B-32)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    json_flag(s)
    s.set_defaults(fn=cmd_export_tvb)
