"""The randomized truncated SVD (compress.svd) is accepted only where its rank-r error stays within 1.02× the exact
truncated SVD's: Gaussian (flat spectrum), low-rank-plus-noise and power-law spectra at the shapes its gate admits."""

from __future__ import annotations

import pytest
import torch

from tvbasis.codecs import decode, parse_codec
from tvbasis.compress.svd import (
    exact_truncated_svd,
    lowrank_encode,
    randomized_svd,
    truncated_svd,
    use_randomized,
)


def _matrix(m: int, n: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, n, generator=g)
    if kind == "lowrank+noise":  # rank 16 carrying ~1/2 of the energy, dense noise the rest
        r = 16
        low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r**0.5
        return low + 0.45 * torch.randn(m, n, generator=g)
    k = min(m, n)  # power law σ_i = i^-1/2: a slowly decaying spectrum, the hard case for a sketch
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return (U * torch.arange(1, k + 1, dtype=torch.float32) ** -0.5) @ V.T


def _err(x: torch.Tensor, f: tuple[torch.Tensor, ...]) -> float:
    u, s, vh = f[0], f[1], f[2]
    return float(torch.linalg.matrix_norm(x.double() - ((u * s) @ vh).double()))


@pytest.mark.parametrize("shape", [(512, 1536), (1536, 512), (1024, 1024)])
@pytest.mark.parametrize("kind", ["gaussian", "lowrank+noise", "powerlaw"])
@pytest.mark.parametrize("rank", [4, 16, 64])
def test_randomized_error_within_2_percent_of_exact(shape: tuple[int, int], kind: str, rank: int) -> None:
    x = _matrix(*shape, kind, seed=rank)  # checked also where the speed gate sends rank 64 to the exact path
    exact = _err(x, exact_truncated_svd(x, rank))
    rand = _err(x, randomized_svd(x, rank))
    assert rand <= 1.02 * exact
    assert rand >= exact * (1 - 1e-6)  # Eckart–Young: nothing beats the exact truncation


def test_gate_and_fallback() -> None:
    assert not use_randomized((384, 1536), 16)   # small side: the Gram eigendecomposition is as fast
    assert not use_randomized((512, 2048), 128)  # sketch too close to the full rank
    assert not use_randomized((30522, 512), 64)  # 10 products of 80 columns cost more than the 512-wide Gram
    assert use_randomized((30522, 512), 16) and use_randomized((1024, 1024), 64)
    assert use_randomized((4096, 11008), 64)
    x = _matrix(200, 300, "gaussian", 0)          # outside the gate: exactly the Gram path
    for a, b in zip(truncated_svd(x, 8), exact_truncated_svd(x, 8)):
        assert torch.equal(a, b)


def test_spectrum_sums_to_the_frobenius_norm_and_is_deterministic() -> None:
    x = _matrix(600, 900, "lowrank+noise", 3)
    u, s, vh, s_all = randomized_svd(x, 16)
    assert u.shape == (600, 16) and s.shape == (16,) and vh.shape == (16, 900)
    assert float((s_all.double() ** 2).sum()) == pytest.approx(float((x.double() ** 2).sum()), rel=1e-5)
    assert torch.equal(s_all[:16], s)
    again = randomized_svd(x, 16)
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh, s_all), again))


def test_lowrank_encode_meta_is_the_stored_error() -> None:
    """rel_error in the codec's meta is the error of what the randomized factors store."""
    x = _matrix(512, 1024, "lowrank+noise", 5)
    enc = lowrank_encode(parse_codec("lowrank:rank=16"), x)
    xhat = decode(enc)
    rel = float(torch.linalg.matrix_norm((x - xhat).double()) / torch.linalg.matrix_norm(x.double()))
    assert enc.meta["rel_error"] == pytest.approx(rel, rel=1e-3)


def test_sparse_rows_lowrank_takes_a_truncated_svd_of_the_touched_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sparse-rows+lowrank:rank=r`` through ``encode_with_svd``: the touched rows' best rank-r approximation (the
    numpy SVD of those rows, written here), zeros elsewhere, the codec's layout (it decodes) — and no full LAPACK
    SVD of the table, which is what the codec's own encode takes (minutes for a 32 000 × 4096 embedding)."""
    import numpy as np

    from tvbasis.compress.svd import encode_with_svd

    g = torch.Generator().manual_seed(2)
    x = torch.zeros(300, 40)
    touched = torch.tensor([3, 17, 18, 90, 91, 92, 150, 299] + list(range(200, 230)))
    x[touched] = torch.randn(len(touched), 6, generator=g) @ torch.randn(6, 40, generator=g) \
        + 0.1 * torch.randn(len(touched), 40, generator=g)
    codec = parse_codec("sparse-rows+lowrank:rank=4")

    def no_full_svd(*a, **k):
        raise AssertionError("full SVD taken")
    monkeypatch.setattr(torch.linalg, "svd", no_full_svd)
    got = decode(encode_with_svd(codec, x))
    rows = x[touched].double().numpy()
    U, S, Vt = np.linalg.svd(rows, full_matrices=False)
    ref = np.zeros((300, 40))
    ref[touched.numpy()] = (U[:, :4] * S[:4]) @ Vt[:4]
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-4)
