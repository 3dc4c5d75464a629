"""Integrity of a store's data files: the digests recorded when a file is written, checked whenever it is read.

Per data file the manifest records (``digests.files``) its size, the SHA-256 of its content, its tensors in order,
and per tensor an XXH3-64 digest of every chunk (rows of one basis: ``store.layout``). Opening a store compares each
file's size and header with what the manifest implies (the header is rebuilt from the manifest and compared byte
for byte: a truncated, swapped or foreign shard fails here); every read checks the digest of each chunk it
touches and that the values are finite, so a command reading a corrupted tensor fails naming it; ``verify``
re-reads everything and checks the SHA-256 too.

XXH3-64 (~14 GB/s on one core, about 5x zlib's CRC-32, which made checked reads 30-70 % slower) changes with any
flipped bit except with probability 2⁻⁶⁴; it is a check against corruption and mix-ups (a shard copied from
another store), not against an adversary, who could rewrite the manifest's digests as well.

Files are opened once, relative to a descriptor of the store directory, and their descriptors held for the
store's lifetime: a concurrent writer's new generation (new files, a new manifest, old files removed) never mixes
into what an open store reads.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from tvbasis.errors import CheckpointError, StoreError
from tvbasis.io import TensorSpec, all_finite, confined_file
from tvbasis.io.fdpool import FdPool
from tvbasis.io.reader import parse_safetensors_header
from tvbasis.store.format import CHUNK_HEX, DIGEST_ALGORITHM, FileDigest, Manifest
from tvbasis.store.layout import chunks_of, expected_header, row_elements

#: bytes read per call when a whole file is digested
READ_BLOCK = 8 * 2**20


class MissingFile(StoreError):
    """A data file named by the manifest does not exist (a concurrent writer may have replaced the generation)."""


@dataclass
class TensorPlace:
    """Where one stored tensor lies and how its chunks are cut."""

    name: str
    part: str
    file: str
    fd: int
    offset: int  # absolute byte offset of its data in the file
    stacked: TensorSpec  # (M, *shape) for bases, shape for the mean, in the stored dtype
    inner: TensorSpec  # one basis (the parameter's shape), stored dtype
    outer: int  # M for bases, 1 for the mean
    chunks: list[tuple[int, int]] | None  # row chunks of one basis (None: no digests)
    chunk_xxh3: list[int] | None  # XXH3-64 digest of every chunk, outer * len(chunks), m-major

    @property
    def row_bytes(self) -> int:
        return row_elements(self.inner) * self.inner.dtype.itemsize


def chunk_digest(view: memoryview) -> int:
    """XXH3-64 of one chunk's bytes: ~14 GB/s on one core, about 5x zlib's CRC-32, so checking every chunk a
    command reads costs a few percent of the read (benchmarks/integrity_cost.py)."""
    return xxhash.xxh3_64_intdigest(view)


def pread_into(fd: int, buf: memoryview, offset: int, what: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; StoreError naming ``what`` if the file ends first."""
    got = 0
    while got < buf.nbytes:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise StoreError(f"{what}: unexpected end of file (truncated while open?)")
        got += n


