"""Reliability: what the package does with damaged caches, concurrent callers, interrupted runs,
non-finite training and bad input. Each numbered test below failed (or was silent) on the code
before the reliability issue; the table at the end calls every public function of the core
modules with at least three bad inputs and asserts a clear error that names the argument."""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import data, distributed, fast_teacher, losses, metrics, models, plots, report, runtime, train
from minidistill.data import Dataset, DeviceLoader, make_shapes, train_val_split
from minidistill.train import Recipe, TrainingDiverged, fit, pretrained

from _core_helpers import assert_state_equal, new_model

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = Recipe(epochs=1, batch_size=128)


# --- 1. the cache never serves a teacher trained on other images -----------------------------

def test_1_another_split_of_the_same_size_gets_its_own_teacher(data_dir):
    base = make_shapes(n_train=320, n_test=64)
    a, b = train_val_split(base, 64, seed=0), train_val_split(base, 64, seed=1)
    assert len(a.x_train) == len(b.x_train) and a.name == b.name
    ta = pretrained("resnet8", a, recipe=TINY_RECIPE, profile="smoke", device="cpu")
    tb = pretrained("resnet8", b, recipe=TINY_RECIPE, profile="smoke", device="cpu")
    assert ta.path != tb.path and not tb.cached
    assert pretrained("resnet8", a, recipe=TINY_RECIPE, profile="smoke", device="cpu").cached


# --- 2. two processes asking for one teacher train it once -----------------------------------

