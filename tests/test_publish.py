"""The publish command: ordering, teacher groups, predictions and the budget (pure functions and
--plan), then a few real executions in the smoke profile: metadata, failures, the deadline."""
import json
import time
from pathlib import Path

import nbformat
import torch
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from minidistill import publish

KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _notebook(path, source, **meta):
    nb = new_notebook(cells=[new_code_cell(source)], metadata={"kernelspec": KERNEL})
    if meta:
        nb.metadata["minidistill"] = meta
    nbformat.write(nb, path)
    return path


def _order(metas):
    return [p.name for p in publish.publishing_order({Path(k): v for k, v in metas.items()})]


# --- pure functions ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [
    ("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-40GB", "A100"),
    ("Tesla T4", "T4"), ("NVIDIA L4", "L4"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("CPU (2 threads)", "CPU (2 threads)"), ("Some Accelerator", "Some Accelerator"),
])
def test_gpu_class(name, cls):
    assert publish.gpu_class(name) == cls


def test_order_tiers_timestamps_and_reading_order_ties():
    course = {"profile": "course"}
    metas = {
        "05_e.ipynb": {**course, "date": "2026-03-01T09:00:00"},
        "04_d.ipynb": {**course, "date": "2026-03-01"},            # a plain date is midnight: older
        "06_f.ipynb": {**course, "date": "2026-03-01T09:00:00"},   # tie with 05: reading order
        "03_c.ipynb": {"profile": "smoke", "date": "2020-01-01"},  # not course: tier 1
        "02_b.ipynb": {},                                          # no metadata: tier 1
        "01_a.ipynb": {**course, "date": "2026-02-01T23:59:59"},
    }
    assert _order(metas) == ["02_b.ipynb", "03_c.ipynb", "01_a.ipynb", "04_d.ipynb", "05_e.ipynb", "06_f.ipynb"]


def test_a_teacher_group_stays_together_trainer_first_placed_by_its_stalest_member():
    course = {"profile": "course", "teacher_group": "cifar"}
    metas = {
        "01_a.ipynb": {**course, "date": "2026-05-01T00:00:00"},
        "02_b.ipynb": {"profile": "course", "date": "2026-04-01T00:00:00"},
        "03_c.ipynb": {"profile": "course", "date": "2026-03-01T00:00:00"},
        "04_d.ipynb": {**course, "date": "2026-01-01T00:00:00"},  # makes the group the stalest unit
    }
    assert _order(metas) == ["01_a.ipynb", "04_d.ipynb", "03_c.ipynb", "02_b.ipynb"]
    metas["04_d.ipynb"] = {"profile": "smoke", "teacher_group": "cifar"}  # tier 1 pulls the group first
    metas["02_b.ipynb"] = {}
    assert _order(metas) == ["02_b.ipynb", "01_a.ipynb", "04_d.ipynb", "03_c.ipynb"]


def test_predictions_prefer_measured_runs_of_the_same_gpu_class():
    meta = {"estimate_s": 100, "teacher_s": 40, "course_runs": [
        {"gpu_class": "H200", "wall_s": 70, "warm": False}, {"gpu_class": "H100", "wall_s": 90, "warm": False},
        {"gpu_class": "H200", "wall_s": 30, "warm": True},  # the last H200 run, warm: 70 cold
    ]}
    assert publish.predict(meta, "H200") == (70.0, "measured on H200")
    assert publish.predict(meta, "H200", warm=True) == (30.0, "measured on H200, warm")
    assert publish.predict(meta, "H100", warm=True) == (50.0, "measured on H100, warm")
    assert publish.predict(meta, "T4") == (100.0, "estimate")
    assert publish.predict(meta, "T4", warm=True) == (60.0, "estimate, warm")
    assert publish.predict({}, "H200") == (None, "no estimate")


def test_plan_warms_a_group_skips_what_does_not_fit_and_goes_on():
    group = {"teacher_group": "t", "teacher_s": 50}
    metas = {Path("01_a.ipynb"): {**group, "estimate_s": 80},   # trains the teacher: 80
             Path("02_b.ipynb"): {**group, "estimate_s": 70},   # warm: 20
             Path("03_c.ipynb"): {"estimate_s": 500},           # does not fit
             Path("04_d.ipynb"): {},                            # no estimate
             Path("05_e.ipynb"): {"estimate_s": 90}}            # still fits after 03 is skipped
    recs = publish.plan(metas, 200, "H200")
    assert [(r["status"], r["predicted_s"], r["warm"]) for r in recs] == [
        ("fits", 80.0, False), ("fits", 20.0, True), ("skipped: does not fit", 500.0, False),
        ("skipped: no estimate", None, False), ("fits", 90.0, False)]
    assert recs[-1]["cumulative_s"] == 190.0
    recs = publish.plan(metas, 75, "H200")  # the trainer is skipped: its partner is predicted cold
    assert [(r["status"], r["predicted_s"], r["warm"]) for r in recs[:2]] == [
        ("skipped: does not fit", 80.0, False), ("fits", 70.0, False)]


