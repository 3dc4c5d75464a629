"""Delta-CoMe's mixed-precision low rank (``mixed-svd``), UltraDelta's code (``ultra``), the ``zstd`` entropy stage,
``int3`` and any-width bit packing — each against a reference written here (an SVD from ``torch.linalg.svd`` and
a round-to-nearest quantiser of this file, UltraDelta's quantise/prune rules re-derived per level, byte counts by
hand) — and the ``deltacome`` / ``ultradelta`` store methods built on tiny models: reconstructions, recorded
errors, the allocation and trace-norm rescaling of the reference code, integrity, edits and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.tinymodels import dense_vector, ft_args, make_family
from tvbasis.cli import main
from tvbasis.codecs import parse_codec, relative_error
from tvbasis.codecs.bits import pack_uint, packed_size, unpack_uint
from tvbasis.compress.deltacome import deltacome_ranks
from tvbasis.compress.ultradelta import allocate_densities, tensor_seed, trace_ratios
from tvbasis.errors import ConfigError
from tvbasis.store import BasisStore, add_task, build_store
from tvbasis.store.ultradelta import build_ultradelta_store


def lowrankish(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A delta-like matrix: a decaying spectrum plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))[0]
    s = 0.05 * torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -1.0
    return (u * s) @ v.T + 1e-4 * torch.randn(m, n, generator=g)


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("width", range(1, 9))
def test_any_width_packs_to_the_dense_bit_stream(width):
    g = np.random.default_rng(width)
    n = 37
    codes = g.integers(0, 2**width, n)
    ref = np.zeros(math.ceil(n * width / 8), dtype=np.uint8)  # stream bit w·i + j = bit j of code i
    for i, c in enumerate(codes):
        for j in range(width):
            if (int(c) >> j) & 1:
                k = width * i + j
                ref[k // 8] |= 1 << (k % 8)
    p = pack_uint(torch.from_numpy(codes), width)
    assert p.numel() == packed_size(n, width) == ref.size and np.array_equal(p.numpy(), ref)
    assert np.array_equal(unpack_uint(p, width, n).numpy(), codes)


def rtn_affine(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Reference round-to-nearest: per consecutive group, min rounded down / scale rounded up to float16."""
    flat = x.reshape(-1).double()
    out = torch.empty_like(flat)
    levels = 2**bits - 1
    for a in range(0, flat.numel(), group):
        v = flat[a:a + group]
        lo = float(v.min())
        m = np.float16(lo)
        if float(m) > lo:
            m = np.nextafter(m, np.float16(-np.inf))
        want = (float(v.max()) - float(m)) / levels
        s = np.float16(want)
        if float(s) < want:
            s = np.nextafter(s, np.float16(np.inf))
        s = float(s) or 1.0
        q = torch.clamp(torch.round((v - float(m)) / s), 0, levels)
        out[a:a + group] = float(m) + s * q
    return out.reshape(x.shape)


def test_int3_matches_a_round_to_nearest_reference_and_its_bytes():
    x = torch.randn(13, 21)
    c = parse_codec("int3:group=16,scheme=affine")
    enc = c.encode(x)
    assert torch.allclose(c.decode(enc).double(), rtn_affine(x, 3, 16), atol=1e-6)
    n, groups = x.numel(), math.ceil(x.numel() / 16)
    assert enc.nbytes == math.ceil(n * 3 / 8) + 2 * 2 * groups


