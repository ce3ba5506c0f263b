#!/usr/bin/env bash
# The GPU check: adapter, GPU parity tests with ENFF_REQUIRE_GPU=1, then benchmarks, ending
# with a short table. Expects the binaries from scripts/prepare-device.sh in .device/.
# Usage: scripts/gpu-check.sh [LOG]   (LOG defaults to gpu-check.log)
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-gpu-check.log}
export ENFF_REQUIRE_GPU=1 NODEVICE_SELECT=1 RUST_LOG=${RUST_LOG:-info}
status=0
{
    echo "== adapter"
    .device/enff info
    echo "== GPU parity tests"
    for t in gpu_kernels gpu_enff gpu_models memory presets; do
        echo "-- $t"
        ".device/test_$t" --test-threads=1 || status=1
    done
    echo "== analysis benchmark (CPU baseline and GPU in the same run)"
    .device/enff bench --reps 5 \
        --size 20x1e4 --size 20x1e6 --size 100x1e5 --size 1000x1e5 --cpu-budget 20 || status=1
    echo "== cycle benchmark (Lorenz-96, forecast + analysis)"
    .device/enff bench --cycles --cpu-budget 10 || status=1
    echo "== grid-model benchmark (KS, NS forecasts and cycles; CPU and GPU in the same run)"
    .device/enff bench --models || status=1
    echo "== full-size preset on the GPU"
    .device/enff run lorenz96_bao2024 --set model.d=1000000 --out /tmp/enff-l96-1e6 --force || status=1
    echo "== summary"
    grep -E "test result|GPU/CPU|speed" "$log" 2>/dev/null | tail -n 20
    echo "gpu-check status: $status"
} 2>&1 | tee "$log"
exit $status
