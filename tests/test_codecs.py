"""Tests of tvbasis.codecs against references written here (numpy), never against the codecs' own output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tvbasis.codecs import (
    AUTO_LADDER,
    CODECS,
    Encoded,
    base,
    decode,
    get_codec,
    pack_bits,
    pack_uint,
    parse_codec,
    unpack_bits,
    unpack_uint,
)
from tvbasis.errors import ConfigError, NonFiniteError

STORED_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32}

ALL_SPECS = ["float32", "float16", "bfloat16", "int8", "int4", "int2", "int8:scheme=affine",
             "int4:group=7,scheme=affine", "int2:group=3", "sign", "sign:scale=tensor", "lowrank:rank=2", "lowrank:energy=0.9", "lowrank:rank=2+int8",
             "sparse-rows", "sparse-rows+int4", "sparse-rows+lowrank:rank=1+int8", "topk:density=0.3",
             "topk:density=0.3+int8", "ternary:density=0.5", "auto", "auto:rel_error=0.3"]
SHAPES = [(), (7,), (5, 12), (3, 4, 5)]


def rng_tensor(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def np_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def stored_bytes(enc: Encoded) -> int:
    flat, _ = enc.to_tensors()
    return sum(t.numel() * t.element_size() for t in flat.values())


def np_rel_error(x: torch.Tensor, xh: torch.Tensor) -> float:
    a, b = np_of(x).ravel(), np_of(xh).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(params=["default", "tiny"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the default chunk and with a tiny one (many chunk boundaries)."""
    if request.param == "tiny":
        monkeypatch.setattr(base, "CHUNK_ELEMENTS", 24)
    return str(request.param)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_shape_dtype_bytes(spec: str, shape: tuple[int, ...]) -> None:
    codec = parse_codec(spec)
    x = rng_tensor(shape, seed=len(shape))
    enc = codec.encode(x)
    xh = codec.decode(enc)
    assert xh.shape == x.shape and xh.dtype == torch.float32
    assert torch.isfinite(xh).all()
    flat, desc = enc.to_tensors("p.")
    assert all(t.dtype in STORED_DTYPES for t in flat.values())
    assert enc.nbytes == sum(t.numel() * t.element_size() for t in flat.values())
    json.dumps(desc)
    assert torch.equal(decode(enc), xh)  # decodable from the recorded spec alone
    if spec in ("float32", "sparse-rows"):
        assert torch.equal(xh, x)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_empty_tensor(spec: str) -> None:
    enc = parse_codec(spec).encode(torch.zeros(0, 3))
    assert enc.nbytes == 0 and parse_codec(spec).decode(enc).shape == (0, 3)


def test_float16_bfloat16_exact_when_representable() -> None:
    x16 = rng_tensor((40, 9)).to(torch.float16).float()
    assert torch.equal(parse_codec("float16").decode(parse_codec("float16").encode(x16)), x16)
    xb = rng_tensor((40, 9)).to(torch.bfloat16).float()
    assert torch.equal(parse_codec("bfloat16").decode(parse_codec("bfloat16").encode(xb)), xb)
    assert parse_codec("float16").encode(x16).nbytes == 40 * 9 * 2


# -------------------------------------------------------------------------------------- quantisation
def groups_np(x: torch.Tensor, group: int) -> list[np.ndarray]:
    flat = np_of(x).ravel()
    return [flat[i:i + group] for i in range(0, flat.size, group)]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [128, 64, 5])
def test_int_symmetric_half_step(bits: int, group: int, chunking: str) -> None:
    x = rng_tensor((1000,), seed=bits) * 0.01
    codec = parse_codec(f"int{bits}:group={group}")
    xh = codec.decode(codec.encode(x))
    q = 2 ** (bits - 1) - 1
    for g, gh in zip(groups_np(x, group), groups_np(xh, group), strict=True):
        step = np.abs(g).max() / q
        assert np.all(np.abs(g - gh) <= step / 2 * (1 + 2**-9) + 1e-9)
        assert len(np.unique(gh)) <= 2 * q + 1


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [128, 5])
def test_int_affine_half_step(bits: int, group: int, chunking: str) -> None:
    x = rng_tensor((1000,), seed=bits) * 0.01 + 0.003  # off-centre, so affine differs from symmetric
    codec = parse_codec(f"int{bits}:group={group},scheme=affine")
    xh = codec.decode(codec.encode(x))
    levels = 2**bits - 1
    for g, gh in zip(groups_np(x, group), groups_np(xh, group), strict=True):
        step = (g.max() - g.min()) / levels
        ulp_min = abs(g.min()) * 2**-10  # the float16 minimum is rounded down by at most one ulp
        assert np.all(np.abs(g - gh) <= (step + ulp_min / levels) / 2 * (1 + 2**-9) + 1e-9)
        assert len(np.unique(gh)) <= levels + 1