def test_2_two_processes_asking_for_one_uncached_teacher_train_it_once(tmp_path):
    script = tmp_path / "ask.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        from minidistill.data import make_shapes
        from minidistill.train import Recipe, pretrained
        t = pretrained("resnet8", make_shapes(n_train=512, n_test=64), recipe=Recipe(epochs=3, batch_size=128),
                       profile="smoke", device="cpu", root={str(tmp_path / 'root')!r}, progress=False)
        print("CACHED" if t.cached else "TRAINED")
    """))
    env = {"MINIDISTILL_PROGRESS": "0", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert sorted(o.strip().splitlines()[-1] for o, _ in outs) == ["CACHED", "TRAINED"]
    files = list((tmp_path / "root" / "checkpoints").iterdir())
    assert len([f for f in files if f.suffix == ".pt"]) == 1 and not any(f.name.endswith(".lock") for f in files)


def test_2_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "m.pt"
    (tmp_path / "m.pt.lock").write_text("999999999")   # no such process
    with train._CacheLock(path, poll=0.01):
        assert (tmp_path / "m.pt.lock").read_text() != "999999999"
    assert not (tmp_path / "m.pt.lock").exists()


def test_2_a_fresh_empty_lock_is_respected_an_old_one_or_a_zombies_is_not(tmp_path, monkeypatch):
    lock = train._CacheLock(tmp_path / "m.pt", poll=0.01)
    lock.path.write_text("")                                  # another process between create and write
    assert not lock._stale()
    old = time.time() - 2 * train._CacheLock.EMPTY_GRACE_S
    os.utime(lock.path, (old, old))                           # ... that died there
    assert lock._stale()
    lock.path.write_text(str(os.getpid()))                    # alive
    assert not lock._stale()
    monkeypatch.setattr(train, "_is_zombie", lambda pid: True)   # killed, never reaped
    assert lock._stale()


def test_2_is_zombie_reads_the_process_state():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while not train._is_zombie(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)                                      # exited, not yet waited for: a zombie
    assert train._is_zombie(child.pid)
    child.wait()
    assert not train._is_zombie(child.pid) and not train._is_zombie(os.getpid())


# --- 3. resume keeps every state, or refuses ---------------------------------------------------

class Counting(losses.Objective):
    """Cross-entropy with state in a buffer (a running count of examples seen), which must
    survive a resume; it stops the run when epoch ``stop`` begins."""

    def __init__(self, stop: int | None = None) -> None:
        super().__init__()
        self.stop = stop
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, model, x, y):
        if self.epoch == self.stop:
            raise KeyboardInterrupt
        self.seen += len(y)
        logits = model(x)
        return F.cross_entropy(logits, y) * (1 + 0 * self.seen), logits, {}


def test_3_an_objectives_buffers_survive_a_resume(tiny, tmp_path):
    recipe = Recipe(epochs=2, batch_size=128)
    full, obj_full = new_model(), Counting()
    fit(full, tiny, obj_full, recipe, device="cpu")
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(new_model(), tiny, Counting(stop=1), recipe, device="cpu", checkpoint=ckpt)
    resumed, obj = new_model(), Counting()
    fit(resumed, tiny, obj, recipe, device="cpu", checkpoint=ckpt)
    assert int(obj.seen) == int(obj_full.seen) == 2 * 512
    assert_state_equal(resumed.state_dict(), full.state_dict())


def test_3_an_objective_that_cannot_be_saved_refuses_to_resume(tiny, tmp_path):
    class Opaque(Counting):
        resumable = False

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(new_model(), tiny, Opaque(stop=1), Recipe(epochs=2, batch_size=128), device="cpu", checkpoint=ckpt)
    with pytest.raises(ValueError, match="cannot be resumed exactly"):
        fit(new_model(), tiny, Opaque(), Recipe(epochs=2, batch_size=128), device="cpu", checkpoint=ckpt)


def test_3_a_checkpoint_with_another_objective_state_is_refused(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    fit(new_model(), tiny, Counting(), TINY_RECIPE, device="cpu", checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["objective"]["seen"]
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"missing \['seen'\]"):
        fit(new_model(), tiny, Counting(), TINY_RECIPE, device="cpu", checkpoint=ckpt)


# --- 4. a NaN gradient on an epoch's last step is caught --------------------------------------

class NaNGradAtLastStep(losses.Objective):
    """A finite loss whose gradient is NaN on the run's last step (0 * d sqrt(x)/dx at 0)."""

    def forward(self, model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.step == self.total_steps - 1:
            w = next(model.parameters())
            loss = loss + 0 * torch.sqrt(w.flatten()[0] - w.flatten()[0].detach())
        return loss, logits, {}


def test_4_a_non_finite_update_on_the_last_step_is_caught_and_not_saved(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    with pytest.raises(TrainingDiverged, match="weights became NaN or infinite in epoch 1"):
        fit(new_model(), tiny, NaNGradAtLastStep(), TINY_RECIPE, device="cpu", checkpoint=ckpt)
    assert not ckpt.exists()


def test_4_non_finite_weights_are_never_cached(tmp_path):
    model = nn.Linear(2, 2)

    def train_fn(_partial):
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
        return train.History()

    with pytest.raises(TrainingDiverged, match="not finite"):
        train.load_or_train(tmp_path / "m.pt", {"m": 1}, model, train_fn)
    assert not (tmp_path / "m.pt").exists()


# --- 5. loading a cache file runs no code --------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(sys.argv[0]).parent / "never",))  # replaced below per test


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the hand-made pickle
def test_5_a_cache_file_that_would_run_code_is_not_unpickled(tmp_path):
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (target,))

    path = tmp_path / "ckpt" / "m.pt"
    path.parent.mkdir()
    with open(path, "wb") as f:
        pickle.dump({"meta": Evil()}, f)
    model = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="ignoring cached checkpoint"):
        out = train.load_or_train(path, {"m": 1}, model, lambda partial: train.History())
    assert not target.exists() and out.cached is False


# --- 6. a cache folder that cannot be written is named before any training --------------------

