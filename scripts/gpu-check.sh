#!/usr/bin/env bash
# The GPU check: adapter, GPU parity tests with ENFF_REQUIRE_GPU=1, then benchmarks, ending
# with a short table. Expects .device/bundle.tgz from scripts/prepare-device.sh.
# Usage: [SECTIONS="tests bench …"] scripts/gpu-check.sh [LOG]   (LOG defaults to gpu-check.log)
# SECTIONS picks some of: tests bench cov baselines letkf cycles models full n1000 covfull (default:
# all; the whole check may take several minutes on a large card, so split it over two runs if
# needed). Each test executable and each benchmark stops after LIMIT seconds (default 240), so a
# hang in one section leaves the others their time. A machine that stops answering returns
# nothing, not even the log: on a fresh card run `SECTIONS=tests LIMIT=60` first (short, and it
# shows the adapter), then the benchmark sections in a second call while the machine is warm.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-gpu-check.log}
export ENFF_REQUIRE_GPU=1 NODEVICE_SELECT=1 RUST_LOG=${RUST_LOG:-info}
bin=$(mktemp -d)
tar -C "$bin" -xzf .device/bundle.tgz || { echo "no .device/bundle.tgz: run scripts/prepare-device.sh"; exit 2; }
lim=${LIMIT:-240}
limited() { timeout --kill-after=5 "$lim" "$@"; }
want() { [[ -z "${SECTIONS:-}" || " $SECTIONS " == *" $1 "* ]]; }
status=0
{
    echo "== adapter"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nproc
    "$bin/enff" info
    want tests && echo "== GPU parity tests" && while read -r t; do
        echo "-- $t"
        limited "$bin/test_$t" --test-threads=1 || status=1
    done < "$bin/tests.txt"
    want bench && echo "== analysis benchmark (CPU baseline and GPU in the same run)" &&
    { limited "$bin/enff" bench --reps 5 \
        --size 20x1e4 --size 20x1e6 --size 100x1e5 --size 1000x1e5 --cpu-budget 20 || status=1; }
    want cov && echo "== covariance guidance: local gains and gain steps (CPU baseline and GPU)" &&
    { limited "$bin/enff" bench --filters enff,enff-cov1,enff-cov4,enff-cov4-relin --size 20x100000 --size 20x1000000 \
        --reps 3 --cpu-budget 20 || status=1; }
    want baselines && echo "== baseline filters: LETKF (per component and batched), ETKF, EnKF beside EnFF (CPU and GPU)" &&
    { limited "$bin/enff" bench --filters letkf,letkf-batched,etkf,enkf,enff --size 20x1000 --size 20x100000 \
        --reps 5 --cpu-budget 20 || status=1; }
    want letkf && echo "== cycling LETKF (Lorenz-96, d = 1e5, sigma_y = 1: the Chebyshev path), CPU then GPU" &&
    for b in cpu gpu; do
        limited "$bin/enff" run lorenz96_sakov2008 --filter letkf --backend "$b" --set model.d=100000 \
            --set ensemble.n=20 --set filter.loc_radius=4 --set experiment.cycles=20 \
            --set experiment.burn_in=5 --out "/tmp/enff-letkf-$b" --force --no-plots | grep -E "rmse |time" || status=1
    done
    want cycles && echo "== cycle benchmark (Lorenz-96, forecast + analysis)" &&
    { limited "$bin/enff" bench --cycles --cpu-budget 10 || status=1; }
    want models && echo "== grid-model benchmark (KS, NS forecasts and cycles; CPU and GPU in the same run)" &&
    { limited "$bin/enff" bench --models || status=1; }
    want full && echo "== full-size preset on the GPU" &&
    { limited "$bin/enff" run lorenz96_bao2024 --set model.d=1000000 --out /tmp/enff-l96-1e6 --force --no-plots || status=1; }
    want n1000 && echo "== n = 1000 at d = 1e6 (member blocks where the card needs them), 3 cycles" &&
    { limited "$bin/enff" run lorenz96_bao2024 --set model.d=1000000 --set ensemble.n=1000 \
        --set experiment.cycles=3 --set experiment.burn_in=0 --out /tmp/enff-l96-n1000 --force --no-plots || status=1; }
    want covfull && echo "== full-size covariance-guided preset on the GPU" &&
    { limited "$bin/enff" run lorenz96_bao2024_covariance --set model.d=1000000 --out /tmp/enff-cov-1e6 --force --no-plots || status=1; }
    echo "== summary"
    grep -E "test result|GPU/CPU|speed" "$log" 2>/dev/null | tail -n 20
    echo "gpu-check status: $status"
    exit $status
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