def test_int_bytes_hand_computed() -> None:
    x = rng_tensor((1000,))
    assert parse_codec("int4:group=128").encode(x).nbytes == 500 + 8 * 2
    assert parse_codec("int8:group=128").encode(x).nbytes == 1000 + 8 * 2
    assert parse_codec("int2:group=128").encode(x).nbytes == 250 + 8 * 2
    assert parse_codec("int4:group=128,scheme=affine").encode(x).nbytes == 500 + 8 * 2 + 8 * 2
    assert parse_codec("int4:group=3").encode(rng_tensor((7,))).nbytes == 4 + 3 * 2


def test_constant_and_zero_groups() -> None:
    x = torch.cat([torch.zeros(128), torch.full((128,), 0.25)])
    for spec in ("int8", "int4:scheme=affine", "int2"):
        xh = parse_codec(spec).decode(parse_codec(spec).encode(x))
        assert torch.all(xh[:128] == 0)  # an all-zero group decodes to exact zeros
        assert torch.all((xh[128:] - 0.25).abs() <= 0.25 * 2**-9)  # a constant group: within float16 rounding


# --------------------------------------------------------------------------------------------- sign
@pytest.mark.parametrize("shape", [(6, 50), (17, 13), (3, 2, 9)], ids=str)
def test_sign_scale_is_least_squares(shape: tuple[int, ...], chunking: str) -> None:
    x = rng_tensor(shape, seed=3)
    xm = np_of(x).reshape(shape[0], -1)
    s = np.where(xm >= 0, 1.0, -1.0)
    for mode in ("row", "tensor"):
        codec = parse_codec(f"sign:scale={mode}")
        xh = np_of(codec.decode(codec.encode(x))).reshape(xm.shape)
        assert np.array_equal(np.sign(xh), s)
        if mode == "row":
            a = np.array([np.linalg.lstsq(s[r:r + 1].T, xm[r], rcond=None)[0][0] for r in range(xm.shape[0])])
            np.testing.assert_allclose(xh, a[:, None] * s, rtol=1e-3)
        else:
            a = np.linalg.lstsq(s.reshape(-1, 1), xm.ravel(), rcond=None)[0][0]
            np.testing.assert_allclose(xh, a * s, rtol=1e-3)
        # decode == scale · sign: one magnitude per row (or per tensor)
        mags = np.abs(xh)
        assert np.all(mags == (mags[:, :1] if mode == "row" else mags.flat[0]))


def test_sign_bytes() -> None:
    x = rng_tensor((10, 100))
    assert parse_codec("sign").encode(x).nbytes == 125 + 10 * 2
    assert parse_codec("sign:scale=tensor").encode(x).nbytes == 125 + 2


# ------------------------------------------------------------------------------------------ lowrank
def test_lowrank_exact_at_true_rank() -> None:
    g = np.random.default_rng(1)
    a = torch.from_numpy((g.standard_normal((60, 5)) @ g.standard_normal((5, 40))).astype(np.float32))
    for r in (5, 8, 100):
        codec = parse_codec(f"lowrank:rank={r}")
        enc = codec.encode(a)
        assert np_rel_error(a, codec.decode(enc)) < 1e-5
        assert enc.nbytes == 4 * min(r, 40) * (60 + 40)


@pytest.mark.parametrize("r", [1, 7, 20])
def test_lowrank_error_is_tail_energy(r: int) -> None:
    x = rng_tensor((50, 30), seed=4)
    sigma = np.linalg.svd(np_of(x), compute_uv=False)
    expected = math.sqrt((sigma[r:] ** 2).sum() / (sigma**2).sum())
    codec = parse_codec(f"lowrank:rank={r}")
    assert np_rel_error(x, codec.decode(codec.encode(x))) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 0.9999])
