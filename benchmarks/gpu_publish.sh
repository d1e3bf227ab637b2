#!/usr/bin/env bash
# One device call that does the GPU work of the course: the KD throughput benchmark, then every
# notebook (or those named) re-executed in place in the course profile, twice for the first
# notebook's teacher cache to be warm (the second run's outputs are the ones kept, and both
# wall times are reported). Everything lands in $OUT. On the lent machine:
#   source .carry/setup.sh; bash benchmarks/gpu_publish.sh [notebooks...]
# PROFILE=smoke and BENCH_ARGS="--dataset shapes ..." make it runnable on a CPU for a dry run.
set -uo pipefail
out=${OUT:-/tmp/minidistill-out}
mkdir -p "$out"
python3 benchmarks/kd_throughput.py --out "$out/kd_throughput.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
for run in cold warm; do
  python3 -m minidistill.publish --profile "${PROFILE:-course}" --report "$out/publish_$run.json" "$@" 2>&1 \
    | grep -v "without encryption" | tee "$out/publish_$run.log"
done
tar czf "$out/notebooks.tgz" notebooks/*.ipynb
echo "results in $out: kd_throughput.json, publish_cold.json, publish_warm.json, notebooks.tgz"
