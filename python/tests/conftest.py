"""Shared fixtures: the `enff` command (to compare against) and random inputs."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def require(var: str) -> bool:
    """True when `var=1`: a missing capability fails the test instead of skipping it."""
    return os.environ.get(var) == "1"


@pytest.fixture(scope="session")
def enff_bin() -> Path:
    """The `enff` command of this checkout (ENFF_BIN, else target/release/enff, built when
    missing)."""
    env = os.environ.get("ENFF_BIN")
    if env:
        return Path(env)
    path = REPO / "target" / "release" / "enff"
    if not path.exists():
        subprocess.run(
            ["cargo", "build", "--release", "--bin", "enff"], cwd=REPO, check=True
        )
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261205)


def l63(E: np.ndarray, t: float, dt: float, steps: int = 5) -> np.ndarray:
    """Lorenz-63 (sigma 10, rho 28, beta 8/3) advanced by `dt` with RK4, vectorised over
    members."""

    def f(x):
        return np.stack(
            [
                10.0 * (x[:, 1] - x[:, 0]),
                x[:, 0] * (28.0 - x[:, 2]) - x[:, 1],
                x[:, 0] * x[:, 1] - 8.0 / 3.0 * x[:, 2],
            ],
            axis=1,
        )

    h = dt / steps
    x = np.array(E, dtype=np.float64)
    for _ in range(steps):
        k1 = f(x)
        k2 = f(x + 0.5 * h * k1)
        k3 = f(x + 0.5 * h * k2)
        k4 = f(x + h * k3)
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
