"""RepDistiller's CIFAR-100 rows (teacher, student alone, KD, FitNet), resumable, on one GPU or several.

    python benchmarks/cifar100_table.py --recipe paper                      # every row, seeds 0 1 2
    python benchmarks/cifar100_table.py --recipe fast --rows resnet56-resnet20 --seeds 0
    torchrun --nproc_per_node 4 benchmarks/cifar100_table.py --recipe paper  # four GPUs, one fit each
    python benchmarks/cifar100_table.py --recipe paper --estimate           # predicted GPU time, no training

The methods, as RepDistiller's ``scripts/run_cifar_distill.sh`` runs them: *KD* is
``0.1 CE + 0.9 T^2 KL`` at T = 4 (``-r 0.1 -a 0.9 -b 0``); *FitNet* is one stage,
``CE + 100 x MSE`` between a regressed student feature (1x1 conv, BatchNorm, ReLU) and the
teacher's output of its second stage (``--distill hint -a 0 -b 100``, hint layer 2), here
:class:`minidistill.losses.FeatureDistillation` with ``regressor_relu=True``. Mixed precision
(``--amp auto``, the default: bf16 on recent GPUs) is the course's; ``--amp off`` trains in
float32, as RepDistiller does. Each row's teacher is trained once, with the same
recipe (seed 0), and cached by :func:`minidistill.train.pretrained`.

Recipes (``--recipe``): ``paper`` is :data:`minidistill.train.PAPER_RECIPE`, RepDistiller's
benchmark setting (240 epochs, batch 64, SGD lr 0.05, x0.1 at epochs 150/180/210, weight decay
5e-4); ``fast`` is :data:`minidistill.train.FAST_RECIPE` (60 epochs, batch 512, one-cycle up to
0.2), a quarter of the images. Teachers are cached as the paper profile's (shared with chapters 1
and 3 under ``MINIDISTILL_PROFILE=paper``). Under the smoke profile (``MINIDISTILL_PROFILE=smoke``,
the CPU default) every run is two short epochs, to check the script end to end.

Resumable row by row and run by run: finished runs are read back from the JSON and skipped, an
interrupted run resumes from its checkpoint, and teachers come from the cache. The data come
from ``$MINIDISTILL_DATA/cifar100.npz`` if present, otherwise torchvision downloads them there.
Results: ``<out>/cifar100_<recipe>[_smoke].json`` and ``.md`` (the last epoch's test accuracy,
mean ± std over seeds, beside RepDistiller's published numbers; RepDistiller's ``train_student.py``
keeps the best test accuracy over its epochs, which favours its column slightly).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minidistill import data, distributed, losses, report, runtime, train  # noqa: E402

#: the rows: teacher -> student, with RepDistiller's README numbers (CIFAR-100 accuracy in %,
#: teacher / student alone / KD / FitNet) from https://github.com/HobbitLong/RepDistiller
#: (README, commit b84f547c5db6a35318d4671d7d5c4de74c822403)
ROWS = {
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4", (79.42, 72.50, 73.33, 73.50)),
    "resnet56-resnet20": ("resnet56", "resnet20", (72.34, 69.06, 70.66, 69.21)),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2", (75.61, 73.26, 74.92, 73.58)),
}
METHODS = ("student alone", "KD", "FitNet")
SOURCE = ("RepDistiller README (https://github.com/HobbitLong/RepDistiller, commit b84f547), "
          "CIFAR-100 classification accuracy (%), run count not stated")
RECIPES = {"paper": train.PAPER_RECIPE, "fast": train.FAST_RECIPE}
SMOKE = train.Recipe(epochs=2, batch_size=32, lr=0.02, nesterov=False, schedule="step", milestones=(1,))


def objective(method: str, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
    """RepDistiller's loss for ``method`` (None: cross-entropy)."""
    if method == "student alone":
        return None
    if method == "KD":
        return losses.Distillation(teacher, temperature=4.0, alpha=0.9)
    if method == "FitNet":
        return losses.FeatureDistillation(teacher, layers=("layer2", "layer2"), weight=100.0, temperature=4.0,
                                          alpha=0.0, regressor_relu=True)  # RepDistiller's ConvReg ends in a ReLU
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def estimate_seconds(row: str, recipe: train.Recipe, seeds: int) -> dict[str, float]:
    """Predicted seconds on one H100-class GPU (bf16, channels_last): the course's cost model
    (benchmarks/estimate_course.py), with a step of fewer than 512 images charged a 512-image
    step's overhead (small batches are launch-bound)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from estimate_course import A_US, B_US, CIFAR_TRAIN, gmacs

    t, s, _ = ROWS[row]
    passes = max(1.0, 512 / recipe.batch_size)
    per_image = lambda g: (A_US * passes + B_US * g) * 1e-6  # noqa: E731
    images = recipe.epochs * CIFAR_TRAIN
    out = {"teacher": images * per_image(3 * gmacs(t)),
           "student alone": seeds * images * per_image(3 * gmacs(s)),
           "KD": seeds * images * per_image(3 * gmacs(s) + gmacs(t))}
    out["FitNet"] = out["KD"]  # (the regressor is a 1x1 or 3x3 conv: negligible)
    return out


def markdown(results: dict) -> str:
    head = (f"# CIFAR-100, recipe `{results['recipe']}` ({results['profile']} profile)\n\n"
            f"Ours: the last epoch's test accuracy, mean ± std over the seeds run ({results['device']}, torch "
            f"{results['torch']}, {results['world_size']} process(es)); the teacher is one run (seed 0). "
            f"RepDistiller: {SOURCE}; its train_student.py keeps the best test accuracy over the epochs.\n\n"
            "| Teacher → Student | Teacher | Student alone | KD | FitNet | RepDistiller: Teacher | Student | KD | FitNet |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row, rec in results["rows"].items():
        accs = [[rec["teacher"]["acc"]] if "teacher" in rec else []]
        accs += [[r["acc"] for r in rec.get("runs", {}).get(m, {}).values()] for m in METHODS]
        ours = [report.format_mean_std(a) if a else "–" for a in accs]
        theirs = [f"{v:.2f}" for v in ROWS[row][2]]
        lines.append(f"| {ROWS[row][0]} → {ROWS[row][1]} | " + " | ".join(ours + theirs) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper")
    p.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS), metavar="ROW",
                   help=f"rows to run (default all): {', '.join(ROWS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="student seeds (default 0 1 2)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON and Markdown")
    p.add_argument("--root", type=Path, default=None, help="data root (default $MINIDISTILL_DATA)")
    p.add_argument("--amp", choices=("auto", "off"), default="auto",
                   help="auto: bf16 (or fp16) mixed precision on a GPU, as the course trains; off: float32, as "
                        "RepDistiller trains")
    p.add_argument("--estimate", action="store_true", help="print the predicted GPU time per row and stop")
    args = p.parse_args()
    if any(s < 0 for s in args.seeds):
        p.error("--seeds must be non-negative")

    recipe = RECIPES[args.recipe]
    if args.estimate:
        total = 0.0
        for row in args.rows:
            parts = estimate_seconds(row, recipe, len(args.seeds))
            total += sum(parts.values())
            print(f"{row:<22} " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in parts.items())
                  + f"; row {sum(parts.values()) / 3600:.1f} h")
        print(f"estimate (not a measurement) for recipe {args.recipe!r}, {len(args.seeds)} seed(s), one GPU: "
              f"{total / 3600:.1f} h")
        return

    distributed.init()
    main_rank = distributed.is_main()
    profile = runtime.get_profile()
    runtime.apply_threads(profile)
    if profile.name == "smoke":
        recipe = SMOKE
    else:   # the teachers are cached as the paper profile's, shared with chapters 1 and 3
        profile = runtime.get_profile("paper", profile.device)
    amp = "auto" if args.amp == "auto" else False
    ds = data.load_dataset("cifar100", args.root) if main_rank else None   # rank 0 alone downloads
    distributed.barrier()
    ds = ds if main_rank else data.load_dataset("cifar100", args.root)
    if ds.num_classes != 100:
        raise SystemExit(f"expected CIFAR-100 (100 classes), the data have {ds.num_classes}")
    stem = f"cifar100_{args.recipe}" + ("_smoke" if profile.name == "smoke" else "")
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    if results and (results.get("recipe_fields") != recipe.fields() or results.get("amp", "auto") != args.amp):
        raise SystemExit(f"{json_path} holds results of another recipe or precision ({results.get('recipe_fields')}, "
                         f"amp {results.get('amp', 'auto')}); "
                         "move it away or choose another --out")
    results.update({"recipe": args.recipe, "recipe_fields": recipe.fields(), "amp": args.amp, "profile": profile.name,
                    "device": runtime.device_name(distributed.local_device() if distributed.is_distributed()
                                                  else profile.device),
                    "torch": torch.__version__, "world_size": distributed.world_size(), "source": SOURCE})
    results.setdefault("rows", {})
    runs_dir = runtime.data_root(args.root) / "checkpoints" / "cifar100_table"

    def save() -> None:
        if main_rank:
            args.out.mkdir(parents=True, exist_ok=True)
            results["date"] = datetime.now().isoformat(timespec="seconds")
            json_path.write_text(json.dumps(results, indent=1) + "\n")
            md_path.write_text(markdown(results))

    def say(text: str) -> None:
        if main_rank:
            print(text, flush=True)

    say(f"{profile}; {distributed.world_size()} process(es); recipe {args.recipe}: {recipe}")
    for row in args.rows:
        t_name, s_name, _ = ROWS[row]
        rec = results["rows"].setdefault(row, {"runs": {}})
        t0 = time.perf_counter()
        teacher = train.pretrained(t_name, ds, recipe=recipe, seed=0, profile=profile, root=args.root,
                                   eval_every=None, amp=amp)
        rec["teacher"] = {"acc": teacher.history.final("test_acc"), "seconds": teacher.history.final("seconds")}
        say(f"{row}: teacher {t_name} {rec['teacher']['acc']:.2f} % "
            f"({'from the cache' if teacher.cached else f'trained, {time.perf_counter() - t0:.0f} s'})")
        save()
        for method in METHODS:
            done = rec["runs"].setdefault(method, {})
            for seed in args.seeds:
                if str(seed) in done:
                    continue
                ckpt = runs_dir / f"{stem}-{row}-{method.replace(' ', '_')}-s{seed}.pt"
                run = train.train_model(s_name, ds, recipe, objective(method, teacher.model), seed=seed,
                                        checkpoint=ckpt, eval_every=None, amp=amp,
                                        description=f"{row} {method} s{seed}")
                done[str(seed)] = {"acc": run.history.final("test_acc"), "seconds": run.history.final("seconds")}
                say(f"{row}: {method:<13} seed {seed}: {done[str(seed)]['acc']:.2f} % "
                    f"({done[str(seed)]['seconds']:.0f} s of training)")
                save()
                if main_rank:
                    ckpt.unlink(missing_ok=True)
    save()
    say(f"wrote {json_path} and {md_path}")
    distributed.close()


if __name__ == "__main__":
    main()