def test_6_an_unwritable_data_root_fails_before_training(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data root's checkpoints folder should go")
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before checking the folder"))
    with pytest.raises(PermissionError, match=r"not-a-folder.*MINIDISTILL_DATA"):
        pretrained("resnet8", tiny, recipe=TINY_RECIPE, profile="smoke", device="cpu", root=blocker / "sub")


# --- 7. a damaged partial checkpoint is set aside, training starts over ------------------------

@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the hand-made pickle
def test_7_a_damaged_partial_checkpoint_is_discarded_with_a_warning(tiny, data_dir):
    first = pretrained("resnet8", tiny, recipe=TINY_RECIPE, profile="smoke", device="cpu")
    partial = first.path.with_name(first.path.stem + ".partial.pt")
    first.path.unlink()
    partial.write_bytes(b"\x80\x04truncated pickle")
    with pytest.warns(UserWarning, match="cannot be read"):
        again = pretrained("resnet8", tiny, recipe=TINY_RECIPE, profile="smoke", device="cpu")
    assert not again.cached and again.path.exists()
    assert partial.with_name(partial.name + ".damaged").exists()


# --- 8. the digest covers the history and metadata --------------------------------------------

def test_8_an_edited_history_is_caught(tiny, data_dir):
    first = pretrained("resnet8", tiny, recipe=TINY_RECIPE, profile="smoke", device="cpu")
    state = torch.load(first.path, weights_only=True)
    state["history"]["records"][-1]["test_acc"] = 99.9
    torch.save(state, first.path)
    with pytest.warns(UserWarning, match="digest"):
        again = pretrained("resnet8", tiny, recipe=TINY_RECIPE, profile="smoke", device="cpu")
    assert not again.cached and again.history.final("test_acc") != 99.9


# --- 9. bad input: a clear error that names the argument -----------------------------------------

def _logits(n=4, k=3):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(0))


def _probs(n=4, k=3):
    return _logits(n, k).softmax(-1)


Y = torch.tensor([0, 1, 2, 0])
SHAPES = make_shapes(n_train=64, n_test=16)
TWO_CLASS = Dataset("two", SHAPES.x_train[:8], SHAPES.y_train[:8] % 2, SHAPES.x_test[:4], SHAPES.y_test[:4] % 2,
                    ("a", "b"), SHAPES.mean, SHAPES.std)
M8 = models.create_model("resnet8", 10)

