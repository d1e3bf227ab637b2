"""minidistill.train: Recipe, History, fit (objectives, divergence, checkpoints and resuming),
predict / evaluate, and the cached pretrained() teachers.

Everything trains resnet8 on small shapes subsets (16x16 images) for one or a few epochs on the
CPU, so the file stays fast on two cores.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import losses as losses_mod
from minidistill import train as train_mod
from minidistill.models import create_model
from minidistill.runtime import seed_everything
from minidistill.data import make_shapes, train_val_split
from minidistill.losses import CrossEntropy, Distillation
from minidistill.metrics import accuracy
from minidistill.runtime import Profile, get_profile
from minidistill.train import (
    History,
    Recipe,
    Trained,
    TrainingDiverged,
    default_recipe,
    evaluate,
    fit,
    load_or_train,
    predict,
    pretrained,
)

from _core_helpers import assert_state_equal, new_model, state_equal

REPO_ROOT = Path(__file__).resolve().parents[1]
ONE_EPOCH = Recipe(epochs=1, batch_size=256)


def _records(history: History) -> list[dict]:
    """The per-epoch records without wall-clock time, which differs from run to run."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history.records]


@pytest.fixture(scope="module")
def fitted():
    """resnet8 fitted 2 epochs on a small shapes set with a validation split."""
    data = train_val_split(make_shapes(n_train=640, n_test=128), val_size=128)
    model = new_model()
    history = fit(model, data, recipe=Recipe(epochs=2, batch_size=128), device="cpu")
    return model, history, data


def test_all_names_exist():
    for name in train_mod.__all__:
        assert hasattr(train_mod, name), name


# --- Recipe and default_recipe --------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be an int"), (dict(batch_size=0), "batch_size must be an int"),
    (dict(epochs=1.5), "epochs must be an int"), (dict(epochs=True), "epochs"),
    (dict(lr=0.0), "lr must be a finite number > 0"), (dict(lr=-0.1), "lr must be"), (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"), (dict(momentum=float("nan")), "momentum"), (dict(momentum=-1), "momentum"),
    (dict(momentum=1.0), "momentum"), (dict(weight_decay=-1), "weight_decay"),
    (dict(weight_decay=float("inf")), "weight_decay"), (dict(label_smoothing=2), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"), (dict(nesterov="yes"), "nesterov"),
    (dict(schedule="linear"), "schedule must be"), (dict(optimizer="lbfgs"), "optimizer"),
    (dict(milestones=(20, 10)), "milestones must be"), (dict(milestones=(0,)), "milestones must be"),
    (dict(epochs=10, milestones=(10,)), "milestones must be"), (dict(milestones=(1.5,)), "milestones must be"),
    (dict(gamma=0.0), "gamma must be"), (dict(gamma=2.0), "gamma must be"),
    (dict(schedule="step"), "schedule='step' needs milestones"),
])
def test_recipe_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Recipe(**kwargs)


def test_recipe_is_frozen_and_replace_copies():
    r = Recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.epochs = 3
    r2 = r.replace(epochs=3)
    assert r2.epochs == 3 and r.epochs == 30 and r2.lr == r.lr
    with pytest.raises(ValueError):
        r.replace(schedule="bogus")


def test_recipe_key_is_stable_short_and_sensitive_to_every_field():
    base = Recipe()
    assert base.key() == Recipe().key()
    assert len(base.key()) == 10 and all(c in "0123456789abcdef" for c in base.key())
    changes = dict(epochs=31, batch_size=256, lr=0.21, momentum=0.8, nesterov=False, weight_decay=1e-4,
                   label_smoothing=0.1, schedule="cosine", optimizer="adam")
    step = dict(milestones=(10,), gamma=0.2)
    assert set(changes) | set(step) == {f.name for f in dataclasses.fields(Recipe)}
    keys = {base.replace(**{k: v}).key() for k, v in changes.items()}
    assert len(keys) == len(changes) and base.key() not in keys
    # milestones and gamma count only for the step schedule (so older recipes keep their keys)
    assert {base.replace(**{k: v}).key() for k, v in step.items()} == {base.key()}
    stepped = base.replace(schedule="step", milestones=(10, 20))
    assert len({stepped.key(), *(stepped.replace(**{k: v}).key() for k, v in step.items())}) == 3
    assert "milestones" not in repr(base) and "milestones=(10, 20)" in repr(stepped)
    assert Recipe(schedule="step", milestones=[5, 7]).milestones == (5, 7)   # a list (from JSON) is taken
    assert json.loads(json.dumps(stepped.fields())) == stepped.fields()       # what a JSON file gives back


def test_recipe_rejects_an_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam'"):
        Recipe(optimizer="rmsprop")