def test_lowrank_energy_picks_rank(energy: float) -> None:
    g = np.random.default_rng(5)
    u, _ = np.linalg.qr(g.standard_normal((40, 12)))
    v, _ = np.linalg.qr(g.standard_normal((24, 12)))
    sigma = np.array([10, 6, 4, 3, 2, 1.5, 1, 0.7, 0.4, 0.2, 0.1, 0.05])
    x = torch.from_numpy((u * sigma) @ v.T).float()
    cum = np.cumsum(sigma**2) / (sigma**2).sum()
    expected = int(np.argmax(cum >= energy - 1e-12)) + 1
    enc = parse_codec(f"lowrank:energy={energy}").encode(x)
    assert enc.meta["rank"] == expected
    assert enc.nbytes == 4 * expected * (40 + 24)


def test_lowrank_chained_bytes_and_fallback() -> None:
    x = rng_tensor((30, 40), seed=6)
    enc = parse_codec("lowrank:rank=4+int8").encode(x)
    # int8 of the (4, 30) and (4, 40) factors: n bytes + 2 bytes per group of 128
    assert enc.nbytes == (120 + 1 * 2) + (160 + 2 * 2)
    plain = parse_codec("lowrank:rank=4")
    err_plain = np_rel_error(x, plain.decode(plain.encode(x)))
    err_chain = np_rel_error(x, parse_codec("lowrank:rank=4+int8").decode(enc))
    assert abs(err_chain - err_plain) < 0.01
    v = rng_tensor((9,))
    enc1 = parse_codec("lowrank:rank=4").encode(v)
    assert enc1.meta["fallback"] == "float32" and torch.equal(parse_codec("lowrank:rank=4").decode(enc1), v)
    assert parse_codec("lowrank+int8").encode(v).meta["fallback"].startswith("int8")


# -------------------------------------------------------------------------------------- sparse rows
def test_sparse_rows_three_changed_rows(chunking: str) -> None:
    x = torch.zeros(50, 16)
    changed = [3, 17, 48]
    x[changed] = rng_tensor((3, 16), seed=7)
    enc = parse_codec("sparse-rows").encode(x)
    assert torch.equal(parse_codec("sparse-rows").decode(enc), x)
    assert enc.nbytes == 3 * 16 * 4 + 3 * 4
    assert enc.tensors["index"].tolist() == changed
    enc8 = parse_codec("sparse-rows+int8").encode(x)
    assert enc8.nbytes == 3 * 4 + (48 + 1 * 2)
    xh = parse_codec("sparse-rows+int8").decode(enc8)
    assert torch.all(xh[[r for r in range(50) if r not in changed]] == 0)


# --------------------------------------------------------------------------------------- top-k / ternary
@pytest.mark.parametrize(("density", "k"), [(0.05, 50), (0.0512, 52), (0.5, 500), (1.0, 1000)])
def test_topk_keeps_largest(density: float, k: int) -> None:
    x = rng_tensor((1000,), seed=8)
    codec = parse_codec(f"topk:density={density}")
    enc = codec.encode(x)
    xh = np_of(codec.decode(enc))
    ref = np.argsort(-np.abs(np_of(x)))[:k]
    assert set(np.flatnonzero(xh)) == set(ref)
    np.testing.assert_allclose(xh[ref], np_of(x)[ref], rtol=1e-3)
    assert enc.nbytes == support_bytes(ref, 1000) + 2 * k


