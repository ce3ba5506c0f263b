"""enff.analyse and enff.Filter against `enff assimilate`, and their bad input."""

import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import enff


def assimilate_cli(enff_bin, tmp_path, forecast, obs, std, previous=None, **kw):
    """`enff assimilate` on .npy files; returns the analysis it wrote."""
    np.save(tmp_path / "f.npy", forecast)
    np.save(tmp_path / "y.npy", obs)
    cmd = [str(enff_bin), "assimilate", "--forecast", str(tmp_path / "f.npy")]
    cmd += ["--obs", str(tmp_path / "y.npy"), "--obs-noise-std", str(std)]
    cmd += ["--out", str(tmp_path / "a.npy"), "--backend", "cpu"]
    cmd += ["--seed", str(kw.pop("seed", 0)), "--cycle", str(kw.pop("cycle", 1))]
    if previous is not None:
        np.save(tmp_path / "p.npy", previous)
        cmd += ["--previous", str(tmp_path / "p.npy")]
    for flag in ("filter", "obs_op", "every", "offset"):
        if flag in kw:
            name = {"every": "obs-every", "offset": "obs-offset"}.get(flag, flag.replace("_", "-"))
            cmd += [f"--{name}", str(kw.pop(flag))]
    for k, v in kw.items():
        cmd += ["--set", f"filter.{k}={v}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return np.load(tmp_path / "a.npy")


CASES = [
    dict(filter="enff-f2p"),
    dict(filter="enff-f2p", obs_op="arctan", every=2, offset=1, sigma_min=0.05),
    dict(filter="enff-f2p", guidance="covariance", loc_radius=4),
    dict(filter="enff-ot", flow_steps=5),
    dict(filter="etkf", inflation=1.02),
    dict(filter="letkf", every=3),
    dict(filter="enkf"),
    dict(filter="ensf"),
    dict(filter="bpf"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_analyse_equals_the_command(tmp_path, enff_bin, rng, case, dtype):
    n, d = 13, 23
    every, offset = case.get("every", 1), case.get("offset", 0)
    m = len(range(offset, d, every))
    forecast = rng.normal(size=(n, d)).astype(dtype)
    previous = rng.normal(size=(n, d)).astype(dtype)
    obs = rng.normal(size=m).astype(dtype)
    kw = dict(case)
    cli = assimilate_cli(enff_bin, tmp_path, forecast, obs, 0.7, previous, seed=5, cycle=3, **kw)
    py = enff.analyse(forecast, obs, 0.7, previous=previous, seed=5, cycle=3, backend="cpu", **kw)
    assert py.dtype == dtype and py.shape == (n, d)
    np.testing.assert_array_equal(py, cli)
    assert not np.array_equal(py, forecast)


def test_orders_and_dtypes_agree(rng):
    f = rng.normal(size=(9, 17))
    y = rng.normal(size=17)
    a = enff.analyse(f, y, 0.5, seed=1, backend="cpu")
    b = enff.analyse(np.asfortranarray(f), y, 0.5, seed=1, backend="cpu")
    c = enff.analyse(f.astype(np.float32), y.astype(np.float32), 0.5, seed=1, backend="cpu")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a.astype(np.float32), c)
    assert a.flags.c_contiguous and b.dtype == np.float64 and c.dtype == np.float32
    # A (1, m) observation is the same as (m,); the inputs are left as they were.
    f0 = f.copy()
    d = enff.analyse(f, y[None, :], 0.5, seed=1, backend="cpu")
    np.testing.assert_array_equal(a, d)
    np.testing.assert_array_equal(f, f0)


def test_filter_repeats_analyse(rng):
    f = rng.normal(size=(10, 30))
    y = rng.normal(size=15)
    filt = enff.Filter("enff-f2p", obs_noise_std=0.8, every=2, seed=4, backend="cpu",
                       sigma_min=0.05, flow_steps=7)
    assert filt.name == "enff-f2p" and filt.backend == "cpu" and filt.cycle == 1
    first = filt.analyse(f, y)
    second = filt.analyse(f, y)
    assert filt.cycle == 3
    kw = dict(every=2, seed=4, backend="cpu", sigma_min=0.05, flow_steps=7)
    np.testing.assert_array_equal(first, enff.analyse(f, y, 0.8, cycle=1, **kw))
    np.testing.assert_array_equal(second, enff.analyse(f, y, 0.8, cycle=2, **kw))
    assert not np.array_equal(first, second)  # new noise each cycle
    np.testing.assert_array_equal(filt.analyse(f, y, cycle=1), first)
    # Another shape rebuilds the buffers; the results still match.
    g = rng.normal(size=(6, 8))
    np.testing.assert_array_equal(
        filt.analyse(g, y[:4], cycle=9), enff.analyse(g, y[:4], 0.8, cycle=9, **kw)
    )
    assert "enff-f2p" in repr(filt) and "filter.sigma_min=0.05" in repr(filt)


def test_two_threads_analyse_at_once(rng):
    f = rng.normal(size=(20, 400))
    y = rng.normal(size=400)
    serial = [enff.analyse(f, y, 1.0, seed=s, backend="cpu") for s in range(8)]
    filters = [enff.Filter(obs_noise_std=1.0, seed=s, backend="cpu") for s in range(8)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(lambda s: filters[s].analyse(f, y), range(8)))
        shared = list(pool.map(lambda s: enff.analyse(f, y, 1.0, seed=s, backend="cpu"), range(8)))
    for a, b, c in zip(serial, together, shared):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


BAD_FORECASTS = [
    (np.ones((4, 3), dtype=np.int64), ValueError, "dtype int64"),
    (np.ones((4, 3), dtype=np.complex128), ValueError, "dtype complex128"),
    (np.ones((4, 3), dtype=object), ValueError, "dtype object"),
    (np.ones((4, 3), dtype=np.float16), ValueError, "dtype float16"),
    (np.ones(12), ValueError, r"shape \(n, d\)"),
    (np.ones((2, 2, 3)), ValueError, r"shape \(n, d\)"),
    (np.ones((0, 3)), ValueError, "empty"),
    (np.ones((4, 6))[:, ::2], ValueError, "non-contiguous"),
    (np.full((4, 3), np.nan), ValueError, "non-finite value in `forecast` at member 0"),
    (np.array([[1, 2, 3], [4, np.inf, 6]] * 2, dtype=float), ValueError, "member 1, component 1"),
    (np.full((4, 3), 1e300), ValueError, "non-finite"),
    ([[1.0, 2.0, 3.0]] * 4, TypeError, "numpy array"),
]


@pytest.mark.parametrize("forecast,kind,message", BAD_FORECASTS)
def test_bad_forecast(forecast, kind, message):
    with pytest.raises(kind, match=message):
        enff.analyse(forecast, np.zeros(3), 1.0, backend="cpu")


def test_bad_settings_and_observations(rng):
    f = rng.normal(size=(5, 6))
    y = np.zeros(6)
    cases = [
        (dict(obs=np.zeros(5)), r"`obs` must have shape \(6,\)"),
        (dict(obs=np.array([0, 1, np.nan, 0, 0, 0.0])), "non-finite value in `obs`"),
        (dict(obs_noise_std=-1.0), "obs_noise_std"),
        (dict(obs_noise_std=float("nan")), "obs_noise_std"),
        (dict(filter="enkff"), "unknown filter `enkff`"),
        (dict(sigma_min=-0.1), "sigma_min"),
        (dict(flow_steps="many"), "flow_steps"),
        (dict(bogus=1), "unknown setting `filter.bogus`"),
        (dict(obs_op="square"), "square"),
        (dict(every=0), "every"),
        (dict(backend="tpu"), "backend"),
        (dict(previous=np.zeros((4, 6))), r"`previous` must have the forecast's shape \(5, 6\)"),
        (dict(previous=np.full((5, 6), np.inf)), "non-finite value in `previous`"),
    ]
    for change, message in cases:
        kw = dict(obs=y, obs_noise_std=1.0, backend="cpu")
        kw.update(change)
        with pytest.raises(ValueError, match=message):
            enff.analyse(f, kw.pop("obs"), kw.pop("obs_noise_std"), **kw)
    with pytest.raises(ValueError, match="obs_noise_std"):
        enff.Filter(obs_noise_std=0.0, backend="cpu")
    # The interpreter and the engine go on working after every error.
    assert np.isfinite(enff.analyse(f, y, 1.0, backend="cpu")).all()
