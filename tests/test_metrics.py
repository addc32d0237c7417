"""KID and FID estimators against straightforward re-implementations of KID_PROTOCOL.md (loops, scipy)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ugatit.metrics import block_sizes, fid, kid_blocks, kid_subsets, mean_kid, mmd2_unbiased, polynomial_kernel


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative, correlated features like pool_3 activations (ReLU outputs averaged over space)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / math.sqrt(d)
    return np.abs(rng.normal(size=(n, d)) @ mixing + 0.3) + shift


def naive_kernel(x: np.ndarray, y: np.ndarray) -> float:
    return (sum(a * b for a, b in zip(x, y, strict=True)) / len(x) + 1) ** 3


def naive_mmd2(real: np.ndarray, fake: np.ndarray) -> float:
    """The protocol's formula, one pair at a time."""
    m, n = len(real), len(fake)
    rr = sum(naive_kernel(real[i], real[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    gg = sum(naive_kernel(fake[i], fake[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    rg = sum(naive_kernel(real[i], fake[j]) for i in range(m) for j in range(n)) / (m * n)
    return rr + gg - 2 * rg


def naive_blocks(real: np.ndarray, fake: np.ndarray, max_block_size: int) -> tuple[float, float]:
    """The protocol's block estimator, spelled out: v = m // n_blocks, the last p blocks hold v + 1 rows."""
    n_blocks = math.ceil(max(len(real), len(fake)) / max_block_size)

    def cut(rows: np.ndarray) -> list[np.ndarray]:
        v = len(rows) // n_blocks
        p = len(rows) - v * n_blocks
        sizes = [v] * (n_blocks - p) + [v + 1] * p
        starts = [sum(sizes[:i]) for i in range(n_blocks)]
        return [rows[s : s + k] for s, k in zip(starts, sizes, strict=True)]

    values = [naive_mmd2(r, g) for r, g in zip(cut(real), cut(fake), strict=True)]
    mean = sum(values) / n_blocks
    if n_blocks == 1:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n_blocks - 1)
    return mean, math.sqrt(var / n_blocks)


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """pytorch-fid's formula: scipy.linalg.sqrtm of C_r C_g, real part of its trace."""
    mu_r, mu_g = real.mean(0), fake.mean(0)
    c_r, c_g = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(c_r @ c_g)
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(c_r) + np.trace(c_g) - 2 * np.trace(root).real)


def symmetric_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID through the symmetric form Tr((S C_g S)^(1/2)), S = C_r^(1/2), with scipy's eigh: robust when singular."""
    mu_r, mu_g = real.mean(0), fake.mean(0)
    c_r, c_g = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    w, v = scipy.linalg.eigh(c_r)
    s = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = scipy.linalg.eigh(s @ c_g @ s, eigvals_only=True)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(c_r) + np.trace(c_g) - 2 * trace_root)


# ----------------------------------------------------------------------------------------------
# Kernel and MMD


def test_polynomial_kernel_matches_definition():
    x, y = features(3, 5, 0), features(4, 5, 1)
    expected = np.array([[naive_kernel(a, b) for b in y] for a in x])
    np.testing.assert_allclose(polynomial_kernel(x, y), expected, rtol=1e-12)


@pytest.mark.parametrize(("m", "n"), [(7, 5), (6, 6), (2, 9)])
def test_mmd2_unbiased_matches_naive_loops(m, n):
    real, fake = features(m, 6, 0), features(n, 6, 1, shift=0.2)
    assert mmd2_unbiased(real, fake) == pytest.approx(naive_mmd2(real, fake), rel=1e-10, abs=1e-12)


def test_accepts_torch_tensors_and_computes_in_float64():
    real, fake = features(20, 8, 0), features(15, 8, 1, shift=0.1)
    real32 = real.astype(np.float32)
    fake32 = fake.astype(np.float32)
    as_numpy = mmd2_unbiased(real32.astype(np.float64), fake32.astype(np.float64))
    assert mmd2_unbiased(torch.from_numpy(real32), torch.from_numpy(fake32)) == as_numpy
    assert fid(torch.from_numpy(real32), fake32) == fid(real32.astype(np.float64), fake32.astype(np.float64))


def test_refuses_unusable_inputs():
    with pytest.raises(ValueError, match="N x D"):
        mmd2_unbiased(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="dimensions differ"):
        mmd2_unbiased(np.zeros((5, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        kid_blocks(np.full((5, 3), np.nan), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------------
# Subset estimator (torch-fidelity)


def test_kid_subsets_matches_a_hand_rolled_torch_fidelity_loop():
    real, fake = features(30, 6, 0), features(25, 6, 1, shift=0.3)
    rng = np.random.RandomState(7)
    values = []
    for _ in range(5):
        g = fake[rng.choice(25, 10, replace=False)]  # torch-fidelity draws input1 (generated) first
        r = real[rng.choice(30, 10, replace=False)]
        values.append(naive_mmd2(r, g))
    mean, std = kid_subsets(real, fake, n_subsets=5, subset_size=10, seed=7)
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)


def test_kid_subsets_clips_the_subset_size_and_one_full_subset_is_plain_mmd2():
    real, fake = features(12, 6, 0), features(9, 6, 1, shift=0.3)
    mean, std = kid_subsets(real, fake, n_subsets=3, subset_size=1000)
    # min(1000, 12, 9) = 9 rows: all of `fake`, 9 of the 12 real rows
    assert np.isfinite(mean) and std >= 0
    square_real = real[:9]
    mean, std = kid_subsets(square_real, fake, n_subsets=1, subset_size=1000)
    assert mean == pytest.approx(mmd2_unbiased(square_real, fake), rel=1e-12) and std == 0


def test_kid_subsets_of_one_distribution_is_near_zero():
    pool = features(600, 32, 0)
    same, _ = kid_subsets(pool[:300], pool[300:], n_subsets=50, subset_size=100)
    shifted, _ = kid_subsets(pool[:300], pool[300:] + 0.3, n_subsets=50, subset_size=100)
    identical, _ = kid_subsets(pool, pool, n_subsets=50, subset_size=100)
    assert shifted > 0.05
    assert abs(same) < 0.02 * shifted and abs(identical) < 0.02 * shifted


# ----------------------------------------------------------------------------------------------
# Block estimator (TF-GAN, the U-GAT-IT authors)


def test_block_split_on_uneven_sizes_follows_the_protocol():
    assert block_sizes(25, 3) == [8, 8, 9]
    assert block_sizes(23, 3) == [7, 8, 8]
    assert block_sizes(100, 10) == [10] * 10
    real, fake = features(25, 5, 0), features(23, 5, 1, shift=0.2)
    blocks = [
        naive_mmd2(real[0:8], fake[0:7]),
        naive_mmd2(real[8:16], fake[7:15]),
        naive_mmd2(real[16:25], fake[15:23]),
    ]
    mean, stderr = kid_blocks(real, fake, max_block_size=10)
    assert mean == pytest.approx(np.mean(blocks), rel=1e-10)
    assert stderr == pytest.approx(np.std(blocks, ddof=1) / math.sqrt(3), rel=1e-8)


@pytest.mark.parametrize(("m", "n", "size"), [(25, 23, 10), (31, 40, 10), (12, 12, 5), (10, 10, 10)])
def test_kid_blocks_matches_the_naive_estimator(m, n, size):
    real, fake = features(m, 4, 0), features(n, 4, 1, shift=0.2)
    mean, stderr = kid_blocks(real, fake, max_block_size=size)
    expected_mean, expected_err = naive_blocks(real, fake, size)
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    if math.isnan(expected_err):
        assert math.isnan(stderr)
    else:
        assert stderr == pytest.approx(expected_err, rel=1e-8)


def test_kid_blocks_has_no_standard_error_for_a_single_block():
    mean, stderr = kid_blocks(features(10, 4, 0), features(8, 4, 1), max_block_size=10)
    assert np.isfinite(mean) and math.isnan(stderr)


def test_kid_blocks_uses_rows_in_order():
    real, fake = features(20, 4, 0), features(20, 4, 1, shift=0.2)
    assert kid_blocks(real, fake)[0] != pytest.approx(kid_blocks(real[::-1], fake)[0], rel=1e-6)


def test_kid_blocks_refuses_blocks_too_small_for_the_unbiased_estimator():
    with pytest.raises(ValueError, match="at least 2 rows"):
        kid_blocks(features(100, 4, 0), features(15, 4, 1))


def test_mean_kid_is_the_authors_mixture():
    source, target, fake = features(20, 4, 0), features(20, 4, 1, 0.5), features(20, 4, 2, 0.4)
    (kid_t, err_t), (kid_s, err_s) = kid_blocks(target, fake), kid_blocks(source, fake)
    value, err = mean_kid(source, target, fake)
    assert value == pytest.approx((0.02 * kid_t + 0.98 * kid_s) / 2, rel=1e-12)
    assert err == pytest.approx((0.02 * err_t + 0.98 * err_s) / 2, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# FID


@pytest.mark.parametrize(("m", "n", "d"), [(200, 150, 16), (120, 90, 40)])
def test_fid_matches_scipy_sqrtm_with_more_samples_than_dimensions(m, n, d):
    real, fake = features(m, d, 0), features(n, d, 1, shift=0.1)
    assert fid(real, fake) == pytest.approx(scipy_fid(real, fake), rel=1e-8)


@pytest.mark.parametrize(("m", "n", "d"), [(30, 20, 64), (100, 100, 512)])
def test_fid_stays_accurate_with_singular_covariances(m, n, d):
    real, fake = features(m, d, 0), features(n, d, 1, shift=0.1)
    assert fid(real, fake) == pytest.approx(symmetric_fid(real, fake), rel=1e-7)
    assert fid(real, fake) == pytest.approx(scipy_fid(real, fake), rel=1e-4)


def test_fid_of_identical_sets_is_zero_and_of_a_shift_is_its_squared_length():
    x = features(50, 128, 0)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(x, rowvar=False)))
    shift = np.linspace(0, 1, 128)
    assert fid(x, x + shift) == pytest.approx((shift**2).sum(), rel=1e-7)
    y = features(300, 128, 1)  # more samples than dimensions: the other numerical route
    assert fid(y, y) == pytest.approx(0.0, abs=1e-7 * np.trace(np.cov(y, rowvar=False)))
    assert fid(y, y + shift) == pytest.approx((shift**2).sum(), rel=1e-6)


def test_fid_is_symmetric():
    real, fake = features(40, 64, 0), features(30, 64, 1, shift=0.2)
    assert fid(real, fake) == pytest.approx(fid(fake, real), rel=1e-10)
