"""What the Python layer costs, each figure against the engine measured in the same run.

    python3 python/benches/overhead.py [--quick]

1. Filter.analyse at n = 20, d = 1000 on the CPU: wall time per call against the engine's own
   time inside the same calls (``Filter.engine_seconds``); the difference is the layer's
   overhead (argument checks, numpy copies in and out, GIL release, locking).
2. enff.run of a preset against the ``enff run`` command on the same preset and seed
   (median of several runs each; the command's time includes starting the process and
   writing its files, so the loop time of summary.json is compared too).
3. A numpy model's round trip per forecast (Assimilator.forecast with a model that returns
   its input) at n = 20 and d = 1000 and 100000, against the engine's own analysis there.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import enff

REPO = Path(__file__).resolve().parents[2]
QUICK = "--quick" in sys.argv


def median_time(f, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def filter_overhead(n=20, d=1000, calls=2000):
    rng = np.random.default_rng(1)
    f = rng.normal(size=(n, d))
    y = rng.normal(size=d)
    rows = []
    for name, settings in [("enff-f2p", {}), ("etkf", {})]:
        filt = enff.Filter(name, obs_noise_std=1.0, backend="cpu", **settings)
        for _ in range(50):  # warm-up: buffers, caches
            filt.analyse(f, y)
        e0 = filt.engine_seconds
        t0 = time.perf_counter()
        for _ in range(calls):
            filt.analyse(f, y)
        wall = (time.perf_counter() - t0) / calls
        engine = (filt.engine_seconds - e0) / calls
        rows.append((name, wall, engine, wall - engine))
    print(f"Filter.analyse, n = {n}, d = {d}, CPU, {calls} calls")
    print(f"  {'filter':10} {'call µs':>10} {'engine µs':>10} {'overhead µs':>12}")
    for name, wall, engine, over in rows:
        print(f"  {name:10} {wall*1e6:10.1f} {engine*1e6:10.1f} {over*1e6:12.1f}")


def run_vs_command(preset="lorenz96_sakov2008", repeat=5):
    binary = REPO / "target" / "release" / "enff"
    overrides = {"experiment.cycles": 1000} if not QUICK else {"experiment.cycles": 200}
    sets = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    cli_wall, cli_loop, py_wall, py_loop = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            out = Path(tmp) / f"cli{i}"
            t = time.perf_counter()
            subprocess.run(
                [str(binary), "run", preset, "--backend", "cpu", "--seed", "1", "--out", str(out),
                 "--no-plots", "--quiet", *sets],
                check=True, capture_output=True,
            )
            cli_wall.append(time.perf_counter() - t)
            cli_loop.append(json.loads((out / "summary.json").read_text())["seconds_total"])
            t = time.perf_counter()
            r = enff.run(preset, backend="cpu", seed=1, overrides=overrides,
                         out=Path(tmp) / f"py{i}", plots=False)
            py_wall.append(time.perf_counter() - t)
            py_loop.append(r.summary["seconds_total"])
    m = statistics.median
    print(f"enff.run vs enff run: {preset}, {overrides}, CPU, median of {repeat}")
    print(f"  wall   command {m(cli_wall):.3f} s   enff.run {m(py_wall):.3f} s   "
          f"ratio {m(py_wall)/m(cli_wall):.3f}")
    print(f"  loop   command {m(cli_loop):.3f} s   enff.run {m(py_loop):.3f} s   "
          f"ratio {m(py_loop)/m(cli_loop):.3f}")


def model_round_trip(n=20, dims=(1000, 100000)):
    print(f"numpy model round trip per forecast (model returns its input), n = {n}, CPU")
    print(f"  {'d':>8} {'forecast ms':>12} {'GB/s':>8} {'analysis ms':>12}")
    for d in dims:
        rng = np.random.default_rng(2)
        e = rng.normal(size=(n, d))
        da = enff.Assimilator(e, 1.0, model=lambda x, t, dt: x, backend="cpu", filter="enff-f2p")
        repeat = 200 if d <= 1000 else 20
        fc = median_time(da.forecast, repeat)
        y = rng.normal(size=d)
        an = median_time(lambda: da.analyse(y), max(5, repeat // 4))
        moved = 2 * 2 * n * d * 8  # out and back, host<->engine and float64<->float32 copies
        print(f"  {d:8d} {fc*1e3:12.3f} {moved/fc/1e9:8.2f} {an*1e3:12.3f}")


def dapper_costs(N=20, cycles=400):
    """Where an EnFF cycle's time goes in the DAPPER adapter on sakov2008 (Lorenz-96, Nx = 40):
    DAPPER's numpy dynamics, the ensemble crossing into and out of the engine, and the
    analysis with the engine's own identity operator or with DAPPER's operator called as a
    numpy function per member, with its Jacobian for the guidance (what any other operator
    costs)."""
    import os

    here = os.getcwd()
    tmp = tempfile.mkdtemp()
    Path(tmp, "dpr_config.yaml").write_text('data_root: "$cwd"\nliveplotting: no\n')
    os.chdir(tmp)
    try:
        from dapper.mods.Lorenz96.sakov2008 import HMM
    finally:
        os.chdir(here)
    from enff.dapper import GUIDANCE_SETTINGS, _noise_std

    obs = HMM.Obs(1)
    rng = np.random.default_rng(3)
    E = HMM.X0.sample(N) + rng.normal(size=(N, 40))
    # Local guidance: covariance guidance needs observation locations, which only the
    # engine's own operators have.
    settings = GUIDANCE_SETTINGS["local"]
    builtin = enff.Assimilator(E, _noise_std(obs), backend="cpu", **settings)
    python = enff.Assimilator(E, _noise_std(obs), backend="cpu", obs_op=lambda x: obs(x),
                              obs_adjoint=lambda x, r: obs.linear(x).T @ r, **settings)
    y = rng.normal(size=40)
    dyn = median_time(lambda: HMM.Dyn(E, 0.0, 0.05), cycles)
    cross = median_time(lambda: (builtin.set_ensemble(E), builtin.ensemble), cycles)
    an_b = median_time(lambda: (builtin.set_ensemble(E), builtin.analyse(y)), cycles) - cross / 2
    an_p = median_time(lambda: (python.set_ensemble(E), python.analyse(y)), cycles // 4) - cross / 2
    print(f"DAPPER adapter, sakov2008 (Nx = 40), N = {N}, local guidance, CPU, per cycle")
    print(f"  DAPPER dynamics (numpy)            {dyn*1e6:9.1f} µs")
    print(f"  ensemble into and out of enff       {cross*1e6:9.1f} µs")
    print(f"  analysis, enff's identity operator {an_b*1e6:9.1f} µs")
    print(f"  analysis, DAPPER's operator (numpy) {an_p*1e6:9.1f} µs")


if __name__ == "__main__":
    print(enff.info()["cpu"])
    filter_overhead(calls=300 if QUICK else 2000)
    run_vs_command(repeat=3 if QUICK else 5)
    model_round_trip(dims=(1000,) if QUICK else (1000, 100000))
    try:
        dapper_costs()
    except ImportError as e:
        print(f"(DAPPER not installed, its costs left out: {e})")
