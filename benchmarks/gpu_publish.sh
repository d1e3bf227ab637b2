#!/usr/bin/env bash
# The one GPU command: everything a lent machine is for, in one call that ends well inside its
# 10 minutes, with every result in $OUT (default /tmp/minidistill-out). On the lent machine:
#   source .carry/setup.sh; bash benchmarks/gpu_publish.sh [notebooks...]
# 1. the KD throughput benchmark, sized to about 45 s on an H200 (BENCH=0 skips it; BENCH_ARGS
#    adds or overrides its flags);
# 2. TTA=1: the time-to-accuracy benchmark (off by default);
# 3. a budgeted publish of the notebooks named (default: all): stalest first, only what fits in
#    BUDGET (default 540) seconds minus the time the benchmarks took, each notebook written back
#    as soon as it finishes and killed if it runs past the budget (python -m minidistill.publish
#    --budget; `--plan` shows what it would do). The teacher cache starts empty on every call.
# Then $OUT holds notebooks.tgz (all notebooks: untar it over the checkout), publish.json, the
# logs (bench.log, tta.log, publish.log) and the benchmarks' JSON.
# Dry run on a CPU: PROFILE=smoke BENCH_ARGS="--dataset shapes --teacher resnet20 --student resnet8"
set -uo pipefail
start=$SECONDS
out=${OUT:-/tmp/minidistill-out}
budget=${BUDGET:-540}
mkdir -p "$out"

if [ "${BENCH:-1}" != 0 ]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  python3 benchmarks/kd_throughput.py --classic-steps 100 --epochs 3 --out "$out/kd_throughput.json" \
    ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
fi
if [ "${TTA:-0}" != 0 ]; then
  python3 benchmarks/time_to_accuracy.py --out "$out/time_to_accuracy.json" 2>&1 | tee "$out/tta.log"
fi

left=$(( budget - (SECONDS - start) ))
(( left < 0 )) && left=0
echo "publishing with a budget of $left s ($(( SECONDS - start )) s of $budget s used so far)"
python3 -m minidistill.publish --budget "$left" --profile "${PROFILE:-course}" --report "$out/publish.json" "$@" \
  2>&1 | grep --line-buffered -v "without encryption" | tee "$out/publish.log"
status=${PIPESTATUS[0]}

tar czf "$out/notebooks.tgz" notebooks/*.ipynb
echo "done in $(( SECONDS - start )) s; in $out:" $(cd "$out" && ls)
exit "$status"
