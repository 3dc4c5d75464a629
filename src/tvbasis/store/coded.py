"""Coded data files: codec-encoded tensors (per-task residuals, TALL masks, bases through a codec) on disk.

A coded file is a plain safetensors file (metadata ``{"format": "pt"}``) holding, entry after entry, the stored
tensors of ``Encoded`` trees: tensor ``n`` of entry ``k`` is key ``{k}/{n}`` (children's tensors ``{k}/{child}.{n}``,
see ``tvbasis.codecs.encoded``). Files written since format version 3 hold those bytes, in the same order, as one
uint8 tensor (layout ``blob``: one header entry for the file, not ~128 bytes per stored tensor); older files list
each tensor in the header (layout ``tensors``). Either way the manifest's ``coded`` section lists each file's
tensors in order with dtype, shape and an XXH3-64 digest per tensor, its size and SHA-256, and per entry the file
and its ``Encoded`` description, so a tensor's offset is the header's length plus the bytes before it. Opening a
store rebuilds each coded file's header from the manifest and compares it byte for byte; every tensor read is
checked against its digest; ``verify`` re-reads whole files (SHA-256 included).

Mode ``joint`` (lora-joint stores): a core entry ``residual/{task}/{param}`` (pseudo-codec ``joint-core``) decodes
to U Σ_t Vᵀ with U, V from the shared entry ``shared/{c}/{param}`` of the task's cluster c; ``joint_sum`` gives
Σ_t α_t U Σ_t Vᵀ as U (Σ_t α_t Σ_t) Vᵀ, one product per cluster whatever the number of tasks.

Writing: encoded tensors arrive in any order from the materialisation pass (small: they are the compressed
part), are appended to a spool file in the staging directory with their digests computed as they are written,
and ``CodedWriter.finish`` lays them out in entry order into shards of at most ``max_shard_size`` bytes — no read
of the written files for their digests.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from tvbasis.codecs import Encoded, LowRank, parse_codec
from tvbasis.errors import StoreError, TvbasisError
from tvbasis.io import all_finite
from tvbasis.io.atomic import temp_path
from tvbasis.io.fdpool import FdPool
from tvbasis.io.specs import parse_size
from tvbasis.store.format import (
    JOINT_CORE,
    NONE_CODEC,
    CodedEntry,
    CodedFile,
    CodedSection,
    CodedTensor,
    Manifest,
    coded_header,
    encoded_keys,
    entry_key,
)
from tvbasis.store.integrity import open_data_file, pread_into
from tvbasis.store.layout import file_names

#: bytes copied per call when a coded file is laid out or digested
COPY_BLOCK = 8 * 2**20


def _bytes_of(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def none_description(shape: tuple[int, ...]) -> dict[str, object]:
    """The description of an entry that stores nothing (a codec plan's ``none`` kind): it decodes to zeros."""
    return {"codec": NONE_CODEC, "shape": list(shape), "tensors": [], "meta": {}, "children": {}}


# ---------------------------------------------------------------------------------------------------- writing
@dataclass
class _Spooled:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    digest: str


class CodedWriter:
    """Collects encoded entries during a build (thread-safe), then writes them as coded files."""

    def __init__(self, stage: Path, max_shard_size: int | str) -> None:
        self.stage = stage
        self.max_shard = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
        self.spool_path = temp_path(stage / "coded")
        self._fh = open(self.spool_path, "xb")
        self._pos = 0
        self._lock = threading.Lock()
        self.entries: dict[str, tuple[dict[str, object], list[_Spooled]]] = {}

    def add(self, key: str, enc: Encoded | None, shape: tuple[int, ...]) -> None:
        """Record entry ``key``: ``enc``'s tensors (None: an entry that stores nothing and decodes to zeros)."""
        if enc is None:
            desc: dict[str, object] = none_description(shape)
            flat: dict[str, torch.Tensor] = {}
        else:
            flat, desc = enc.to_tensors("")
        with self._lock:
            if key in self.entries:
                raise ValueError(f"coded entry {key!r} written twice")
            spooled = []
            for name in sorted(flat):
                t = flat[name]
                view = _bytes_of(t)
                self._fh.write(view)
                spooled.append(_Spooled(f"{key}/{name}", str(t.dtype).removeprefix("torch."), tuple(t.shape),
                                        self._pos, view.nbytes, f"{xxhash.xxh3_64_intdigest(view):016x}"))
                self._pos += view.nbytes
            self.entries[key] = (desc, spooled)

    def finish(self, order: Iterable[str], generation: int = 1) -> tuple[list[str], CodedSection]:
        """Write the coded files (entries in ``order``; every entry must have been added) into the staging
        directory, fsynced; remove the spool. Returns the file names and a section with no codec specs set."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        order = list(order)
        missing = [k for k in order if k not in self.entries]
        if missing or len(order) != len(self.entries):
            raise ValueError(f"coded entries missing or unexpected: {missing[:3]}")
        shards: list[list[str]] = [[]]
        size = 0
        for k in order:
            n = sum(s.nbytes for s in self.entries[k][1])
            if shards[-1] and size + n > self.max_shard:
                shards.append([])
                size = 0
            shards[-1].append(k)
            size += n
        names = file_names("coded", len(shards), generation)
        files: dict[str, CodedFile] = {}
        entries: dict[str, CodedEntry] = {}
        fd = os.open(self.spool_path, os.O_RDONLY)
        try:
            for fname, keys in zip(names, shards):
                tensors = [CodedTensor(s.key, s.dtype, s.shape, s.digest) for k in keys for s in self.entries[k][1]]
                files[fname] = self._write_file(self.stage / fname, tensors, [s for k in keys
                                                                              for s in self.entries[k][1]], fd)
                for k in keys:
                    entries[k] = CodedEntry(fname, self.entries[k][0])
        finally:
            os.close(fd)
            os.unlink(self.spool_path)
        return names, CodedSection("add", None, None, files, entries)

    def _write_file(self, path: Path, tensors: list[CodedTensor], spooled: list[_Spooled], src: int) -> CodedFile:
        header = coded_header(tensors, "blob")
        sha = hashlib.sha256(header)
        with open(path, "xb") as out:
            out.write(header)
            for s in spooled:
                pos, left = s.offset, s.nbytes
                while left:
                    block = os.pread(src, min(COPY_BLOCK, left), pos)
                    if not block:
                        raise StoreError(f"{self.spool_path}: spool file ended early")
                    out.write(block)
                    sha.update(block)
                    pos += len(block)
                    left -= len(block)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        return CodedFile(size, sha.hexdigest(), tensors, "blob")

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            try:
                os.unlink(self.spool_path)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class _Place:
    fd: int
    file: str
    offset: int
    tensor: CodedTensor


class CodedData:
    """The coded files of one store generation, opened through the store directory's descriptor; entries decoded
    on demand, every tensor checked against its digest."""

    def __init__(self, root: Path, dfd: int, manifest: Manifest) -> None:
        assert manifest.coded is not None
        self.root = root
        self.section = manifest.coded
        self.specs = manifest.specs()
        #: core entries of a joint store -> (task, param); every task's cluster
        self.cluster_of = {t.name: t.cluster for t in manifest.tasks}
        self._core_of: dict[str, tuple[str, str]] = {}
        if self.section.mode == "joint":
            self._core_of = {entry_key("residual", p, t): (t, p) for t in manifest.task_names for p in self.specs}
        self._fds: FdPool[str] = FdPool()
        self.places: dict[str, _Place] = {}
        try:
            for fname in manifest.files.coded:
                self._open(dfd, fname)
        except BaseException:
            self.close()
            raise

    def _open(self, dfd: int, fname: str) -> None:
        where = f"{self.root}: coded file {fname}"
        fd, st = open_data_file(self.root, dfd, fname, "coded", where)
        self._fds[fname] = fd
        cf = self.section.files[fname]
        if st.st_size != cf.size:
            raise StoreError(f"{where}: is {st.st_size} bytes, the manifest records {cf.size} (truncated, extended or "
                             "another file)")
        header = cf.header()
        buf = bytearray(len(header))
        pread_into(fd, memoryview(buf), 0, where)
        if bytes(buf) != header:
            raise StoreError(f"{where}: its header does not match the manifest (corrupt, or a file of another store)")
        off = len(header)
        for t in cf.tensors:
            self.places[t.key] = _Place(fd, fname, off, t)
            off += t.spec.nbytes

    def close(self) -> None:
        self._fds.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def tensor(self, key: str) -> torch.Tensor:
        pl = self.places[key]
        spec = pl.tensor.spec
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        buf = torch.empty(spec.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        pread_into(pl.fd, view, pl.offset, f"{self.root}: coded file {pl.file}")
        if f"{xxhash.xxh3_64_intdigest(view):016x}" != pl.tensor.digest:
            raise StoreError(f"{self.root}: coded tensor {key!r} is corrupt (in {pl.file}): it does not match its "
                             f"recorded xxh3_64; run `tvbasis verify {self.root}`")
        return buf.view(spec.dtype).reshape(spec.shape)

    def has(self, key: str) -> bool:
        return key in self.section.entries

    def decode(self, key: str) -> torch.Tensor:
        """Entry ``key`` decoded to a float32 tensor of its parameter's shape."""
        entry = self.section.entries.get(key)
        if entry is None:
            raise StoreError(f"{self.root}: the store has no coded entry {key!r}")
        desc = entry.encoded
        shape = tuple(int(x) for x in desc["shape"])
        if desc["codec"] == NONE_CODEC:
            return torch.zeros(shape, dtype=torch.float32)
        if desc["codec"] == JOINT_CORE:
            task, param = self._core_of[key]
            return self.joint_sum(param, {task: 1.0}, None)
        try:
            out = parse_codec(desc["codec"]).decode(self.encoded(key))
        except (TvbasisError, ValueError, TypeError, RuntimeError, IndexError, KeyError) as e:
            raise StoreError(f"{self.root}: coded entry {key!r} cannot be decoded ({type(e).__name__}: {e}); the "
                             "manifest and its data disagree") from None
        return self._checked(key, out, shape)

    def _checked(self, key: str, out: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(out.shape) != shape or not all_finite(out):
            raise StoreError(f"{self.root}: coded entry {key!r} decodes to a wrong shape or to NaN/Inf")
        return out

    def encoded(self, key: str) -> Encoded:
        """Entry ``key`` as its ``Encoded`` (stored tensors read and checked against their digests)."""
        entry = self.section.entries.get(key)
        if entry is None:
            raise StoreError(f"{self.root}: the store has no coded entry {key!r}")
        desc = entry.encoded
        prefix = f"{key}/"
        tensors = {prefix + k: self.tensor(prefix + k) for k in encoded_keys(desc, "")}
        return Encoded.from_tensors(tensors, desc, prefix)

    def codec_of(self, key: str) -> str:
        return str(self.section.entries[key].encoded["codec"])

    # -- factor form ------------------------------------------------------------------------------------------
    def shared(self, param: str, cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A joint store's shared bases of one tensor and cluster: U (rows × k_out), V (cols × k_in), float32."""
        key = entry_key("shared", param, cluster)
        if key not in self.section.entries:
            raise StoreError(f"{self.root}: the store has no shared entry {key!r}")
        U, V = self.tensor(f"{key}/u").to(torch.float32), self.tensor(f"{key}/v").to(torch.float32)
        if not (all_finite(U) and all_finite(V)):
            raise StoreError(f"{self.root}: shared entry {key!r} holds NaN/Inf")
        return U, V

    def core(self, key: str) -> torch.Tensor:
        """A core entry as a (k_out × k_in) float32 matrix (a diagonal core made square)."""
        c = self.tensor(f"{key}/core").to(torch.float32)
        if not all_finite(c):
            raise StoreError(f"{self.root}: core entry {key!r} holds NaN/Inf")
        return torch.diag(c) if c.dim() == 1 else c

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Entry ``key`` as two float32 factors (P, Q) with P·Q its decoded 2-D view — a ``lowrank`` entry's
        (usᵀ, vt), a joint core's (U Σ_t, Vᵀ) — or None for an entry that is not a low-rank product (``none``,
        dense codecs, a lowrank fallback)."""
        codec = self.codec_of(key)
        if codec == JOINT_CORE:
            task, param = self._core_of[key]
            cl = self.cluster_of[task]
            assert cl is not None
            U, V = self.shared(param, cl)
            return U @ self.core(key), V.T.contiguous()
        if not codec.startswith(LowRank.name + ":"):
            return None
        try:
            out = parse_codec(codec).factors(self.encoded(key))  # type: ignore[attr-defined]
        except (TvbasisError, ValueError, TypeError, RuntimeError, IndexError, KeyError) as e:
            raise StoreError(f"{self.root}: coded entry {key!r} cannot be decoded ({type(e).__name__}: {e}); the "
                             "manifest and its data disagree") from None
        if out is not None and not (all_finite(out[0]) and all_finite(out[1])):
            raise StoreError(f"{self.root}: coded entry {key!r} decodes to NaN/Inf")
        return out

    def joint_sum(self, param: str, weights: Mapping[str, float], rows: tuple[int, int] | None) -> torch.Tensor:
        """Σ_t α_t ṽ_t of one tensor (rows [a, b)) in a joint store: per cluster U (Σ_t α_t Σ_t) Vᵀ over the tasks'
        core entries, plus α_t times every other (decoded) entry."""
        spec = self.specs[param]
        shape = spec.shape if rows is None or not spec.shape else (rows[1] - rows[0], *spec.shape[1:])
        out = torch.zeros(shape, dtype=torch.float32)
        cores: dict[int, torch.Tensor] = {}
        for task, a in weights.items():
            key = entry_key("residual", param, task)
            codec = self.codec_of(key)
            if codec == NONE_CODEC or a == 0.0:
                continue
            if codec == JOINT_CORE:
                cl = self.cluster_of[task]
                assert cl is not None
                c = self.core(key).double() * a
                cores[cl] = cores[cl] + c if cl in cores else c
            else:
                x = self.decode(key)
                out.add_(x[rows[0]:rows[1]] if rows is not None and x.dim() else x, alpha=a)
        for cl, C in cores.items():
            U, V = self.shared(param, cl)
            if rows is not None:
                U = U[rows[0]:rows[1]]
            if U.shape[1] != C.shape[0] or V.shape[1] != C.shape[1]:
                raise StoreError(f"{self.root}: the cores of {param!r} do not fit its shared bases of cluster {cl}")
            out.add_((U.double() @ C @ V.double().T).to(torch.float32).reshape(shape))
        return self._checked(f"residual/…/{param}", out, tuple(shape))

    def verify_file(self, fname: str) -> list[str]:
        """Re-read one coded file whole: size, header, every tensor's digest, SHA-256. Problems as lines."""
        where = f"{self.root}: coded file {fname}"
        cf = self.section.files[fname]
        fd = self._fds[fname]
        problems = []
        if os.fstat(fd).st_size != cf.size:
            return [f"{where}: is {os.fstat(fd).st_size} bytes, the manifest records {cf.size}"]
        sha = hashlib.sha256()
        pos = 0
        while pos < cf.size:
            n = min(COPY_BLOCK, cf.size - pos)
            b = bytearray(n)
            pread_into(fd, memoryview(b), pos, where)
            sha.update(b)
            pos += n
        for t in cf.tensors:
            try:
                self.tensor(t.key)
            except StoreError as e:
                problems.append(str(e))
        if sha.hexdigest() != cf.sha256:
            problems.append(f"{where}: SHA-256 {sha.hexdigest()[:16]}… differs from the recorded {cf.sha256[:16]}…")
        return problems
