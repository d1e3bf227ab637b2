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
