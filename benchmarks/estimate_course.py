"""Cold course-profile estimates: how long each chapter notebook should take on the publishing
GPU before a GPU has measured it, written into the notebook's metadata for
``python -m minidistill.publish --budget/--plan``.

    python benchmarks/estimate_course.py            # print the estimates and their sum
    python benchmarks/estimate_course.py --write    # also store them in the notebooks

Each notebook gets ``metadata.minidistill``: ``estimate_s`` (cold: its teachers trained inside),
``teacher_s`` (the part spent on a teacher shared with other notebooks), ``teacher_group`` (the
notebooks sharing it) and ``estimate`` (how the number was computed). A measured course run on
the same GPU class replaces the estimate in every prediction, so these numbers matter only until
the first GPU window.

The cost model is one line, fitted to the only course-size GPU timings we have (an H100, CIFAR-10,
50,000 training images, batch 512, bf16, channels_last, eager, a test evaluation every epoch):
resnet32x4 trained alone for 30 epochs 64 s, resnet8x4 alone 19 s, KD resnet32x4 -> resnet8x4
36 s. Per training image,

    microseconds = A * passes + B * GMACs,     GMACs = 3 x student forward + teacher forward(s)

(a training step costs about three forwards: forward, and backward twice as much). The two runs
alone give A and B; the KD run, left out of the fit, is predicted within 3 %. ``passes`` counts
the networks a step runs through one after another (multi-task heads, SGLD steps), each paying
the per-image overhead A. Every chapter's workload below mirrors its notebook's course
configuration: change both together.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from minidistill.models import PlainCNN, create_model  # noqa: E402

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
#: measured course-size timings (seconds for 30 epochs of CIFAR-10 on an H100)
MEASURED = {"resnet32x4": 64.0, "resnet8x4": 19.0, "kd resnet32x4 -> resnet8x4": 36.0}
OVERHEAD_S = 12.0  # kernel start, imports, data decode, derivation cells and figures: a guess, per notebook


@lru_cache(maxsize=None)
def gmacs(name: str) -> float:
    """Multiply-accumulates (in billions) of one forward pass on a 32x32 image."""
    if name == "fastnet":
        from minidistill.fast_teacher import FastNet

        model = FastNet(10, tta=False)
    elif name == "resnet20x4":  # chapter 9's wide network (not in models.MODELS)
        from minidistill.methods.wide_narrow import wide_resnet

        model = wide_resnet(20, 4, 10)
    elif name.startswith("plain"):
        depth, width = (int(v) for v in name[5:].split("w"))
        model = PlainCNN(depth, (width, 2 * width, 4 * width), 10)
    else:
        model = create_model(name, 10)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() / 2e9


def _fit() -> tuple[float, float]:
    """A (microseconds per image per pass) and B (microseconds per GMAC) from the runs alone."""
    images = 30 * CIFAR_TRAIN
    (x1, y1), (x2, y2) = ((3 * gmacs(m), MEASURED[m] / images * 1e6) for m in ("resnet8x4", "resnet32x4"))
    b = (y2 - y1) / (x2 - x1)
    return y1 - b * x1, b


A_US, B_US = _fit()


@dataclass
class Stage:
    """``runs`` training runs of ``epochs`` x ``images``, each image costing ``gmacs`` (already
    3 x student + teacher) and ``passes`` overheads."""

    what: str
    gmacs: float
    epochs: float
    runs: int = 1
    images: int = CIFAR_TRAIN
    passes: float = 1.0
    shared_teacher: bool = False

    @property
    def seconds(self) -> float:
        return self.runs * self.epochs * self.images * (A_US * self.passes + B_US * self.gmacs) * 1e-6


def train_alone(name: str) -> float:
    return 3 * gmacs(name)


def kd(student: str, teacher: str, teacher_passes: float = 1.0) -> float:
    return 3 * gmacs(student) + teacher_passes * gmacs(teacher)


FAST_TEACHER = Stage("fast teacher (FastNet, 10 epochs, batch 1024)", train_alone("fastnet"), 10, shared_teacher=True)

#: the course workload of every chapter (mirrors each notebook's `profile.pick(course=...)`)
CHAPTERS: dict[str, dict] = {
    "01_kd_basics.ipynb": dict(group="cifar10-fastnet", stages=[
        FAST_TEACHER,
        Stage("resnet8x4 alone, 30 epochs, 2 seeds", train_alone("resnet8x4"), 30, runs=2),
        Stage("resnet8x4 + KD from FastNet (flip TTA: 2 teacher forwards), 30 epochs, 2 seeds",
              kd("resnet8x4", "fastnet", 2), 30, runs=2),
    ]),
    "02_kd_as_lsr.ipynb": dict(group="cifar10-fastnet", stages=[
        FAST_TEACHER,
        Stage("weak teacher resnet8, 8 epochs", train_alone("resnet8"), 8),
        Stage("defective teacher resnet8x4, 1 epoch", train_alone("resnet8x4"), 1),
        Stage("resnet8x4 alone (self-teachers), 8 epochs, 2 seeds", train_alone("resnet8x4"), 8, runs=2),
        Stage("LSR and Tf-KD reg, 8 epochs, 2 seeds", train_alone("resnet8x4"), 8, runs=4),
        Stage("Tf-KD self and defective KD (resnet8x4 teachers), 8 epochs, 2 seeds",
              kd("resnet8x4", "resnet8x4"), 8, runs=4),
        Stage("normal KD (FastNet teacher), 8 epochs, 2 seeds", kd("resnet8x4", "fastnet", 2), 8, runs=2),
        Stage("reversed KD (resnet8 teacher), 8 epochs, 2 seeds", kd("resnet8x4", "resnet8"), 8, runs=2),
    ]),
    "03_fitnets.ipynb": dict(group=None, stages=[
        Stage("teacher resnet8x4, 30 epochs", train_alone("resnet8x4"), 30),
        Stage("PlainCNN(13) alone, 11 epochs, 2 seeds", train_alone("plain13w16"), 11, runs=2),
        Stage("PlainCNN(13) + KD, 11 epochs, 2 seeds", kd("plain13w16", "resnet8x4"), 11, runs=2),
        Stage("PlainCNN(13) + KD at equal compute, 15 epochs, 2 seeds", kd("plain13w16", "resnet8x4"), 15, runs=2),
        Stage("FitNet in one stage (hint + KD), 11 epochs, 2 seeds", kd("plain13w16", "resnet8x4"), 11, runs=2),
        Stage("FitNet stage 1 (hints; whole student and teacher counted), 4 epochs, 2 seeds",
              kd("plain13w16", "resnet8x4"), 4, runs=2),
        Stage("FitNet stage 2 (KD), 11 epochs, 2 seeds", kd("plain13w16", "resnet8x4"), 11, runs=2),
        Stage("budget experiment at depth 4: alone, 11 epochs, one seed", train_alone("plain4w37"), 11),
        Stage("budget experiment at depth 4: FitNet stage 1 + 2, 4 + 11 epochs, one seed",
              kd("plain4w37", "resnet8x4"), 15),
    ]),
    "04_gumbel_adashare.ipynb": dict(group=None, stages=[
        Stage("independent networks, hard sharing, stochastic depth, random policy: 3 task heads on a "
              "resnet14-sized trunk, 6 epochs, 2 seeds", 3 * train_alone("resnet14"), 6, runs=8, passes=3),
        Stage("AdaShare: warm-up 2 epochs, 8 policy rounds (counted as 8 epochs), retrain 6 epochs, 2 seeds",
              3 * train_alone("resnet14"), 2 + 8 + 6, runs=2, passes=3),
        Stage("AdaShare policy in the paper's form: warm-up 2 epochs + 8 rounds, one seed",
              3 * train_alone("resnet14"), 2 + 8, passes=3),
    ]),
    "05_ensembles_ods.ipynb": dict(group=None, stages=[
        Stage("Deep Ensemble teacher: 4 x resnet20 in one vmapped network, 60 epochs on 10,000 images",
              4 * train_alone("resnet20"), 60, images=10_000, passes=1.5),
        Stage("BatchEnsemble-4 students (4 x resnet20) from the ensemble, KD / Gaussian, 12 epochs, 2 seeds",
              4 * kd("resnet20", "resnet20"), 12, runs=4, images=10_000, passes=2),
        Stage("the same with ODS / ConfODS (one more teacher forward and backward for the direction)",
              4 * (kd("resnet20", "resnet20") + 3 * gmacs("resnet20")), 12, runs=4, images=10_000, passes=3),
    ]),
    "06_jem.ipynb": dict(group=None, stages=[
        Stage("plain classifier wrn_16_2, 10 epochs on 45,000 images (5,000 held out for temperature "
              "scaling), 1 seed", train_alone("wrn_16_2"), 10, images=45_000),
        Stage("JEM wrn_16_2, 10 epochs on 45,000 images, 1 seed: data step + 10 SGLD steps + sample step "
              "per batch", 12 * train_alone("wrn_16_2"), 10, images=45_000, passes=12),
    ]),
    # IE-KD's auto-encoder (6 convolutions at 8x8, 64 <-> 32 channels) is about 0.008 GMACs a forward, a
    # student's two split encoders about 0.004 together: small next to the networks, but each adds kernels
    # (counted as extra passes: one per teacher factor or student encoder pair, one per IE-DML network)
    "07_iekd.ipynb": dict(group=None, stages=[
        Stage("teachers resnet56 and resnet8, 12 epochs each", train_alone("resnet56") + train_alone("resnet8"), 12,
              passes=2),
        Stage("two teacher auto-encoders, 2 epochs each (frozen teacher forward + auto-encoder)",
              gmacs("resnet56") + gmacs("resnet8") + 2 * 3 * 0.008, 2, passes=2),
        Stage("resnet20 alone, 5 epochs, 2 seeds", train_alone("resnet20"), 5, runs=2),
        Stage("DML pairs of resnet20 (simultaneous update), 5 epochs, 2 seeds", 2 * train_alone("resnet20"), 5,
              runs=2, passes=2),
        Stage("KD from resnet56 and from resnet8, 5 epochs, 2 seeds",
              kd("resnet20", "resnet56") + kd("resnet20", "resnet8"), 5, runs=2, passes=2),
        Stage("IE-KD from resnet56 and from resnet8 (teacher factor + two student encoders), 5 epochs, 2 seeds",
              kd("resnet20", "resnet56") + kd("resnet20", "resnet8") + 2 * (0.004 + 3 * 0.004), 5, runs=2, passes=3),
        Stage("IE-DML pairs of resnet20 (auto-encoders and encoders trained alongside), 5 epochs, 2 seeds",
              2 * (train_alone("resnet20") + 3 * (0.008 + 0.004)), 5, runs=2, passes=4),
    ]),
    "08_trikd.ipynb": dict(group=None, stages=[
        Stage("fixed teacher resnet56 for KD, 10 epochs", train_alone("resnet56"), 10),
        Stage("resnet8 alone, 4 epochs, 2 seeds", train_alone("resnet8"), 4, runs=2),
        Stage("resnet8 alone at equal student epochs, 12 epochs, 2 seeds", train_alone("resnet8"), 12, runs=2),
        Stage("KD resnet56 -> resnet8, 4 epochs, 2 seeds", kd("resnet8", "resnet56"), 4, runs=2, passes=2),
        Stage("TriKD generation 0 (DML: resnet8 + resnet56 online), 4 epochs, 2 seeds",
              train_alone("resnet8") + train_alone("resnet56"), 4, runs=2, passes=2),
        Stage("TriKD generations 1-2 (pair + frozen resnet8 anchor), 4 epochs, 2 seeds",
              train_alone("resnet8") + train_alone("resnet56") + gmacs("resnet8"), 4, runs=4, passes=3),
        Stage("over-strong anchor: generation 1 again with lambda_a = 10, 4 epochs, one seed",
              train_alone("resnet8") + train_alone("resnet56") + gmacs("resnet8"), 4, passes=3),
    ]),
    "09_wide_narrow.ipynb": dict(group=None, stages=[
        Stage("wide network resnet20x4 (stage 1), 15 epochs", train_alone("resnet20x4"), 15),
        Stage("resnet20 alone, 10 epochs, 2 seeds", train_alone("resnet20"), 10, runs=2),
        Stage("resnet20 + KD from resnet20x4, 10 epochs, 2 seeds", kd("resnet20", "resnet20x4"), 10, runs=2),
        Stage("layerwise imitation, 4 blocks x 1 epoch (each counted as a full KD step: an upper bound, the "
              "prefixes are shorter), 2 seeds", kd("resnet20", "resnet20x4"), 4, runs=2),
        Stage("merged resnet20 fine-tuned, 6 epochs, 2 seeds", train_alone("resnet20"), 6, runs=2),
    ]),
    "10_manidp.ipynb": dict(group=None, stages=[
        Stage("dense resnet20, 30 epochs", train_alone("resnet20"), 30),
        Stage("static pruning (fixed masks) fine-tune, 8 epochs, 2 seeds", train_alone("resnet20"), 8, runs=2,
              passes=1.5),
        Stage("dynamic pruning (18 saliency gates) fine-tune, 8 epochs, 2 seeds", train_alone("resnet20"), 8,
              runs=2, passes=2),
        Stage("ManiDP (gates + 18 Gram matrices) fine-tune, 8 epochs, 2 seeds", train_alone("resnet20"), 8,
              runs=2, passes=2.5),
    ]),
    "11_rbn.ipynb": dict(group=None, stages=[
        Stage("resnet20 with BN, 15 epochs, 3 seeds", train_alone("resnet20"), 15, runs=3),
        Stage("resnet20 with RBN (2 passes: RBN's extra per-channel means, sigmoid gate and products in every "
              "normalisation layer, counted as a second network's per-image overhead, an upper bound), 15 epochs, "
              "3 seeds", train_alone("resnet20"), 15, runs=3, passes=2),
        Stage("small batch: resnet20 with BN, batch 32, first 5,000 images, 2 epochs, 2 seeds (16 passes: a "
              "launch-bound step of 32 images is counted at the per-step overhead of a 512-image step)",
              train_alone("resnet20"), 2, runs=2, images=5000, passes=16),
        Stage("small batch: resnet20 with RBN, same (32 passes: 2 x 16)", train_alone("resnet20"), 2, runs=2,
              images=5000, passes=32),
    ]),
    "12_robust_transfer.ipynb": dict(group=None, stages=[
        Stage("standard source resnet8 (eps = 0) on 5 CIFAR-10 classes (25,000 images), 20 epochs",
              train_alone("resnet8"), 20, images=25_000),
        Stage("robust sources resnet8 at 3 l2 budgets, 2 PGD steps (3 passes: each PGD step costs a forward and a "
              "backward pass, counted as a training step), 25,000 images, 20 epochs",
              3 * train_alone("resnet8"), 20, runs=3, images=25_000, passes=3),
        Stage("robust accuracy: 4 sources x 5,000 test images x 10 PGD steps (each counted as a training step)",
              train_alone("resnet8"), 10, runs=4, images=5000),
        Stage("transfer: fixed-feature and full-network from 4 sources x 2 seeds, 500 target images, batch 128, "
              "40 epochs (4 passes: a launch-bound 128-image step counted at a 512-image step's overhead; the probe "
              "counted as full training, an upper bound)", train_alone("resnet8"), 40, runs=16, images=500, passes=4),
    ]),
    "13_tsit.ipynb": dict(group=None, stages=[
        Stage("perceptual network and judge: resnet8, 10 epochs each", train_alone("resnet8"), 10, runs=2),
        Stage("TSIT generators (full, no style stream, no FADE), 2 epochs at batch 256; one step = D step + G step, "
              "0.73 GMAC per image measured with FlopCounterMode over a whole step (forward and backward of G, the "
              "2-scale D and the resnet8 perceptual network; the full model's count for all three, an upper bound); "
              "16 passes: 8 networks run one after another per step, doubled for a launch-bound 256-image step",
              0.73, 2, runs=3, passes=16),
    ]),
}


def estimate(name: str) -> dict:
    """The metadata entry for one notebook."""
    spec = CHAPTERS[name]
    stages = spec["stages"]
    total = OVERHEAD_S + sum(s.seconds for s in stages)
    teacher = sum(s.seconds for s in stages if s.shared_teacher)
    parts = "; ".join(f"{s.what}: {s.seconds:.0f} s" for s in stages)
    how = (f"estimate, not a measurement: {parts}; plus {OVERHEAD_S:.0f} s for the rest of the notebook. "
           f"Per training image {A_US:.1f} us per pass + {B_US:.1f} us per GMAC (3 x student + teacher "
           "forwards), a line through the H100 course timings of resnet8x4 and resnet32x4 trained alone "
           "(benchmarks/estimate_course.py).")
    out = {"estimate_s": round(total), "teacher_s": round(teacher), "estimate": how}
    if spec["group"]:
        out["teacher_group"] = spec["group"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="store the estimates in the notebooks' metadata")
    args = parser.parse_args()
    print(f"cost model: {A_US:.2f} us per image per pass + {B_US:.2f} us per GMAC; "
          f"KD resnet32x4 -> resnet8x4 predicted "
          f"{30 * CIFAR_TRAIN * (A_US + B_US * kd('resnet8x4', 'resnet32x4')) * 1e-6:.1f} s, measured "
          f"{MEASURED['kd resnet32x4 -> resnet8x4']:.0f} s")
    total = 0.0
    for name in CHAPTERS:
        est = estimate(name)
        total += est["estimate_s"]
        print(f"{name:<28} cold {est['estimate_s']:>4} s  shared teacher {est['teacher_s']:>3} s  "
              f"group {est.get('teacher_group', '-')}")
        if args.write:
            import nbformat

            path = ROOT / "notebooks" / name
            nb = nbformat.read(path, as_version=4)
            meta = dict(nb.metadata.get("minidistill", {}))
            meta.pop("teacher_group", None)
            meta.update(est)
            nb.metadata["minidistill"] = meta
            nbformat.write(nb, path)
    print(f"sum of cold estimates: {total:.0f} s")


if __name__ == "__main__":
    main()
