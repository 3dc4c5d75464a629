"""Rate–distortion of the per-tensor codecs on real MiniLM task vectors: Delta-CoMe's ``mixed-svd``, UltraDelta's
``ultra``, the ``zstd`` entropy stage, against ``lowrank:rank=R+int4`` and plain integer quantisation.

Per task vector (fine-tune − pretrained, ``tvbasis finetune`` directories) and per codec setting, every linear
weight of the transformer blocks (``is_block_weight``: the 36 attention and feed-forward matrices of MiniLM-L6,
10.6 M of its 22.7 M parameters, the tensors every one of these peers compresses) is encoded and decoded:

* bytes: Σ ``Encoded.nbytes`` (every stored tensor: codes, scales, minima, positions, σ), and the ratio to the
  float32 bytes of those matrices;
* error: ‖v − v̂‖ / ‖v‖ over those matrices, per task (mean and max over tasks).

Settings named ``deltacome α=…`` are Delta-CoMe's rule (``tvbasis.compress.deltacome``: 2 / 32 / rest-of-α
triplets at 8 / 3 / 2 bits per matrix); ``ultra d=…`` is UltraDelta's code at a uniform density with its 1/d
rescale (the reference's) and with scale 1 (no rescale: smaller L2 error, what the rescale trades away); the
cross-layer allocation and trace-norm step are store-level (``tvbasis build --method ultradelta``), not here.
Each ``zstd+X`` row is X with the lossless stage; the ``zstd saves`` column is its byte saving against X. A
second table does the same for the word-embedding table alone (sparse rows, then codes, with and without zstd).

    python benchmarks/codec_rd.py --work /tmp/h0-work            # pretrained/ and finetuned/<task>/ inside
    python benchmarks/codec_rd.py --pretrained P --finetuned a=A --finetuned b=B

Results: benchmarks/results/codec_rd.json and .md (the command at the top).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, markdown_table, save_results
from tvbasis.codecs import parse_codec
from tvbasis.compress.blocks import is_block_weight
from tvbasis.compress.deltacome import DELTACOME_DEFAULTS, deltacome_codec
from tvbasis.eval.finetune import task_vector_state

LOWRANK = [f"lowrank:rank={r}+int4" for r in (16, 32, 64)]
QUANT = ["int2:group=32,scheme=affine", "int4"]
MIXED = ["mixed-svd:ranks=2/32/64,bits=8/3/2"]
DELTACOME = (1 / 32, 1 / 16)
ULTRA = ["ultra:density=0.03", "ultra:density=0.1", "ultra:density=0.03,scale=1.0"]
ZSTD = ["int2:group=32,scheme=affine", "int4", "lowrank:rank=32+int4", "ultra:density=0.03", "DELTACOME"]
#: the word-embedding table (a fine-tune changes only the rows of the tokens it saw), second table
EMBEDDING = ["sparse-rows+int4", "sparse-rows+int8", "sparse-rows+lowrank:rank=64+int4"]


def settings() -> list[tuple[str, str]]:
    """(label, spec or DELTACOME:α) rows in table order."""
    rows = [(s, s) for s in LOWRANK + QUANT + MIXED]
    rows += [(f"deltacome α=1/{round(1 / a)}", f"DELTACOME:{a!r}") for a in DELTACOME]
    rows += [(s, s) for s in ULTRA]
    for s in ZSTD:
        inner = f"DELTACOME:{1 / 16!r}" if s == "DELTACOME" else s
        rows.append((f"zstd+{'deltacome α=1/16' if s == 'DELTACOME' else s}", f"ZSTD:{inner}"))
    return rows


def codec_of(spec: str, name: str, shape: tuple[int, ...]):
    """The codec of a row for one matrix (Delta-CoMe's rank split depends on the shape)."""
    if spec.startswith("ZSTD:"):
        inner = codec_of(spec[5:], name, shape)
        return parse_codec(f"zstd+{inner.spec}")
    if spec.startswith("DELTACOME:"):
        alpha = float(spec.split(":", 1)[1])
        return deltacome_codec(name, shape, {**DELTACOME_DEFAULTS, "alpha": alpha})
    return parse_codec(spec)


def measure(vectors: dict[str, dict[str, torch.Tensor]], spec: str) -> dict[str, object]:
    nbytes, errs, fp32 = 0, {}, 0
    t0 = time.perf_counter()
    for task, vec in vectors.items():
        num = den = 0.0
        for name, x in vec.items():
            codec = codec_of(spec, name, tuple(x.shape))
            enc = codec.encode(x)
            xhat = codec.decode(enc)
            nbytes += enc.nbytes
            fp32 += 4 * x.numel()
            num += float(((x.double() - xhat.double()) ** 2).sum())
            den += float((x.double() ** 2).sum())
        errs[task] = math.sqrt(num / den)
    return {"bytes": nbytes, "ratio": fp32 / nbytes, "rel_error": errs,
            "mean_error": sum(errs.values()) / len(errs), "max_error": max(errs.values()),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="a tvbasis finetune work directory (pretrained/, finetuned/<task>/)")
    p.add_argument("--pretrained", type=Path)
    p.add_argument("--finetuned", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--name", default="codec_rd")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.work is not None:
        pre = args.work / "pretrained"
        fts = {d.name: d for d in sorted((args.work / "finetuned").iterdir()) if d.is_dir()}
    else:
        pre = args.pretrained
        fts = {k: Path(v) for k, v in (f.split("=", 1) for f in args.finetuned)}
    if pre is None or not fts:
        p.error("give --work, or --pretrained and --finetuned")
    vectors, embeddings = {}, {}
    for task, d in fts.items():
        tv = task_vector_state(pre, d)
        vectors[task] = {k: v for k, v in tv.items() if is_block_weight(k, tuple(v.shape))}
        embeddings[task] = {k: v for k, v in tv.items() if k.endswith("word_embeddings.weight")}
    n = sum(v.numel() for v in next(iter(vectors.values())).values())
    log(f"{len(vectors)} task vectors, {len(next(iter(vectors.values())))} block linear matrices, {n} parameters")
    results = {}
    for label, spec in settings():
        results[label] = measure(vectors, spec)
        r = results[label]
        log(f"{label}: {r['ratio']:.1f}x, error {r['mean_error']:.4f} (max {r['max_error']:.4f}), "
            f"{r['seconds']:.1f} s")
    emb = {}
    for spec in EMBEDDING:
        for label in (spec, f"zstd+{spec}"):
            emb[label] = measure(embeddings, label)
            log(f"embedding {label}: {emb[label]['ratio']:.1f}x, error {emb[label]['mean_error']:.4f}")
    rows = []
    for label, r in results.items():
        saves = ""
        if label.startswith("zstd+"):
            base = results[label[5:]]
            saves = f"{100 * (1 - r['bytes'] / base['bytes']):.1f} %"
        rows.append([label, f"{r['bytes'] / len(vectors) / 1e6:.3f}", f"{r['ratio']:.1f}x", f"{r['mean_error']:.4f}",
                     f"{r['max_error']:.4f}", saves])
    headers = ["MB per task", "× vs fp32", "rel. error (mean)", "rel. error (max)", "zstd saves"]
    table = markdown_table(["codec (block linear matrices)", *headers], rows)
    erows = [[label, f"{r['bytes'] / len(vectors) / 1e6:.3f}", f"{r['ratio']:.1f}x", f"{r['mean_error']:.4f}",
              f"{r['max_error']:.4f}",
              f"{100 * (1 - r['bytes'] / emb[label[5:]]['bytes']):.1f} %" if label.startswith("zstd+") else ""]
             for label, r in emb.items()]
    table += "\n\n" + markdown_table(["codec (word embeddings)", *headers], erows)
    save_results(args.name, {"tasks": list(vectors), "parameters_per_task": n, "results": results,
                             "embedding_results": emb}, table)


if __name__ == "__main__":
    main()