BAD = [
    # distributed (one process here: the checks come before any collective)
    (distributed.init, ("mpi",), {}, ValueError, "backend"),
    (distributed.init, ("NCCL",), {}, ValueError, "backend"),
    (distributed.init, (2,), {}, ValueError, "backend"),
    (distributed.all_reduce_sum, (3.0,), {}, TypeError, "t must be a torch.Tensor"),
    (distributed.all_reduce_sum, ([1, 2],), {}, TypeError, "t must be a torch.Tensor"),
    (distributed.all_reduce_sum, (None,), {}, TypeError, "t must be a torch.Tensor"),
    (distributed.broadcast_buffers, (torch.zeros(2),), {}, TypeError, "module must be an nn.Module"),
    (distributed.broadcast_buffers, ("model",), {}, TypeError, "module must be an nn.Module"),
    (distributed.broadcast_buffers, (None,), {}, TypeError, "module must be an nn.Module"),
    # runtime
    (runtime.get_profile, ("huge",), {}, ValueError, "profile"),
    (runtime.get_profile, ("gpu",), {}, ValueError, "profile"),
    (runtime.get_profile, ("Smoke!",), {}, ValueError, "profile"),
    (runtime.seed_everything, (-1,), {}, ValueError, "seed"),
    (runtime.seed_everything, (1.5,), {}, ValueError, "seed"),
    (runtime.seed_everything, (True,), {}, ValueError, "seed"),
    (runtime.attempted, (3,), {}, TypeError, "exercise function"),
    (runtime.attempted, ("f",), {}, TypeError, "exercise function"),
    (runtime.attempted, (None,), {}, TypeError, "exercise function"),
    (runtime.get_profile("smoke").pick, (), {"gpu": 1}, ValueError, "unknown profile"),
    (runtime.get_profile("smoke").pick, (), {"course": 1}, KeyError, "smoke"),
    (runtime.get_profile("smoke").pick, (), {"huge": 1, "smoke": 2}, ValueError, "huge"),
    # data
    (data.load_dataset, ("mnist",), {}, ValueError, "dataset"),
    (data.load_dataset, ("CIFAR10",), {}, ValueError, "dataset"),
    (data.load_dataset, ("",), {}, ValueError, "dataset"),
    (make_shapes, (), {"n_train": -5}, ValueError, "n_train"),
    (make_shapes, (), {"size": 0}, ValueError, "size"),
    (make_shapes, (), {"n_test": -1}, ValueError, "n_test"),
    (train_val_split, (SHAPES, 0), {}, ValueError, "val_size"),
    (train_val_split, (SHAPES, 64), {}, ValueError, "val_size"),
    (train_val_split, (SHAPES, 1.5), {}, ValueError, "val_size"),
    (DeviceLoader, (SHAPES.x_train, SHAPES.y_train, 0), {"mean": SHAPES.mean, "std": SHAPES.std}, ValueError, "batch_size"),
    (DeviceLoader, (SHAPES.x_train, SHAPES.y_train[:3], 8), {"mean": SHAPES.mean, "std": SHAPES.std}, ValueError, "differ in length"),
    (DeviceLoader, (SHAPES.x_train.float(), SHAPES.y_train, 8), {"mean": SHAPES.mean, "std": SHAPES.std}, ValueError, "uint8"),
    (DeviceLoader, (SHAPES.x_train, SHAPES.y_train, 8), {"mean": SHAPES.mean, "std": SHAPES.std, "rank": 2,
                                                         "world_size": 2}, ValueError, "rank must be"),
    (DeviceLoader, (SHAPES.x_train, SHAPES.y_train, 9), {"mean": SHAPES.mean, "std": SHAPES.std, "train": True,
                                                         "world_size": 2}, ValueError, "world size divides"),
    (Dataset, ("d", SHAPES.x_train, SHAPES.y_train + 5, SHAPES.x_test, SHAPES.y_test, SHAPES.classes, SHAPES.mean,
                SHAPES.std), {}, ValueError, "y_train"),
    (Dataset, ("d", SHAPES.x_train.float(), SHAPES.y_train, SHAPES.x_test, SHAPES.y_test, SHAPES.classes,
                SHAPES.mean, SHAPES.std), {}, ValueError, "x_train"),
    (Dataset, ("d", SHAPES.x_train, SHAPES.y_train, SHAPES.x_test, SHAPES.y_test, ("a",), SHAPES.mean,
                SHAPES.std), {}, ValueError, "classes"),
    # models
    (models.create_model, ("resnet7", 10), {}, ValueError, "model"),
    (models.create_model, ("resnet8", 0), {}, ValueError, "num_classes"),
    (models.create_model, ("resnet8", 2.5), {}, ValueError, "num_classes"),
    (models.CifarResNet, (9, (16, 16, 32, 64), 10), {}, ValueError, "depth"),
    (models.WideResNet, (17, 2, 10), {}, ValueError, "depth"),
    (models.PlainCNN, (3, (8, 16, 32), 10), {}, ValueError, "depth"),
    (models.PlainCNN, (7, (8, 16), 10), {}, ValueError, "widths"),
    (models.PlainCNN, (7, (8, 16, 32), 1), {}, ValueError, "num_classes"),
    (models.CifarResNet, (2, (16, 16, 32, 64), 10), {}, ValueError, "depth"),
    (models.CifarResNet, (8, (16, 16, 32), 10), {}, ValueError, "widths"),
    (models.CifarResNet, (8, (16, 16, 32, 64), 0), {}, ValueError, "num_classes"),
    (models.WideResNet, (16, 0, 10), {}, ValueError, "widen"),
    (models.WideResNet, (16.0, 2, 10), {}, ValueError, "depth"),
    (models.feature_extractor, (M8, ["layer4"]), {}, ValueError, "layer4"),
    (models.feature_extractor, (M8, "layer2"), {}, ValueError, "names"),
    (models.feature_extractor, (M8, []), {}, ValueError, "names"),
    (models.feature_shapes, (M8, ["layer2"], (32, 32)), {}, ValueError, "image_shape"),
    (models.feature_shapes, (M8, ["layer2"], (3, 0, 32)), {}, ValueError, "image_shape"),
    (models.feature_shapes, (M8, ["nope"], (3, 32, 32)), {}, ValueError, "nope"),
    (models.count_parameters, ("resnet8",), {}, TypeError, "model"),
    (models.feature_names, (3,), {}, TypeError, "model"),
    (models.feature_names, ("resnet8",), {}, TypeError, "model"),
    (models.feature_names, (None,), {}, TypeError, "model"),
    (models.count_parameters, (None,), {}, TypeError, "model"),
    (models.count_parameters, ([torch.nn.Linear(2, 2)],), {}, TypeError, "model"),
    # losses
    (losses.soft_targets, (_logits(), 0.0), {}, ValueError, "temperature"),
    (losses.soft_targets, (_logits(), float("nan")), {}, ValueError, "temperature"),
    (losses.soft_targets, (_logits(), "4"), {}, ValueError, "temperature"),
    (losses.kd_loss, (_logits(), _logits(4, 5)), {}, ValueError, "teacher logits"),
    (losses.kd_loss, (torch.zeros(0, 3), torch.zeros(0, 3)), {}, ValueError, "empty batch"),
    (losses.kd_loss, (_logits(), _logits(), -1.0), {}, ValueError, "temperature"),
    (losses.distillation_loss, (_logits(), _logits(), Y), {"alpha": 1.5}, ValueError, "alpha"),
    (losses.distillation_loss, (_logits(), _logits(), Y[:2]), {}, ValueError, "targets"),
    (losses.distillation_loss, (_logits(), _logits(), Y.float()), {}, ValueError, "targets"),
    (losses.CrossEntropy, (1.0,), {}, ValueError, "label_smoothing"),
    (losses.CrossEntropy, (-0.1,), {}, ValueError, "label_smoothing"),
    (losses.CrossEntropy, ("0.1",), {}, ValueError, "label_smoothing"),
    (losses.Distillation, (M8,), {"temperature": 0}, ValueError, "temperature"),
    (losses.Distillation, (M8,), {"alpha": -0.1}, ValueError, "alpha"),
    (losses.Distillation, ("resnet8",), {}, TypeError, "teacher"),
    (losses.FeatureRegressor, ((4, 8), (6, 4, 4)), {}, ValueError, "student_shape"),
    (losses.FeatureRegressor, ((4, 8, 8), (6, 0, 4)), {}, ValueError, "teacher_shape"),
    (losses.FeatureRegressor, ((4, 8, 8), "x"), {}, ValueError, "teacher_shape"),
    (losses.FeatureDistillation, (M8,), {"layers": "layer2"}, ValueError, "layers"),
    (losses.FeatureDistillation, (M8,), {"regressor_relu": 1}, ValueError, "regressor_relu"),
    (losses.FeatureRegressor, ((4, 8, 8), (6, 4, 4)), {"relu": "no"}, ValueError, "relu"),
    (losses.FeatureDistillation, (M8,), {"weight": -1.0}, ValueError, "weight"),
    (losses.FeatureDistillation, (M8,), {"weight": float("inf")}, ValueError, "weight"),
    (losses.check_logits_pair, (_logits(), _logits(3, 3)), {}, ValueError, "student and teacher"),
    (losses.check_logits_pair, (_logits()[0], _logits()[0]), {}, ValueError, "student and teacher"),
    (losses.check_logits_pair, (_logits(), _logits(4, 2)), {}, ValueError, "student and teacher"),
    # train
    (Recipe, (), {"lr": float("inf")}, ValueError, "lr"),
    (Recipe, (), {"epochs": 1.5}, ValueError, "epochs"),
    (Recipe, (), {"momentum": float("nan")}, ValueError, "momentum"),
    (Recipe, (), {"weight_decay": -1}, ValueError, "weight_decay"),
    (Recipe, (), {"label_smoothing": 2}, ValueError, "label_smoothing"),
    (fit, (M8, SHAPES), {"check_every": 0}, ValueError, "check_every"),
    (fit, (M8, SHAPES), {"seed": -1}, ValueError, "seed"),
    (fit, (M8, SHAPES, None, Recipe(epochs=1, batch_size=128)), {}, ValueError, "batch_size"),
    (fit, (models.create_model("resnet8", 2), SHAPES, None, Recipe(epochs=1, batch_size=32)), {}, ValueError,
     "num_classes=10"),
    (fit, (M8, "shapes"), {}, TypeError, "data"),
    (fit, (M8, SHAPES, None, "recipe"), {}, TypeError, "recipe"),
    (fit, (M8, SHAPES), {"eval_splits": "test"}, ValueError, "eval_splits"),
    (fit, (M8, SHAPES), {"eval_every": 0}, ValueError, "eval_every"),
    (train.default_recipe, ("huge",), {}, ValueError, "profile"),
    (train.default_recipe, ("cpu",), {}, ValueError, "profile"),
    (train.default_recipe, ("gpu",), {}, ValueError, "profile"),
    (train.build_model, (3, 10), {}, TypeError, "model"),
    (train.build_model, (lambda: "x", 10), {}, TypeError, "nn.Module"),
    (train.build_model, ("resnet7", 10), {}, ValueError, "model"),
    (train.train_model, (3, SHAPES), {}, TypeError, "model"),
    (train.train_model, (lambda: "x", SHAPES), {}, TypeError, "nn.Module"),
    (train.train_model, ("resnet7", SHAPES), {}, ValueError, "model"),
    (train.predict, (M8, SHAPES, "validation"), {}, ValueError, "split"),
    (train.predict, (M8, SHAPES, "val"), {}, ValueError, "val"),
    (train.predict, (M8, SHAPES), {"batch_size": 0}, ValueError, "batch_size"),
    (train.evaluate, (M8, SHAPES, "dev"), {}, ValueError, "split"),
    (train.evaluate, (M8, SHAPES, "val"), {}, ValueError, "val"),
    (train.evaluate, (M8, SHAPES), {"batch_size": -1}, ValueError, "batch_size"),
    (train.pretrained, ("resnet7", SHAPES), {"profile": "smoke", "device": "cpu"}, ValueError, "model"),
    (train.pretrained, ("resnet8", SHAPES), {"profile": "smoke", "seed": -1}, ValueError, "seed"),
    (train.pretrained, ("resnet8", SHAPES), {"profile": "smoke", "recipe": {"epochs": 1}}, TypeError, "recipe"),
    (train.autocast_dtype, (torch.device("cpu"), "yes"), {}, ValueError, "amp"),
    (train.autocast_dtype, (torch.device("cpu"), 1.0), {}, ValueError, "amp"),
    (train.autocast_dtype, (torch.device("cpu"), None), {}, ValueError, "amp"),
    # metrics
    (metrics.linear_cka, (_logits().numpy(), _logits()), {}, TypeError, "x"),
    (metrics.linear_cka, (_logits(), _logits()[:3]), {}, ValueError, "same number of rows"),
    (metrics.linear_cka, (_logits(), torch.ones(4, 3)), {}, ValueError, "constant"),
    (metrics.linear_cka, (_logits()[:, :, None], _logits()), {}, ValueError, "flatten"),
    (metrics.accuracy, (_logits(), torch.tensor([0, 1, 2, 8])), {}, ValueError, "targets"),
    (metrics.accuracy, (torch.full((4, 3), float("nan")), Y), {}, ValueError, "finite"),
    (metrics.accuracy, (_logits()[0], Y), {}, ValueError, "scores"),
    (metrics.nll, (_probs(), torch.tensor([0, 1, 2, 3])), {}, ValueError, "targets"),
    (metrics.nll, (_logits(), Y), {}, ValueError, "probs"),
    (metrics.nll, (_probs(), Y), {"eps": 2.0}, ValueError, "eps"),
    (metrics.brier_score, (_probs(), Y[:2]), {}, ValueError, "targets"),
    (metrics.brier_score, (_logits(), Y), {}, ValueError, "probs"),
    (metrics.brier_score, (torch.zeros(0, 3), Y[:0]), {}, ValueError, "empty"),
    (metrics.expected_calibration_error, (_probs(), torch.tensor([0, 1, 2, 9])), {}, ValueError, "targets"),
    (metrics.expected_calibration_error, (torch.zeros(0, 3), Y[:0]), {}, ValueError, "empty"),
    (metrics.expected_calibration_error, (_probs(), Y), {"n_bins": 0}, ValueError, "n_bins"),
    (metrics.reliability_curve, (_probs(), Y), {"n_bins": -1}, ValueError, "n_bins"),
    (metrics.reliability_curve, (_logits(), Y), {}, ValueError, "probs"),
    (metrics.reliability_curve, (_probs(), Y.float()), {}, ValueError, "targets"),
    (metrics.fit_temperature, (_logits(), torch.tensor([0, 1, 2, 5])), {}, ValueError, "targets"),
    (metrics.fit_temperature, (_logits(), Y), {"bounds": (2.0, 1.0)}, ValueError, "bounds"),
    (metrics.fit_temperature, (torch.full((4, 3), float("-inf")), Y), {}, ValueError, "finite"),
    (metrics.pairwise_kl, (_probs(),), {}, ValueError, "member_probs"),
    (metrics.pairwise_kl, (torch.randn(2, 4, 3),), {}, ValueError, "member_probs"),
    (metrics.pairwise_kl, (_probs().unsqueeze(0),), {}, ValueError, "member_probs"),
    (metrics.diversity_by_confidence, (_probs(),), {}, ValueError, "member_probs"),
    (metrics.diversity_by_confidence, (torch.stack([_probs(), _probs()]),), {"n_bins": 0}, ValueError, "n_bins"),
    (metrics.diversity_by_confidence, (torch.randn(2, 4, 3),), {}, ValueError, "member_probs"),
    (metrics.deep_ensemble_equivalent, (1.0, []), {}, ValueError, "ensemble_nlls"),
    (metrics.deep_ensemble_equivalent, (float("nan"), [1.0, 0.9]), {}, ValueError, "nll_value"),
    (metrics.deep_ensemble_equivalent, (1.0, [1.0, float("inf")]), {}, ValueError, "ensemble_nlls"),
    (metrics.auroc, (torch.tensor([0.1, 0.2]), torch.tensor([1, 1])), {}, ValueError, "positives and negatives"),
    (metrics.auroc, (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1])), {}, ValueError, "scores"),
    (metrics.auroc, (torch.tensor([0.1, 0.2]), torch.tensor([0, 1, 1])), {}, ValueError, "labels"),
    # report
    (report.mean_std, ([],), {}, ValueError, "at least one value"),
    (report.mean_std, ([1.0, float("nan")],), {}, ValueError, "finite"),
    (report.mean_std, ("12",), {}, TypeError, "values"),
    (report.format_mean_std, ([],), {}, ValueError, "at least one value"),
    (report.format_mean_std, ([1.0],), {"digits": -1}, ValueError, "digits"),
    (report.format_mean_std, ([float("inf")],), {}, ValueError, "finite"),
    (report.results_table, ({"a": []},), {}, ValueError, "at least one value"),
    (report.results_table, ({"a": [1.0]},), {"reported": {"src": "x"}}, TypeError, "reported"),
    (report.results_table, ([1.0],), {}, TypeError, "rows"),
    (report.metrics_table, ({"a": [{"acc": 1.0}]}, "acc"), {}, TypeError, "columns"),
    (report.metrics_table, ({"a": {"acc": 1.0}}, ["acc"]), {}, TypeError, "rows"),
    (report.metrics_table, ({"a": [{"acc": 1.0}]}, {"acc": ("A", "x")}), {}, TypeError, "scale"),
    (report.show_results, ("a key", "x"), {}, ValueError, "key"),
    (report.show_results, ("k", 3), {}, TypeError, "table"),
    (report.show_results, (3, "x"), {}, ValueError, "key"),
    # plots
    (plots.plot_soft_targets, (_logits()[0], (1, 2), ("a", "b")), {}, ValueError, "class_names"),
    (plots.plot_soft_targets, (_logits()[0], (0,)), {}, ValueError, "temperature"),
    (plots.plot_soft_targets, (_logits(),), {}, ValueError, "logits"),
    (plots.plot_history, ({},), {}, ValueError, "histories"),
    (plots.plot_history, ("h",), {}, TypeError, "histories"),
    (plots.plot_history, (train.History([{"epoch": 1, "train_loss": 1.0}]),), {"metrics": ("nope",)}, KeyError, "nope"),
    (plots.plot_reliability, ({"a": (_logits(), Y)},), {}, ValueError, "probs"),
    (plots.plot_reliability, ({},), {}, ValueError, "results"),
    (plots.plot_reliability, ({"a": (_probs(), Y)},), {"n_bins": 0}, ValueError, "n_bins"),
    # fast teacher
    (fast_teacher.FastNet, (1,), {}, ValueError, "num_classes"),
    (fast_teacher.FastNet, (10, (64, 256)), {}, ValueError, "widths"),
    (fast_teacher.FastNet, (10, (64, 0, 256)), {}, ValueError, "widths"),
    (fast_teacher.train_fast_teacher, (SHAPES,), {"epochs": 0}, ValueError, "epochs"),
    (fast_teacher.train_fast_teacher, (SHAPES,), {"batch_size": 10_000}, ValueError, "batch_size"),
    (fast_teacher.train_fast_teacher, ("shapes",), {}, TypeError, "data"),
]


