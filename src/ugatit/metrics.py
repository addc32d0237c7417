"""KID and FID on feature arrays, exactly as defined in docs/kid-protocol.md.

Every function takes real and generated features as N x D arrays (numpy or torch, any float dtype), computes in
float64 numpy, and returns raw values: KID is an MMD^2 (tables show it x 100, see `evaluate.format_table`).
Three KID estimators are provided because published numbers use different ones: `kid_subsets` (torch-fidelity,
the standard today), `kid_blocks` (TF-GAN's block estimator, used by the U-GAT-IT authors' metric code) and
`mean_kid` (the authors' source/target mixture, see docs/kid-protocol.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _features(x: ArrayLike, name: str, min_rows: int = 2) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an N x D feature array, got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} feature rows, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: holds NaN or infinite values")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


def polynomial_kernel(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for every pair of rows: the KID kernel (d = feature dimension)."""
    x, y = _features(x, "x", 1), _features(y, "y", 1)
    _same_dim(x, y)
    return _kernel(x, y)


def _kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2(real: np.ndarray, fake: np.ndarray) -> float:
    m, n = real.shape[0], fake.shape[0]
    k_rr, k_gg, k_rg = _kernel(real, real), _kernel(fake, fake), _kernel(real, fake)
    within_real = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    within_fake = (k_gg.sum() - np.trace(k_gg)) / (n * (n - 1))
    return float(within_real + within_fake - 2.0 * k_rg.mean())


def mmd2_unbiased(real: ArrayLike, fake: ArrayLike) -> float:
    """Unbiased MMD^2 with the polynomial kernel; the sets may differ in size (at least 2 rows each)."""
    real, fake = _features(real, "real"), _features(fake, "fake")
    _same_dim(real, fake)
    return _mmd2(real, fake)


def kid_subsets(
    real: ArrayLike, fake: ArrayLike, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """torch-fidelity's KID: mean and standard deviation (ddof=0, as torch-fidelity) of the MMD^2 of `n_subsets`
    random subsets of min(subset_size, m, n) rows drawn without replacement from each set.

    Draws come from `np.random.RandomState(seed)`, generated rows first then real ones, as torch-fidelity does
    with input1 = generated and input2 = real, so the same seed gives the same subsets.
    """
    real, fake = _features(real, "real"), _features(fake, "fake")
    _same_dim(real, fake)
    if n_subsets < 1:
        raise ValueError(f"n_subsets={n_subsets} must be at least 1")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"subset_size={subset_size} must be at least 2")
    rng = np.random.RandomState(seed)
    values = np.empty(n_subsets)
    for i in range(n_subsets):
        fake_rows = rng.choice(fake.shape[0], size, replace=False)
        real_rows = rng.choice(real.shape[0], size, replace=False)
        values[i] = _mmd2(real[real_rows], fake[fake_rows])
    return float(values.mean()), float(values.std())


def block_sizes(n_rows: int, n_blocks: int) -> list[int]:
    """TF-GAN's split of `n_rows` consecutive rows into `n_blocks`: the last (n_rows mod n_blocks) blocks get one
    row more than the others."""
    base, extra = divmod(n_rows, n_blocks)
    return [base] * (n_blocks - extra) + [base + 1] * extra


def kid_blocks(real: ArrayLike, fake: ArrayLike, max_block_size: int = 10) -> tuple[float, float]:
    """The U-GAT-IT authors' KID (TF-GAN `kernel_classifier_distance_and_std_from_activations`): mean over blocks
    of the block-wise MMD^2 and its standard error; rows are taken in the given order, unshuffled.

    The standard error is NaN for a single block, as in TF-GAN.
    """
    real, fake = _features(real, "real"), _features(fake, "fake")
    _same_dim(real, fake)
    if max_block_size < 2:
        raise ValueError(f"max_block_size={max_block_size} must be at least 2")
    n_blocks = math.ceil(max(real.shape[0], fake.shape[0]) / max_block_size)
    sizes_r, sizes_g = block_sizes(real.shape[0], n_blocks), block_sizes(fake.shape[0], n_blocks)
    if min(sizes_r + sizes_g) < 2:
        raise ValueError(
            f"{real.shape[0]} real and {fake.shape[0]} generated rows cannot be cut into {n_blocks} blocks of at "
            "least 2 rows each; use sets of similar sizes"
        )
    ends_r, ends_g = np.cumsum(sizes_r), np.cumsum(sizes_g)
    values = np.array(
        [
            _mmd2(real[end_r - size_r : end_r], fake[end_g - size_g : end_g])
            for size_r, end_r, size_g, end_g in zip(sizes_r, ends_r, sizes_g, ends_g, strict=True)
        ]
    )
    stderr = math.sqrt(values.var(ddof=1) / n_blocks) if n_blocks > 1 else math.nan
    return float(values.mean()), stderr


def mean_kid(source: ArrayLike, target: ArrayLike, fake: ArrayLike, max_block_size: int = 10) -> tuple[float, float]:
    """The authors' "mean KID": (0.02 KID_block(target, fake) + 0.98 KID_block(source, fake)) / 2, and the same
    mixture of the two standard errors. Not a standard metric; kept to compare with the paper's table."""
    kid_t, err_t = kid_blocks(target, fake, max_block_size)
    kid_s, err_s = kid_blocks(source, fake, max_block_size)
    return (0.02 * kid_t + 0.98 * kid_s) / 2, (0.02 * err_t + 0.98 * err_s) / 2


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """Tr((C_a C_b)^(1/2)) for the covariances of the centred rows `a` and `b`, computed without forming a
    non-symmetric matrix square root.

    With C_a = A^T A / (m-1) and C_b = B^T B / (n-1), the eigenvalues of C_a C_b are the squared singular values of
    A B^T / sqrt((m-1)(n-1)), so the trace is that matrix's nuclear norm: exact and cheap when there are fewer
    samples than dimensions (the singular case of small test sets). With more samples, the D x D route is cheaper:
    the eigenvalues of S C_b S with S = C_a^(1/2), both from symmetric eigendecompositions, clipped at 0.
    """
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    if max(m, n) <= d:
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt((m - 1) * (n - 1)))
    cov_a, cov_b = a.T @ a / (m - 1), b.T @ b / (n - 1)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root_a @ cov_b @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def fid(real: ArrayLike, fake: ArrayLike) -> float:
    """Fréchet distance ||mu_r - mu_g||^2 + Tr(C_r + C_g - 2 (C_r C_g)^(1/2)), covariances with n - 1.

    Accurate also when the covariances are singular (fewer images than 2048 features), without scipy.
    """
    real, fake = _features(real, "real"), _features(fake, "fake")
    _same_dim(real, fake)
    mu_r, mu_g = real.mean(axis=0), fake.mean(axis=0)
    a, b = real - mu_r, fake - mu_g
    trace_r = (a * a).sum() / (real.shape[0] - 1)
    trace_g = (b * b).sum() / (fake.shape[0] - 1)
    value = float(((mu_r - mu_g) ** 2).sum() + trace_r + trace_g - 2.0 * _trace_sqrt_product(a, b))
    return max(value, 0.0)
