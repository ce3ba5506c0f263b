"""EnFF as a DAPPER data-assimilation method.

``EnFF`` follows DAPPER's method protocol (``assimilate(HMM, xx, yy)`` on a class declared
with ``da_method``), so it sits in an ``xpList`` beside DAPPER's own EnKFs, records through
DAPPER's stats, and ``xp.avrgs`` and ``xps.tabulate_avrgs()`` work as for any method::

    import dapper as dpr
    import dapper.da_methods as da
    from dapper.mods.Lorenz96.sakov2008 import HMM
    from enff.dapper import EnFF

    xps = dpr.xpList()
    xps += da.EnKF("Sqrt", N=20, infl=1.02, rot=True)
    xps += EnFF("covariance", N=20)
    xps += EnFF("local", N=20)
    for xp in xps:
        xp.seed = 3000
    xps.launch(HMM, save_as=False)
    print(xps.tabulate_avrgs())

What crosses between numpy and the engine: DAPPER's dynamics are numpy code, so each
forecast runs in numpy and the ensemble (N x Nx) is copied into the engine before every
analysis and back after it. The observation operator runs inside the engine when DAPPER's is
the identity or picks every k-th component (checked on the HMM's own operator); any other
operator is called from the engine as a numpy function once per member (and its Jacobian,
``Obs.linear``, for local guidance). ``R`` must be ``sigma^2 I``.

DAPPER is optional: ``pip install 'dapper>=1.7.1'`` (1.7.1 is the last release for
Python < 3.12).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

try:
    import dapper as _dpr
    from dapper.da_methods import da_method
    from dapper.da_methods.ensemble import add_noise
    from dapper.tools.progressbar import progbar
except ImportError as _e:  # pragma: no cover - exercised only without DAPPER
    raise ImportError(
        "enff.dapper needs DAPPER: pip install 'dapper>=1.7.1' "
        "(DAPPER 1.7.1 runs on Python 3.9-3.11)"
    ) from _e

from . import Assimilator, UnsupportedError

__all__ = ["EnFF", "GUIDANCE_SETTINGS", "observation_of"]

#: The filter settings each guidance starts from (``settings=`` adds to or replaces them).
#: Covariance guidance: tempered, localized ensemble-space gains, tuned on DAPPER's
#: ``sakov2008`` Lorenz-96 setting with N = 20 (localization radius 8, prior inflation
#: 1.015, sigma_min 0.005, no adaptive inflation: within 2-6 % of DAPPER's
#: ``EnKF('Sqrt', N=20, infl=1.02, rot=True)`` over four seeds of a short span). Local
#: guidance: the ``lorenz96_sakov2008`` preset's EnFF settings.
GUIDANCE_SETTINGS: Dict[str, Dict[str, Any]] = {
    "covariance": dict(
        guidance="covariance",
        sigma_min=0.005,
        guidance_scale=1.0,
        flow_steps=19,
        loc_radius=8.0,
        gain_stages=4,
        innovation_clip=2.0,
        adaptive_inflation=1.0,
        inflation=1.015,
    ),
    "local": dict(
        guidance="local",
        sigma_min=0.1,
        guidance_scale=0.3,
        flow_steps=9,
    ),
}


def _noise_std(obs) -> float:
    """sigma of ``R = sigma^2 I``, or a ValueError."""
    C = obs.noise.C
    full = np.asarray(C.full, dtype=float)
    diag = np.diag(full)
    if not (np.allclose(full, np.diag(diag)) and np.allclose(diag, diag[0])):
        raise ValueError(
            "enff's filters take R = sigma^2 I: this HMM's observation noise covariance is "
            "not a multiple of the identity"
        )
    return float(np.sqrt(diag[0]))


def observation_of(obs, nx: int, rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
    """The ``Assimilator`` keywords for a DAPPER observation operator: a built-in strided
    selection when ``obs`` is one (checked on two random states), else numpy callables."""
    rng = rng or np.random.default_rng(12345)
    probes = rng.normal(size=(2, nx))
    m = int(obs.M)
    for every in range(1, nx + 1):
        for offset in range(every):
            idx = np.arange(offset, nx, every)
            if idx.size != m:
                continue
            if all(np.allclose(np.asarray(obs(x), dtype=float), x[idx]) for x in probes):
                return dict(obs_op="identity", every=every, offset=offset)
    model = obs.model if hasattr(obs, "model") else obs

    def h(x):
        return np.asarray(model(x), dtype=float)

    def adjoint(x, r):
        return np.asarray(obs.linear(x), dtype=float).T @ r

    h.__name__ = getattr(model, "__name__", "dapper_obs")
    return dict(obs_op=h, obs_adjoint=adjoint)


@da_method()
class EnFF:
    """The Ensemble Flow Filter (EnFF-F2P) of enff as a DAPPER method.

    Args:
        guidance: ``"covariance"`` (tempered ensemble-space gains, localized) or ``"local"``
            (the paper's local guidance).
        N: ensemble size.
        infl: multiplicative prior inflation (1 = none; default: the guidance's, see
            ``GUIDANCE_SETTINGS``).
        backend: ``"cpu"``, ``"gpu"`` or ``"auto"`` (a hardware GPU when found).
        settings: further ``filter.*`` settings of enff, e.g. ``{"loc_radius": 6}``.

    The engine's random numbers are seeded from DAPPER's generator, so ``xp.seed`` makes a
    run repeatable.
    """

    guidance: str = "covariance"
    N: int = 20
    infl: Optional[float] = None
    backend: str = "cpu"
    settings: Optional[dict] = None

    def _filter_settings(self) -> Dict[str, Any]:
        if self.guidance not in GUIDANCE_SETTINGS:
            raise ValueError(
                f"invalid value for `guidance`: {self.guidance!r} "
                f"(choose one of {', '.join(GUIDANCE_SETTINGS)})"
            )
        s = dict(GUIDANCE_SETTINGS[self.guidance])
        if self.infl is not None:
            s["inflation"] = self.infl
        s.update(self.settings or {})
        return s

    def assimilate(self, HMM, xx, yy):
        settings = self._filter_settings()
        seed = int(_dpr.rng.integers(1, 2**31))
        E = HMM.X0.sample(self.N)
        self.stats.assess(0, E=E)
        engine = None
        obs_seen = None
        for k, ko, t, dt in progbar(HMM.tseq.ticker):
            E = HMM.Dyn(E, t - dt, dt)
            E = add_noise(E, dt, HMM.Dyn.noise, "Stoch")
            if ko is not None:
                self.stats.assess(k, ko, "f", E=E)
                obs = HMM.Obs(ko)
                if engine is None or obs is not obs_seen:
                    # The first analysis (or a new operator): the previous analysis EnFF-F2P
                    # flows from is the last analysis, the forecast itself at the start.
                    previous = None if engine is None else engine.ensemble
                    observation = observation_of(obs, E.shape[1])
                    if callable(observation["obs_op"]) and settings.get("guidance") == "covariance":
                        raise UnsupportedError(
                            "covariance guidance needs the locations of the observations, which "
                            "enff knows when DAPPER's operator selects every k-th component; "
                            "this HMM's operator is another function: use EnFF('local')"
                        )
                    engine = Assimilator(
                        np.ascontiguousarray(E, dtype=np.float64),
                        _noise_std(obs),
                        filter="enff-f2p",
                        previous=previous,
                        seed=seed,
                        cycle=int(ko) + 1,
                        backend=self.backend,
                        **observation,
                        **settings,
                    )
                    obs_seen = obs
                else:
                    engine.set_ensemble(np.ascontiguousarray(E, dtype=np.float64))
                engine.analyse(np.ascontiguousarray(yy[ko], dtype=np.float64))
                E = engine.ensemble
            self.stats.assess(k, ko, E=E)
