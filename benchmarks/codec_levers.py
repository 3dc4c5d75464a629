"""The codec-side levers of issue 28 measured alone, before and after, in one process on one thread: the int8/int4
kernels (this tree's ``codecs/quant.py`` against the version of commit ``--before``) and the randomized truncated SVD
against the exact float64-Gram one (time and the rank-r error ratio), on BERT-base and Llama-7B matrix shapes of
low-rank-plus-noise deltas. Best of ``--repeats``; the machine's other load still shows in the absolute times.

    nice -n 10 python benchmarks/codec_levers.py
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, markdown_table, save_results
from tvbasis.codecs import quant
from tvbasis.compress.svd import exact_truncated_svd, randomized_svd, use_randomized

REPO = Path(__file__).resolve().parent.parent


def old_quant(commit: str) -> object:
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:src/tvbasis/codecs/quant.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "quant_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("quant_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def delta(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = 16
    low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r**0.5
    return (low + 0.45 * torch.randn(m, n, generator=g)) * 1e-3


def rank_error(x: torch.Tensor, f: tuple[torch.Tensor, ...]) -> float:
    return float(torch.linalg.matrix_norm((x - (f[0] * f[1]) @ f[2]).double()))


def best(fn, repeats: int) -> tuple[float, object]:
    out, t = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="d1e36e1", help="commit whose codecs/quant.py is the 'before' kernel")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name")
    a = ap.parse_args()
    torch.set_num_threads(1)
    before = old_quant(a.before)
    shapes = {"BERT 512²": (512, 512), "BERT FFN 2048×512": (2048, 512), "BERT embedding 30522×512": (30522, 512),
              "Llama q/k/v/o 4096²": (4096, 4096), "Llama MLP 11008×4096": (11008, 4096)}
    qrows, srows, runs = [], [], []
    for label, (m, n) in shapes.items():
        x = delta(m, n)
        for codec in ("Int8", "Int4"):
            old, new = getattr(before, codec)(), getattr(quant, codec)()
            t_old, e_old = best(lambda old=old, x=x: old.decode(old.encode(x)), a.repeats)
            t_new, e_new = best(lambda new=new, x=x: new.decode(new.encode(x)), a.repeats)
            same = torch.equal(e_old, e_new)
            runs.append({"kind": "quant", "shape": [m, n], "codec": codec, "before_s": t_old, "after_s": t_new,
                         "identical": same})
            qrows.append([label, codec.lower(), f"{t_old:.3f}", f"{t_new:.3f}", f"{t_old / t_new:.2f}×",
                          "yes" if same else "**no**"])
            log(f"{label} {codec}: {t_old:.3f} -> {t_new:.3f} s")
        ranks = [r for r in (16, 64) if use_randomized((m, n), r)]
        if ranks:  # the exact path's cost does not depend on r (a full eigendecomposition): once, at the top rank
            reps = 1 if m * n > 20e6 else a.repeats
            top = max(ranks)
            t_ex, f_top = best(lambda x=x, r=top: exact_truncated_svd(x, r), reps)
        for r in ranks:
            f_ex = (f_top[0][:, :r], f_top[1][:r], f_top[2][:r])
            t_rd, f_rd = best(lambda r=r, x=x: randomized_svd(x, r), reps)
            ratio = rank_error(x, f_rd) / rank_error(x, f_ex)
            runs.append({"kind": "svd", "shape": [m, n], "rank": r, "exact_s": t_ex, "randomized_s": t_rd,
                         "error_ratio": ratio})
            srows.append([label, r, f"{t_ex:.2f}", f"{t_rd:.2f}", f"{t_ex / t_rd:.1f}×", f"{ratio:.5f}"])
            log(f"{label} rank {r}: exact {t_ex:.2f} s, randomized {t_rd:.2f} s, error ratio {ratio:.5f}")
    table = (f"One thread, best of {a.repeats} (1 for the SVDs of Llama's matrices), low-rank-plus-noise float32 "
             f"deltas. Quantisation: encode + decode, the kernels of commit {a.before} against this tree's, outputs "
             "compared bit for bit.\n\n"
             + markdown_table(["matrix", "codec", "before s", "after s", "speed-up", "identical"], qrows)
             + "\n\nTruncated SVD at rank r: the exact float64-Gram eigendecomposition against the randomized SVD "
             "(q = r + 16, 4 power iterations) that `truncated_svd` now takes for these shapes; error ratio = "
             "‖X − X̂_rand‖ / ‖X − X̂_exact‖ (accepted ≤ 1.02).\n\n"
             + markdown_table(["matrix", "rank", "exact s", "randomized s", "speed-up", "error ratio"], srows))
    save_results(a.name or "codec_levers", {"params": vars(a), "runs": runs}, table)


if __name__ == "__main__":
    main()