def test_fit_uses_adam_when_the_recipe_says_so(tiny, monkeypatch):
    made = []
    for name in ("SGD", "Adam"):
        cls = getattr(torch.optim, name)

        def spy(*args, _cls=cls, **kwargs):
            made.append((_cls.__name__, kwargs))
            return _cls(*args, **kwargs)

        monkeypatch.setattr(train_mod.torch.optim, name, spy)
    one = Recipe(epochs=1, batch_size=256, lr=1e-3, weight_decay=0.0, optimizer="adam")
    fit(new_model(), tiny, recipe=one)
    fit(new_model(), tiny, recipe=one.replace(optimizer="sgd", lr=0.05))
    assert [m[0] for m in made] == ["Adam", "SGD"]
    assert made[0][1] == {"lr": 1e-3, "weight_decay": 0.0}
    assert made[1][1]["momentum"] == 0.9 and made[1][1]["nesterov"] is True


def test_default_recipe_per_profile(monkeypatch):
    cpu = torch.device("cpu")
    smoke = default_recipe(Profile("smoke", cpu))
    assert (smoke.epochs, smoke.batch_size, smoke.lr) == (8, 128, 0.1)
    assert default_recipe("course") == Recipe()
    paper = default_recipe("paper")
    # RepDistiller's benchmark recipe: 240 epochs, batch 64, lr 0.05, x0.1 at 150/180/210, wd 5e-4
    assert (paper.epochs, paper.batch_size, paper.lr, paper.schedule, paper.nesterov) == (240, 64, 0.05, "step", False)
    assert (paper.milestones, paper.gamma, paper.weight_decay, paper.momentum) == ((150, 180, 210), 0.1, 5e-4, 0.9)
    monkeypatch.setenv("MINIDISTILL_PROFILE", "smoke")
    assert default_recipe() == smoke
    monkeypatch.setenv("MINIDISTILL_PROFILE", "paper")
    assert default_recipe() == paper
    assert default_recipe(get_profile("course", "cpu")) == Recipe()


def test_default_recipe_unknown_profile_raises():
    with pytest.raises(ValueError, match="unknown profile"):
        default_recipe("huge")


# --- History --------------------------------------------------------------------------------

