"""The self-check of the page "Write your own method": it accepts correct logit-matching
objectives (any positive multiple of the mean squared error) and catches the classic slips."""
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import losses
from minidistill.exercises.custom import check_logit_matching


class Mean(losses.TeacherObjective):
    def forward(self, model, x, y):
        logits = model(x)
        loss = F.mse_loss(logits, self.teacher_forward(x))
        return loss, logits, {"mse": loss.detach()}


class HalfSum(losses.TeacherObjective):               # 1/2 * sum over classes, mean over batch
    def forward(self, model, x, y):
        logits = model(x)
        return 0.5 * (logits - self.teacher_forward(x)).pow(2).sum(1).mean(), logits, {}


class NotSquared(losses.TeacherObjective):
    def forward(self, model, x, y):
        logits = model(x)
        return (logits - self.teacher_forward(x)).abs().mean(), logits, {}


class TwoValues(losses.TeacherObjective):
    def forward(self, model, x, y):
        logits = model(x)
        return F.mse_loss(logits, self.teacher_forward(x)), logits


class PlainModule(losses.Objective):                   # holds the teacher as a plain submodule
    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, model, x, y):
        logits = model(x)
        return F.mse_loss(logits, self.teacher(x)), logits, {}


class Unsolved(losses.TeacherObjective):
    def forward(self, model, x, y):
        raise NotImplementedError


def test_correct_forms_pass(capsys):
    assert check_logit_matching(Mean)
    assert check_logit_matching(HalfSum)
    assert "✓" in capsys.readouterr().out


def test_classic_mistakes_fail(capsys):
    assert not check_logit_matching(NotSquared)
    assert not check_logit_matching(TwoValues)
    assert not check_logit_matching(PlainModule)
    out = capsys.readouterr().out
    assert "fixed multiple" in out and "(loss, logits, terms)" in out and "training mode" in out


def test_unsolved_prints_a_hint(capsys):
    assert not check_logit_matching(Unsolved)
    assert "not attempted" in capsys.readouterr().out
