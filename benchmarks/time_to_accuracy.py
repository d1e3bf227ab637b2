"""Time to accuracy: the fast teacher (airbench's recipe) against the course's resnet32x4, in one run.

    python benchmarks/time_to_accuracy.py                    # CIFAR-10 on a GPU: about 2 minutes on an H100
    python benchmarks/time_to_accuracy.py --dataset shapes --n-train 1000 --seeds 2 --target 30 \\
        --fast-epochs 3 --fast-batch 100 --resnet resnet8 --resnet-epochs 2 --resnet-batch 128   # CPU sanity run

* fast teacher: :func:`minidistill.fast_teacher.train_fast_teacher` with ``target_acc``
  (``--target``, 94 % by default), once per seed; its History records the training seconds
  (evaluation excluded) of the first epoch whose flip-TTA test accuracy reaches the target.
  A short untimed warm-up run comes first, so cuDNN's autotuning is not charged to seed 0.
* course teacher: resnet32x4 through ``train.fit`` with ``Recipe(epochs=30, batch_size=512,
  lr=0.2)``, as ``train.pretrained`` trains it (after a one-epoch warm-up on a few batches);
  the seconds until the first epoch that reaches its own final test accuracy.

Results, with the device, torch version and date, go to JSON (``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minidistill import data as mdata  # noqa: E402
from minidistill.fast_teacher import train_fast_teacher  # noqa: E402
from minidistill.models import create_model  # noqa: E402
from minidistill.runtime import device_name, get_device, seed_everything  # noqa: E402
from minidistill.train import History, Recipe, fit  # noqa: E402


def subset(ds: mdata.Dataset, n_train: int | None, n_test: int | None) -> mdata.Dataset:
    """The first ``n_train`` training and ``n_test`` test images (all when None)."""
    return dataclasses.replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                               x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


def seconds_to(history: History, acc: float) -> float | None:
    """Training seconds at the end of the first epoch whose test accuracy reaches ``acc``."""
    return next((r["seconds"] for r in history.records if r["test_acc"] >= acc), None)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--n-train", type=int, default=None, help="use the first N training images (default all)")
    p.add_argument("--n-test", type=int, default=None, help="use the first N test images (default all)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--target", type=float, default=94.0, help="test accuracy (%%) the fast teacher runs to")
    p.add_argument("--fast-epochs", type=float, default=10, help="the fast teacher's schedule length")
    p.add_argument("--fast-batch", type=int, default=1024)
    p.add_argument("--warmup-epochs", type=float, default=1, help="the untimed warm-up run (0: none)")
    p.add_argument("--resnet", default="resnet32x4", help="the course teacher to compare with")
    p.add_argument("--resnet-epochs", type=int, default=30)
    p.add_argument("--resnet-batch", type=int, default=512)
    p.add_argument("--resnet-lr", type=float, default=0.2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "time_to_accuracy.json")
    args = p.parse_args()

    device = get_device()
    ds = subset(mdata.load_dataset(args.dataset), args.n_train, args.n_test)
    print(f"{ds} | {device_name(device)} | torch {torch.__version__}", flush=True)

    fast = dict(epochs=args.fast_epochs, batch_size=args.fast_batch, device=device, progress=False)
    if args.warmup_epochs > 0:
        train_fast_teacher(ds, **{**fast, "epochs": args.warmup_epochs}, seed=10_000)
    runs = []
    for seed in range(args.seeds):
        _, h = train_fast_teacher(ds, **fast, seed=seed, target_acc=args.target)
        runs.append(h)
        print(f"fast teacher, seed {seed}: {h.final('test_acc'):.2f} % after {h.final('epoch')} epochs, "
              f"{h.final('seconds'):.2f} s" + ("" if h.meta["reached_target"] else " (target not reached)"), flush=True)
    reached = [h.final("seconds") for h in runs if h.meta["reached_target"]]
    mean_s, std_s = mean_std(reached)

    recipe = Recipe(epochs=args.resnet_epochs, batch_size=args.resnet_batch, lr=args.resnet_lr)
    warm = subset(ds, 4 * args.resnet_batch, None)
    if len(warm.x_train) >= args.resnet_batch:  # cuDNN autotuning at the real batch shape, untimed
        fit(create_model(args.resnet, ds.num_classes), warm, recipe=recipe.replace(epochs=1), device=device,
            progress=False, eval_splits=())
    seed_everything(0)  # as train.pretrained: the model's initialisation from seed 0
    resnet = create_model(args.resnet, ds.num_classes)
    rh = fit(resnet, ds, recipe=recipe, seed=0, device=device, progress=False, eval_splits=("test",))
    final = rh.final("test_acc")
    to_final = seconds_to(rh, final)
    print(f"{args.resnet}: {final:.2f} % after {recipe.epochs} epochs; reached it at {to_final:.2f} s "
          f"of {rh.final('seconds'):.2f} s", flush=True)
    fast_to_resnet = [seconds_to(h, final) for h in runs]

    record = {
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "dataset": ds.name, "n_train": len(ds.x_train), "n_test": len(ds.x_test),
        "fast_teacher": {
            "target_acc": args.target, "epochs": args.fast_epochs, "batch_size": args.fast_batch,
            "warmup_epochs": args.warmup_epochs, "seeds": list(range(args.seeds)),
            "reached_target": [h.meta["reached_target"] for h in runs],
            "seconds": [round(h.final("seconds"), 3) for h in runs],
            "epochs_run": [h.final("epoch") for h in runs],
            "final_test_acc": [round(h.final("test_acc"), 2) for h in runs],
            "seconds_to_target_mean": mean_s, "seconds_to_target_std": std_s,
            "seconds_to_resnet_final_acc": fast_to_resnet,
        },
        "resnet_teacher": {
            "model": args.resnet, "recipe": recipe.fields(), "final_test_acc": round(final, 2),
            "seconds_to_final_acc": to_final, "epochs_to_final_acc": next(
                r["epoch"] for r in rh.records if r["test_acc"] >= final),
            "total_seconds": rh.final("seconds"),
        },
        "speedup_resnet_final_over_fast_target": (to_final / mean_s) if mean_s else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
