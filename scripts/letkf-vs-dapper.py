#!/usr/bin/env python3
"""Times enff's LETKF beside DAPPER's on the same machine, one core each.

    pip install 'dapper==1.7.1'
    python3 scripts/letkf-vs-dapper.py [--d 1000] [--cycles 200] [--enff target/release/enff]

DAPPER: a Lorenz-96 HMM with Nx = d, every component observed (R = I), N = 20,
`LETKF(N=20, loc_rad=4)`; its analysis time per cycle is the run's time less that of the same
run with the analysis left out (both through DAPPER's own loop and stats). enff, under
RAYON_NUM_THREADS=1: (1) the same cycling twin experiment, `enff run lorenz96_sakov2008 --filter
letkf` with d = D, n = 20, Gaspari-Cohn radius 4, no inflation, every component observed with
sigma_y = 1, its analysis time per cycle read from the run's metrics.csv (the figure compared
with DAPPER's); (2) `enff bench --filters letkf --size 20xD --backend cpu`, one analysis of the
bench problem, whose spread is ten times its observation noise (a cold start, where enff's
local transforms take the eigendecomposition). Prints all three and the ratios.
"""

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time

# One core for numpy's BLAS as for enff.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402


def dapper_seconds_per_analysis(d, cycles, N=20, loc_rad=4.0):
    here = os.getcwd()
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "dpr_config.yaml"), "w") as f:
        f.write('data_root: "$cwd"\nliveplotting: no\n')
    os.chdir(tmp)
    try:
        import dapper as dpr
        import dapper.da_methods as da
        import dapper.mods as modelling
        import dapper.tools.progressbar as pb
        from dapper.da_methods import da_method
        from dapper.mods.Lorenz96 import dstep_dx, step, x0
        from dapper.tools.localization import nd_Id_localization
    finally:
        os.chdir(here)
    pb.disable_progbar = True
    tseq = modelling.Chronology(0.05, dko=1, Ko=cycles, BurnIn=0.05 * cycles / 4)
    Dyn = {"M": d, "model": step, "linear": dstep_dx, "noise": 0}
    Obs = modelling.partial_Id_Obs(d, np.arange(d))
    Obs["noise"] = 1
    Obs["localizer"] = nd_Id_localization((d,), (2,))
    HMM = modelling.HiddenMarkovModel(Dyn, Obs, tseq, modelling.GaussRV(mu=x0(d), C=0.001))

    @da_method()
    class ForecastOnly:
        N: int = 20

        def assimilate(self, HMM, xx, yy):
            E = HMM.X0.sample(self.N)
            self.stats.assess(0, E=E)
            for k, ko, t, dt in HMM.tseq.ticker:
                E = HMM.Dyn(E, t - dt, dt)
                if ko is not None:
                    self.stats.assess(k, ko, "f", E=E)
                self.stats.assess(k, ko, E=E)

    dpr.set_seed(3000)
    xx, yy = HMM.simulate()
    times = {}
    for name, xp in [("forecast", ForecastOnly(N=N)), ("letkf", da.LETKF(N=N, loc_rad=loc_rad))]:
        t = time.perf_counter()
        xp.assimilate(HMM, xx, yy, liveplots=False)
        times[name] = time.perf_counter() - t
        xp.stats.average_in_time()
        if name == "letkf":
            rmse = float(xp.avrgs.rmse.a.val)
    return (times["letkf"] - times["forecast"]) / (cycles + 1), rmse


def enff_cycling_seconds_per_analysis(binary, d, cycles):
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    out_dir = os.path.join(tempfile.mkdtemp(), "letkf")
    subprocess.run(
        [binary, "run", "lorenz96_sakov2008", "--filter", "letkf", "--backend", "cpu",
         "--set", f"model.d={d}", "--set", "ensemble.n=20", "--set", "filter.loc_radius=4",
         "--set", "filter.inflation=1", "--set", f"experiment.cycles={cycles}",
         "--set", f"experiment.burn_in={cycles // 4}", "--out", out_dir],
        check=True, capture_output=True, text=True, env=env,
    )
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["seconds_analysis"]) for r in rows]
    rmse = [float(r["rmse"]) for r in rows[cycles // 4:]]
    return sum(seconds) / len(seconds), sum(rmse) / len(rmse)


def enff_seconds_per_analysis(binary, d):
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    out = subprocess.run(
        [binary, "bench", "--filters", "letkf", "--size", f"20x{d}", "--backend", "cpu"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    for line in out.splitlines():
        if re.match(r"\s*letkf\s+cpu\b", line):
            nums = re.findall(r"\d+\.?\d*", line)
            # n, d, reps, ms/analysis (median), best ms
            return out, float(nums[3]) * 1e-3
    return out, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=1000)
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--enff", default=os.path.join(os.path.dirname(__file__), "..", "target",
                                                  "release", "enff"))
    a = p.parse_args()
    dapper_s, rmse = dapper_seconds_per_analysis(a.d, a.cycles)
    print(f"DAPPER LETKF(N=20, loc_rad=4), Nx = {a.d}, one core: "
          f"{dapper_s * 1e3:.2f} ms per analysis (rmse.a {rmse:.3f} over {a.cycles} cycles)")
    cyc_s, cyc_rmse = enff_cycling_seconds_per_analysis(a.enff, a.d, a.cycles)
    print(f"enff run lorenz96_sakov2008 --filter letkf, d = {a.d}, one core: "
          f"{cyc_s * 1e3:.2f} ms per analysis (rmse {cyc_rmse:.3f} after burn-in)")
    print(f"cycling: enff {cyc_s * 1e3:.2f} ms against DAPPER {dapper_s * 1e3:.2f} ms per "
          f"analysis: {dapper_s / cyc_s:.1f}x")
    out, enff_s = enff_seconds_per_analysis(a.enff, a.d)
    print("enff bench --filters letkf (RAYON_NUM_THREADS=1; the cold-start bench problem):")
    print(out.rstrip())
    if enff_s:
        print(f"bench problem: enff {enff_s * 1e3:.2f} ms against DAPPER's cycling "
              f"{dapper_s * 1e3:.2f} ms per analysis: {dapper_s / enff_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
