"""enff.run, enff.presets and enff.preset against the `enff` command."""

import _thread
import csv
import json
import subprocess
import threading
import time

import numpy as np
import pytest

import enff

SHORT = {"experiment.cycles": 40, "experiment.burn_in": 10, "experiment.spinup": 100}
TIMES = ("seconds_total", "seconds_per_cycle", "seconds_forecast", "seconds_analysis")


def without_times(summary):
    return {k: v for k, v in summary.items() if k not in TIMES}


@pytest.mark.parametrize(
    "preset,filter",
    [("lorenz96_sakov2008", None), ("lorenz63_spantini2022", "etkf"), ("rotation2d", "kf")],
)
def test_run_equals_the_command(tmp_path, enff_bin, preset, filter):
    short = dict(SHORT, **({"ensemble.n": 1} if filter == "kf" else {}))
    sets = [f"{k}={v}" for k, v in short.items()]
    cmd = [str(enff_bin), "run", preset, "--backend", "cpu", "--seed", "7", "--no-plots"]
    cmd += ["--out", str(tmp_path / "cli")]
    if filter:
        cmd += ["--filter", filter]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, capture_output=True)
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())

    r = enff.run(preset, filter=filter, backend="cpu", seed=7, overrides=short)
    assert without_times(r.summary) == without_times(cli)
    assert r.out is None
    assert r.name == preset
    # The metrics columns are metrics.csv's, row for row.
    with open(tmp_path / "cli" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(r.metrics) == list(enff.METRIC_COLUMNS)
    assert len(rows) == len(r.metrics["cycle"]) == SHORT["experiment.cycles"]
    for col in ("rmse", "spread", "rmse_forecast", "spread_forecast"):
        np.testing.assert_allclose(
            r.metrics[col], [float(x[col]) for x in rows], rtol=2e-6
        )
    np.testing.assert_array_equal(r.metrics["cycle"], [int(x["cycle"]) for x in rows])
    assert r.metrics["cycle"].dtype == np.int64
    assert r.rmse == r.summary["rmse_mean"] and np.isfinite(r.rmse)


def test_run_writes_the_commands_files_only_with_out(tmp_path):
    r = enff.run("lorenz96_sakov2008", backend="cpu", overrides=SHORT, out=tmp_path / "a")
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.toml", "metrics.csv", "summary.json", "rmse_spread.png"} <= files
    assert r.out == str(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["rmse_mean"] == r.rmse
    # A folder with results is refused unless forced.
    with pytest.raises(FileExistsError, match="--force|force"):
        enff.run("lorenz96_sakov2008", backend="cpu", overrides=SHORT, out=tmp_path / "a")
    enff.run(
        "lorenz96_sakov2008", backend="cpu", overrides=SHORT, out=tmp_path / "a",
        force=True, plots=False,
    )
    # The resolved configuration runs again from its file to the same numbers.
    again = enff.run(str(tmp_path / "a" / "config.toml"), backend="cpu")
    assert again.summary["rmse_mean"] == r.summary["rmse_mean"]


def test_overrides_as_list_and_config():
    r = enff.run(
        "lorenz96_sakov2008", backend="cpu", seed=3,
        overrides=["experiment.cycles=12", "experiment.burn_in=2", "model.d=20"],
    )
    assert r.summary["d"] == 20 and r.summary["cycles"] == 12 and r.summary["seed"] == 3
    assert r.config["model"]["d"] == 20
    assert len(r.metrics["rmse"]) == 12


def test_run_bad_input():
    with pytest.raises(ValueError, match="unknown preset `nope`"):
        enff.run("nope")
    with pytest.raises(ValueError, match="model.dd"):
        enff.run("lorenz96_sakov2008", backend="cpu", overrides={"model.dd": 3})
    with pytest.raises(ValueError, match="ensemble.n"):
        enff.run("lorenz96_sakov2008", backend="cpu", overrides={"ensemble.n": 0})
    with pytest.raises(ValueError, match="unknown filter"):
        enff.run("lorenz96_sakov2008", filter="enkf2", backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        enff.run("lorenz96_sakov2008", backend="tpu")
    with pytest.raises(TypeError, match="overrides"):
        enff.run("lorenz96_sakov2008", backend="cpu", overrides=3)


def test_divergence_is_a_typed_error():
    # A model step far beyond Lorenz-96's stability limit blows the truth up.
    with pytest.raises(enff.DivergenceError) as e:
        enff.run("lorenz96_sakov2008", backend="cpu", overrides={"model.dt": 2.0, **SHORT})
    assert isinstance(e.value, RuntimeError)
    assert isinstance(e.value.cycle, int) and e.value.stage


def test_ctrl_c_stops_a_run_between_cycles(tmp_path):
    long = {"experiment.cycles": 200000, "experiment.spinup": 10}
    timer = threading.Timer(1.0, _thread.interrupt_main)
    start = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        enff.run("lorenz96_sakov2008", backend="cpu", overrides=long, out=tmp_path / "r")
    assert time.perf_counter() - start < 30
    # The cycles that finished are in metrics.csv.
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert 2 <= len(rows) < 200001


def test_presets():
    names = enff.presets()
    assert "lorenz96_bao2024" in names and "ks_1024" in names
    p = enff.preset("lorenz63_spantini2022")
    assert p["name"] == "lorenz63_spantini2022"
    assert p["config"]["model"]["system"] == "lorenz63"
    lo, hi = p["expected_rmse"]
    assert 0 < lo < hi
    with pytest.raises(ValueError, match="known presets"):
        enff.preset("lorenz97")


def test_run_releases_the_gil():
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    try:
        enff.run("lorenz96_sakov2008", backend="cpu", overrides={"experiment.cycles": 300})
    finally:
        stop.set()
        t.join()
    assert len(ticks) > 10
