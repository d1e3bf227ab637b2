"""How many torch threads a CPU smoke run should use: one smoke training epoch timed with 1 and
with 2 threads, on the machine as it is and beside busy loops that each keep one core busy.

    python benchmarks/cpu_threads.py                        # 1 vs 2 threads, quiet and 1 busy core, 5 repeats
    python benchmarks/cpu_threads.py --busy 0 1 --repeats 7 --out benchmarks/results/cpu_threads.json

Each measurement runs in a fresh Python process (``torch.set_num_threads`` before any work):
resnet8 on ``data.make_shapes(5000)``, batch 128, one warm-up epoch and then one timed epoch,
fp32 on the CPU. The busy loops (``python -c "while True: pass"``) are started before the
measurements of a condition and killed after them. The machine's load average is recorded with
every condition, because other jobs change the answer. The JSON holds every time and the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from minidistill.data import make_shapes
from minidistill.models import create_model
from minidistill.runtime import seed_everything
from minidistill.train import Recipe, fit
data = make_shapes(int(sys.argv[3]))
recipe = Recipe(epochs=1, batch_size=int(sys.argv[4]))
seed_everything(0)
fit(create_model("resnet8", data.num_classes), data, recipe=recipe, device="cpu", progress=False, eval_splits=())
seed_everything(0)
model = create_model("resnet8", data.num_classes)
t0 = time.perf_counter()
fit(model, data, recipe=recipe, device="cpu", progress=False, eval_splits=())
print(time.perf_counter() - t0)
"""


def one_epoch(threads: int, n_train: int, batch: int) -> float:
    """Seconds of one timed training epoch in a fresh process with ``threads`` torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MINIDISTILL_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(threads), str(ROOT), str(n_train), str(batch)],
                         env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy loops beside the run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_threads.json")
    args = parser.parse_args()

    records = []
    for busy in args.busy:
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)
            load_before = os.getloadavg()
            times: dict[int, list[float]] = {t: [] for t in args.threads}
            for _ in range(args.repeats):  # interleaved, so a change in load hits both alike
                for t in args.threads:
                    times[t].append(round(one_epoch(t, args.n_train, args.batch), 2))
            load_after = os.getloadavg()
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
        rec = {"busy_loops": busy, "loadavg_before": [round(v, 2) for v in load_before],
               "loadavg_after": [round(v, 2) for v in load_after], "times_s": times,
               "median_s": {t: round(statistics.median(v), 2) for t, v in times.items()}}
        records.append(rec)
        print(json.dumps(rec), flush=True)

    result = {"cpu_count": os.cpu_count(), "torch": __import__("torch").__version__,
              "workload": f"resnet8, make_shapes({args.n_train}), batch {args.batch}, 1 epoch fp32",
              "conditions": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
