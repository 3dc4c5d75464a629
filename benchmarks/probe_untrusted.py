"""The CLI sweep of issue 27: each case runs one ``tvbasis`` command, as an attacker or a careless user would, on
tiny models built here, and is classified from the outside:

- **data loss**: a file or directory the command was not asked to replace changed or vanished;
- **silent wrong output**: a command that must refuse exited 0 (or wrote an output);
- **internal error**: ``internal error`` or a traceback on stderr, more than one line, or no exit within the
  time limit (a hang or runaway work);
- **ok**: the expected outcome (a refusal: non-zero exit, one line, nothing written; or a success).

    python benchmarks/probe_untrusted.py            # prints a table, writes benchmarks/results/probe_untrusted.{json,md}

Every case is a subprocess (a hang is caught by its time limit). Nothing here needs the network or a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tests.tinymodels import make_family  # noqa: E402

TIMEOUT = 120
EXE = [sys.executable, "-c", "import sys; from tvbasis.cli import main; sys.exit(main())"]
os.environ["TQDM_DISABLE"] = "1"  # no progress bars, here or in the cases


@dataclass
class Case:
    name: str
    argv: list[str]
    protected: list[Path] = field(default_factory=list)  # must be byte-identical afterwards
    absent: list[Path] = field(default_factory=list)  # must not exist afterwards (outputs of a refused command)
    expect: str = "refuse"  # or "ok"
    check: Callable[[], str | None] | None = None  # extra check after the run: a problem, or None
    klass: str = ""


def tree(p: Path) -> dict[str, str]:
    if not os.path.lexists(p):
        return {}
    if p.is_file() and not p.is_symlink():
        return {".": hashlib.sha256(p.read_bytes()).hexdigest()}
    out = {}
    for q in sorted(p.rglob("*")):
        if q.name == ".tvbasis.lock":
            continue
        out[str(q.relative_to(p))] = hashlib.sha256(q.read_bytes()).hexdigest() if q.is_file() and not \
            q.is_symlink() and not q.is_fifo() else "dir"
    return out


def resign(root: Path, mf: dict) -> None:
    from tvbasis.store.format import manifest_digest
    mf = dict(mf)
    mf["manifest_sha256"] = manifest_digest(mf)
    (root / "tvbasis.json").write_text(json.dumps(mf))


def tamper_coded(root: Path, want_suffix: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Change a residual coded tensor's bytes and re-digest tensor, file and manifest consistently."""
    mf = json.loads((root / "tvbasis.json").read_text())
    for fname, f in mf["coded"]["files"].items():
        for t in f["tensors"]:
            if not (t[0].startswith("residual/") and t[0].endswith(want_suffix)):
                continue
            path = root / fname
            data = bytearray(path.read_bytes())
            n = struct.unpack("<Q", data[:8])[0]
            header = json.loads(data[8:8 + n])
            a, b = header[t[0]]["data_offsets"]
            dt = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}[header[t[0]]["dtype"]]
            s = 8 + n
            x = np.frombuffer(bytes(data[s + a:s + b]), dtype=dt).copy()
            data[s + a:s + b] = fn(x).astype(dt).tobytes()
            path.write_bytes(bytes(data))
            t[3] = f"{xxhash.xxh3_64_intdigest(bytes(data[s + a:s + b])):016x}"
            f["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
            resign(root, mf)
            return
    raise RuntimeError("no such coded tensor")


def run(case: Case, work: Path) -> dict:
    before = {str(p): tree(p) for p in case.protected}
    t0 = time.time()
    try:
        r = subprocess.run([*EXE, "-q", *case.argv], cwd=work, capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, "TQDM_DISABLE": "1"})
        rc, err = r.returncode, r.stderr.strip()
    except subprocess.TimeoutExpired:
        rc, err = None, "TIMEOUT"
    wall = time.time() - t0
    problems = []
    lost = [p for p in case.protected if tree(Path(p)) != before[str(p)]]
    if lost:
        problems.append("data loss: " + ", ".join(str(p) for p in lost))
    internal = rc is None or "internal error" in err or "Traceback" in err or (rc != 0 and err.count("\n") > 0
                                                                                  and "WARNING" not in err)
    if internal:
        problems.append("internal error: " + err[-300:])
    if case.expect == "refuse" and rc == 0:
        problems.append("silent wrong output: exit 0")
    if case.expect == "ok" and rc not in (0, None) and not internal:
        problems.append(f"refused unexpectedly: {err[-200:]}")
    written = [p for p in case.absent if os.path.lexists(p)]
    if written:
        problems.append("silent wrong output: wrote " + ", ".join(str(p) for p in written))
    if case.check is not None and rc is not None:
        extra = case.check()
        if extra:
            problems.append(extra)
    kind = ("data loss" if lost else "internal error" if internal else
            "silent wrong output" if problems else "ok")
    return {"case": case.name, "class": case.klass, "rc": rc, "result": kind, "wall_s": round(wall, 1),
            "stderr": err.splitlines()[-1][:240] if err else "", "problems": problems}


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tvb-probe-"))
    try:
        return _main(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _main(w: Path) -> int:
    from tests.test_interop import write_ae_folder, write_pca_folder

    from tvbasis.store import build_store, store_lock

    fam = make_family(w / "fam", T=3)
    pre, fts = fam[0], fam[1]
    other = make_family(w / "other", T=1, seed=7)  # another pretrained model of the same shapes
    names = list(fts)
    ft = [a for n, p in fts.items() for a in ("--finetuned", f"{n}={p}")]
    cases: list[Case] = []

    def store(name: str, **kw) -> Path:
        s = build_store(pre, fts, kw.pop("method", "pca"), kw.pop("M", 1), w / name, **kw)
        s.close()
        return w / name

    deep = "lowrank+lowrank+lowrank+lowrank+lowrank+lowrank+lowrank+int8"
    s1 = store("s1")
    cases.append(Case("build --force onto a store, codec chain deeper than the reader allows",
                      ["build", "--pretrained", str(pre), *ft, "--method", "pca", "-M", "1", "--residual", deep,
                       "--out", str(s1), "--force"], [s1], klass="data loss"))
    cases.append(Case("build to a new path, codec chain deeper than the reader allows",
                      ["build", "--pretrained", str(pre), *ft, "--method", "pca", "-M", "1", "--residual", deep,
                       "--out", str(w / "n1")], absent=[w / "n1"], klass="bug"))
    folder = w / "tvb-nl"
    write_ae_folder(folder, fam)
    info = json.loads((folder / "method_info.json").read_text())
    info["datasets"][0] = "a\nb"
    (folder / "method_info.json").write_text(json.dumps(info))
    s2 = store("s2")
    cases.append(Case("import-tvb --force onto a store, dataset name with a newline",
                      ["import-tvb", str(folder), "--pretrained", str(pre), "--out", str(s2), "--force"], [s2],
                      klass="data loss"))
    cases.append(Case("import-tvb to a new path, dataset name with a newline",
                      ["import-tvb", str(folder), "--pretrained", str(pre), "--out", str(w / "n2")],
                      absent=[w / "n2"], klass="bug"))
    data = w / "bank.csv"
    data.write_text("text,label\nhello there,greet\nbye now,leave\n")
    labels = w / "labels.txt"
    labels.write_text("greet\nleave\n")
    cases.append(Case("eval --json FILE = its own --task file",
                      ["eval", str(pre), "--task", f"bank={data}", "--json", str(data)], [data], klass="data loss"))
    cases.append(Case("eval --json FILE = its --task file, with --force",
                      ["eval", str(pre), "--task", f"bank={data}", "--json", str(data), "--force"], [data],
                      klass="data loss"))
    existing = w / "results.json"
    existing.write_text("{}")
    cases.append(Case("eval --json onto an existing file without --force",
                      ["eval", str(pre), "--task", f"bank={data}", "--json", str(existing)], [existing],
                      klass="data loss"))
    cases.append(Case("tune --json FILE = its --labels file",
                      ["tune", "--pretrained", str(pre), *ft, "--task", f"bank={data}", "--labels",
                       f"bank={labels}", "--json", str(labels)], [labels], klass="data loss"))
    s3 = store("s3", residual="int8")
    mf = json.loads((s3 / "tvbasis.json").read_text())
    key = next(k for k in mf["coded"]["entries"] if k.startswith("residual/"))
    mf["coded"]["entries"][key]["encoded"]["codec"] = "none"
    resign(s3, mf)
    cases.append(Case("re-signed manifest marks a non-empty coded entry empty: reconstruct",
                      ["reconstruct", str(s3), names[0], "--out", str(w / "r3.safetensors")],
                      absent=[w / "r3.safetensors"], klass="bug"))
    cases.append(Case("re-signed manifest marks a non-empty coded entry empty: verify", ["verify", str(s3)],
                      klass="bug"))
    bomb = w / "bomb.yml"
    bomb.write_text("models: *i\na: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")))
    cases.append(Case("merge --config: 1 KB YAML alias bomb", ["merge", "--config", str(bomb), "--out",
                                                                str(w / "m-bomb")], absent=[w / "m-bomb"],
                      klass="bug"))
    s4 = store("s4", residual="int8")
    tamper_coded(s4, "/scale", lambda x: x * 3)
    cases.append(Case("verify: consistently tampered int8 scales (every digest re-signed)", ["verify", str(s4)],
                      klass="coded data"))
    cases.append(Case("add-task onto the tampered store", ["add-task", str(s4), f"x={fts[names[0]]}",
                                                           "--pretrained", str(pre)], [s4], klass="coded data"))
    s5 = store("s5", residual="int8")
    tamper_coded(s5, "/scale", lambda x: np.full_like(x, np.nan))
    cases.append(Case("verify: NaN in coded data, re-digested", ["verify", str(s5)], klass="coded data"))
    deep_st = w / "deep" / "model.safetensors"
    deep_st.parent.mkdir()
    h = ("[" * 100000 + "]" * 100000).encode()
    deep_st.write_bytes(struct.pack("<Q", len(h)) + h)
    cases.append(Case("vector: safetensors header JSON nested 100000 deep",
                      ["vector", "--pretrained", str(deep_st.parent), "--finetuned", str(fts[names[0]]),
                       "--out", str(w / "v-deep.safetensors")], absent=[w / "v-deep.safetensors"],
                      klass="internal error"))
    s6 = store("s6")
    text = (s6 / "tvbasis.json").read_text()
    mf = json.loads(text)
    mf["task_vectors_bytes"] = 7
    (s6 / "tvbasis.json").write_text(json.dumps(mf).replace('"task_vectors_bytes": 7', '"task_vectors_bytes": 1e999'))
    cases.append(Case("inspect: 1e999 literal in a manifest", ["inspect", str(s6)], klass="internal error"))
    cases.append(Case("build: 30-digit integer in a codec spec",
                      ["build", "--pretrained", str(pre), *ft, "--method", "pca", "-M", "1", "--residual",
                       "int8:group=" + "9" * 30, "--out", str(w / "n3")], absent=[w / "n3"],
                      klass="internal error"))
    for label, yml in [("5000-digit integer", "a: " + "9" * 5000), ("nesting 5000 deep", "[" * 5000 + "]" * 5000),
                       ("a repeated key", f"base_model: {pre}\nmerge_method: linear\nmerge_method: ties\nmodels:\n"
                                          f"  - model: {fts[names[0]]}\n")]:
        f = w / f"cfg-{len(cases)}.yml"
        f.write_text(yml + "\n")
        cases.append(Case(f"merge --config: YAML with {label}", ["merge", "--config", str(f), "--out",
                                                                  str(w / f"m{len(cases)}")],
                          absent=[w / f"m{len(cases)}"], klass="internal error"))
    # masks files
    masks = w / "masks.safetensors"
    subprocess.run([*EXE, "-q", "localize", "--pretrained", str(pre), *ft, "--out", str(masks)], check=True,
                   capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
    bad_masks = w / "bad-masks.safetensors"
    from safetensors import safe_open
    with safe_open(str(masks), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["tensors"] = json.dumps({k: "x" for k in json.loads(meta["tensors"])})
    save_file(tensors, str(bad_masks), meta)
    cases.append(Case("stitch: malformed masks file metadata",
                      ["stitch", "--pretrained", str(pre), *ft, "--masks", str(bad_masks), "--out",
                       str(w / "st1")], absent=[w / "st1"], klass="internal error"))
    cases.append(Case("stitch: a masks file of another pretrained model with the same shapes",
                      ["stitch", "--pretrained", str(other[0]), "--masks", str(masks), "--out", str(w / "st2")],
                      absent=[w / "st2"], klass="wrong model"))
    vec = w / "a.safetensors"
    subprocess.run([*EXE, "-q", "vector", "--pretrained", str(pre), "--finetuned", str(fts[names[0]]), "--out",
                    str(vec)], check=True, capture_output=True)
    cases.append(Case("apply: a saved task vector onto another pretrained model with the same shapes",
                      ["apply", "--pretrained", str(other[0]), "--vector", f"{vec}=1", "--out", str(w / "ap1")],
                      absent=[w / "ap1"], klass="wrong model"))
    for label, alpha, nan in [("lora_alpha 1e300", 1e300, False), ("NaN in lora_A", 8, True)]:
        d = w / f"adapter-{len(cases)}"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": alpha,
                                                           "target_modules": ["query"]}))
        A, B = torch.randn(2, 8), torch.randn(8, 2)
        if nan:
            A[0, 0] = float("nan")
        key = "base_model.model.encoder.layer.0.attention.query"
        save_file({f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}, str(d / "adapter_model.safetensors"))
        cases.append(Case(f"vector: a LoRA adapter with {label}",
                          ["vector", "--pretrained", str(pre), "--finetuned", str(d), "--out",
                           str(w / f"v{len(cases)}.safetensors")], absent=[w / f"v{len(cases)}.safetensors"],
                          klass="internal error"))
    # paper-layout folders
    for label, mutate in [("mean vector 3 values short", lambda d: d.__setitem__("mean_vector",
                                                                                   d["mean_vector"][:-3])),
                          ("a string shape", lambda d: d["param_shapes"].__setitem__(d["keys_order"][0], "8x8"))]:
        f = w / f"pca-{len(cases)}"
        write_pca_folder(f, fam)
        d = torch.load(f / "pca_components.pt", weights_only=True)
        mutate(d)
        torch.save(d, f / "pca_components.pt")
        cases.append(Case(f"import-tvb: paper folder with {label}",
                          ["import-tvb", str(f), "--pretrained", str(pre), "--out", str(w / f"i{len(cases)}")],
                          absent=[w / f"i{len(cases)}"], klass="internal error"))
    f = w / "pca-million"
    write_pca_folder(f, fam)
    info = json.loads((f / "method_info.json").read_text())
    info["datasets"] = [f"t{i}" for i in range(10**6)]
    (f / "method_info.json").write_text(json.dumps(info))
    d = torch.load(f / "pca_components.pt", weights_only=True)
    d["coefficients"] = d["coefficients"][:, :1].expand(d["coefficients"].shape[0], 10**6)
    d["dataset_names"] = info["datasets"]
    torch.save(d, f / "pca_components.pt")
    cases.append(Case("import-tvb: stride-0 tensors claiming 10^6 tasks",
                      ["import-tvb", str(f), "--pretrained", str(pre), "--out", str(w / "i-million")],
                      absent=[w / "i-million"], klass="caps"))
    cases.append(Case("eval --batch-size 0", ["eval", str(pre), "--task", f"bank={data}", "--batch-size", "0"],
                      klass="internal error"))
    cases.append(Case("tune --grid with 10^18 points", ["tune", "--pretrained", str(pre), *ft, "--task",
                                                         f"bank={data}", "--grid", "1e-12:1e6"], klass="caps"))
    # outputs
    user = w / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    s7 = store("s7")
    cases.append(Case("merge --force onto a non-empty user directory",
                      ["merge", "--pretrained", str(pre), "--finetuned", f"a={fts[names[0]]}", "--out", str(user),
                       "--force"], [user], klass="outputs"))
    cases.append(Case("export-tvb --force onto a non-empty user directory",
                      ["export-tvb", str(s7), "--out", str(user), "--force"], [user], klass="outputs"))
    cases.append(Case("export-tvb STORE --out STORE --force", ["export-tvb", str(s7), "--out", str(s7), "--force"],
                      [s7], klass="outputs"))
    plots = w / "plots"
    plots.mkdir()
    (plots / "cosine.png").write_bytes(b"mine")
    cases.append(Case("inspect --plot DIR over an existing picture", ["inspect", str(s7), "--plot", str(plots)],
                      [plots], klass="outputs"))
    # gc
    gcd = w / "gcdir"
    gcd.mkdir()
    fake_temp = gcd / f".data.tvbasis-tmp-{2**22 + 12345}-deadbeef"
    fake_temp.mkdir()
    (fake_temp / "keep.txt").write_text("mine")
    cases.append(Case("gc: a user directory that merely matches the temporary-name pattern", ["gc", str(gcd)],
                      [fake_temp], expect="ok", klass="gc"))
    nonstore = w / "nonstore"
    nonstore.mkdir()
    (nonstore / "tvbasis.json").write_text('{"hello": 1}')
    cases.append(Case("gc: a directory whose tvbasis.json is not a manifest (no lock file left)",
                      ["gc", str(nonstore)], expect="ok", klass="gc",
                      check=lambda: "lock file left" if (nonstore / ".tvbasis.lock").exists() else None))
    gc2 = w / "gc2"
    gc2.mkdir()
    shutil.copytree(s7, gc2 / "a")
    shutil.copytree(s7, gc2 / "b")
    (gc2 / "b" / "bases.g9.safetensors").write_bytes(b"leftover")
    cases.append(Case("gc --lock-timeout 0: one locked store among two", ["gc", str(gc2), "--lock-timeout", "0"],
                      expect="ok", klass="gc",
                      check=lambda: "the unlocked store was not cleaned" if (gc2 / "b" / "bases.g9.safetensors")
                      .exists() else None))
    s8 = store("s8")
    (s8 / "mean.safetensors").unlink()
    os.mkfifo(s8 / "mean.safetensors")
    cases.append(Case("verify: a FIFO named as a store data file", ["verify", str(s8)], klass="internal error"))

    results = []
    with store_lock(gc2 / "a", 0):
        for c in cases:
            r = run(c, w)
            results.append(r)
            print(f"{r['result']:>19} | {c.name} | {r['stderr'][:100]}", flush=True)
    counts = {k: sum(r["result"] == k for r in results) for k in ("ok", "data loss", "silent wrong output",
                                                                   "internal error")}
    cmd = "python benchmarks/probe_untrusted.py"
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_untrusted.json").write_text(json.dumps({"command": cmd, "counts": counts, "cases": results},
                                                         indent=1) + "\n")
    lines = ["# CLI sweep of untrusted inputs (issue 27)\n", f"Command: `{cmd}` ({len(results)} cases, tiny models "
             "built by the script; each case one `tvbasis` subprocess).\n",
             "| result | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in counts.items()], "",
             "| class | case | result | exit | stderr (last line) |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['class']} | {r['case']} | {r['result']} | {r['rc']} | "
                     f"{r['stderr'][:140].replace('|', '/')} |")
    (out / "probe_untrusted.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(counts))
    return 0 if counts["ok"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