@pytest.mark.parametrize("fn, args, kwargs, error, match", BAD,
                         ids=[f"{getattr(b[0], '__qualname__', b[0])}-{i}" for i, b in enumerate(BAD)])
def test_9_bad_input_gets_a_clear_error_naming_the_argument(fn, args, kwargs, error, match, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDISTILL_DATA", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            fn(*args, **kwargs)


def test_9_every_public_function_of_the_core_has_three_bad_inputs():
    covered = {}
    for fn, *_ in BAD:
        name = getattr(fn, "__qualname__", str(fn))
        covered[name] = covered.get(name, 0) + 1
    modules = (runtime, data, models, losses, train, metrics, report, plots, fast_teacher, distributed)
    skip = {"PROFILES", "DATASETS", "MODELS", "Profile", "History", "Trained", "Run", "TrainingDiverged",
            "device_name", "get_device", "data_root", "show_progress", "banner", "Objective", "TeacherObjective",
            "upcast", "warn_if_probabilities", "check_temperature", "autocast", "score_loader", "load_or_train",
            "GLUE_PREFIX", "AlternatingFlipLoader", "Lookahead", "fast_teacher", "FeatureExtractor",
            "cpu_threads", "apply_threads", "SCHEDULES", "PAPER_RECIPE", "FAST_RECIPE", "is_distributed", "rank",
            "world_size", "is_main", "local_device", "barrier", "close", "broadcast_object"}
    missing = []
    for mod in modules:
        for name in mod.__all__:
            obj = getattr(mod, name)
            if name in skip or not callable(obj):
                continue
            qual = getattr(obj, "__qualname__", name)
            if covered.get(qual, 0) < 3:
                missing.append(f"{mod.__name__}.{name} ({covered.get(qual, 0)})")
    assert not missing, f"fewer than 3 bad-input cases: {missing}"