def open_in_store(root: Path, dfd: int, name: str, field: str, missing: StoreError, unreadable: str) -> int:
    """Open ``name`` read-only through the store directory's descriptor ``dfd``, after checking it is a plain name
    inside the store (``field`` names where it came from). Raises ``missing`` when it does not exist and a
    StoreError "<unreadable> (<reason>)" when it cannot be opened; the caller closes the descriptor."""
    confined_file(root, name, field, StoreError)
    try:  # O_NONBLOCK: opening a FIFO put where a file should be must not wait for a writer forever
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0), dir_fd=dfd)
    except FileNotFoundError:
        raise missing from None
    except OSError as e:
        raise StoreError(f"{unreadable} ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        os.close(fd)
        raise StoreError(f"{unreadable} (not a regular file: a FIFO, socket or device)")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def open_data_file(root: Path, dfd: int, fname: str, part: str, where: str) -> tuple[int, os.stat_result]:
    """Open data file ``fname`` of part ``part`` through the store directory's descriptor: a plain name inside the
    store, existing (else ``MissingFile``), a regular file. Returns its descriptor (the caller closes it) and stat."""
    fd = open_in_store(root, dfd, fname, f"{root}: manifest field 'files.{part}'",
                       MissingFile(f"{where} (named by the manifest) does not exist"), f"{where}: cannot open")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise StoreError(f"{where}: is not a regular file")
    return fd, st


class StoreData:
    """The data files of one store generation (bases and mean), opened through the store directory's descriptor
    ``dfd``; tensors read by positional reads, every chunk checked against its recorded digest (version 2)."""

    def __init__(self, root: Path, dfd: int, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self._fds: FdPool[str] = FdPool()
        self.places: dict[str, dict[str, TensorPlace]] = {"bases": {}, "mean": {}}
        try:
            for part, names in (("bases", manifest.files.bases), ("mean", manifest.files.mean)):
                for fname in names:
                    self._open_file(dfd, part, fname)
            self._check_complete()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------------
    def _open_file(self, dfd: int, part: str, fname: str) -> None:
        mf = self.manifest
        where = f"{self.root}: {part} file {fname}"
        fd, st = open_data_file(self.root, dfd, fname, part, where)
        self._fds[fname] = fd
        specs = mf.specs()
        if mf.digests is not None:
            dg = mf.digests.files[fname]
            stacked = mf.stacked_specs(part, dg.tensors)
            header = expected_header(stacked)
            if st.st_size != dg.size:
                raise StoreError(f"{where}: is {st.st_size} bytes, the manifest records {dg.size} (truncated, "
                                 "extended or another file)")
            buf = bytearray(len(header))
            pread_into(fd, memoryview(buf), 0, where)
            if bytes(buf) != header:
                raise StoreError(f"{where}: its header does not match the manifest (corrupt, or a shard of another "
                                 "store or layout)")
            off = len(header)
            for name, s in zip(dg.tensors, stacked):
                inner = s if part == "mean" else TensorSpec(name, s.shape[1:], s.dtype)
                self.places[part][name] = TensorPlace(name, part, fname, fd, off, s, inner,
                                                      1 if part == "mean" else mf.M,
                                                      chunks_of(specs[name], mf.digests.chunk_elements),
                                                      dg.chunk_digests(name))
                off += s.nbytes
            return
        # version 1: no digests; the header is parsed by the strict reader and checked against the manifest
        try:
            entries, _meta, data_start = parse_safetensors_header(self.root / fname)
        except CheckpointError as e:
            raise StoreError(f"{self.root}: cannot open the store's {part} shards: {e}") from None
        if data_start + sum(s.nbytes for s, _ in entries) != st.st_size:
            raise StoreError(f"{where}: changed while being opened")
        for s, start in entries:
            if s.name not in specs:
                continue
            dtype = getattr(torch, mf.store_dtypes[s.name])
            want = mf.stacked_specs(part, [s.name])[0]
            if s.shape != want.shape or s.dtype != dtype:
                raise StoreError(f"{self.root}: {part} tensor {s.name!r} is {s.shape} {s.dtype}, expected shape "
                                 f"{want.shape} {dtype}")
            if s.name in self.places[part]:
                raise StoreError(f"{where}: tensor {s.name!r} is also in {self.places[part][s.name].file}")
            inner = want if part == "mean" else TensorSpec(s.name, want.shape[1:], dtype)
            self.places[part][s.name] = TensorPlace(s.name, part, fname, fd, data_start + start, want, inner,
                                                    1 if part == "mean" else mf.M, None, None)

    def _check_complete(self) -> None:
        mf = self.manifest
        for part, names in (("bases", mf.files.bases), ("mean", mf.files.mean)):
            if not names:
                continue
            missing = [s.name for s in mf.tensors if s.name not in self.places[part]]
            if missing:
                raise StoreError(f"{self.root}: {part} tensor {missing[0]!r} is missing from the store's shards "
                                 f"({len(missing)} missing)")

    def fd_of(self, fname: str) -> int:
        """The open descriptor of data file ``fname`` (valid while the store is open)."""
        return self._fds[fname]

    def close(self) -> None:
        self._fds.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- reading ---------------------------------------------------------------------------------------
    def has(self, part: str) -> bool:
        return bool(self.places[part])

    def read(self, part: str, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows [a, b) of every basis (bases: (M, b − a, ...)) or of the mean ((b − a, ...)), or the whole tensor,
        in the stored dtype; each chunk touched is checked against its digest, the values checked finite."""
        pl = self.places[part].get(name)
        if pl is None:
            raise StoreError(f"{self.root}: the store has no {part} tensor {name!r}")
        shape = pl.inner.shape
        a, b = (0, shape[0] if shape else 1) if rows is None or not shape else (max(0, rows[0]),
                                                                                   min(shape[0], rows[1]))
        b = max(a, b)
        basis_bytes = pl.inner.nbytes
        if pl.chunks is None:
            lo, hi = a * pl.row_bytes, b * pl.row_bytes
            out = torch.empty((pl.outer, hi - lo), dtype=torch.uint8)
            for m in range(pl.outer):
                pread_into(pl.fd, memoryview(out[m].numpy()), pl.offset + m * basis_bytes + lo, self._what(pl))
        else:
            k0, k1 = _chunk_span(pl.chunks, a, b)
            ca, cb = pl.chunks[k0][0], pl.chunks[k1 - 1][1] if k1 > k0 else pl.chunks[k0][0]
            span = (cb - ca) * pl.row_bytes
            buf = torch.empty((pl.outer, span), dtype=torch.uint8)
            for m in range(pl.outer):
                view = memoryview(buf[m].numpy())
                pread_into(pl.fd, view, pl.offset + m * basis_bytes + ca * pl.row_bytes, self._what(pl))
                n = len(pl.chunks)
                for k in range(k0, k1):
                    r0, r1 = pl.chunks[k]
                    seg = view[(r0 - ca) * pl.row_bytes:(r1 - ca) * pl.row_bytes]
                    assert pl.chunk_xxh3 is not None
                    if chunk_digest(seg) != pl.chunk_xxh3[m * n + k]:
                        raise self._corrupt(pl, m, k)
            out = buf[:, (a - ca) * pl.row_bytes:(b - ca) * pl.row_bytes]
        t = out.contiguous().view(pl.inner.dtype).reshape(pl.outer, *((b - a,) if shape else ()), *shape[1:])
        if part == "mean":
            t = t[0]
        # with digests the bytes are those written, which were checked finite before they were committed
        if pl.chunk_xxh3 is None and not all_finite(t):
            raise StoreError(f"{self.root}: {part} tensor {name!r} holds NaN/Inf values (in {pl.file}); the store "
                             f"is corrupt (run `tvbasis verify {self.root}`)")
        return t

    def _what(self, pl: TensorPlace) -> str:
        return f"{self.root}: {pl.part} file {pl.file}"

    def _corrupt(self, pl: TensorPlace, m: int, k: int) -> StoreError:
        assert pl.chunks is not None
        r0, r1 = pl.chunks[k]
        which = f"rows {r0}:{r1}" + (f" of basis {m}" if pl.part == "bases" else "")
        return StoreError(f"{self.root}: {pl.part} tensor {pl.name!r} is corrupt: {which} (in {pl.file}) do not "
                          f"match their recorded {DIGEST_ALGORITHM}; run `tvbasis verify {self.root}`")

    # -- verification ----------------------------------------------------------------------------------
    def verify_file(self, fname: str) -> list[str]:
        """Re-read one whole file: header, every chunk digest, finite values, size and SHA-256. Problems as
        lines (empty when the file is intact)."""
        mf = self.manifest
        fd = self._fds[fname]
        where = f"{self.root}: {mf.files.part_of(fname)} file {fname}"
        if mf.digests is None:
            return self._verify_v1(fname)
        dg = mf.digests.files[fname]
        problems: list[str] = []
        try:
            got, nonfinite = digest_fd(fd, mf, mf.files.part_of(fname), dg.tensors, mf.digests.chunk_elements, where)
        except StoreError as e:
            return [str(e)]
        for name in dg.tensors:
            if got.chunks[name] != dg.chunks[name]:
                pl = self.places[mf.files.part_of(fname)][name]
                bad = [i for i, (x, y) in enumerate(zip(_split(got.chunks[name]), _split(dg.chunks[name]))) if x != y]
                n = len(pl.chunks or [1])
                problems.append(str(self._corrupt(pl, bad[0] // n, bad[0] % n)) + f" ({len(bad)} chunk(s) differ)")
        problems.extend(f"{where}: tensor {n!r} holds NaN/Inf values" for n in sorted(nonfinite))
        if got.sha256 != dg.sha256:
            problems.append(f"{where}: SHA-256 {got.sha256[:16]}… differs from the recorded {dg.sha256[:16]}…")
        return problems

    def _verify_v1(self, fname: str) -> list[str]:
        part = self.manifest.files.part_of(fname)
        problems = []
        for name, pl in self.places[part].items():
            if pl.file != fname:
                continue
            try:
                self.read(part, name)
            except StoreError as e:
                problems.append(str(e))
        return problems


def _split(s: str) -> list[str]:
    return [s[i:i + CHUNK_HEX] for i in range(0, len(s), CHUNK_HEX)]


def _chunk_span(chunks: list[tuple[int, int]], a: int, b: int) -> tuple[int, int]:
    """Indices [k0, k1) of the chunks that rows [a, b) touch (chunks are contiguous and sorted)."""
    starts = [c[0] for c in chunks]
    k0 = max(0, bisect.bisect_right(starts, a) - 1)
    k1 = max(k0 + 1, bisect.bisect_left(starts, b)) if b > a else k0
    return k0, min(k1, len(chunks))


def _sha256_of(fd: int, size: int, where: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(min(READ_BLOCK, size))
    pos = 0
    while pos < size:
        view = memoryview(buf)[:min(len(buf), size - pos)]
        pread_into(fd, view, pos, where)
        h.update(view)
        pos += view.nbytes
    return h.hexdigest()


def digest_fd(fd: int, manifest: Manifest, part: str, names: list[str], chunk_elements: int,
              where: str, check_finite: bool = True) -> tuple[FileDigest, set[str]]:
    """Digest a data file that must hold ``names`` (in order) of ``part``: its header must be exactly the one
    tvbasis writes. Returns (size, SHA-256 and per-chunk digests; the tensors holding NaN/Inf when
    ``check_finite``). The SHA-256 runs in a second thread over its own sequential read (hashlib and zlib release
    the GIL), so the two cost about the time of the slower."""
    stacked = manifest.stacked_specs(part, names)
    header = expected_header(stacked)
    size = os.fstat(fd).st_size
    want = len(header) + sum(s.nbytes for s in stacked)
    if size != want:
        raise StoreError(f"{where}: is {size} bytes, its tensors need {want}")
    head = bytearray(len(header))
    pread_into(fd, memoryview(head), 0, where)
    if bytes(head) != header:
        raise StoreError(f"{where}: its header is not the one tvbasis writes for the tensors the manifest lists")
    with ThreadPoolExecutor(1, thread_name_prefix="tvbasis-sha") as pool:
        sha = pool.submit(_sha256_of, fd, size, where)
        chunk_hex, nonfinite = _chunk_xxh3_hex(fd, manifest, part, names, stacked, chunk_elements, len(header),
                                               where, check_finite)
        digest = sha.result()
    return FileDigest(size, digest, list(names), chunk_hex), nonfinite


def _chunk_xxh3_hex(fd: int, manifest: Manifest, part: str, names: list[str], stacked: list[TensorSpec],
                    chunk_elements: int, pos: int, where: str, check_finite: bool) -> tuple[dict[str, str], set[str]]:
    """Per tensor its chunks' XXH3-64 digests as one hex string (16 digits per chunk, m-major), and the tensors
    holding a non-finite value (``check_finite``)."""
    specs = manifest.specs()
    chunk_hex: dict[str, str] = {}
    nonfinite: set[str] = set()
    block = bytearray(0)
    for name, s in zip(names, stacked):
        inner = specs[name].with_dtype(s.dtype)
        outer = manifest.M if part == "bases" else 1
        rb = row_elements(inner) * s.dtype.itemsize
        parts = []
        for _m in range(outer):
            for a, b in chunks_of(specs[name], chunk_elements):
                n = (b - a) * rb
                if len(block) < n:
                    block = bytearray(n)
                view = memoryview(block)[:n]
                pread_into(fd, view, pos, where)
                pos += n
                parts.append(f"{chunk_digest(view):016x}")
                if check_finite and name not in nonfinite and not all_finite(torch.frombuffer(view, dtype=s.dtype)):
                    nonfinite.add(name)
        chunk_hex[name] = "".join(parts)
    return chunk_hex, nonfinite


def digest_file(path: Path, manifest: Manifest, part: str, names: list[str], chunk_elements: int,
                check_finite: bool = False) -> FileDigest:
    """``digest_fd`` of a file by path (a file just written, before it is committed; its values were checked
    finite as they were written, so by default they are not checked again). NaN/Inf refused."""
    fd = os.open(path, os.O_RDONLY)
    try:
        d, bad = digest_fd(fd, manifest, part, names, chunk_elements, str(path), check_finite)
    finally:
        os.close(fd)
    if bad:
        raise StoreError(f"{path}: tensor {sorted(bad)[0]!r} holds NaN/Inf values; nothing committed")
    return d
