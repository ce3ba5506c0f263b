"""EnFF as a DAPPER method, beside DAPPER's own EnKF on the Lorenz-96 `sakov2008` HMM.
Skips without DAPPER; fails instead when ENFF_REQUIRE_DAPPER=1 (CI installs it)."""

import os
import tempfile

import numpy as np
import pytest

from conftest import require

# DAPPER makes its data folder when it is imported, where the dpr_config.yaml of the working
# folder says: import it from a temporary folder whose config keeps everything there.
_here = os.getcwd()
_tmp = tempfile.mkdtemp(prefix="enff-dapper-")
with open(os.path.join(_tmp, "dpr_config.yaml"), "w") as _f:
    _f.write('data_root: "$cwd"\nliveplotting: no\n')
os.chdir(_tmp)
try:
    import dapper  # noqa: F401
except ImportError as e:  # pragma: no cover
    if require("ENFF_REQUIRE_DAPPER"):
        raise
    pytest.skip(f"DAPPER is not installed: {e}", allow_module_level=True)
finally:
    os.chdir(_here)


def test_enff_beside_dapper_enkf():
    import dapper as dpr
    import dapper.da_methods as da
    from dapper.mods.Lorenz96.sakov2008 import HMM as sakov2008

    from enff.dapper import EnFF

    HMM = sakov2008.copy()
    HMM.tseq.T = 20  # a short span: 400 cycles, burn-in 10 time units
    xps = dpr.xpList()
    xps += da.EnKF("Sqrt", N=20, infl=1.02, rot=True)
    xps += EnFF("covariance", N=20)
    xps += EnFF("local", N=20)
    for xp in xps:
        xp.seed = 3000
    xps.launch(HMM, save_as=False, fail_gently=False, liveplots=False)
    enkf, cov, local = (float(xp.avrgs.rmse.a.val) for xp in xps)
    table = xps.tabulate_avrgs(["rmse.a", "rmv.a"], colorize=False)
    print(table)
    assert "EnFF" in table and "EnKF" in table and "covariance" in table
    assert cov <= 1.10 * enkf, (cov, enkf)
    # Local guidance tracks too (the observation noise std is 1).
    assert local < 0.6, local


def test_operator_detection_and_bad_noise():
    from dapper.mods.Lorenz96.sakov2008 import HMM as sakov2008

    from enff.dapper import EnFF, observation_of

    obs = sakov2008.Obs(1)
    assert observation_of(obs, 40) == {"obs_op": "identity", "every": 1, "offset": 0}

    class Square:
        M = 40

        def __call__(self, x):
            return x**2

        def linear(self, x):
            return np.diag(2 * x)

    kw = observation_of(Square(), 40)
    x = np.arange(40.0)
    np.testing.assert_allclose(kw["obs_op"](x), x**2)
    np.testing.assert_allclose(kw["obs_adjoint"](x, np.ones(40)), 2 * x)
    with pytest.raises(ValueError, match="guidance"):
        EnFF("nonlocal", N=20)._filter_settings()
