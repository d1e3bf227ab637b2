"""KD training throughput: a classic pipeline against minidistill's trainer, in one run.

    python benchmarks/kd_throughput.py                       # CIFAR-10, resnet32x4 -> resnet8x4
    python benchmarks/kd_throughput.py --dataset shapes --teacher resnet20 --student resnet8   # CPU sanity run

The same KD step -- teacher forward without gradients, student forward and backward, SGD
step, loss (1 - alpha) CE + alpha T^2 KL -- in two pipelines:

* classic: uint8 images turned into PIL images, RandomCrop(pad 4) + flip + ToTensor +
  Normalize in DataLoader worker processes, batch 64, fp32, NCHW;
* minidistill: ``train.fit`` with ``losses.Distillation``: data resident on the device as
  uint8, crop/flip/normalise there, batch 512, bf16 autocast, channels_last; again with
  torch.compile (``--compile``, on by default on a GPU).

Throughput is training images per second. For minidistill it comes from the History that
``fit`` returns (training seconds only, the first epoch left out as warm-up); for the
classic pipeline from timing ``--classic-steps`` steps after a warm-up. Results go to JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minidistill import data as mdata  # noqa: E402
from minidistill.losses import Distillation, distillation_loss  # noqa: E402
from minidistill.models import create_model  # noqa: E402
from minidistill.runtime import device_name, get_device, seed_everything  # noqa: E402
from minidistill.train import Recipe, fit  # noqa: E402


def classic(ds: mdata.Dataset, teacher_name: str, student_name: str, device: torch.device,
            steps: int, warmup: int, batch_size: int, workers: int) -> float:
    """Images per second of the classic PIL + DataLoader + fp32 loop."""
    from PIL import Image
    from torchvision import transforms

    size = ds.x_train.shape[-1]
    tf = transforms.Compose([
        transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std),
    ])
    images = ds.x_train.permute(0, 2, 3, 1).numpy()  # NHWC uint8, as torchvision keeps CIFAR
    labels = ds.y_train.tolist()

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return tf(Image.fromarray(images[i])), labels[i]

    loader = torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    seed_everything(0)
    teacher = create_model(teacher_name, ds.num_classes).to(device).eval().requires_grad_(False)
    student = create_model(student_name, ds.num_classes).to(device).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    done, t0 = 0, None
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                t_logits = teacher(x)
            loss = distillation_loss(student(x), t_logits, y, 4.0, 0.9)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == warmup + steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def minidistill(ds: mdata.Dataset, teacher_name: str, student_name: str, device: torch.device,
                epochs: int, batch_size: int, compile: bool) -> float:
    """Images per second of ``fit`` with the Distillation objective (epochs 2.. only)."""
    seed_everything(0)
    teacher = create_model(teacher_name, ds.num_classes)
    student = create_model(student_name, ds.num_classes)
    h = fit(student, ds, Distillation(teacher.to(device)), Recipe(epochs=epochs, batch_size=batch_size, lr=0.2),
            device=device, compile=compile, progress=False)
    per_epoch = (len(ds.x_train) // batch_size) * batch_size
    seconds = h["seconds"]
    return (epochs - 1) * per_epoch / (seconds[-1] - seconds[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--classic-steps", type=int, default=200)
    p.add_argument("--classic-batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--epochs", type=int, default=4, help="minidistill epochs (the first is warm-up)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--compile", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kd_throughput.json")
    args = p.parse_args()

    device = get_device()
    ds = mdata.load_dataset(args.dataset)
    print(f"{args.teacher} -> {args.student} on {ds} | {device_name(device)} | torch {torch.__version__}", flush=True)
    results = {"classic": classic(ds, args.teacher, args.student, device, args.classic_steps,
                                  warmup=10, batch_size=args.classic_batch, workers=args.workers)}
    print(f"classic (PIL + {args.workers} workers, batch {args.classic_batch}, fp32): {results['classic']:,.0f} img/s", flush=True)
    results["minidistill"] = minidistill(ds, args.teacher, args.student, device, args.epochs, args.batch, compile=False)
    print(f"minidistill (device data, batch {args.batch}, amp, channels_last): {results['minidistill']:,.0f} img/s", flush=True)
    if args.compile == "yes" or (args.compile == "auto" and device.type == "cuda"):
        results["minidistill_compile"] = minidistill(ds, args.teacher, args.student, device, args.epochs, args.batch,
                                                     compile=True)
        print(f"minidistill + torch.compile: {results['minidistill_compile']:,.0f} img/s", flush=True)
    ratios = {k: v / results["classic"] for k, v in results.items() if k != "classic"}
    for k, r in ratios.items():
        print(f"ratio {k} / classic: {r:.1f}x")
    record = {
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "dataset": ds.name, "teacher": args.teacher, "student": args.student,
        "classic": {"batch": args.classic_batch, "workers": args.workers, "steps": args.classic_steps},
        "minidistill": {"batch": args.batch, "epochs": args.epochs},
        "img_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratio_to_classic": {k: round(v, 2) for k, v in ratios.items()},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
