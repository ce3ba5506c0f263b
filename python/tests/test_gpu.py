"""The GPU backend from Python: the same analyses as the CPU. Skips loudly without an adapter;
fails instead when ENFF_REQUIRE_GPU=1."""

import warnings

import numpy as np
import pytest

import enff
from conftest import require


@pytest.fixture(scope="module")
def gpu():
    try:
        enff.Filter(obs_noise_std=1.0, backend="gpu")
    except RuntimeError as e:
        if require("ENFF_REQUIRE_GPU"):
            pytest.fail(f"ENFF_REQUIRE_GPU=1 and no GPU adapter: {e}")
        warnings.warn(f"NO GPU ADAPTER: the Python GPU tests are skipped ({e})")
        pytest.skip(f"no GPU adapter: {e}")
    return "gpu"


@pytest.mark.parametrize("filter,settings", [
    ("enff-f2p", {}), ("etkf", {}), ("enff-f2p", {"guidance": "covariance", "loc_radius": 4}),
])
def test_gpu_analysis_matches_cpu(gpu, rng, filter, settings):
    f = rng.normal(size=(17, 41)).astype(np.float32)
    y = rng.normal(size=41).astype(np.float32)
    a = enff.analyse(f, y, 0.9, filter=filter, seed=2, backend="cpu", **settings)
    filt = enff.Filter(filter, obs_noise_std=0.9, seed=2, backend=gpu, **settings)
    assert filt.backend == "gpu"
    b = filt.analyse(f, y)
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3)


def test_gpu_assimilator_and_run(gpu, rng):
    initial = rng.normal(size=(12, 40))
    da = enff.Assimilator(initial, 1.0, backend=gpu, seed=1)
    assert da.backend == "gpu"
    da.set_ensemble(initial + 0.5)
    da.analyse(np.zeros(40))
    assert np.isfinite(da.ensemble).all()
    r = enff.run("lorenz96_sakov2008", backend=gpu,
                 overrides={"experiment.cycles": 10, "experiment.burn_in": 2})
    assert r.summary["backend"] == "gpu" and np.isfinite(r.rmse)
