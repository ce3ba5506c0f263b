"""enff.Assimilator around models and observation operators written in numpy."""

import numpy as np
import pytest

import enff
from conftest import l63


def twin_l63(rng, cycles=80, **kw):
    """A Lorenz-63 twin experiment: truth, noisy observations, and an assimilator."""
    dt, std = 0.1, 2.0
    truth = np.array([1.0, 3.0, 20.0])
    for _ in range(50):
        truth = l63(truth[None, :], 0.0, dt)[0]
    initial = truth + rng.normal(scale=2.0, size=(20, 3))
    da = enff.Assimilator(initial, std, model=l63, dt=dt, backend="cpu", seed=2, **kw)
    errors = []
    for _ in range(cycles):
        truth = l63(truth[None, :], 0.0, dt)[0]
        da.forecast()
        da.analyse(da.observe(truth) + rng.normal(scale=std, size=da.m))
        errors.append(da.stats(truth)["rmse"])
    return da, truth, np.array(errors)


@pytest.mark.parametrize("filter", ["etkf", "enkf", "enff-f2p"])
def test_tracks_a_numpy_lorenz63(rng, filter):
    # EnFF with the lorenz63_spantini2022 preset's settings; the Kalman filters inflated.
    settings = (
        {"sigma_min": 0.3, "guidance_scale": 1.6, "flow_steps": 9}
        if filter == "enff-f2p"
        else {"inflation": 1.05}
    )
    da, truth, errors = twin_l63(rng, filter=filter, **settings)
    late = errors[20:].mean()
    # The observation noise is 2 per component; a filter that tracks does far better than the
    # climatology (about 8) and better than the observations alone.
    assert late < 1.6, (filter, late)
    assert da.cycle == 81 and da.n == 20 and da.d == 3 and da.m == 3
    assert abs(da.time - 8.0) < 1e-9
    assert da.ensemble.shape == (20, 3) and da.ensemble.dtype == np.float64
    np.testing.assert_allclose(da.mean, da.ensemble.mean(axis=0), rtol=1e-6, atol=1e-6)
    assert da.spread > 0 and np.isfinite(da.spread)
    assert "Assimilator" in repr(da)


def test_python_operator_matches_the_builtin(rng):
    d = 12
    initial = rng.normal(size=(10, d))
    y = rng.normal(size=6)

    def h(x):
        return x[1::2]

    def adjoint(x, r):
        out = np.zeros_like(x)
        out[1::2] = r
        return out

    builtin = enff.Assimilator(initial, 0.5, every=2, offset=1, backend="cpu", seed=3)
    python = enff.Assimilator(initial, 0.5, obs_op=h, obs_adjoint=adjoint, obs_linear=True,
                              backend="cpu", seed=3)
    assert python.m == builtin.m == 6
    builtin.analyse(y)
    python.analyse(y)
    np.testing.assert_allclose(python.ensemble, builtin.ensemble, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(python.observe(np.arange(d, dtype=float)), np.arange(1, d, 2))


def test_set_ensemble_and_float32(rng):
    initial = rng.normal(size=(8, 5)).astype(np.float32)
    da = enff.Assimilator(initial, 1.0, filter="etkf", backend="cpu")
    assert da.ensemble.dtype == np.float32
    forecast = initial + 1.0
    da.set_ensemble(forecast)
    np.testing.assert_array_equal(da.ensemble, forecast)
    da.analyse(np.zeros(5, dtype=np.float32))
    assert da.cycle == 2
    with pytest.raises(ValueError, match="has no model"):
        da.forecast()
    with pytest.raises(ValueError, match=r"shape \(8, 5\)"):
        da.set_ensemble(np.zeros((7, 5)))


def test_model_errors_are_python_exceptions(rng):
    initial = rng.normal(size=(6, 3))

    def wrong_shape(E, t, dt):
        return E[:, :2]

    def raises(E, t, dt):
        raise ZeroDivisionError("model failed")

    def nan(E, t, dt):
        return E * np.nan

    def not_an_array(E, t, dt):
        return "x"

    for model, kind, message in [
        (wrong_shape, ValueError, r"shape \(6, 2\).*\(6, 3\)"),
        (raises, ZeroDivisionError, "model failed"),
        (nan, ValueError, "non-finite"),
        (not_an_array, (ValueError, TypeError), "model"),
    ]:
        da = enff.Assimilator(initial, 1.0, model=model, backend="cpu")
        before = da.ensemble
        with pytest.raises(kind, match=message):
            da.forecast()
        # The ensemble and the time are left as they were.
        np.testing.assert_array_equal(da.ensemble, before)
        assert da.time == 0.0
    with pytest.raises(TypeError, match="model"):
        enff.Assimilator(initial, 1.0, model=3, backend="cpu")
    with pytest.raises(ValueError, match="dt"):
        enff.Assimilator(initial, 1.0, model=l63, dt=-1.0, backend="cpu")


def test_operator_errors_are_python_exceptions(rng):
    initial = rng.normal(size=(6, 4))
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyError("h failed")
        return x[:2]

    da = enff.Assimilator(initial, 1.0, obs_op=flaky, filter="etkf", backend="cpu")
    with pytest.raises(KeyError, match="h failed"):
        da.analyse(np.zeros(2))
    # Local guidance follows the gradient of h: without its adjoint the call says so.
    da = enff.Assimilator(initial, 1.0, obs_op=lambda x: x[:2], filter="enff-f2p", backend="cpu")
    with pytest.raises(ValueError, match="obs_adjoint"):
        da.analyse(np.zeros(2))
    with pytest.raises(ValueError, match="first member"):
        enff.Assimilator(initial, 1.0, obs_op=lambda x: 1 / 0, backend="cpu")
    da = enff.Assimilator(initial, 1.0, backend="cpu")
    for y, message in [(np.zeros(3), r"`y` must have shape \(4,\)"), (np.full(4, np.nan), "non-finite")]:
        with pytest.raises(ValueError, match=message):
            da.analyse(y)
    with pytest.raises(ValueError, match="obs_noise_std"):
        enff.Assimilator(initial, -2.0, backend="cpu")
    with pytest.raises(ValueError, match="every"):
        enff.Assimilator(initial, 1.0, every=0, backend="cpu")


def test_covariance_guidance_on_a_numpy_lorenz63(rng):
    # A numpy model has no spatial geometry: switching to covariance guidance brings its own
    # defaults there (global gain, transport weights at the unguided position), and the
    # ensemble tracks far better than the observations alone (noise 2 per component).
    da, truth, errors = twin_l63(rng, filter="enff-f2p", guidance="covariance", sigma_min=0.03,
                                 guidance_scale=2.0, gain_stages=9, flow_steps=9)
    late = errors[20:].mean()
    assert late < 1.0, late
    assert np.isfinite(da.ensemble).all() and da.spread > 0