def test_stamp_keeps_other_keys_and_the_last_five_course_runs():
    meta = {"estimate_s": 9, "estimate": "how", "teacher_s": 3, "teacher_group": "g", "profile": "smoke",
            "course_runs": [{"wall_s": i} for i in range(5)]}
    run = {"device": "NVIDIA H200", "gpu_class": "H200", "torch": "2", "wall_s": 7.0,
           "date": "2026-01-01T00:00:00", "warm": False}
    new = publish.stamp(meta, run, "course")
    assert {k: new[k] for k in ("estimate_s", "estimate", "teacher_s", "teacher_group")} == \
        {"estimate_s": 9, "estimate": "how", "teacher_s": 3, "teacher_group": "g"}
    assert new["profile"] == "course" and new["wall_s"] == 7.0
    assert [r["wall_s"] for r in new["course_runs"]] == [1, 2, 3, 4, 7.0] and new["course_runs"][-1] == run
    assert publish.stamp(meta, run, "smoke")["course_runs"] == meta["course_runs"]


# --- the command line, without executing ---------------------------------------------------------

def test_plan_runs_the_course_profile_on_a_cpu_and_executes_nothing(tmp_path, capsys):
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w')"
    a = _notebook(tmp_path / "01_a.ipynb", code, estimate_s=30, teacher_group="t", teacher_s=20)
    b = _notebook(tmp_path / "02_b.ipynb", code, estimate_s=25, teacher_group="t", teacher_s=20,
                  course_runs=[{"gpu_class": "T4", "wall_s": 40, "warm": False}])
    c = _notebook(tmp_path / "03_c.ipynb", code)
    before = [p.read_bytes() for p in (a, b, c)]
    report = tmp_path / "plan.json"
    assert publish.main(["--plan", "--budget", "60", "--profile", "course", "--device-class", "T4",
                         "--report", str(report), str(c), str(b), str(a)]) == 0
    out = capsys.readouterr().out
    assert "01_a.ipynb" in out.splitlines()[2] and "02_b.ipynb" in out.splitlines()[3]
    assert "measured on T4, warm" in out and "no estimate" in out and "Sum of all predictions: 50.0 s" in out
    assert [p.read_bytes() for p in (a, b, c)] == before and not marker.exists()
    rec = json.loads(report.read_text())
    assert rec["plan"] and rec["budget_s"] == 60 and rec["gpu_class"] == "T4"
    assert [r["status"] for r in rec["records"]] == ["fits", "fits", "skipped: no estimate"]


def test_bad_arguments_are_usage_errors(tmp_path, capsys):
    nb = _notebook(tmp_path / "a.ipynb", "1")
    for argv in (["--budget", "-5", str(nb)], ["--budget", "soon", str(nb)], ["--plan", str(nb)],
                 [str(tmp_path / "nope.ipynb"), "--profile", "smoke"]):
        with pytest.raises(SystemExit):
            publish.main(argv)
    assert "argument --budget: must be a number of seconds >= 0, got '-5'" in capsys.readouterr().err


