#!/usr/bin/env bash
# One device call of the course's GPU work, everything landing in $OUT. On the lent machine:
#   source .carry/setup.sh; bash benchmarks/gpu_publish.sh notebooks/01_kd_basics.ipynb ...
# 1. the KD throughput benchmark (BENCH=0 skips it);
# 2. the notebooks named (default: all), re-executed in place in the course profile, once each,
#    in the order given. Teachers are cached under $MINIDISTILL_DATA, which every device call
#    starts empty: put the notebooks that share a teacher in one call (chapters 1 and 2 share the
#    resnet32x4 CIFAR-10 teacher) and name a notebook twice to measure it warm (the second run
#    finds the cache the first one filled; the last run's outputs are the ones kept).
# A call may run 10 minutes: split the notebooks over calls (README, "Publishing outputs").
# PROFILE=smoke and BENCH_ARGS="--dataset shapes ..." make it runnable on a CPU for a dry run.
set -uo pipefail
out=${OUT:-/tmp/minidistill-out}
mkdir -p "$out"
if [ "${BENCH:-1}" != 0 ]; then
  python3 benchmarks/kd_throughput.py --out "$out/kd_throughput.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
fi
python3 -m minidistill.publish --profile "${PROFILE:-course}" --report "$out/publish.json" "$@" 2>&1 \
  | grep -v "without encryption" | tee "$out/publish.log"
tar czf "$out/notebooks.tgz" notebooks/*.ipynb
echo "results in $out: $( [ "${BENCH:-1}" != 0 ] && echo 'kd_throughput.json, ')publish.json, publish.log, notebooks.tgz"
