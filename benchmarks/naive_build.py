"""The naive, all-in-memory basis build (as the paper's reference code does it), for memory comparisons.

Loads the pretrained model and every fine-tune fully, keeps the T task vectors as dicts of float32 tensors,
flattens them into V (D × T, float32), forms G = VᵀV, fits B from G (top-M eigenvectors: the PCA-like choice
costs nothing next to the rest) and materialises the bases V·B (D × M), then writes them as one safetensors
file. Run it in its own process; its peak RSS is the baseline that the streaming build is compared with.

    python benchmarks/naive_build.py --pretrained PRE FT1 FT2 ... -M 4 --out bases.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def model_file(p: str) -> str:
    path = Path(p)
    return str(path / "model.safetensors" if path.is_dir() else path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("finetuned", nargs="+")
    ap.add_argument("-M", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t0 = time.perf_counter()
    pre = load_file(model_file(a.pretrained))
    keys = [k for k, v in pre.items() if v.is_floating_point()]
    tvs = []
    for f in a.finetuned:
        ft = load_file(model_file(f))
        tvs.append({k: ft[k].float() - pre[k].float() for k in keys})
        del ft
    V = torch.stack([torch.cat([tv[k].reshape(-1) for k in keys]) for tv in tvs], dim=1)  # (D, T)
    G = (V.T @ V).double().numpy()
    w, U = np.linalg.eigh(G)
    B = torch.from_numpy(np.ascontiguousarray(U[:, ::-1][:, : a.M])).float()  # (T, M)
    S = V @ B  # (D, M)
    out, off = {}, 0
    for k in keys:
        n = pre[k].numel()
        out[k] = S[off:off + n].T.reshape(a.M, *pre[k].shape).contiguous()
        off += n
    save_file(out, a.out)
    print(f"naive build: D = {V.shape[0]:,}, T = {V.shape[1]}, M = {a.M}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