def support_bytes(positions: np.ndarray, n: int) -> int:
    """Bytes of the smallest support form: LEB128 varints of the gaps minus one (7 bits per byte), int32
    positions, or an n-bit mask."""
    p = np.sort(np.asarray(positions, dtype=np.int64))
    gaps = np.diff(np.concatenate([[-1], p])) - 1
    varints = sum(max(1, -(-int(g).bit_length() // 7)) for g in gaps)
    return min(varints, 4 * len(p), -(-n // 8))


def test_varint_gaps_round_trip_and_refuse_a_bad_stream() -> None:
    from tvbasis.codecs.topk import decode_support, encode_support, varint_decode

    pos = torch.tensor([0, 1, 129, 130, 20_000, 2**22])
    kind, t = encode_support(pos, 2**23, gaps=True)
    # gaps minus one: 0, 0, 127, 0, 19869, 4174303 -> 1 + 1 + 1 + 1 + 3 + 4 bytes, against 24 as int32
    assert kind == "gaps" and t.numel() == 11 and t[:4].tolist() == [0, 0, 127, 0]
    assert decode_support({"gaps": t}, 2**23, 6).tolist() == pos.tolist()
    with pytest.raises(ValueError, match="reach position"):
        decode_support({"gaps": t}, 2**22, 6)  # the last position falls outside a smaller tensor
    with pytest.raises(ValueError, match="expected 7"):
        decode_support({"gaps": t}, 2**23, 7)
    with pytest.raises(ValueError, match="complete numbers"):
        varint_decode(torch.tensor([0x80], dtype=torch.uint8), 1)  # a number never ends
    with pytest.raises(ValueError, match="longer than"):
        varint_decode(torch.tensor([0x80] * 6 + [1], dtype=torch.uint8), 1)
    assert encode_support(pos, 2**23)[0] == "index"  # the default (UltraDelta's stores) keeps the older forms


def test_topk_chained_values() -> None:
    x = rng_tensor((40, 25), seed=9)
    enc = parse_codec("topk:density=0.01+int8").encode(x)
    top = np.argsort(-np.abs(np_of(x)).ravel())[:10]
    assert enc.nbytes == support_bytes(top, 1000) + (10 + 2)


def np_ternary(x: np.ndarray, density: float) -> np.ndarray:
    flat = x.ravel()
    k = min(math.ceil(round(density * flat.size, 9)), int(np.count_nonzero(flat)))
    idx = np.argsort(-np.abs(flat))[:k]
    out = np.zeros_like(flat)
    out[idx] = np.abs(flat[idx]).mean() * np.sign(flat[idx])
    return out.reshape(x.shape)


@pytest.mark.parametrize("density", [0.02, 0.1, 0.6])
def test_ternary_matches_dense_reference(density: float) -> None:
    x = rng_tensor((20, 50), seed=10)
    x[0, :30] = 0.0  # zeros are never kept, even at high density
    codec = parse_codec(f"ternary:density={density}")
    enc = codec.encode(x)
    np.testing.assert_allclose(np_of(codec.decode(enc)), np_ternary(np_of(x), density), rtol=1e-3, atol=0)
    k = min(math.ceil(density * 1000 - 1e-9), 970)
    kept = np.flatnonzero(np_ternary(np_of(x), density).reshape(-1))
    assert len(kept) == k
    assert enc.nbytes == support_bytes(kept, 1000) + math.ceil(k / 8) + 2


# ---------------------------------------------------------------------------------------- spec strings
@pytest.mark.parametrize("spec", ["int9", "int8:grp=4", "int8:group=abc", "int8:group=0", "int8:group=1.5",
                                  "int4:scheme=foo", "lowrank:rank=0", "lowrank:rank=4,energy=0.5",
                                  "lowrank:energy=1.01", "topk:density=0", "topk:density=1.5",
                                  "ternary:density=-0.1", "topk:density=nan", "auto:rel_error=-1", "int8+int4",
                                  "sign+int8", "sign:scale=col", "", "int8:", "int8:group=4,group=5", "float16:x=1",
                                  "lowrank+", "+int8"])
def test_bad_specs_raise_config_error(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_codec(spec)
    assert "\n" not in str(e.value)


def test_error_message_names_codec_and_parameter() -> None:
    with pytest.raises(ConfigError, match=r"'lowrank'.*'rank'.*integer >= 1"):
        parse_codec("lowrank:rank=0")
    with pytest.raises(ConfigError, match=r"'topk'.*'density'.*\(0, 1\]"):
        parse_codec("topk:density=2")
    with pytest.raises(ConfigError, match=r"unknown codec 'nope'"):
        parse_codec("nope")


@pytest.mark.parametrize("spec", ALL_SPECS + ["sparse-rows+topk:density=0.2+int4:group=32,scheme=affine",
                                              "auto:rel_error=1e-05", "topk:density=0.05", "topk:density=0.123456789"])
def test_canonical_spec_round_trip(spec: str) -> None:
    c = parse_codec(spec)
    assert parse_codec(c.spec) == c and parse_codec(c.spec).spec == c.spec
    assert c.spec.split("+")[0].startswith(spec.split(":")[0].split("+")[0])


def test_canonical_spec_has_defaults() -> None:
    assert parse_codec("int8").spec == "int8:group=128,scheme=symmetric"
    assert parse_codec("lowrank:energy=0.9+int4").spec == (
        "lowrank:rank=none,energy=0.9,fraction=none+int4:group=128,scheme=symmetric")
    assert parse_codec(" INT4 : Group = 64 ") == parse_codec("int4:group=64") == get_codec("int4", group=64)
    assert get_codec("lowrank", next="int8", rank=3) == parse_codec("lowrank:rank=3+int8")
    assert parse_codec("int8") != parse_codec("int8:scheme=affine")
    assert set(CODECS) == {"float32", "float16", "bfloat16", "int8", "int4", "int3", "int2", "sign", "lowrank",
                           "sparse-rows", "topk", "ternary", "auto", "mask", "minmax", "mixed-svd", "ultra", "zstd",
                           "colscale"}


# ------------------------------------------------------------------------------------------------ auto
def auto_inputs() -> dict[str, torch.Tensor]:
    g = np.random.default_rng(11)
    low = g.standard_normal((64, 3)) @ g.standard_normal((3, 48)) + 0.01 * g.standard_normal((64, 48))
    emb = np.zeros((64, 48))
    emb[[2, 9]] = g.standard_normal((2, 48))
    return {"gauss": rng_tensor((64, 48), seed=12), "lowrank": torch.from_numpy(low).float(),
            "rows": torch.from_numpy(emb).float(), "vector": rng_tensor((300,), seed=13)}


@pytest.mark.parametrize("target", [0.0, 0.01, 0.1, 0.5])
def test_auto_picks_cheapest_meeting_target(target: float) -> None:
    for name, x in auto_inputs().items():
        tried = []
        for spec in AUTO_LADDER:
            c = parse_codec(spec)
            if c.name == "lowrank" and x.ndim < 2:
                continue
            e = c.encode(x)
            tried.append((e.nbytes, np_rel_error(x, c.decode(e)), c.spec))
        ok = [t for t in tried if t[1] <= target + 1e-12]
        expected = min(ok, key=lambda t: (t[0], t[1]))
        auto = parse_codec(f"auto:rel_error={target}")
        enc = auto.encode(x)
        assert enc.meta["chosen"] == expected[2], name
        assert enc.nbytes == expected[0]
        assert np_rel_error(x, auto.decode(enc)) <= target + 1e-12


def test_auto_prefers_structure() -> None:
    inputs = auto_inputs()
    assert parse_codec("auto:rel_error=0.05").encode(inputs["lowrank"]).meta["chosen"].startswith("lowrank")
    assert parse_codec("auto:rel_error=0").encode(inputs["rows"]).meta["chosen"] == "sparse-rows"


# ---------------------------------------------------------------------------------- flat tensors / files
@pytest.mark.parametrize("spec", ["int4:group=64,scheme=affine", "lowrank:rank=3+int8", "sparse-rows+int4",
                                  "topk:density=0.05", "ternary:density=0.3", "sign", "auto:rel_error=0.2",
                                  "float16"])
def test_flat_tensors_through_safetensors(spec: str, tmp_path: Path) -> None:
    x = rng_tensor((20, 30), seed=14)
    x[5] = 0.0
    enc = parse_codec(spec).encode(x)
    flat, desc = enc.to_tensors("layer.weight.")
    path = tmp_path / "t.safetensors"
    save_file({**flat, "other": torch.ones(3)}, str(path))
    desc = json.loads(json.dumps(desc))
    back = Encoded.from_tensors(load_file(str(path)), desc, "layer.weight.")
    assert back.nbytes == enc.nbytes == stored_bytes(enc)
    assert torch.equal(decode(back), parse_codec(spec).decode(enc))


# ------------------------------------------------------------------------------------------------ bits
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100, 1001])
def test_bit_packing_against_numpy(n: int) -> None:
    g = np.random.default_rng(n)
    b = g.random(n) < 0.5
    packed = pack_bits(torch.from_numpy(b))
    assert np.array_equal(packed.numpy(), np.packbits(b, bitorder="little"))
    assert np.array_equal(unpack_bits(packed, n).numpy(), b)
    for width in (2, 4):
        codes = g.integers(0, 2**width, n)
        per = 8 // width
        ref = np.zeros(-(-n // per), dtype=np.uint8)
        for i, c in enumerate(codes):
            ref[i // per] |= int(c) << (width * (i % per))
        p = pack_uint(torch.from_numpy(codes), width)
        assert np.array_equal(p.numpy(), ref)
        assert np.array_equal(unpack_uint(p, width, n).numpy(), codes)


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        pack_uint(torch.tensor([0, 4]), 2)


# ----------------------------------------------------------------------------- inputs, chunks, determinism
def test_bad_inputs() -> None:
    with pytest.raises(NonFiniteError):
        parse_codec("int8").encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError):
        parse_codec("int8").encode(torch.arange(4))
    with pytest.raises(NonFiniteError):
        parse_codec("float16").encode(torch.tensor([1e5]))
    enc = parse_codec("int8").encode(rng_tensor((4,)))
    with pytest.raises(ConfigError):
        parse_codec("int4").decode(enc)
    x64 = rng_tensor((5, 5)).double()
    assert parse_codec("float32").decode(parse_codec("float32").encode(x64)).dtype == torch.float32


@pytest.mark.parametrize("spec", ["int4:group=5", "int8:group=7,scheme=affine", "int2:group=3", "sign",
                                  "sign:scale=tensor", "sparse-rows+int4:group=5"])
def test_chunked_encoding_is_identical(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = rng_tensor((37, 13), seed=15)
    x[[4, 20]] = 0.0
    whole = parse_codec(spec).encode(x)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 20)
    chunked = parse_codec(spec).encode(x)
    a, _ = whole.to_tensors()
    b, _ = chunked.to_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic() -> None:
    x = rng_tensor((40, 30), seed=16)
    for spec in ("lowrank:rank=5+int8", "topk:density=0.1", "ternary:density=0.1", "auto"):
        a, _ = parse_codec(spec).encode(x).to_tensors()
        b, _ = parse_codec(spec).encode(x).to_tensors()
        assert all(torch.equal(a[k], b[k]) for k in a)


def _fp16_up(v: np.ndarray) -> np.ndarray:
    """float32 values rounded up to float16 (numpy's nearest, stepped one float16 ulp up where it fell below)."""
    h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _fp16_down(v: np.ndarray) -> np.ndarray:
    h = v.astype(np.float16)
    high = h.astype(np.float32) > v
    h[high] = np.nextafter(h[high], np.float16(-np.inf))
    return h


@pytest.mark.parametrize("spec", ["int8", "int4", "int3", "int2:group=5", "int4:group=32,scheme=affine",
                                  "int2:group=7,scheme=affine", "int8:scheme=affine"])
def test_int_roundtrip_is_decode_of_encode_and_the_formula(spec: str, chunking: str) -> None:
    """``roundtrip`` (the measuring pass's unpacked path) equals decode(encode(x)) bit for bit, and both equal the
    quantiser's definition computed here in numpy: s = max|x_g|/Q rounded up to float16, x̂ = s·round(x/s); affine
    m = min x_g rounded down, s = (max − m)/L rounded up, x̂ = m + s·round((x − m)/s)."""
    codec = parse_codec(spec)
    x = rng_tensor((37, 29), seed=len(spec)) * 0.01 + (0.002 if "affine" in spec else 0.0)
    got = codec.roundtrip(x)
    assert torch.equal(got, codec.decode(codec.encode(x)))
    bits, group = codec.bits, codec.group
    flat = x.reshape(-1).numpy()
    ref = np.empty_like(flat)
    for i in range(0, flat.size, group):
        g = flat[i:i + group]
        if codec.affine:
            L = 2**bits - 1
            m = _fp16_down(np.array([g.min()], np.float32)).astype(np.float32)[0]
            s = _fp16_up(np.array([(g.max() - m) / np.float32(L)], np.float32)).astype(np.float32)[0]
            q = np.clip(np.round((g - m) / (s if s > 0 else np.float32(1))), 0, L)
            ref[i:i + group] = q * s + m
        else:
            Q = 2 ** (bits - 1) - 1
            s = _fp16_up(np.array([np.abs(g).max() / np.float32(Q)], np.float32)).astype(np.float32)[0]
            q = np.clip(np.round(g / (s if s > 0 else np.float32(1))), -Q, Q)
            ref[i:i + group] = q * s
    np.testing.assert_allclose(got.reshape(-1).numpy(), ref, rtol=0, atol=1e-7)
    # the measuring pass's error without the decoded tensor: the squared error of the definition's x̂
    assert codec.sq_error(x) == pytest.approx(float(((flat.astype(np.float64) - ref) ** 2).sum()), rel=1e-5)
