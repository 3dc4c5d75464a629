"""Reading and editing a store's files in tests as an outsider would: the manifest with its coded section expanded,
and each coded tensor's place in its file, decoded here independently of tvbasis (format version 3: the coded
section's 'files' and 'entries' packed as base64 of a zstd frame; a coded file's tensors back to back as one uint8
safetensors tensor 'coded', layout 'blob')."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import zstandard

from tvbasis.store.format import manifest_digest

#: bytes per element of the dtypes a coded file holds, by manifest name
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8,
            "bool": 1, "float64": 8}
#: safetensors' dtype names
ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "uint8": "U8", "int16": "I16",
            "int32": "I32", "int64": "I64", "bool": "BOOL", "float64": "F64"}
NUMPY = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8, "int32": np.int32,
         "int16": np.int16, "int64": np.int64, "bool": np.bool_, "float64": np.float64}


def expanded(mf: dict) -> dict:
    """The manifest with a packed coded section expanded into the plain form (which a manifest may also hold)."""
    c = mf.get("coded")
    if isinstance(c, dict) and "packed" in c:
        bulk = json.loads(zstandard.ZstdDecompressor().stream_reader(base64.b64decode(c["packed"])).read())
        mf = {**mf, "coded": {**{k: v for k, v in c.items() if k != "packed"}, **bulk}}
    return mf


def read_manifest(root: Path) -> dict:
    return expanded(json.loads((Path(root) / "tvbasis.json").read_text()))


def write_manifest(root: Path, mf: dict) -> None:
    """Write an edited manifest with a matching manifest_sha256 (as an attacker or a buggy writer would), so only
    the field checks can refuse it; the coded section in plain form."""
    mf = dict(mf)
    mf["manifest_sha256"] = manifest_digest(mf)
    (Path(root) / "tvbasis.json").write_text(json.dumps(mf, indent=1))


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(offset of the data region, the header's tensors) of a safetensors file, parsed from its bytes. A coded file
    of layout 'blob' is split into its tensors as the manifest lists them, back to back."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    if set(header) == {"coded"} and header["coded"]["dtype"] == "U8":
        listing = read_manifest(Path(path).parent)["coded"]["files"][Path(path).name]
        assert listing.get("layout") == "blob"
        header, off = {}, 0
        for key, dtype, shape, _ in listing["tensors"]:
            size = math.prod(shape) * ITEMSIZE[dtype]
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + size]}
            off += size
        assert off == len(raw) - 8 - n  # the blob is exactly the listed tensors
    return 8 + n, header


def tensor_dtype(header_dtype: str) -> type:
    """numpy dtype of a tensor of ``safetensors_layout``'s header (safetensors or manifest dtype names)."""
    st = {"F32": "float32", "F16": "float16", "I8": "int8", "U8": "uint8", "I32": "int32", "BOOL": "bool"}
    return NUMPY[st.get(header_dtype, header_dtype)]
