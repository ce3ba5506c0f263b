#!/usr/bin/env bash
# Builds the release binaries a GPU check needs and packs them, stripped and gzipped, into
# .device/bundle.tgz: the enff command and the GPU test executables (about 80 MB stripped,
# under the 64 MiB a device run carries once compressed). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=(kernels enff ks_ns covariance_guidance baselines ensemble_space assimilate memory
    presets properties reliability)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cargo build --release
cp target/release/enff "$stage/enff"
for t in "${tests[@]}"; do
    exe=$(cargo test --release --no-run --message-format=json --test "$t" 2>/dev/null \
        | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)
    cp "$exe" "$stage/test_$t"
done
strip "$stage"/*
rm -rf .device
mkdir -p .device
printf '%s\n' "${tests[@]}" > "$stage/tests.txt"
tar -C "$stage" -czf .device/bundle.tgz .
du -sh .device/bundle.tgz
