"""Type stubs of the engine module (`enff._enff`); the names are re-exported by `enff`."""

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

FloatArray = npt.NDArray[np.floating[Any]]
Setting = Union[bool, int, float, str, None]

class DivergenceError(RuntimeError):
    """The ensemble became non-finite; ``cycle``, ``stage`` and ``detail`` say where."""

    cycle: int
    stage: str
    detail: str

class UnsupportedError(ValueError):
    """The chosen backend cannot run what was asked; the message says what to do instead."""

class Filter:
    """A configured filter on a backend, for repeated analyses of forecasts made elsewhere.

    ``settings`` are the filter's settings (``sigma_min=0.05``, ``flow_steps=9``,
    ``guidance="covariance"``, ``loc_radius=4`` …: the ``filter.*`` keys of
    ``enff preset show``). The device and buffers are made once and reused while the ensemble
    shape stays the same. Each call's random numbers come from ``(seed, cycle)``; ``cycle``
    counts up by one per call unless given.
    """

    def __init__(
        self,
        filter: str = "enff-f2p",
        *,
        obs_noise_std: float,
        obs_op: str = "identity",
        every: int = 1,
        offset: int = 0,
        seed: int = 0,
        cycle: int = 1,
        backend: str = "auto",
        **settings: Setting,
    ) -> None: ...
    def analyse(
        self,
        forecast: FloatArray,
        obs: FloatArray,
        *,
        previous: Optional[FloatArray] = None,
        cycle: Optional[int] = None,
    ) -> FloatArray:
        """The analysis of ``forecast`` (n, d) for ``obs`` (m,), in the forecast's dtype.
        ``previous`` is EnFF-F2P's previous analysis (default: the forecast)."""
    @property
    def name(self) -> str: ...
    @property
    def backend(self) -> str:
        """``"cpu"`` or ``"gpu"``."""
    @property
    def cycle(self) -> int:
        """The cycle number the next call gets unless it names one."""
    @property
    def settings(self) -> List[str]: ...
    @property
    def engine_seconds(self) -> float:
        """Seconds spent inside the engine over all calls (upload, analysis, read-back)."""

def analyse(
    forecast: FloatArray,
    obs: FloatArray,
    obs_noise_std: float,
    *,
    filter: str = "enff-f2p",
    obs_op: str = "identity",
    every: int = 1,
    offset: int = 0,
    previous: Optional[FloatArray] = None,
    seed: int = 0,
    cycle: int = 1,
    backend: str = "auto",
    **settings: Setting,
) -> FloatArray:
    """One analysis of ``forecast`` (n, d) for the observation ``obs`` (m,) of
    ``obs_op`` applied to every ``every``-th component from ``offset``, with noise std
    ``obs_noise_std``: the same numbers as ``enff assimilate`` on the same inputs. The result
    has the forecast's dtype."""

class Assimilator:
    """Data assimilation around a model of yours, one cycle at a time.

    ``model(ensemble, t, dt) -> ensemble`` advances all members, an (n, d) array, from time
    ``t`` to ``t + dt``. ``obs_op`` is ``"identity"``, ``"arctan"`` or ``"tanh"`` of every
    ``every``-th component from ``offset`` (run by the engine), or a function ``h(x) -> y`` of
    one state, with ``obs_adjoint(x, r) -> J_h(x)^T r`` for the filters that follow its
    gradient (EnFF with local guidance, EnSF). Each cycle is :meth:`forecast` then
    :meth:`analyse`.
    """

    def __init__(
        self,
        initial: FloatArray,
        obs_noise_std: float,
        *,
        model: Optional[Callable[[FloatArray, float, float], FloatArray]] = None,
        dt: float = 1.0,
        t0: float = 0.0,
        obs_op: Union[str, Callable[[FloatArray], FloatArray], None] = None,
        obs_adjoint: Optional[Callable[[FloatArray, FloatArray], FloatArray]] = None,
        obs_linear: bool = False,
        every: int = 1,
        offset: int = 0,
        filter: str = "enff-f2p",
        previous: Optional[FloatArray] = None,
        seed: int = 0,
        cycle: int = 1,
        backend: str = "auto",
        **settings: Setting,
    ) -> None: ...
    def forecast(self) -> None:
        """Advances every member by ``dt`` with the model; the ensemble becomes the previous
        analysis."""
    def set_ensemble(self, forecast: FloatArray) -> None:
        """Replaces the ensemble by a forecast made elsewhere, shape (n, d)."""
    def analyse(self, y: FloatArray) -> None:
        """The analysis for the observation ``y`` (m,); moves on to the next cycle."""
    def observe(self, x: FloatArray) -> FloatArray:
        """h(x) of one state (d,)."""
    def stats(self, truth: FloatArray) -> Dict[str, float]:
        """``{"rmse": …, "spread": …}`` of the ensemble against ``truth`` (d,)."""
    @property
    def ensemble(self) -> FloatArray:
        """The ensemble, (n, d), in the initial ensemble's dtype."""
    @property
    def mean(self) -> npt.NDArray[np.float64]:
        """The ensemble mean, (d,)."""
    @property
    def spread(self) -> float:
        """sqrt of the mean over components of the unbiased member variance."""
    @property
    def n(self) -> int: ...
    @property
    def d(self) -> int: ...
    @property
    def m(self) -> int: ...
    @property
    def cycle(self) -> int:
        """The number the next analysis gets."""
    @property
    def time(self) -> float:
        """Model time of the ensemble: ``t0`` plus ``dt`` per forecast."""
    @property
    def filter(self) -> str: ...
    @property
    def backend(self) -> str: ...

def info() -> Dict[str, str]:
    """The backends this process can use: ``cpu`` and ``gpu`` (the adapter ``"auto"`` takes,
    or why there is none)."""

def run(
    source: str,
    *,
    filter: Optional[str] = None,
    backend: str = "auto",
    seed: Optional[int] = None,
    overrides: Union[Mapping[str, Any], Iterable[str], None] = None,
    out: Optional[str] = None,
    force: bool = False,
    plots: bool = True,
) -> Tuple[str, Dict[str, np.ndarray], str, str, Optional[str]]: ...
def presets() -> List[str]: ...
def preset_json(name: str) -> str: ...
