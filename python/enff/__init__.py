"""enff: Ensemble Flow Filter data assimilation from Python.

The engine is written in Rust and runs on the CPU or, when one is found, a GPU. From Python:

* :func:`run` runs a twin experiment (a preset or an experiment file) and returns its summary
  and per-cycle metrics, as ``enff run`` does on the command line.
* :func:`analyse` and :class:`Filter` compute the analysis of a forecast ensemble made
  elsewhere, the same numbers as ``enff assimilate``.
* :class:`Assimilator` drives the engine around a model written in numpy,
  ``model(ensemble, t, dt) -> ensemble``, one cycle at a time.
* :func:`presets` and :func:`preset` list and show the built-in experiments.
* :mod:`enff.dapper` offers EnFF as a DAPPER data-assimilation method.

Arrays are numpy float32 or float64 (C or Fortran order); results come back in the input's
dtype. The engine computes in float32. Calls release the GIL while the engine works, and a
run stops at the end of the cycle in progress on Ctrl-C. Bad input raises ``ValueError`` (or
``TypeError`` for something that is not an array) naming the parameter and the fix; a
divergence raises :class:`DivergenceError`; a backend that cannot run what was asked raises
:class:`UnsupportedError`; a device failure ``RuntimeError``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np

from . import _enff
from ._enff import (
    Assimilator,
    DivergenceError,
    Filter,
    UnsupportedError,
    __version__,
    analyse,
    info,
)

__all__ = [
    "Assimilator",
    "DivergenceError",
    "Filter",
    "RunResult",
    "UnsupportedError",
    "__version__",
    "analyse",
    "info",
    "preset",
    "presets",
    "run",
]

#: The columns of ``metrics.csv``, in order, as :attr:`RunResult.metrics` holds them.
METRIC_COLUMNS = (
    "cycle",
    "time",
    "rmse_forecast",
    "spread_forecast",
    "rmse",
    "spread",
    "seconds_forecast",
    "seconds_analysis",
    "ess",
)


@dataclass(frozen=True)
class RunResult:
    """What :func:`run` returns.

    Attributes:
        name: the name the run is filed under (the preset's, or the experiment file's).
        summary: the contents of ``summary.json`` (time-mean RMSE and spread after burn-in,
            timings, the resolved sizes, the expected band of a preset).
        metrics: one numpy array per ``metrics.csv`` column (``cycle``, ``time``,
            ``rmse_forecast``, ``spread_forecast``, ``rmse``, ``spread``, ``seconds_forecast``,
            ``seconds_analysis``, ``ess``; ``ess`` is NaN for filters that do not weight).
        config: the fully resolved configuration, as ``config.toml`` holds it.
        out: the folder the files were written to, or ``None``.
    """

    name: str
    summary: Dict[str, Any]
    metrics: Dict[str, np.ndarray]
    config: Dict[str, Any] = field(repr=False)
    out: Optional[str] = None

    @property
    def rmse(self) -> float:
        """Time-mean analysis RMSE after burn-in (``summary["rmse_mean"]``)."""
        return float(self.summary["rmse_mean"])

    @property
    def spread(self) -> float:
        """Time-mean analysis spread after burn-in (``summary["spread_mean"]``)."""
        return float(self.summary["spread_mean"])

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"RunResult({self.name!r}, filter={s['filter']!r}, backend={s['backend']!r}, "
            f"n={s['n']}, d={s['d']}, cycles={s['cycles']}, rmse={s['rmse_mean']:.4f}, "
            f"spread={s['spread_mean']:.4f}, out={self.out!r})"
        )


Overrides = Union[Mapping[str, Any], Iterable[str], None]


def run(
    preset_or_path: str = "lorenz96_bao2024",
    *,
    filter: Optional[str] = None,
    backend: str = "auto",
    seed: Optional[int] = None,
    overrides: Overrides = None,
    out: Union[str, "os.PathLike[str]", None] = None,
    force: bool = False,
    plots: bool = True,
) -> RunResult:
    """Runs a twin experiment, as ``enff run`` does.

    Args:
        preset_or_path: a preset name (see :func:`presets`) or an experiment file (TOML, e.g.
            written by ``enff preset show NAME > my.toml``).
        filter: the filter (``enff-f2p``, ``enff-ot``, ``ensf``, ``etkf``, ``letkf``, ``enkf``,
            ``bpf``, ``kf``); default: the preset's.
        backend: ``"auto"`` (a hardware GPU when found, else the CPU), ``"cpu"`` or ``"gpu"``.
        seed: the seed of every random stream; default: the preset's.
        overrides: settings as ``{"model.d": 80, "filter.flow_steps": 9}`` or
            ``["model.d=80"]``, the ``--set`` of the command line.
        out: a folder to write ``config.toml``, ``metrics.csv`` (a row per cycle as it ends),
            ``summary.json`` and the plots into; nothing is written without it.
        force: write into ``out`` even when it holds files.
        plots: write the plots into ``out``.

    Returns:
        A :class:`RunResult`.
    """
    if out is not None:
        out = os.fspath(out)
    summary, metrics, config, name, out_dir = _enff.run(
        preset_or_path,
        filter=filter,
        backend=backend,
        seed=seed,
        overrides=overrides,
        out=out,
        force=force,
        plots=plots,
    )
    return RunResult(
        name=name,
        summary=json.loads(summary),
        metrics=dict(metrics),
        config=json.loads(config),
        out=out_dir,
    )


def presets() -> List[str]:
    """Names of the built-in experiments, as ``enff preset list`` shows them."""
    return list(_enff.presets())


def preset(name: str) -> Dict[str, Any]:
    """One built-in experiment as a dict: ``name``, ``description``, ``expected_rmse`` (the
    band of the time-mean RMSE with the preset's own filter), ``expected_source`` and
    ``config`` (model, observe, ensemble, filter and experiment sections)."""
    return json.loads(_enff.preset_json(name))