def test_history_columns_and_final(fitted):
    _, history, _ = fitted
    assert len(history) == 2
    assert set(history.records[0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                                       "test_loss", "test_acc", "seconds"}
    assert history["epoch"] == [1, 2]
    assert history.final() == history["test_acc"][-1]
    assert history.final("val_loss") == history.records[-1]["val_loss"]
    assert all(0 <= a <= 100 for a in history["test_acc"] + history["train_acc"] + history["val_acc"])
    assert history["seconds"][1] >= history["seconds"][0] > 0  # cumulative training time
    meta = history.meta
    assert meta["model"] == "CifarResNet" and meta["objective"] == "CrossEntropy" and meta["data"] == "shapes"
    assert meta["recipe"] == Recipe(epochs=2, batch_size=128).fields()
    assert meta["seed"] == 0 and meta["amp"] == "off" and meta["device"].startswith("CPU")


def test_history_unknown_column_lists_the_columns(fitted):
    _, history, _ = fitted
    with pytest.raises(KeyError, match=r"no column 'acc'.*test_acc"):
        history["acc"]
    with pytest.raises(KeyError, match="no column"):
        History().final()


def test_history_round_trips_through_dict(fitted):
    _, history, _ = fitted
    again = History.from_dict(copy.deepcopy(history.to_dict()))
    assert again.records == history.records and again.meta == history.meta


def test_history_without_validation_split_has_no_val_columns(tiny):
    history = fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu")
    assert "val_acc" not in history.records[0] and "test_acc" in history.records[0]


def test_fit_scores_only_the_splits_asked_for(tiny):
    data = train_val_split(tiny, 64)
    both = fit(new_model(), data, recipe=ONE_EPOCH, device="cpu").records[0]
    test_only = fit(new_model(), data, recipe=ONE_EPOCH, device="cpu", eval_splits=("test",)).records[0]
    none = fit(new_model(), data, recipe=ONE_EPOCH, device="cpu", eval_splits=()).records[0]
    assert {"val_acc", "test_acc"} <= set(both)
    assert "test_acc" in test_only and "val_acc" not in test_only
    assert not any(k.startswith(("val_", "test_")) for k in none)


@pytest.mark.parametrize("bad", ["test", ("train",), ("val", "tset")])
def test_fit_rejects_unknown_eval_splits(tiny, bad):
    with pytest.raises(ValueError, match="eval_splits"):
        fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu", eval_splits=bad)


# --- predict / evaluate ---------------------------------------------------------------------

def test_predict_gives_logits_in_order(fitted):
    model, _, data = fitted
    model.train()
    logits = predict(model, data, "test")
    assert not model.training  # left in eval mode
    assert logits.shape == (128, 10) and logits.dtype == torch.float32
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = model((data.x_test.float() / 255 - mean) / std)
    assert torch.allclose(logits, direct, atol=1e-4)
    assert torch.allclose(predict(model, data, "test", batch_size=50), logits, atol=1e-5)
    assert predict(model, data, "val").shape == (128, 10)


def test_evaluate_is_consistent_with_predict(fitted):
    model, _, data = fitted
    for split in ("test", "val", "train"):
        logits = predict(model, data, split)
        y = data.split(split)[1]
        result = evaluate(model, data, split)
        assert set(result) == {"loss", "acc"}
        assert result["acc"] == pytest.approx(accuracy(logits, y), abs=1e-3)
        assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_history_test_columns_match_evaluate(fitted):
    model, history, data = fitted
    assert history.final("test_acc") == pytest.approx(evaluate(model, data)["acc"], abs=1e-3)
    assert history.final("val_loss") == pytest.approx(evaluate(model, data, "val")["loss"], rel=1e-5)


def test_predict_on_a_missing_split_raises(tiny):
    with pytest.raises(ValueError, match="train_val_split"):
        predict(new_model(), tiny, "val")


# --- fit ------------------------------------------------------------------------------------

def test_fit_learns_better_than_chance():
    data = make_shapes(n_train=2048, n_test=256)
    model = new_model()
    before = evaluate(model, data)["acc"]
    history = fit(model, data, recipe=Recipe(epochs=2, batch_size=32, lr=0.05, schedule="constant"), device="cpu")
    assert before < 20  # an untrained net is at chance (10 %)
    assert history.final("test_acc") >= 30
    assert history["train_loss"][-1] < history["train_loss"][0] < 2.5
    assert not model.training  # fit leaves the model in eval mode


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant", "step"])
def test_fit_schedules(tiny, schedule):
    lr = 0.05
    epochs, step = (3, dict(milestones=(1, 2), gamma=0.1)) if schedule == "step" else (2, {})
    history = fit(new_model(), tiny, recipe=Recipe(epochs=epochs, batch_size=128, lr=lr, schedule=schedule, **step),
                  device="cpu")
    lrs = history["lr"]
    if schedule == "step":   # the rate of each epoch's last step: x0.1 after epoch 1, again after epoch 2
        assert lrs == pytest.approx([lr, lr * 0.1, lr * 0.01], rel=1e-9)
    elif schedule == "constant":
        assert lrs == [lr, lr]
    elif schedule == "cosine":
        assert lr / 3 < lrs[0] < lr and lrs[1] < 0.05 * lr
    else:
        assert lr / 3 < lrs[0] < lr and lrs[1] < lrs[0]


def test_last_epoch_lr_of_onecycle_is_annealed(tiny):
    """One-cycle ends at max_lr / (25 * 1e4); the final record should show an annealed lr."""
    history = fit(new_model(), tiny, recipe=Recipe(epochs=2, batch_size=128, lr=0.05), device="cpu")
    assert history.final("lr") < 0.05 / 1000


def test_fit_onecycle_with_four_steps(tiny):
    history = fit(new_model(), tiny, recipe=Recipe(epochs=2, batch_size=256), device="cpu")
    assert len(history) == 2


def test_fit_is_reproducible_and_seed_changes_data_order(tiny):
    a, b, c = new_model(), new_model(), new_model()
    ha = fit(a, tiny, recipe=ONE_EPOCH, device="cpu", seed=1)
    hb = fit(b, tiny, recipe=ONE_EPOCH, device="cpu", seed=1)
    fit(c, tiny, recipe=ONE_EPOCH, device="cpu", seed=2)
    assert_state_equal(a, b)
    assert _records(ha) == _records(hb)
    assert not state_equal(a, c)


def test_fit_progress_bar_follows_argument_and_environment(tiny, capfd, monkeypatch):
    fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu", progress=True, description="my-teacher")
    assert "my-teacher" in capfd.readouterr().err
    fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu")  # MINIDISTILL_PROGRESS=0 (conftest)
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("MINIDISTILL_PROGRESS", "1")
    fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu", description="shown")
    assert "shown" in capfd.readouterr().err


def test_fit_closes_the_progress_bar_when_the_objective_raises(tiny, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k, disable=True)
            self.closed = False
            bars.append(self)

        def close(self):
            self.closed = True
            super().close()

    class Broken(nn.Module):
        def forward(self, model, x, y):
            raise RuntimeError("objective bug")

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    with pytest.raises(RuntimeError, match="objective bug"):
        fit(new_model(), tiny, Broken(), ONE_EPOCH, device="cpu", progress=True)
    assert len(bars) == 1 and bars[0].closed


class AdapterCE(nn.Module):
    """An objective with its own learnable parts: a linear adapter on the logits and a scale."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.adapter = nn.Linear(k, k)
        self.scale = nn.Parameter(torch.tensor(1.0))
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(k))
            self.adapter.bias.zero_()

    def forward(self, model, x, y):
        logits = self.adapter(model(x)) * self.scale
        return F.cross_entropy(logits, y), logits, {}


def test_objective_parameters_are_trained_and_checkpointed(tiny, tmp_path):
    objective = AdapterCE()
    ckpt = tmp_path / "run.pt"
    fit(new_model(), tiny, objective, recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)
    assert not torch.equal(objective.adapter.weight, torch.eye(10))
    assert objective.scale.item() != 1.0
    saved = torch.load(ckpt, weights_only=False)["objective"]
    assert torch.equal(saved["adapter.weight"], objective.adapter.weight)
    assert torch.equal(saved["scale"], objective.scale)
    # resuming a finished run restores the objective's learned state into a fresh objective
    fresh = AdapterCE()
    fit(new_model(seed=5), tiny, fresh, recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)
    assert torch.equal(fresh.adapter.weight, objective.adapter.weight)
    assert torch.equal(fresh.scale, objective.scale)


def test_distillation_keeps_the_teacher_frozen_and_in_eval_mode(tiny, tmp_path):
    teacher = new_model(seed=1).train()
    before = copy.deepcopy(teacher.state_dict())
    modes = []
    teacher.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    student = new_model(seed=2)
    student_before = copy.deepcopy(student.state_dict())
    ckpt = tmp_path / "kd.pt"
    history = fit(student, tiny, Distillation(teacher, temperature=4.0, alpha=0.9),
                  recipe=Recipe(epochs=1, batch_size=64), device="cpu", checkpoint=ckpt)
    assert len(modes) == 8 and not any(modes)  # 512 / 64 steps, every teacher call in eval mode
    assert not teacher.training
    assert_state_equal(teacher.state_dict(), before)  # weights and BatchNorm statistics untouched
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not state_equal(student.state_dict(), student_before)
    assert history.meta["objective"] == "Distillation"
    assert torch.load(ckpt, weights_only=False)["objective"] == {}  # the frozen teacher is not saved


class NaNAfter(nn.Module):
    """Cross-entropy that turns NaN from the ``start``-th call on (counting from 0)."""

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.start, self.calls = start, 0

    def forward(self, model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.start else loss), logits, {}


def test_nan_loss_raises_training_diverged(tiny):
    with pytest.raises(TrainingDiverged, match=r"the loss became nan in epoch 1.*Lower the learning rate"):
        fit(new_model(), tiny, NaNAfter(0), recipe=ONE_EPOCH, device="cpu")


def test_divergence_is_caught_within_check_every_steps(tiny):
    objective = NaNAfter(1)
    with pytest.raises(TrainingDiverged, match="by step 2"):
        fit(new_model(), tiny, objective, recipe=Recipe(epochs=1, batch_size=32), device="cpu", check_every=2)
    assert objective.calls == 2  # stopped right at the first check, not at the end of the epoch


def test_huge_learning_rate_raises_training_diverged(tiny):
    with pytest.raises(TrainingDiverged, match="became (nan|inf)"):
        fit(new_model(), tiny, recipe=Recipe(epochs=3, batch_size=256, lr=1e8, schedule="constant"), device="cpu")


def test_divergence_leaves_the_last_good_checkpoint(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    with pytest.raises(TrainingDiverged, match="still holds the last good epoch"):
        fit(new_model(), tiny, NaNAfter(2), recipe=Recipe(epochs=3, batch_size=256), device="cpu", checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_checkpoint_of_another_recipe_or_seed_refuses_to_load(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)
    for kwargs in (dict(recipe=ONE_EPOCH.replace(lr=0.1)), dict(recipe=ONE_EPOCH.replace(epochs=3)),
                   dict(recipe=ONE_EPOCH, seed=1)):
        with pytest.raises(ValueError, match=r"belongs to another run.*Delete it or choose another"):
            fit(new_model(), tiny, device="cpu", checkpoint=ckpt, **kwargs)


def test_checkpoint_of_another_objective_refuses_to_load(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)
    with pytest.raises(ValueError, match="belongs to another run"):
        fit(new_model(), tiny, Distillation(new_model(seed=1)), recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)


@pytest.mark.parametrize("other", ["architecture", "training_set"])
def test_checkpoint_of_another_model_or_data_refuses_to_load(tiny, tmp_path, other):
    ckpt = tmp_path / "run.pt"
    fit(new_model("resnet8"), tiny, recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)
    model, data = new_model("resnet8"), tiny
    if other == "architecture":
        model = new_model("resnet14")  # also a CifarResNet
    else:
        data = make_shapes(n_train=256, n_test=128)  # also 'shapes'
    with pytest.raises(ValueError, match="belongs to another run"):
        fit(model, data, recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)


# --- resuming -------------------------------------------------------------------------------

class StopAt(CrossEntropy):
    """Cross-entropy that raises KeyboardInterrupt at the ``stop_at``-th step (0-based), as a
    user pressing Ctrl-C would; ``stop_at=None`` never stops."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.stop_at, self.steps = stop_at, 0

    def forward(self, model, x, y):
        if self.steps == self.stop_at:
            raise KeyboardInterrupt
        self.steps += 1
        return super().forward(model, x, y)


def test_resume_after_interrupt_equals_uninterrupted_run(tiny, tmp_path):
    recipe = Recipe(epochs=3, batch_size=256)  # 2 steps per epoch
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(new_model(), tiny, StopAt(5), recipe=recipe, device="cpu", seed=4, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2  # killed in the 3rd epoch

    # resume into a model initialised differently: only the checkpoint can make it match
    resumed = new_model(seed=99)
    objective = StopAt()
    h_resumed = fit(resumed, tiny, objective, recipe=recipe, device="cpu", seed=4, checkpoint=ckpt)
    assert objective.steps == 2  # only the 3rd epoch was trained again

    reference = new_model()
    h_reference = fit(reference, tiny, StopAt(), recipe=recipe, device="cpu", seed=4)
    assert_state_equal(resumed, reference)
    assert _records(h_resumed) == _records(h_reference)


CHILD = """
import sys, torch
torch.set_num_threads(2)
from minidistill.data import make_shapes
from minidistill.models import create_model
from minidistill.runtime import seed_everything
from minidistill.train import Recipe, fit
seed_everything(0)
model = create_model("resnet8", 10)
data = make_shapes(n_train={n_train}, n_test={n_test})
fit(model, data, recipe=Recipe(epochs={epochs}, batch_size={batch_size}), seed={seed},
    device="cpu", checkpoint=sys.argv[1], progress=False)
print("finished", flush=True)
"""


def test_resume_after_sigkill_loses_no_progress(tiny, tmp_path):
    """Kill a training process with SIGKILL once its checkpoint holds >= 2 epochs, resume it
    here, and get exactly the weights and history of a run that was never interrupted."""
    config = dict(n_train=512, n_test=128, epochs=6, batch_size=256, seed=3)
    recipe = Recipe(epochs=config["epochs"], batch_size=config["batch_size"])
    ckpt = tmp_path / "killed.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               MINIDISTILL_PROGRESS="0")
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(**config), str(ckpt)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] >= 2:
                os.kill(child.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
    finally:
        if child.poll() is None and not killed:
            child.kill()  # timed out, or the test failed: never leave the child running
        out, err = child.communicate(timeout=60)
    assert killed, f"the checkpoint never reached 2 epochs (rc {child.returncode}):\n{out}\n{err}"
    assert child.returncode == -signal.SIGKILL, f"the child ended by itself (rc {child.returncode}):\n{out}\n{err}"
    assert "finished" not in out
    at_kill = torch.load(ckpt, weights_only=False)
    done = at_kill["epoch"]
    assert 2 <= done < recipe.epochs, "the kill must come before the run completed"
    assert len(at_kill["history"]["records"]) == done

    resumed = new_model(seed=99)  # other initial weights: only the checkpoint can make it match
    data = tiny  # the same set as the child's
    assert (len(data.x_train), len(data.x_test)) == (config["n_train"], config["n_test"])
    h_resumed = fit(resumed, data, recipe=recipe, seed=config["seed"], device="cpu", checkpoint=ckpt)
    # the epochs done before the kill come from the checkpoint (their timings prove it) ...
    assert h_resumed.records[:done] == at_kill["history"]["records"]
    assert torch.load(ckpt, weights_only=False)["epoch"] == recipe.epochs

    reference = new_model(seed=0)
    h_reference = fit(reference, data, recipe=recipe, seed=config["seed"], device="cpu")
    # ... and nothing was lost: same weights, same BatchNorm statistics, same history
    assert_state_equal(resumed, reference)
    assert _records(h_resumed) == _records(h_reference)


def test_finished_checkpoint_is_not_trained_again(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    trained = new_model()
    h1 = fit(trained, tiny, StopAt(), recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)
    again = new_model(seed=7)
    h2 = fit(again, tiny, StopAt(0), recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)  # StopAt(0): any step raises
    assert_state_equal(again, trained)
    assert h2.records == h1.records


# --- pretrained -----------------------------------------------------------------------------

def _pretrained(data, **kwargs):
    kwargs.setdefault("recipe", ONE_EPOCH)
    return pretrained("resnet8", data, profile="smoke", device="cpu", **kwargs)


def test_pretrained_trains_once_then_loads_from_cache(tiny, data_dir, monkeypatch):
    first = _pretrained(tiny)
    assert isinstance(first, Trained) and first.cached is False
    assert first.path.parent == data_dir / "checkpoints" and first.path.exists()
    assert first.path.name == f"resnet8-shapes512-{tiny.digest()[:8]}-smoke-s0-{ONE_EPOCH.key()}.pt"
    assert not list(first.path.parent.glob("*.partial.pt"))  # the resumable copy is cleaned up
    assert len(first.history) == 1 and not first.model.training

    monkeypatch.setattr(train_mod, "fit", lambda *a, **k: pytest.fail("retrained a valid cached model"))
    second = _pretrained(tiny)
    assert second.cached is True and second.path == first.path
    assert_state_equal(second.model, first.model)
    assert second.history.records == first.history.records
    assert not second.model.training
    assert evaluate(second.model, tiny) == evaluate(first.model, tiny)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_pretrained_corrupt_file_is_retrained_with_a_warning(tiny, damage):
    first = _pretrained(tiny)
    raw = first.path.read_bytes()
    first.path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"not a checkpoint" * 100)
    with pytest.warns(UserWarning, match=r"ignoring cached checkpoint .*retraining"):
        again = _pretrained(tiny)
    assert again.cached is False
    assert_state_equal(again.model, first.model)  # retrained with the same seed, not loaded
    assert _pretrained(tiny).cached is True  # and the rewritten file is good


def test_pretrained_tampered_weights_are_retrained(tiny):
    first = _pretrained(tiny)
    state = torch.load(first.path, weights_only=False)
    state["model"]["fc.bias"] = state["model"]["fc.bias"] + 1.0  # the stored digest no longer matches
    torch.save(state, first.path)
    with pytest.warns(UserWarning, match="digest"):
        again = _pretrained(tiny)
    assert again.cached is False
    assert torch.equal(again.model.fc.bias, first.model.fc.bias)


def test_pretrained_mismatched_metadata_is_retrained(tiny):
    first = _pretrained(tiny)
    state = torch.load(first.path, weights_only=False)
    state["meta"]["seed"] = 1
    torch.save(state, first.path)
    with pytest.warns(UserWarning, match="metadata"):
        assert _pretrained(tiny).cached is False


def test_pretrained_other_seed_or_recipe_uses_another_file(tiny):
    base = _pretrained(tiny)
    other_seed = _pretrained(tiny, seed=1)
    other_recipe = _pretrained(tiny, recipe=ONE_EPOCH.replace(lr=0.1))
    paths = {base.path, other_seed.path, other_recipe.path}
    assert len(paths) == 3 and all(p.exists() for p in paths)
    assert not other_seed.cached and not other_recipe.cached
    assert not state_equal(base.model, other_seed.model)
    assert _pretrained(tiny).cached  # the first file is still there and valid


def test_pretrained_by_dataset_name_loads_from_root(tiny, tmp_path, monkeypatch):
    calls = []

    def fake_load(name, root=None):
        calls.append((name, root))
        return tiny

    monkeypatch.setattr(train_mod, "load_dataset", fake_load)
    root = tmp_path / "elsewhere"
    result = pretrained("resnet8", "shapes", recipe=ONE_EPOCH, root=root, profile="smoke", device="cpu")
    assert calls == [("shapes", root)]
    assert result.path.parent == root / "checkpoints"


def test_pretrained_unknown_model_raises(tiny):
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        pretrained("resnet9", tiny, recipe=ONE_EPOCH, profile="smoke", device="cpu")


def test_load_or_train_caches_any_model(tmp_path):
    """The cache behind pretrained works for a model pretrained cannot build."""
    calls = []

    def train_fn(partial):
        calls.append(partial)
        with torch.no_grad():
            model.weight.fill_(0.5)
        return History([{"epoch": 1, "test_acc": 50.0}], {"note": "fake"})

    path = tmp_path / "custom.pt"
    model = nn.Linear(3, 2)
    first = load_or_train(path, {"kind": "custom", "v": 1}, model, train_fn)
    assert not first.cached and path.exists() and calls == [tmp_path / "custom.partial.pt"]
    model = nn.Linear(3, 2)  # a fresh model gets the cached weights
    second = load_or_train(path, {"kind": "custom", "v": 1}, model, train_fn)
    assert second.cached and len(calls) == 1 and torch.all(second.model.weight == 0.5)
    assert second.history.final() == 50.0 and not second.model.training
    with pytest.warns(UserWarning, match="metadata"):
        third = load_or_train(path, {"kind": "custom", "v": 2}, nn.Linear(3, 2), train_fn)
    assert not third.cached and len(calls) == 2


# --- the objective protocol, terms, positions, eval_every, train_model -----------------------

class Terms(losses_mod.Objective):
    """Cross-entropy that logs two terms and records the positions fit gives it; it stops the
    run (as Ctrl-C would) when epoch ``stop`` begins."""

    def __init__(self, stop: int | None = None) -> None:
        super().__init__()
        self.stop = stop
        self.seen: list[tuple[int, int, int, int]] = []
        self.batch_ce: list[tuple[float, int]] = []

    def forward(self, model, x, y):
        if self.epoch == self.stop:
            raise KeyboardInterrupt
        self.seen.append((self.epoch, self.step, self.steps_per_epoch, self.total_steps))
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        self.batch_ce.append((ce.item(), len(y)))
        return ce, logits, {"ce": ce.detach(), "twice": 2 * ce.detach()}


def test_fit_averages_terms_per_epoch_and_sets_positions(tiny):
    objective = Terms()
    h = fit(new_model(), tiny, objective, Recipe(epochs=2, batch_size=128), device="cpu")
    assert objective.seen == [(e, e * 4 + s, 4, 8) for e in range(2) for s in range(4)]
    first = objective.batch_ce[:4]
    mean = sum(v * n for v, n in first) / sum(n for _, n in first)
    assert h["train_ce"][0] == pytest.approx(mean, rel=1e-5)
    assert h["train_twice"][0] == pytest.approx(2 * mean, rel=1e-5)
    assert h["train_loss"] == pytest.approx(h["train_ce"], rel=1e-6)


def test_positions_are_restored_on_resume(tiny, tmp_path):
    ckpt, recipe = tmp_path / "run.pt", Recipe(epochs=2, batch_size=128)
    with pytest.raises(KeyboardInterrupt):
        fit(new_model(), tiny, Terms(stop=1), recipe, device="cpu", checkpoint=ckpt)
    objective = Terms()
    fit(new_model(), tiny, objective, recipe, device="cpu", checkpoint=ckpt)
    assert objective.seen == [(1, 4 + s, 4, 8) for s in range(4)]  # epoch 1, steps 4..7 of 8


def test_objective_without_logits_has_no_train_acc(tiny):
    class Feature(losses_mod.Objective):
        def forward(self, model, x, y):
            return model(x).pow(2).mean(), None, {}

    h = fit(new_model(), tiny, Feature(), ONE_EPOCH, device="cpu", eval_splits=())
    assert "train_acc" not in h.records[0] and "train_loss" in h.records[0]


def test_fit_rejects_a_function_objective_and_a_two_tuple(tiny):
    with pytest.raises(TypeError, match="nn.Module"):
        fit(new_model(), tiny, lambda model, x, y: (model(x).sum(), None, {}), ONE_EPOCH, device="cpu")

    class Old(nn.Module):
        def forward(self, model, x, y):
            logits = model(x)
            return F.cross_entropy(logits, y), logits

    with pytest.raises(TypeError, match=r"\(loss, logits or None, terms dict\), got a 2-tuple"):
        fit(new_model(), tiny, Old(), ONE_EPOCH, device="cpu")


def test_a_term_named_loss_is_refused(tiny):
    class Clash(losses_mod.Objective):
        def forward(self, model, x, y):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            return loss, logits, {"loss": loss.detach()}

    with pytest.raises(ValueError, match="'loss'"):
        fit(new_model(), tiny, Clash(), ONE_EPOCH, device="cpu")


@pytest.mark.parametrize("every, scored", [(1, [1, 2, 3]), (2, [2, 3]), (None, [3])])
def test_eval_every_scores_those_epochs_and_always_the_last(tiny, every, scored):
    h = fit(new_model(), tiny, recipe=Recipe(epochs=3, batch_size=256), device="cpu", eval_every=every)
    got = [r["epoch"] for r in h.records if not math.isnan(r["test_acc"])]
    assert got == scored
    assert not math.isnan(h.final("test_acc")) and not math.isnan(h.final("test_loss"))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_eval_every_and_check_every_reject_bad_values(tiny, bad):
    with pytest.raises(ValueError, match="eval_every"):
        fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu", eval_every=bad)
    with pytest.raises(ValueError, match="check_every"):
        fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu", check_every=bad)


def test_train_model_builds_seeded_models_by_name_or_function(tiny):
    run = train_mod.train_model("resnet8", tiny, ONE_EPOCH, seed=3, device="cpu")
    model, history = run                               # a Run unpacks like the old tuple
    assert model is run.model and history is run.history and len(history) == 1
    again = train_mod.train_model(lambda: create_model("resnet8", 10), tiny, ONE_EPOCH, seed=3, device="cpu")
    assert_state_equal(again.model.state_dict(), run.model.state_dict())
    with pytest.raises(TypeError, match="model"):
        train_mod.train_model(3, tiny, ONE_EPOCH)
    with pytest.raises(TypeError, match="nn.Module"):
        train_mod.train_model(lambda: "resnet8", tiny, ONE_EPOCH)


def test_autocast_dtype_choices():
    cpu = torch.device("cpu")
    assert train_mod.autocast_dtype(cpu, "auto") is None
    assert train_mod.autocast_dtype(cpu, True) == torch.bfloat16
    assert train_mod.autocast_dtype(cpu, False) is None
    with pytest.raises(ValueError, match="amp"):
        train_mod.autocast_dtype(cpu, "yes")


def test_checkpoint_mismatch_names_only_the_fields_that_differ(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    fit(new_model(), tiny, recipe=ONE_EPOCH, device="cpu", checkpoint=ckpt)
    with pytest.raises(ValueError) as err:
        fit(new_model(), tiny, recipe=ONE_EPOCH.replace(epochs=2), device="cpu", checkpoint=ckpt)
    message = str(err.value)
    assert "recipe.epochs: checkpoint 1 vs now 2" in message
    assert "momentum" not in message and "layer1" not in message and len(message) < 400


# --- the recipe reaches the optimiser, the schedule and the loss (spies) ----------------------

def test_recipe_reaches_optimizer_and_loss(tiny, monkeypatch):
    """A spy on the optimiser's and the loss's arguments: weight decay, momentum, Nesterov and
    label smoothing are the recipe's, not defaults."""
    made, smoothing = [], []
    real_sgd, real_ce = torch.optim.SGD, F.cross_entropy

    def spy_sgd(params, **kw):
        made.append(kw)
        return real_sgd(params, **kw)

    def spy_ce(*args, **kw):
        if args[0].requires_grad:                           # training steps, not the evaluations
            smoothing.append(kw.get("label_smoothing", 0.0))
        return real_ce(*args, **kw)

    monkeypatch.setattr(torch.optim, "SGD", spy_sgd)
    monkeypatch.setattr(losses_mod.F, "cross_entropy", spy_ce)
    for recipe in (Recipe(epochs=1, batch_size=256, weight_decay=1e-3, momentum=0.8, nesterov=False,
                          label_smoothing=0.1),
                   Recipe(epochs=1, batch_size=256, weight_decay=0.0, momentum=0.9, nesterov=True)):
        made.clear(), smoothing.clear()
        fit(new_model(), tiny, recipe=recipe, device="cpu")
        assert made[0]["weight_decay"] == recipe.weight_decay
        assert made[0]["momentum"] == recipe.momentum and made[0]["nesterov"] == recipe.nesterov
        assert smoothing and set(smoothing) == {recipe.label_smoothing}


def test_resume_restores_the_random_state(tiny, tmp_path):
    """A model with dropout draws from torch's global generator: a resumed run must continue
    from the saved generator state, whatever the process did meanwhile."""
    def net():
        seed_everything(0)
        return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 16 * 16, 10))

    recipe = Recipe(epochs=2, batch_size=256)
    full = net()
    fit(full, tiny, Terms(), recipe=recipe, device="cpu")
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(net(), tiny, Terms(stop=1), recipe, device="cpu", checkpoint=ckpt)
    resumed = net()
    torch.manual_seed(999)                                  # the process moved on meanwhile
    fit(resumed, tiny, Terms(), recipe=recipe, device="cpu", checkpoint=ckpt)
    assert_state_equal(resumed.state_dict(), full.state_dict())


def test_score_loader_equals_evaluate(fitted):
    from minidistill.data import DeviceLoader
    model, _, data = fitted
    loader = DeviceLoader.from_dataset(data, "test", 50, train=False, device="cpu", channels_last=False)
    got, want = train_mod.score_loader(model, loader), evaluate(model, data)
    assert got["acc"] == pytest.approx(want["acc"]) and got["loss"] == pytest.approx(want["loss"], rel=1e-5)


# --- Colab's T4 path: fp16 + GradScaler where bf16 is not native (no GPU needed) --------------

@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
@pytest.mark.parametrize("keyword", [True, False], ids=["torch>=2.5", "older-torch"])
def test_autocast_dtype_on_cuda_picks_bf16_only_with_native_support(monkeypatch, native, keyword):
    """A T4 (sm75) has no native bf16, but torch >= 2.5 reports bf16 as supported *with emulation*;
    ``autocast_dtype`` must ask without emulation, and fall back to the old signature (which
    reports native support only) where the keyword does not exist."""
    calls = []
    if keyword:
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            calls.append(including_emulation)
            return native or including_emulation      # emulated bf16 is "supported" everywhere
    else:
        def is_bf16_supported() -> bool:
            calls.append(None)
            return native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    want = torch.bfloat16 if native else torch.float16
    assert train_mod.autocast_dtype(cuda, "auto") == want
    assert train_mod.autocast_dtype(cuda, True) == want
    assert train_mod.autocast_dtype(cuda, False) is None
    assert calls and (all(c is False for c in calls) if keyword else all(c is None for c in calls))
