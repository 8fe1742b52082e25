"""Fast checks of the built-in benchmark models (benchmarks/models)."""
import math

import numpy as np
import pytest
import torch

from benchmarks.models import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    alphas_cumprod,
    betas,
    digits_data,
    frechet_distance,
    load_digits_classifier,
    load_digits_unet,
    load_timeseries_model,
    sliced_wasserstein,
    timeseries_data,
)


@pytest.fixture(scope="module")
def unet():
    return load_digits_unet()


@pytest.fixture(scope="module")
def ts_model():
    return load_timeseries_model()


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


def test_schedule():
    b = betas()
    ab = alphas_cumprod()
    assert NUM_TRAIN_TIMESTEPS == 1000 and b.shape == ab.shape == (1000,)
    assert b.dtype == ab.dtype == torch.float64
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert ab[0].item() == pytest.approx(1 - 1e-4)
    assert ab[-1].item() == pytest.approx(math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000)), rel=1e-9)
    assert torch.all(ab[1:] < ab[:-1])


def test_digits_data():
    tr, te, al = digits_data("train"), digits_data("test"), digits_data("all")
    assert tr.shape == (1438, 1, 8, 8) and te.shape == (359, 1, 8, 8) and al.shape == (1797, 1, 8, 8)
    assert tr.dtype == torch.float32 and al.min() == -1.0 and al.max() == 1.0
    # the split is a partition of all images: the images themselves (rows) compared as multisets
    def multiset(rows: torch.Tensor):
        values, counts = torch.unique(rows.reshape(rows.shape[0], -1), dim=0, return_counts=True)
        return values, counts

    (v_split, c_split), (v_all, c_all) = multiset(torch.cat([tr, te])), multiset(al)
    assert torch.equal(v_split, v_all) and torch.equal(c_split, c_all)
    x, y = digits_data("test", return_labels=True)
    assert torch.equal(x, te) and y.shape == (359,) and y.dtype == torch.int64


@pytest.mark.parametrize("which", ["unet", "ts"])
def test_eps_model_call_conventions(which, unet, ts_model):
    model, shape = (unet, (5, 1, 8, 8)) if which == "unet" else (ts_model, (5, 1, 32))
    x = torch.randn(shape)
    t_int = torch.tensor([0, 1, 250, 998, 999])
    out_int = model(x, t_int)
    out_float = model(x, t_int.float())
    assert out_int.shape == shape and out_int.dtype == torch.float32
    assert torch.isfinite(out_int).all()
    torch.testing.assert_close(out_int, out_float)
    # float (non-integer) times, scalar time, float64 input
    assert torch.isfinite(model(x, torch.full((5,), 999.0))).all()
    assert torch.isfinite(model(x, t_int.float() + 0.5)).all()
    torch.testing.assert_close(model(x, torch.tensor(250)), model(x, torch.full((5,), 250)))
    out64 = model(x.double(), t_int)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, out_int.double())
    assert not model.training


def _eps_mse(model, x0, seed=0):
    """(the model's eps MSE, the MSE of predicting zero) on the same noised data."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = model(add_noise(x0, eps, t), t)
    return torch.mean((pred - eps) ** 2).item(), torch.mean(eps ** 2).item()


def test_digits_unet_denoises_held_out(unet):
    x0 = digits_data("test")
    mse, zero = _eps_mse(unet, x0)
    assert mse < 0.5 * zero  # well below the trivial predictor's error


def test_timeseries_model_denoises_fresh_data(ts_model):
    x0 = timeseries_data(512, seed=2024)
    assert x0.shape == (512, 1, 32)
    assert 0.7 < x0.std().item() < 1.3
    mse, zero = _eps_mse(ts_model, x0)
    assert mse < 0.5 * zero


def test_timeseries_data_reproducible():
    torch.testing.assert_close(timeseries_data(10, seed=3), timeseries_data(10, seed=3))
    assert not torch.equal(timeseries_data(10, seed=3), timeseries_data(10, seed=4))


def test_classifier_accuracy_and_features(classifier):
    x, y = digits_data("test", return_labels=True)
    with torch.no_grad():
        acc = (classifier(x).argmax(1) == y).float().mean().item()
        f = classifier.features(x[:7])
    assert acc > 0.9
    assert f.shape == (7, 64) and torch.isfinite(f).all()


def test_frechet_distance_references():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((6, 6))
    a = torch.from_numpy(rng.standard_normal((400, 6)) @ mix)
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.1, 0.3], dtype=torch.float64)
    # a pure mean shift: the covariances are equal, so FD = ||shift||^2
    fd_shift = frechet_distance(a, a + shift)
    assert fd_shift > 0
    assert fd_shift == pytest.approx(float(shift @ shift), rel=1e-6)
    # a pure scaling by s around the mean: FD = (1 - s)^2 tr(C)
    s = 1.5
    b = a.mean(0) + s * (a - a.mean(0))
    tr_c = float(np.trace(np.cov(a.numpy(), rowvar=False)))
    assert frechet_distance(a, b) == pytest.approx((1 - s) ** 2 * tr_c, rel=1e-6)
    # symmetric, and works for float32 inputs of different sizes
    c = torch.randn(300, 6)
    assert frechet_distance(a, c) == pytest.approx(frechet_distance(c, a), rel=1e-6)


def test_sliced_wasserstein():
    a = timeseries_data(300, seed=5)
    assert sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
    v = torch.full((1, 1, 32), 0.5)
    # a shift moves every projection by v.dir: SW = sqrt(mean (v.dir)^2) ~ ||v|| / sqrt(D) = 0.5
    assert sliced_wasserstein(a, a + v) == pytest.approx(0.5, rel=0.25)
    assert sliced_wasserstein(a, timeseries_data(200, seed=6)) < sliced_wasserstein(a, torch.randn(200, 1, 32))
    # sets of different sizes, in 1-D (every unit direction is +-1): the 1-D W2 of the larger set's sorted values
    # and the smaller set's quantiles at (i + 1/2) / K, K the larger size, by numpy
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 1, generator=g, dtype=torch.float64)
    y = 0.5 + 2.0 * torch.rand(100, 1, generator=g, dtype=torch.float64)
    q = (np.arange(100) + 0.5) / 100
    want = float(np.sqrt(np.mean((np.quantile(x.numpy().ravel(), q) - np.sort(y.numpy().ravel())) ** 2)))
    assert sliced_wasserstein(x, y, n_projections=8) == pytest.approx(want, rel=1e-12)
    assert sliced_wasserstein(y, x, n_projections=8) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_matches_sqrtm_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5)) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    ref = d @ d + np.trace(ca + cb - 2 * np.real(scipy_linalg.sqrtm(ca @ cb)))
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-8)
    # singular covariances (constant feature) stay finite and non-negative
    a[:, 0] = 0.0
    assert 0.0 <= frechet_distance(torch.from_numpy(a), torch.from_numpy(a) + 0.0) < 1e-8
