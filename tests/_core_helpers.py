"""Helpers shared by the package-core tests (imported as ``from _core_helpers import ...``)."""
from __future__ import annotations

import torch

from minidistill.models import create_model
from minidistill.runtime import seed_everything


def new_model(name: str = "resnet8", num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model whose weights depend only on ``seed``."""
    seed_everything(seed)
    return create_model(name, num_classes)


def state_equal(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> bool:
    """Whether two modules (or state dicts) hold bit-identical tensors under the same names."""
    sa = a.state_dict() if isinstance(a, torch.nn.Module) else a
    sb = b.state_dict() if isinstance(b, torch.nn.Module) else b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def assert_state_equal(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    """Assert bit-identical state, naming the first tensor that differs."""
    sa = a.state_dict() if isinstance(a, torch.nn.Module) else a
    sb = b.state_dict() if isinstance(b, torch.nn.Module) else b
    assert sa.keys() == sb.keys(), f"different keys: {sorted(sa.keys() ^ sb.keys())}"
    for k in sa:
        x, y = sa[k].cpu(), sb[k].cpu()
        if not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else "shape"
            raise AssertionError(f"{k!r} differs (max abs difference {diff})")
