"""fit on two processes (torchrun, gloo, CPU) against fit in one process on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from minidistill import data, distributed
from minidistill.train import Recipe, fit

ROOT = Path(__file__).resolve().parents[1]
RECIPE = Recipe(epochs=2, batch_size=32, lr=0.05, schedule="constant")


def small_net() -> nn.Module:
    """No BatchNorm: SyncBatchNorm needs GPUs, and per-rank statistics would differ from one process's."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 10))


def tiny_data() -> data.Dataset:
    return data.make_shapes(n_train=128, n_test=40, size=16, seed=0)


WORKER = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
from minidistill import distributed, train
from test_distributed import RECIPE, small_net, tiny_data

assert not distributed.is_distributed()   # fit joins the process group itself
out = Path({out!r})
saves, real_save = [], train._save_atomic

def spy(obj, path):                     # record who writes, and keep a copy of the epoch-1 checkpoint
    saves.append(str(path))
    real_save(obj, path)
    if obj.get("epoch") == 1 and "ckpt" in str(path):
        real_save(obj, path.with_name("epoch1.pt"))

train._save_atomic = spy
torch.set_num_threads(1)
model = small_net()
history = train.fit(model, tiny_data(), recipe=RECIPE, seed=0, device="cpu", checkpoint=out / "ckpt" / "run.pt",
                    progress=False, check_every=1)
assert distributed.is_distributed() and distributed.world_size() == 2
dump, rank = Path({dump!r}), distributed.rank()
torch.save(model.state_dict(), dump / f"weights{{rank}}.pt")
cache = out / "cache" / "net.pt"       # a cached model: trained by both ranks together, saved by rank 0
made = [train.load_or_train(cache, {{"what": "test"}}, m, lambda partial, m=m: train.fit(
            m, tiny_data(), recipe=RECIPE, seed=0, device="cpu", checkpoint=partial, progress=False))
        for m in (small_net(), small_net())]
cached = [t.cached for t in made]
same = all(torch.equal(a, b) for a, b in zip(made[0].model.state_dict().values(), made[1].model.state_dict().values()))
(dump / f"rank{{rank}}.json").write_text(json.dumps({{"saves": saves, "history": history.to_dict(),
                                                     "cached": cached, "same": same}}))
distributed.close()
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch of two CPU processes (gloo), shared by the tests below."""
    out, dump = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("dump")
    script = out / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), root=str(ROOT), out=str(out), dump=str(dump)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIDISTILL_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(dump / f"weights{r}.pt", weights_only=True) for r in (0, 1)]
    return out, ranks, weights


def one_process(**kwargs):
    model = small_net()
    history = fit(model, tiny_data(), recipe=RECIPE, seed=0, device="cpu", progress=False, check_every=1, **kwargs)
    return model.state_dict(), history


def test_two_ranks_train_the_weights_of_one_process_on_the_same_global_batch(two_ranks):
    _, ranks, weights = two_ranks
    ref, history = one_process()
    for w in weights:   # 8 steps of SGD: equal to float tolerance (the gradient is averaged in another order)
        for k in ref:
            torch.testing.assert_close(w[k], ref[k], rtol=1e-5, atol=1e-6)
    # the recorded metrics are sums over both ranks: the same as one process's
    for r in ranks:
        for rec, one in zip(r["history"]["records"], history.records):
            for k in ("train_loss", "train_acc", "val_acc", "test_loss", "test_acc"):
                if k in one:
                    assert rec[k] == pytest.approx(one[k], rel=1e-4, abs=1e-4), k
        assert r["history"]["meta"]["world_size"] == 2


def test_the_global_batch_is_split_not_repeated():
    """The two ranks' slices of a global batch are disjoint and together are one process's batch."""
    ds = tiny_data()
    make = lambda r, w: data.DeviceLoader.from_dataset(ds, "train", 32, seed=3, rank=r, world_size=w,  # noqa: E731
                                                       channels_last=False)
    for (x0, y0), (x1, y1), (x, y) in zip(make(0, 2), make(1, 2), make(0, 1)):
        assert len(y0) == len(y1) == 16
        torch.testing.assert_close(torch.cat([x0, x1]), x)   # same images and the same crops and flips
        assert torch.equal(torch.cat([y0, y1]), y)


def test_only_rank_0_writes_files(two_ranks):
    out, ranks, _ = two_ranks
    assert all("ckpt" in p for p in ranks[0]["saves"][:RECIPE.epochs]) and ranks[1]["saves"] == []
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["epoch1.pt", "run.pt"]


def test_a_cached_model_is_trained_by_all_ranks_then_loaded_by_all(two_ranks):
    out, ranks, _ = two_ranks
    for r in ranks:   # first call: trained (together); second: every rank loads rank 0's file
        assert r["cached"] == [False, True] and r["same"]
    # rank 0 saved 2 epochs of the partial (then removed it) and the cache file; rank 1 nothing
    assert len(ranks[0]["saves"]) == 2 * RECIPE.epochs + 1 and ranks[1]["saves"] == []
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["net.pt"]


def test_a_two_rank_checkpoint_resumes_in_one_process(two_ranks, tmp_path):
    out, _, weights = two_ranks
    ckpt = tmp_path / "resume.pt"
    ckpt.write_bytes((out / "ckpt" / "epoch1.pt").read_bytes())
    resumed, history = one_process(checkpoint=ckpt)
    assert [r["epoch"] for r in history.records] == [1, 2]
    for k in resumed:
        torch.testing.assert_close(resumed[k], weights[0][k], rtol=1e-5, atol=1e-6)


def test_one_process_is_not_distributed():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.is_main() and not distributed.init()       # no torchrun: nothing to start
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
