#!/usr/bin/env bash
# Builds the release binaries a GPU check needs and copies them, stripped, into .device/:
# the enff command and the GPU test executables. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
cargo build --release
cp target/release/enff .device/enff
for t in gpu_kernels gpu_enff gpu_models memory presets; do
    exe=$(cargo test --release --no-run --message-format=json --test "$t" 2>/dev/null \
        | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)
    cp "$exe" ".device/test_$t"
done
strip .device/*
du -sh .device
