#!/usr/bin/env bash
# Golden outputs of the command-line tool: every preset on the CPU with a fixed seed and a
# shortened cycle count, plus `compare`, `sweep`, `assimilate` and one sharded run (when the
# binary is built with the `mpi` feature and `mpirun` is on the PATH). Each run's numbers
# (metrics.csv and summary.json without wall times or the device line, and a digest of the
# analysis `.npy`) go to one text file per run.
#
#   scripts/golden-runs.sh record   # write scripts/golden/*.txt (commit them)
#   scripts/golden-runs.sh          # check: run again and compare with scripts/golden/, digit
#                                   # for digit; exit status 1 and a diff when anything differs
#
# A reshaping of the code keeps these identical (same arithmetic in the same order); a change
# that means to alter the numbers records them again in the same commit.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-check}
case "$mode" in record | check) ;; *)
    echo "usage: $0 [record|check]" >&2
    exit 2
    ;;
esac

features=()
if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; then
    features=(--features mpi)
fi
cargo build --release --quiet "${features[@]}"
enff=target/release/enff
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
got=$work/golden
mkdir -p "$got"
export RAYON_NUM_THREADS=2

# The numbers of one result folder, without wall times and the device description.
normalize() {
    python3 - "$1" <<'PY'
import csv, json, os, sys
root = sys.argv[1]
for dirpath, _, files in sorted(os.walk(root)):
    for name in sorted(files):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root)
        if name.endswith(".csv"):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                continue
            keep = [i for i, h in enumerate(rows[0]) if not h.startswith("seconds")]
            print(f"== {rel}")
            for r in rows:
                print(",".join(r[i] for i in keep if i < len(r)))
        elif name in ("summary.json", "sweep.json"):
            def strip(v):
                if isinstance(v, dict):
                    return {k: strip(x) for k, x in v.items()
                            if not k.startswith("seconds") and k not in ("device", "hash")}
                if isinstance(v, list):
                    return [strip(x) for x in v]
                return v
            with open(path) as f:
                data = json.load(f)
            print(f"== {rel}")
            print(json.dumps(strip(data), indent=1, sort_keys=True))
        elif name.endswith(".npy"):
            import hashlib
            with open(path, "rb") as f:
                print(f"== {rel} sha256 {hashlib.sha256(f.read()).hexdigest()}")
PY
}

short=(--set experiment.cycles=4 --set experiment.burn_in=1)
common=(--backend cpu --seed 11 --quiet --no-plots)
run() {
    local name=$1
    shift
    "$enff" "$@" --out "$work/$name" >/dev/null
    normalize "$work/$name" >"$got/$name.txt"
}

for p in $("$enff" preset list --quiet | awk '{print $1}'); do
    case "$p" in
    ns_256) extra=(--set experiment.spinup=20 --set experiment.cycles=2) ;;
    ks_1024 | ks_512) extra=(--set experiment.spinup=200) ;;
    *) extra=() ;;
    esac
    run "run-$p" run "$p" "${common[@]}" "${short[@]}" "${extra[@]}"
done
run compare-sakov compare lorenz96_sakov2008 --filters enff-f2p,enff-ot,ensf,etkf,letkf,enkf,bpf \
    --set experiment.cycles=5 --set experiment.burn_in=1 "${common[@]}"
run compare-rotation compare rotation2d --filters kf,enff-f2p,etkf --set experiment.cycles=6 \
    --set experiment.burn_in=1 "${common[@]}"
run seeds-l63 run lorenz63_spantini2022 --seeds 2 --set experiment.cycles=6 \
    --set experiment.burn_in=1 "${common[@]}"
"$enff" sweep lorenz63_spantini2022 --grid filter.sigma_min=0.01,0.1 --seeds 2 \
    --set experiment.cycles=5 --set experiment.burn_in=1 --backend cpu --quiet \
    --out "$work/sweep-l63" >/dev/null
normalize "$work/sweep-l63" >"$got/sweep-l63.txt"
# Checkpoint, then resume from it: the resumed run's numbers.
"$enff" run lorenz96_sakov2008 "${common[@]}" --set experiment.cycles=6 --set experiment.burn_in=1 \
    --checkpoint-every 3 --out "$work/ck" >/dev/null
normalize "$work/ck" | grep -v '^== checkpoint' >"$got/checkpoint-sakov.txt"

# One analysis through .npy files: the forecast is a saved analysis ensemble of a short run.
"$enff" run lorenz96_sakov2008 "${common[@]}" --set experiment.cycles=2 --set experiment.burn_in=0 --save-ensembles 1 \
    --out "$work/ens" >/dev/null
python3 - "$work" <<'PY'
import struct, sys
# A float64 vector of 40 observations, written as .npy by hand (no numpy needed).
header = "{'descr': '<f8', 'fortran_order': False, 'shape': (40,), }"
header += " " * (63 - len(header) % 64) + "\n"
with open(sys.argv[1] + "/obs.npy", "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    f.write(struct.pack("<40d", *[((7 * i) % 13 - 6) * 0.5 for i in range(40)]))
PY
for f in enff-f2p enff-ot etkf enkf letkf; do
    mkdir -p "$work/assim-$f"
    "$enff" assimilate --forecast "$work/ens/ensembles/cycle_0002.npy" --obs "$work/obs.npy" \
        --obs-noise-std 1 --filter "$f" --seed 5 --cycle 3 \
        --previous "$work/ens/ensembles/cycle_0001.npy" \
        --out "$work/assim-$f/analysis.npy" >/dev/null
    normalize "$work/assim-$f" >"$got/assimilate-$f.txt"
done

if [ ${#features[@]} -gt 0 ]; then
    mpirun --allow-run-as-root --oversubscribe -n 2 -x RAYON_NUM_THREADS=1 "$enff" run \
        lorenz96_bao2024 --set model.d=64 "${common[@]}" "${short[@]}" \
        --out "$work/mpi-bao" >/dev/null
    normalize "$work/mpi-bao" >"$got/mpi-bao-2ranks.txt"
    mpirun --allow-run-as-root --oversubscribe -n 2 -x RAYON_NUM_THREADS=1 "$enff" run \
        lorenz96_bao2024_covariance --set model.d=80 "${common[@]}" "${short[@]}" \
        --out "$work/mpi-cov" >/dev/null
    normalize "$work/mpi-cov" >"$got/mpi-cov-2ranks.txt"
else
    echo "golden-runs: no MPI (mpirun/mpicc): the sharded runs are not compared" >&2
fi

if [ "$mode" = record ]; then
    rm -rf scripts/golden
    cp -r "$got" scripts/golden
    echo "golden-runs: recorded $(ls scripts/golden | wc -l) runs in scripts/golden/"
    exit 0
fi
status=0
for f in scripts/golden/*.txt; do
    name=$(basename "$f")
    if [ ! -f "$got/$name" ]; then
        echo "golden-runs: $name was not produced"
        status=1
    elif ! diff -u "$f" "$got/$name" >"$work/diff" 2>&1; then
        echo "golden-runs: $name differs:"
        head -n 40 "$work/diff"
        status=1
    fi
done
if [ $status -eq 0 ]; then
    echo "golden-runs: $(ls scripts/golden | wc -l) runs identical to scripts/golden/"
fi
exit $status