def test_course_profile_refuses_to_publish_on_cpu(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", "1")
    with pytest.raises(SystemExit, match="needs a GPU"):
        publish.publish([nb], "course")
    with pytest.raises(SystemExit, match="needs a GPU"):
        publish.main(["--budget", "60", str(nb)])
    with pytest.raises(ValueError, match="profile"):
        publish.publish([nb], "huge")


# --- real executions (smoke profile, a kernel each) ----------------------------------------------

def test_publish_writes_outputs_and_metadata_keeping_other_keys(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", "import os\nfrom minidistill.runtime import device_name, get_profile\n"
                   "get_profile()\nprint('profile', os.environ['MINIDISTILL_PROFILE'])\nprint(device_name('cpu'))\n"
                   "import matplotlib\nprint(matplotlib.rcParams['figure.dpi'])",
                   estimate_s=5, estimate="a guess", teacher_s=0, teacher_group="g")
    report = tmp_path / "report.json"
    threads = torch.get_num_threads()
    assert publish.main([str(nb), "--profile", "smoke", "--report", str(report)]) == 0
    assert torch.get_num_threads() == threads          # publishing leaves this process's threads alone
    out = nbformat.read(nb, as_version=4)
    printed = "".join(o.get("text", "") for o in out.cells[0].outputs).strip().splitlines()  # streams may split
    assert printed[0] == "profile smoke"
    meta = out.metadata["minidistill"]
    assert meta["profile"] == "smoke" and meta["wall_s"] >= 0
    assert meta["device"] == printed[1]               # the stamp names the threads the kernel used
    assert float(printed[2]) == publish.FIGURE_DPI     # stored figures are drawn at the publishing resolution
    assert meta["warm"] is False and len(meta["date"]) == 19 and meta["date"][10] == "T"
    assert meta["estimate"] == "a guess" and meta["teacher_group"] == "g" and "course_runs" not in meta
    rec = json.loads(report.read_text())
    assert rec["budget_s"] is None and rec["records"][0]["status"] == "ok"
    assert rec["records"][0]["notebook"].endswith("a.ipynb") and rec["records"][0]["predicted_s"] == 5.0


def test_publish_reports_a_failing_notebook_and_leaves_it_untouched(tmp_path, capsys):
    nb = _notebook(tmp_path / "bad.ipynb", "raise ValueError('boom')")
    before = nb.read_bytes()
    assert publish.main([str(nb), "--profile", "smoke"]) == 1
    assert "failed: CellExecutionError" in capsys.readouterr().out
    assert nb.read_bytes() == before


def test_budget_skips_what_does_not_fit_runs_what_does_and_measures_time(tmp_path):
    long = _notebook(tmp_path / "01_long.ipynb", "1", estimate_s=1000)
    short = _notebook(tmp_path / "02_short.ipynb", "import time; time.sleep(2.5)", estimate_s=0.5)
    none = _notebook(tmp_path / "03_none.ipynb", "1")
    # 0.5 + 18 would fit in 20 s by predictions, but 02 really takes over 2.5 s: 04 no longer fits
    late = _notebook(tmp_path / "04_late.ipynb", "1", estimate_s=18)
    before = {p: p.read_bytes() for p in (long, none, late)}
    recs = publish.publish([late, none, short, long], "smoke", budget=20)
    assert [(Path(r["notebook"]).name, r["status"]) for r in recs] == [
        ("01_long.ipynb", "skipped: does not fit"), ("02_short.ipynb", "ok"),
        ("03_none.ipynb", "skipped: no estimate"), ("04_late.ipynb", "skipped: does not fit")]
    assert recs[1]["wall_s"] >= 2.5 and {p: p.read_bytes() for p in before} == before
    assert nbformat.read(short, as_version=4).metadata["minidistill"]["estimate_s"] == 0.5


def test_a_notebook_past_the_deadline_is_killed_with_its_kernel_and_left_unchanged(tmp_path):
    pid_file = tmp_path / "kernel.pid"
    nb = _notebook(tmp_path / "slow.ipynb",
                   f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)",
                   estimate_s=1)
    before = nb.read_bytes()
    t0 = time.perf_counter()
    recs = publish.publish([nb], "smoke", budget=6)
    assert recs[0]["status"] == "timeout" and time.perf_counter() - t0 < 15
    assert nb.read_bytes() == before
    psutil = pytest.importorskip("psutil")
    pid = int(pid_file.read_text())
    for _ in range(50):  # the kernel went with it (a zombie nobody reaped yet counts as gone)
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"kernel {pid} still alive")


def _png_b64(fig_or_image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    if hasattr(fig_or_image, "savefig"):
        fig_or_image.savefig(buf, format="png", dpi=80)
    else:
        fig_or_image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode() + "\n"


def _pixels(b64: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGBA"), dtype=float)


def test_shrink_figures_keeps_the_look_at_a_fraction_of_the_bytes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from minidistill.publish import shrink_figures

    fig, ax = plt.subplots(figsize=(5, 3))
    x = np.linspace(0, 6, 200)
    for k in range(4):
        ax.plot(x, np.sin(x + k), label=f"curve {k}")
    ax.legend(); ax.set_xlabel("x"); ax.set_title("four curves")
    plot = _png_b64(fig)
    plt.close(fig)
    clear = Image.new("RGBA", (20, 20), (255, 0, 0, 0))          # real transparency: left alone
    nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {
              "image/png": plot, "text/plain": "<Figure>"}}]},
                    {"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {
                        "image/png": _png_b64(clear)}}]}],
          "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {"m1": {"state": {
              "outputs": [{"output_type": "display_data", "data": {"image/png": plot}}]}}}}}}}
    before, after = shrink_figures(nb)
    small = nb["cells"][0]["outputs"][0]["data"]["image/png"]
    widget = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]["m1"]["state"]
    assert after < 0.7 * before and len(small) < 0.6 * len(plot)
    assert widget["outputs"][0]["data"]["image/png"] == small          # the widget's saved figure too
    a, b = _pixels(plot), _pixels(small)
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0          # same size, same look (mean error < 1/255)
    assert nb["cells"][0]["outputs"][0]["data"]["text/plain"] == "<Figure>"
    assert _pixels(nb["cells"][1]["outputs"][0]["data"]["image/png"])[..., 3].max() == 0   # still transparent
    assert shrink_figures(nb)[1] == after                                # a second pass changes nothing
