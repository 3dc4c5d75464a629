"""``zstd``: a lossless entropy stage over the integer codes of the NEXT codec (``zstd+int2:group=32``,
``lowrank:rank=16+zstd+int4``, ``zstd+ultra``).

The NEXT codec encodes x; every stored tensor of its encoding with an integer or boolean dtype (packed codes,
positions, bit masks) is compressed with Zstandard (the ``zstandard`` package, level ``level``) and kept
compressed only where that is smaller; float tensors (scales, minima, singular values) are kept as they are.
Decoding decompresses (bounded by the recorded size, so a forged frame cannot expand past it) and hands the
original encoding to NEXT: x̂ is exactly NEXT's x̂.

Stored: own tensors ``t0``, ``t1``, … (uint8 frames, or the original tensors), one per tensor of NEXT's encoding;
meta records NEXT's description and each tensor's key, dtype, shape and whether it is compressed. Bytes: the
frames plus the tensors kept raw. Integer codes of a quantiser are close to uniform over their levels only when
the values are; task-vector deltas are peaked at 0, so their codes are not, and that is what zstd gains on
(``benchmarks/codec_rd.py`` measures it on real MiniLM task vectors).

``zstandard`` is an optional dependency (``pip install "tvbasis[zstd]"``); without it the codec fails with one
line saying so.
"""

from __future__ import annotations

from typing import Any

import torch

from tvbasis.codecs.base import Codec
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param
from tvbasis.errors import ConfigError

#: dtypes whose tensors are compressed (codes, positions, masks); by name as recorded in meta
_INT_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
                                       "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}
_FLOAT_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                         "float32": torch.float32, "float64": torch.float64}
_DTYPES = {**_INT_DTYPES, **_FLOAT_DTYPES}


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise ConfigError("codec 'zstd' needs the zstandard package: pip install 'tvbasis[zstd]' "
                          "(or pip install zstandard)") from None
    return zstandard


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class Zstd(Codec):
    """Zstandard over the integer tensors of NEXT's encoding; lossless on top of NEXT."""

    name = "zstd"
    params = (Param("level", int, 19, "an integer in 1..22", lambda v: 1 <= v <= 22),)
    takes_next = True

    def _validate(self) -> None:
        if self.next is None:
            raise ConfigError("codec 'zstd' compresses the codes of a NEXT codec: write e.g. zstd+int4 or "
                              "lowrank:rank=16+zstd+int2")

    def _encode(self, x: torch.Tensor) -> Encoded:
        assert self.next is not None
        zstd = _zstd()
        inner = self.next.encode(x)
        flat, desc = inner.to_tensors("")
        cctx = zstd.ZstdCompressor(level=int(self.values["level"]))
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for i, (key, t) in enumerate(sorted(flat.items())):
            name = _dtype_name(t.dtype)
            raw = t.contiguous().cpu()
            packed = False
            if name in _INT_DTYPES and raw.numel():
                flat_raw = raw.reshape(-1)
                frame = cctx.compress((flat_raw.to(torch.uint8) if name == "bool" else flat_raw.view(torch.uint8))
                                      .numpy().tobytes())
                if len(frame) < raw.numel() * raw.element_size():
                    tensors[f"t{i}"] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
                    packed = True
            if not packed:
                tensors[f"t{i}"] = raw
            entries.append({"key": key, "dtype": name, "shape": list(raw.shape), "zstd": packed})
        return self._make(x, tensors, {"inner": desc, "entries": entries})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        assert self.next is not None
        try:
            entries = list(enc.meta["entries"])
            desc = dict(enc.meta["inner"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"codec {self.spec!r}: the encoding records no valid 'entries'/'inner'") from None
        flat: dict[str, torch.Tensor] = {}
        dctx = None
        for i, e in enumerate(entries):
            try:
                key, name, shape, packed = str(e["key"]), str(e["dtype"]), [int(d) for d in e["shape"]], bool(e["zstd"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"codec {self.spec!r}: malformed entry {i} of a zstd encoding") from None
            if name not in _DTYPES or any(d < 0 for d in shape):
                raise ValueError(f"codec {self.spec!r}: entry {key!r} has dtype {name!r} / shape {shape}")
            t = enc.tensors.get(f"t{i}")
            if t is None:
                raise ValueError(f"codec {self.spec!r}: stored tensor t{i} ({key}) is missing")
            dtype = _DTYPES[name]
            numel = 1
            for d in shape:
                numel *= d
            if packed:
                if dctx is None:
                    dctx = _zstd().ZstdDecompressor()
                size = numel * (1 if dtype == torch.bool else torch.empty(0, dtype=dtype).element_size())
                try:
                    raw = dctx.decompress(t.contiguous().numpy().tobytes(), max_output_size=size)
                except Exception as err:  # zstandard.ZstdError: a corrupt frame
                    raise ValueError(f"codec {self.spec!r}: tensor {key!r} does not decompress: {err}") from None
                if len(raw) != size:
                    raise ValueError(f"codec {self.spec!r}: tensor {key!r} decompresses to {len(raw)} bytes, "
                                     f"expected {size}")
                buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if size else torch.zeros(0, dtype=torch.uint8)
                t = buf.to(torch.bool) if dtype == torch.bool else buf.view(dtype)
            elif t.dtype != dtype or t.numel() != numel:
                raise ValueError(f"codec {self.spec!r}: stored tensor {key!r} is {t.dtype} × {t.numel()}, "
                                 f"expected {dtype} × {numel}")
            flat[key] = t.reshape(shape)
        try:
            inner = Encoded.from_tensors(flat, desc)
        except Exception as err:  # StoreError on a malformed description
            raise ValueError(f"codec {self.spec!r}: {err}") from None
        return self.next.decode(inner)