# ------------------------------------------------------------------------------------------------ mixed-svd
def mixed_reference(x: torch.Tensor, ranks: list[int], bits: list[int], group: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    out = torch.zeros(x.shape, dtype=torch.float64)
    a = 0
    s16 = S.to(torch.float16).double()
    for r, b in zip(ranks, bits, strict=True):
        r = min(r, S.numel() - a)
        if r <= 0:
            continue
        u = U[:, a:a + r]
        v = Vh[a:a + r]
        uq = u.double() if b == 16 else rtn_affine(u, b, min(group, r))
        vq = v.double() if b == 16 else rtn_affine(v, b, group)
        if b == 16:
            uq, vq = u.half().double(), v.half().double()
        out += (uq * s16[a:a + r]) @ vq
        a += r
    return out


def mixed_bytes(m: int, n: int, ranks: list[int], bits: list[int], group: int) -> int:
    total, a = 0, 0
    for r, b in zip(ranks, bits, strict=True):
        r = min(r, min(m, n) - a)
        if r <= 0:
            continue
        if b == 16:
            total += 2 * r * (m + n)
        else:
            gu = min(group, r)
            total += math.ceil(m * r * b / 8) + 4 * math.ceil(m * r / gu)  # U: codes + fp16 min and scale
            total += math.ceil(r * n * b / 8) + 4 * math.ceil(r * n / group)  # Vᵀ
        a += r
    return total + 2 * a  # σ in float16


@pytest.mark.parametrize(("ranks", "bits", "group"), [([2, 8, 12], [8, 3, 2], 16), ([1, 40], [16, 4], 32),
                                                       ([3, 50, 50], [8, 3, 2], 8)])
def test_mixed_svd_matches_the_svd_and_rtn_reference_with_exact_bytes(ranks, bits, group):
    x = lowrankish(48, 32)
    spec = f"mixed-svd:ranks={'/'.join(map(str, ranks))},bits={'/'.join(map(str, bits))},group={group}"
    c = parse_codec(spec)
    enc = c.encode(x)
    ref = mixed_reference(x, ranks, bits, group)
    assert float((c.decode(enc).double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    assert enc.nbytes == mixed_bytes(48, 32, ranks, bits, group)


def test_mixed_svd_error_falls_with_rank_and_bits_and_handles_vectors():
    x = lowrankish(64, 48, seed=3)

    def err(spec):
        c = parse_codec(spec)
        return relative_error(x, c.decode(c.encode(x)))

    assert err("mixed-svd:ranks=2/8/8,bits=8/3/2") > err("mixed-svd:ranks=2/8/24,bits=8/3/2") > \
        err("mixed-svd:ranks=2/8/24,bits=8/4/4") > err("mixed-svd:ranks=2/8/24,bits=8/8/8")
    v = torch.randn(7)
    c = parse_codec("mixed-svd")
    enc = c.encode(v)
    assert torch.equal(c.decode(enc), v.half().float()) and enc.nbytes == 14


@pytest.mark.parametrize("spec", ["mixed-svd:ranks=2/3,bits=8", "mixed-svd:bits=8/5/2", "mixed-svd:ranks=a/b",
                                  "mixed-svd:ranks=2/32/40,bits=8/3/2,scheme=odd"])
def test_mixed_svd_refuses_bad_specs(spec):
    with pytest.raises(ConfigError, match="mixed-svd"):
        parse_codec(spec)


def test_deltacome_ranks_reproduce_the_reference_setting():
    # run.sh of thunlp/Delta-CoMe for a 4096 x 4096 LLaMA attention matrix: 2 / 32 / 968 at 8 / 3 / 2 bits = 1/16
    assert deltacome_ranks((4096, 4096), 1 / 16, 2, 32) == (2, 32, 968)
    # MiniLM's 384 x 384: 2·8 + 32·3 + 2·r2 = 384/2 bits per triplet pair  ->  r2 = 40
    assert deltacome_ranks((384, 384), 1 / 16, 2, 32) == (2, 32, 40)
    assert deltacome_ranks((8, 8), 1 / 16, 2, 32) == (2, 6, 0)  # capped at min(m, n), nothing left for 2 bits


# ------------------------------------------------------------------------------------------------ ultra
def ultra_reference_parts(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's quantize_delta, in float32 as it runs on float32 deltas: (levels (2^b,), code per element)."""
    flat = x.reshape(-1).float()
    lo, hi = flat.min(), flat.max()
    L = 2**bits - 1
    q = torch.round((flat - lo) / (hi - lo) * L)
    return (torch.arange(L + 1, dtype=torch.float32) / L * (hi - lo) + lo).double(), q.long()


@pytest.mark.parametrize(("density", "bits"), [(0.1, 4), (0.3, 2), (0.05, 8)])
def test_ultra_keeps_each_level_at_the_density_with_its_value_rescaled(density, bits):
    x = torch.randn(40, 50) * 0.01
    c = parse_codec(f"ultra:density={density},bits={bits},seed=7")
    enc = c.encode(x)
    xhat = c.decode(enc).double().reshape(-1)
    levels, q = ultra_reference_parts(x, bits)
    kept = xhat != 0
    # every level keeps count − round(count · (1 − density)) of its elements (no level is exactly 0 here)
    for v in range(2**bits):
        at = q == v
        c_v = int(at.sum())
        assert int((kept & at).sum()) == c_v - round(c_v * (1 - density))
    # kept values are the level value times 1/density
    span = float(x.max() - x.min())
    assert torch.allclose(xhat[kept], levels[q[kept]] / density, rtol=1e-5, atol=1e-6 * span / density)
    k = int(kept.sum())
    support = min(4 * k, math.ceil(x.numel() / 8))
    assert enc.nbytes == support + math.ceil(k * bits / 8) + 8
    # seeded: the same seed picks the same positions, another seed others
    assert torch.equal(c.decode(c.encode(x)), c.decode(enc))
    other = parse_codec(f"ultra:density={density},bits={bits},seed=8")
    assert not torch.equal(other.decode(other.encode(x)) != 0, c.decode(enc) != 0)


def test_ultra_scale_zero_and_constant_tensors():
    x = torch.randn(300)
    a = parse_codec("ultra:density=0.5,bits=4,scale=1.0,seed=1")
    b = parse_codec("ultra:density=0.5,bits=4,scale=3.0,seed=1")
    assert torch.allclose(3.0 * a.decode(a.encode(x)), b.decode(b.encode(x)))
    z = parse_codec("ultra").encode(torch.zeros(5, 5))
    assert z.meta["k"] == 0 and float(parse_codec("ultra").decode(z).abs().max()) == 0.0
    const = torch.full((10,), 0.25)
    c = parse_codec("ultra:density=1.0,scale=1.0")
    assert torch.allclose(c.decode(c.encode(const)), const)


# ------------------------------------------------------------------------------------------------ zstd
@pytest.mark.parametrize("inner", ["int2:group=32,scheme=affine", "int4", "ultra:density=0.2",
                                   "mixed-svd:ranks=2/8/8,bits=8/3/2,group=16", "topk:density=0.3+int8"])
def test_zstd_decodes_exactly_what_its_next_codec_does(inner):
    pytest.importorskip("zstandard")
    x = torch.randn(64, 48) * torch.rand(64, 48) ** 4  # peaked at 0, as deltas are
    plain = parse_codec(inner)
    z = parse_codec(f"zstd+{inner}")
    pe, ze = plain.encode(x), z.encode(x)
    assert torch.equal(z.decode(ze), plain.decode(pe))
    assert ze.nbytes <= pe.nbytes  # a tensor is kept compressed only where that is smaller
    assert sum(e["zstd"] for e in ze.meta["entries"]) >= 1 or ze.nbytes == pe.nbytes


def test_zstd_saves_on_peaked_codes_and_refuses_forged_frames():
    zstandard = pytest.importorskip("zstandard")
    x = torch.randn(256, 256) * torch.rand(256, 256) ** 8
    z = parse_codec("zstd+int4:group=128,scheme=affine")
    enc = z.encode(x)
    assert enc.nbytes < parse_codec("int4:group=128,scheme=affine").encode(x).nbytes
    i = next(i for i, e in enumerate(enc.meta["entries"]) if e["zstd"])
    bomb = zstandard.ZstdCompressor().compress(bytes(10 * 2**20))  # expands far past the recorded size
    forged = type(enc)(enc.codec, enc.shape, {**enc.tensors, f"t{i}": torch.frombuffer(bytearray(bomb),
                                                                                        dtype=torch.uint8)},
                       enc.meta, enc.children)
    with pytest.raises(ValueError, match="decompress"):
        z.decode(forged)
    with pytest.raises(ConfigError, match="NEXT"):
        parse_codec("zstd")


def test_block_weights_include_openclip_resblocks():
    from tvbasis.compress.blocks import is_block_weight
    assert is_block_weight("visual.transformer.resblocks.3.attn.in_proj_weight", (2304, 768))
    assert is_block_weight("visual.transformer.resblocks.3.mlp.c_fc.weight", (3072, 768))
    assert is_block_weight("model.layers.0.self_attn.q_proj.weight", (64, 64))
    assert not is_block_weight("visual.transformer.resblocks.3.ln_1.weight", (768,))
    assert not is_block_weight("visual.transformer.resblocks.3.attn.in_proj_bias", (2304,))
    assert not is_block_weight("token_embedding.weight", (49408, 512))
    assert not is_block_weight("visual.proj", (768, 512))


# ------------------------------------------------------------------------------------------------ allocation
def test_allocate_densities_follows_the_reference_thirds():
    # stds 1 < 2 < 3 < 4 over sizes 10/10/10/30 (total 60): cumulative 10, 20 ≤ 20 → low third (s + step); 30 ≤ 40
    # → middle (s); the last 30 get (s·60 − s·10 − (s + step)·20) / 30
    stats = {"a": (10, 1.0), "b": (10, 2.0), "c": (10, 3.0), "d": (30, 4.0)}
    got = allocate_densities(stats, density=0.1, step=0.02)
    s, st = 0.9, 0.02
    rest = (s * 60 - s * 10 - (s + st) * 20) / 30
    assert got == pytest.approx({"a": 1 - (s + st), "b": 1 - (s + st), "c": 1 - s, "d": 1 - rest})
    assert sum(stats[k][0] * (1 - got[k]) for k in stats) / 60 == pytest.approx(s)  # mean sparsity kept
    assert trace_ratios({"x": 2.0, "y": 4.0, "z": 8.0}) == {"x": 1.0, "y": 0.5, "z": 0.25}
    assert tensor_seed(0, "a", "w") != tensor_seed(0, "b", "w") and tensor_seed(0, "a", "w") == tensor_seed(0, "a", "w")


# ------------------------------------------------------------------------------------------------ stores
@pytest.fixture(scope="module")
def fam3(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam3"), T=3)


def vectors(pre, sds):
    return [dense_vector(pre, sd) for sd in sds]


def recon(store: BasisStore, task: str) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in store.reconstruct(task).to_state_dict().items()}


def rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float(((got[k] - want[k]) ** 2).sum()) for k in want)
    return math.sqrt(num / sum(float((v ** 2).sum()) for v in want.values()))


BLOCK = ("encoder.layer.0.attention.query.weight", "encoder.layer.0.output.dense.weight",
         "encoder.layer.1.attention.query.weight", "encoder.layer.1.output.dense.weight")


def test_deltacome_store_codes_block_linears_mixed_and_the_rest_in_float16(fam3, tmp_path):
    pre_p, fts, pre, sds = fam3
    store = build_store(pre_p, fts, "deltacome", None, tmp_path / "s", options={"alpha": 0.5, "r3": 2})
    assert store.M == 0 and store.manifest.coded.residual_codec.startswith("deltacome:alpha=0.5,r8=2,r3=2")
    for t, v in zip(store.task_names, vectors(pre, sds), strict=True):
        got = recon(store, t)
        for k, x in v.items():
            if k in BLOCK:  # α = 1/2 of 16 bits on an m × n matrix: r2 from the budget, 2-bit factors in groups of 128
                m, n = x.shape
                r2 = min(int((0.5 * 16 * m * n - (8 * 2 + 3 * 2) * (m + n)) // (2 * (m + n))), min(m, n) - 4)
                ref = mixed_reference(x.float(), [2, 2, max(r2, 0)], [8, 3, 2], 128)
                assert float((got[k] - ref).abs().max()) < 1e-5
            else:
                assert torch.equal(got[k], x.float().half().double())
        assert abs(store.rel_errors[t] - rel(got, v)) < 1e-6
    assert store.verify() == []
    add = {k: v.double() for k, v in store.addition().to_state_dict().items()}
    assert max(float((add[k] - sum(recon(store, t)[k] for t in store.task_names)).abs().max()) for k in add) < 1e-6


def test_deltacome_rest_in_sparse_rows(fam3, tmp_path):
    pre_p, fts, pre, sds = fam3
    store = build_store(pre_p, fts, "deltacome", None, tmp_path / "s", options={"rest": "sparse-rows+int8"})
    v = vectors(pre, sds)[0]
    got = recon(store, "task0")
    for k, x in v.items():
        if k not in BLOCK:  # int8 symmetric, groups of 128 over the kept rows: within half a step of each group
            rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
            flat = rows.reshape(-1)
            step = max(float(flat[a:a + 128].abs().max()) / 127 for a in range(0, flat.numel(), 128))
            assert float((got[k] - x).abs().max()) <= step / 2 + 1e-7


def quantized_std_ref(x: torch.Tensor, bits: int) -> float:
    levels, q = ultra_reference_parts(x, bits)
    return float(levels[q].std(unbiased=False))


def nuclear(v: dict[str, torch.Tensor]) -> float:
    return sum(float(torch.linalg.svdvals(v[k]).sum()) for k in BLOCK)


def test_ultradelta_store_allocation_trace_norms_and_reconstructions(fam3, tmp_path):
    pre_p, fts, pre, sds = fam3
    opts = {"density": 0.3, "step": 0.05, "bits": 4}
    store = build_ultradelta_store(pre_p, fts, tmp_path / "s", options=opts)
    o = store.manifest.options
    assert store.M == 0 and store.manifest.method == "ultradelta"
    vs = vectors(pre, sds)
    for t, v in zip(store.task_names, vs, strict=True):
        # the recorded allocation is the reference's thirds over the std of each quantised delta, computed here
        want = allocate_densities({k: (v[k].numel(), quantized_std_ref(v[k], 4)) for k in BLOCK}, 0.3, 0.05)
        assert o["allocation"][t] == pytest.approx(want)
        got = recon(store, t)
        assert set(k for k, x in got.items() if float(x.abs().max()) > 0) <= set(BLOCK)  # rest=none: not stored
        for k in BLOCK:  # kept values: quantised levels × (1/density) × the task's trace ratio
            levels, q = ultra_reference_parts(v[k], 4)
            kept = got[k].reshape(-1) != 0
            assert torch.allclose(got[k].reshape(-1)[kept], levels[q[kept]] / 0.3 * o["scales"][t], rtol=1e-5)
            d = o["allocation"][t][k]
            for lev in range(16):  # each level keeps its share of the tensor's allocated density
                c_v = int((q == lev).sum())
                assert int((kept & (q == lev)).sum()) == c_v - round(c_v * (1 - d))
        assert abs(store.rel_errors[t] - rel(got, v)) < 1e-6
    # trace-norm rescaling brings every task to the smallest trace norm: the stored tasks' nuclear norms agree
    norms = [nuclear(recon(store, t)) for t in store.task_names]
    assert max(norms) == pytest.approx(min(norms), rel=1e-5)
    assert min(o["scales"].values()) < 1.0 == max(o["scales"].values())
    assert store.verify() == []
    reopened = BasisStore.open(tmp_path / "s")
    assert torch.equal(reopened.reconstruct("task1").to_state_dict()[BLOCK[0]],
                       store.reconstruct("task1").to_state_dict()[BLOCK[0]])


def test_add_task_codes_the_new_task_with_the_peers_rule(fam3, tmp_path):
    pre_p, fts, pre, sds = fam3
    first = {k: fts[k] for k in ("task0", "task1")}
    dc = add_task(build_store(pre_p, first, "deltacome", None, tmp_path / "dc"), "task2", fts["task2"],
                  pretrained=pre_p)
    v = vectors(pre, sds)[2]
    got = recon(dc, "task2")
    for k in BLOCK:  # α = 1/16 of an 8 × 8 or 12 × 8 matrix: the 8- and 3-bit blocks only, r2 = 0
        r8, r3, _ = deltacome_ranks(tuple(v[k].shape), 1 / 16, 2, 32)
        assert float((got[k] - mixed_reference(v[k].float(), [r8, r3], [8, 3], 128)).abs().max()) < 1e-5
    assert abs(dc.rel_errors["task2"] - rel(got, v)) < 1e-6
    ud = add_task(build_ultradelta_store(pre_p, first, tmp_path / "ud", options={"density": 0.5}), "task2",
                  fts["task2"], pretrained=pre_p)
    got = recon(ud, "task2")  # a later task: the uniform density, the plain 1/density rescale
    for k in BLOCK:
        levels, q = ultra_reference_parts(v[k], 4)
        kept = got[k].reshape(-1) != 0
        assert torch.allclose(got[k].reshape(-1)[kept], levels[q[kept]] / 0.5, rtol=1e-5)
    assert abs(ud.rel_errors["task2"] - rel(got, v)) < 1e-6 and ud.verify() == []


def test_ultradelta_density_at_the_step_masks_the_low_variance_third_whole(fam3, tmp_path):
    """density 0.05 with step 0.05: the reference's low-variance third gets mask rate 0.95 + 0.05 = 1 (its masking
    accepts rates in [0, 1]), so those tensors are dropped; the store builds and they read back as zeros."""
    stats = {"a": (10, 1.0), "b": (10, 2.0), "c": (10, 3.0), "d": (30, 4.0)}
    got = allocate_densities(stats, density=0.01, step=0.01)  # 0.99 + 0.01 rounds to 1.0: clamped, not above
    rest = (0.99 * 60 - 0.99 * 10 - 1.0 * 20) / 30  # the high-variance third keeps the mean sparsity at 0.99
    assert got["a"] == got["b"] == 0.0 and got["c"] == pytest.approx(0.01) and got["d"] == pytest.approx(1 - rest)
    pre_p, fts, pre, sds = fam3
    store = build_ultradelta_store(pre_p, fts, tmp_path / "s", options={"density": 0.05, "step": 0.05})
    alloc = store.manifest.options["allocation"]
    for t, v in zip(store.task_names, vectors(pre, sds), strict=True):
        want = allocate_densities({k: (v[k].numel(), quantized_std_ref(v[k], 4)) for k in BLOCK}, 0.05, 0.05)
        assert alloc[t] == pytest.approx(want)
        dropped = [k for k in BLOCK if want[k] == 0.0]
        assert dropped  # the low-variance third
        got = recon(store, t)
        assert all(float(got[k].abs().max()) == 0.0 for k in dropped)
        assert abs(store.rel_errors[t] - rel(got, v)) < 1e-6
    assert store.verify() == []


def test_ultradelta_without_trace_norm_keeps_the_plain_rescale(fam3, tmp_path):
    pre_p, fts, *_ = fam3
    store = build_ultradelta_store(pre_p, fts, tmp_path / "s", options={"density": 0.5, "trace_norm": False,
                                                                       "rest": "float16"})
    assert store.manifest.options["scales"] == dict.fromkeys(store.task_names, 1.0)
    assert float(recon(store, "task0")["pooler.dense.weight"].abs().max()) > 0  # rest=float16 stores the rest


def test_zstd_option_gives_the_same_tasks_never_in_more_bytes(fam3, tmp_path):
    pytest.importorskip("zstandard")
    pre_p, fts, *_ = fam3
    for method in ("deltacome", "ultradelta"):
        stores = []
        for z in (False, True):
            opts = {"zstd": z, **({"density": 0.2} if method == "ultradelta" else {})}
            out = tmp_path / f"{method}-{z}"
            stores.append(build_ultradelta_store(pre_p, fts, out, options=opts) if method == "ultradelta"
                          else build_store(pre_p, fts, method, None, out, options=opts))
        plain, packed = stores
        assert packed.manifest.coded.residual_codec.endswith("zstd=true")
        for t in plain.task_names:
            a, b = recon(plain, t), recon(packed, t)
            assert all(torch.equal(a[k], b[k]) for k in a)
        # tiny tensors: a frame is kept only where smaller, so never more bytes (savings: the codec tests above)
        assert packed.summary()["coded"]["per_task_bytes"] <= plain.summary()["coded"]["per_task_bytes"]
        assert packed.verify() == []


@pytest.mark.parametrize(("method", "options", "pattern"), [
    ("ultradelta", {"density": 0.0}, "density"), ("ultradelta", {"bits": 9}, "bits"),
    ("ultradelta", {"allocation": {}}, "computed by the build"), ("ultradelta", {"what": 1}, "unknown"),
    ("deltacome", {"alpha": 2.0}, "alpha"), ("deltacome", {"rest": "int4"}, "rest"), ("deltacome", {"r8": -1}, "r8")])
def test_peer_option_refusals(fam3, tmp_path, method, options, pattern):
    pre_p, fts, *_ = fam3
    with pytest.raises(ConfigError, match=pattern):
        if method == "ultradelta":
            build_ultradelta_store(pre_p, fts, tmp_path / "s", options=options)
        else:
            build_store(pre_p, fts, method, None, tmp_path / "s", options=options)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="statistics"):  # the plain build path cannot allocate
        build_store(pre_p, fts, "ultradelta", None, tmp_path / "s")


def test_cli_builds_reconstructs_and_edits_both_methods(fam3, tmp_path, capsys):
    pre_p, fts, *_ = fam3
    for method, extra in (("ultradelta", ["--option", "density=0.4"]), ("deltacome", ["--option", "alpha=0.25"])):
        out = tmp_path / method
        assert main(["build", "--pretrained", str(pre_p), *ft_args(fts), "--method", method, *extra,
                     "--out", str(out)]) == 0
        assert main(["verify", str(out)]) == 0
        assert main(["reconstruct", str(out), "task2", "--out", str(tmp_path / f"{method}.safetensors")]) == 0
        assert main(["edit", str(out), "--pretrained", str(pre_p), "--add", "all", "--scaling-coef", "0.3",
                     "--out", str(tmp_path / f"{method}-mt")]) == 0
    assert main(["build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "ultradelta", "-M", "1",
                 "--out", str(tmp_path / "bad")]) != 0
    assert "M = 0" in capsys.readouterr().err
