"""EnFF beside DAPPER's EnKF on DAPPER's own Lorenz-96 setting (Sakov & Oke 2008), through
DAPPER's experiment list: prints DAPPER's table of time-mean analysis RMSE and spread.

    pip install ./python 'dapper==1.7.1'     # DAPPER 1.7.1 runs on Python 3.9-3.11
    python3 examples/python/dapper_compare.py [T]

T is the span in model time units (default 50, DAPPER's own; burn-in 20).
"""

import sys

import dapper as dpr
import dapper.da_methods as da
from dapper.mods.Lorenz96.sakov2008 import HMM as sakov2008

from enff.dapper import EnFF


def main():
    HMM = sakov2008.copy()
    if len(sys.argv) > 1:
        HMM.tseq.T = float(sys.argv[1])
    xps = dpr.xpList()
    xps += da.EnKF("Sqrt", N=20, infl=1.02, rot=True)
    xps += EnFF("covariance", N=20)
    xps += EnFF("local", N=20)
    for xp in xps:
        xp.seed = 3000  # the same truth and observations for every method
    xps.launch(HMM, save_as=False, liveplots=False)
    print(xps.tabulate_avrgs(["rmse.a", "rmv.a", "rmse.f", "duration"], colorize=False))


if __name__ == "__main__":
    main()
