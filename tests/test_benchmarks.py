"""The throughput benchmark runs end to end (tiny CPU sizes) and writes its JSON."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kd_throughput_smoke_run(tmp_path):
    out = tmp_path / "kd.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kd_throughput.py"), "--dataset", "shapes",
           "--teacher", "resnet8", "--student", "resnet8", "--classic-steps", "3", "--workers", "0",
           "--epochs", "2", "--batch", "1024", "--compile", "no", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rec = json.loads(out.read_text())
    assert set(rec["img_per_s"]) == {"classic", "minidistill"}
    assert all(v > 0 for v in rec["img_per_s"].values())
    ratio = rec["img_per_s"]["minidistill"] / rec["img_per_s"]["classic"]
    assert abs(rec["ratio_to_classic"]["minidistill"] - ratio) <= 0.01 * ratio + 0.01


def test_time_to_accuracy_smoke_run(tmp_path):
    out = tmp_path / "tta.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--dataset", "shapes",
           "--n-train", "400", "--n-test", "100", "--seeds", "2", "--target", "15", "--fast-epochs", "2",
           "--fast-batch", "100", "--warmup-epochs", "0.5", "--resnet", "resnet8", "--resnet-epochs", "2",
           "--resnet-batch", "100", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rec = json.loads(out.read_text())
    assert {"device", "torch", "date", "dataset", "n_train", "fast_teacher", "resnet_teacher"} <= set(rec)
    fast, resnet = rec["fast_teacher"], rec["resnet_teacher"]
    assert {"seconds_to_target_mean", "seconds_to_target_std", "reached_target", "seconds"} <= set(fast)
    assert len(fast["seconds"]) == len(fast["reached_target"]) == 2 and all(s > 0 for s in fast["seconds"])
    assert rec["dataset"] == "shapes" and rec["n_train"] == 400
    assert resnet["model"] == "resnet8" and 0 < resnet["seconds_to_final_acc"] <= resnet["total_seconds"]


def test_course_estimates_are_stored_in_the_notebooks_and_fit_one_gpu_window():
    """Each chapter's metadata carries the estimate that benchmarks/estimate_course.py computes
    (run it with --write after changing a course configuration), and the budgeted plan fits all
    chapters, cold, into the 540 s of one GPU call."""
    import importlib.util

    from minidistill import publish

    spec = importlib.util.spec_from_file_location("estimate_course", ROOT / "benchmarks" / "estimate_course.py")
    est = importlib.util.module_from_spec(spec)
    sys.modules["estimate_course"] = est          # (dataclasses look their module up there)
    spec.loader.exec_module(est)
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(est.CHAPTERS) == [p.name for p in notebooks]
    metas = {p: publish.read_meta(p) for p in notebooks}
    for path, meta in metas.items():
        want = est.estimate(path.name)
        assert {k: meta.get(k) for k in want} == want, f"{path.name}: run benchmarks/estimate_course.py --write"
    # the model reproduces the measurement it was not fitted to within 5 %
    kd = 30 * est.CIFAR_TRAIN * (est.A_US + est.B_US * est.kd("resnet8x4", "resnet32x4")) * 1e-6
    assert abs(kd - est.MEASURED["kd resnet32x4 -> resnet8x4"]) < 0.05 * kd
    # every chapter fits one GPU call alone; chapters 7 on (written for the budget) take <= 75 s each
    assert all(m["estimate_s"] <= 540 for m in metas.values())
    assert all(m["estimate_s"] <= 75 for p, m in metas.items() if int(p.name[:2]) >= 7)
    if all(m.get("profile") != "course" for m in metas.values()):   # before any GPU has measured them
        plan = publish.plan(metas, 540, "H200")
        fits = [r for r in plan if r["status"] == "fits"]
        assert sum(r["predicted_s"] for r in fits) <= 540
        # the first call publishes the chapters in reading order until the next would not fit
        first_skip = next((i for i, r in enumerate(plan) if r["status"] != "fits"), len(plan))
        assert first_skip >= 5 and [Path(r["notebook"]).name for r in plan[:first_skip]] == \
            [p.name for p in notebooks[:first_skip]]


def test_cifar100_table_runs_end_to_end_and_resumes_run_by_run(tmp_path):
    """The table script on the smoke profile, with a fake CIFAR-100 .npz: one row, then a second seed."""
    import os

    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar100.npz", x_train=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(200) % 100, x_test=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(100) % 100)
    env = {**os.environ, "MINIDISTILL_PROFILE": "smoke", "MINIDISTILL_DATA": str(tmp_path), "MINIDISTILL_PROGRESS": "0"}
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cifar100_table.py"), "--recipe", "paper",
           "--rows", "wrn_40_2-wrn_16_2", "--out", str(out), "--seeds"]
    first = subprocess.run(cmd + ["0"], check=True, capture_output=True, text=True, timeout=300, env=env).stdout
    assert "teacher wrn_40_2" in first and "trained" in first and first.count("seed 0:") == 3
    results = json.loads((out / "cifar100_paper_smoke.json").read_text())
    row = results["rows"]["wrn_40_2-wrn_16_2"]
    assert set(row["runs"]) == {"student alone", "KD", "FitNet"}
    assert all(0 <= r["0"]["acc"] <= 100 for r in row["runs"].values()) and 0 <= row["teacher"]["acc"] <= 100
    # a second call trains only what is missing: the teacher comes from the cache, seed 0 is skipped
    second = subprocess.run(cmd + ["0", "1"], check=True, capture_output=True, text=True, timeout=300, env=env).stdout
    assert "from the cache" in second and "seed 0:" not in second and second.count("seed 1:") == 3
    results = json.loads((out / "cifar100_paper_smoke.json").read_text())
    assert all(set(r) == {"0", "1"} for r in results["rows"]["wrn_40_2-wrn_16_2"]["runs"].values())
    table = (out / "cifar100_paper_smoke.md").read_text()
    assert "| wrn_40_2 → wrn_16_2 |" in table and "75.61 | 73.26 | 74.92 | 73.58" in table and " ± " in table
    assert not list((tmp_path / "checkpoints" / "cifar100_table").iterdir())   # finished runs leave no partials


def test_cifar100_table_estimate_prints_every_row():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cifar100_table.py"), "--estimate",
                          "--recipe", "fast", "--seeds", "0"], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert all(row in out for row in ("resnet32x4-resnet8x4", "resnet56-resnet20", "wrn_40_2-wrn_16_2"))
    assert "estimate (not a measurement)" in out


def test_cifar100_table_under_torchrun_writes_once(tmp_path):
    """Two CPU processes (gloo): the same table, written by rank 0 only."""
    import os

    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar100.npz", x_train=rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(128) % 100, x_test=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(64) % 100)
    env = {**os.environ, "MINIDISTILL_PROFILE": "smoke", "MINIDISTILL_DATA": str(tmp_path), "MINIDISTILL_PROGRESS": "0",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "benchmarks" / "cifar100_table.py"), "--rows", "wrn_40_2-wrn_16_2", "--seeds", "0",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("seed 0:") == 3 and "2 process(es)" in done.stdout   # printed by rank 0 only
    results = json.loads((out / "cifar100_paper_smoke.json").read_text())
    assert results["world_size"] == 2 and set(results["rows"]["wrn_40_2-wrn_16_2"]["runs"]) == {
        "student alone", "KD", "FitNet"}
    assert sorted(p.name for p in out.iterdir()) == ["cifar100_paper_smoke.json", "cifar100_paper_smoke.md"]
