"""Re-execute notebooks in place and keep their outputs, within a time budget: the command that
publishes the course.

    python -m minidistill.publish                        # every notebook, in order, course profile
    python -m minidistill.publish --budget 540           # stalest first, as many as fit in 540 s
    python -m minidistill.publish --plan --budget 540    # only print that plan (any machine)
    python -m minidistill.publish notebooks/01_kd_basics.ipynb --profile smoke

Each notebook runs top to bottom in a fresh kernel (working directory ``notebooks/``), driven by
a child process, with ``MINIDISTILL_PROFILE`` set and progress bars off. A notebook that finishes
is written back at once with its outputs and ``metadata.minidistill`` updated (profile, device,
gpu_class, torch, wall_s, warm, date as UTC ``YYYY-MM-DDTHH:MM:SS``; in the course profile also
``course_runs``, the last five measured runs), every other key kept. A notebook that fails or is
stopped stays byte-for-byte as it was.

With ``--budget SECONDS`` the stalest go first: notebooks without course outputs in reading (file
name) order, then the oldest course publish. Notebooks declaring the same ``teacher_group`` share
a cached teacher: they stay together in reading order (the first trains it), placed where their
stalest member would be. A notebook starts only if its prediction fits in what is left (time used
is measured), and it is killed, kernel included, when the budget runs out. The prediction is its
last measured course run on the same GPU class, else the chapter's cold ``estimate_s``, less
``teacher_s`` when its group's teacher was trained earlier in the call; with neither, it is skipped.

A table follows; ``--report FILE`` also writes the records as JSON. The course profile refuses to
execute without a GPU, so a CPU never publishes outputs that claim to be course-sized.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from .runtime import PROFILES, Profile, _cpu_name, cpu_threads, device_name, get_device

__all__ = ["DEFAULT_GPU_CLASS", "gpu_class", "read_meta", "publishing_order", "predict", "plan", "stamp",
           "shrink_figures", "publish", "main"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GPU_CLASS = "H200"  # predictions on a machine without a GPU are for the course's publishing GPU
KEEP_RUNS = 5  # measured course runs kept per notebook
#: the resolution of the figures stored in published notebooks (matplotlib's default is 100): at 80
#: the PNGs take about two thirds of the space, which keeps the repository (and what a GPU run must
#: carry) small; running a notebook yourself draws at your own setting
FIGURE_DPI = 80

# The child process that executes one notebook. It writes the executed notebook to `dst`, or a
# one-line error to `tmp/error.txt`; it also writes the kernel's process group to
# `tmp/kernel.pgid`, because the kernel runs in a session of its own and must be killed too.
_CHILD = r"""
import os, re, sys
import nbformat
from nbclient import NotebookClient

src, dst, tmp, cell_timeout = sys.argv[1:]
nb = nbformat.read(src, as_version=4)

def tell_kernel_group(**_):
    pgid = getattr(getattr(client.km, "provisioner", None), "pgid", None)
    if pgid:
        with open(tmp + "/kernel.pgid.part", "w") as f:
            f.write(str(pgid))
        os.replace(tmp + "/kernel.pgid.part", tmp + "/kernel.pgid")

client = NotebookClient(nb, timeout=int(cell_timeout), kernel_name="python3",
                        resources={"metadata": {"path": os.path.dirname(os.path.abspath(src))}},
                        on_notebook_start=tell_kernel_group)
try:
    client.execute()
except Exception as e:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    print(text[-3000:], file=sys.stderr)
    last = text.splitlines()[-1][:200] if text else ""
    with open(tmp + "/error.txt", "w") as f:
        f.write(f"{type(e).__name__}: {last}")
    sys.exit(1)
nbformat.write(nb, dst)
"""


def _smaller_png(b64: str) -> str:
    """The PNG (base64) re-encoded with a 256-colour palette, if that is smaller; else as it was."""
    import base64
    import io

    from PIL import Image

    raw = base64.b64decode(b64)
    image = Image.open(io.BytesIO(raw))
    if image.mode == "P":   # already a palette image (shrunk before)
        return b64
    if image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255:
        return b64          # real transparency: a palette would lose it
    out = io.BytesIO()
    image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                  dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
    small = base64.b64encode(out.getvalue()).decode()
    return small if len(small) < len(b64) else b64


def shrink_figures(nb: Any) -> tuple[int, int]:
    """Re-encode every stored PNG of a notebook (cell outputs and the widgets' saved outputs) with a
    256-colour palette where that is smaller: figures keep their size and look (matplotlib's plots
    use few colours), at about a third of the bytes, which keeps the repository and what a GPU run
    must carry small. Returns the PNG bytes (base64) before and after."""
    outputs = [o for cell in nb.get("cells", []) for o in cell.get("outputs", [])]
    state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    for model in state.get("state", {}).values():
        outputs += model.get("state", {}).get("outputs", []) or []
    before = after = 0
    for out in outputs:
        data = out.get("data", {}) if isinstance(out, dict) else {}
        png = data.get("image/png")
        if isinstance(png, list):
            png = "".join(png)
        if isinstance(png, str):
            data["image/png"] = _smaller_png(png.replace("\n", ""))
            before, after = before + len(png), after + len(data["image/png"])
    return before, after


def gpu_class(name: str) -> str:
    """A short class for a device name: ``'NVIDIA H100 80GB HBM3'`` -> ``'H100'``, ``'Tesla T4'``
    -> ``'T4'``, ``'NVIDIA GeForce RTX 4090'`` -> ``'RTX 4090'``; other names are kept whole."""
    name = name.strip()
    short = re.sub(r"^(NVIDIA\s+)?(Tesla\s+|GeForce\s+)?", "", name)
    match = re.match(r"(RTX \w+|[A-Z]+\d+[A-Za-z]?)(?=$|[\s-])", short)
    return match.group(1) if match else name


def _when(text: Any) -> dt.datetime:
    """A stored date or datetime as naive UTC; a plain date is midnight; missing: the distant past."""
    try:
        when = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return dt.datetime.min
    return when.astimezone(dt.timezone.utc).replace(tzinfo=None) if when.tzinfo else when


def read_meta(path: Path) -> dict:
    """A notebook's ``metadata.minidistill`` (empty if it has none)."""
    return json.loads(Path(path).read_text()).get("metadata", {}).get("minidistill") or {}


def _group(path: Path, meta: Mapping) -> tuple[str, str]:
    """Notebooks sharing a teacher: its ``teacher_group``, else the notebook alone."""
    return ("group", meta["teacher_group"]) if meta.get("teacher_group") else ("notebook", str(path))


def publishing_order(metas: Mapping[Path, Mapping]) -> list[Path]:
    """The notebooks of ``metas`` (path -> ``metadata.minidistill``), stalest first.

    Not course outputs first, in reading order (file name order); then course outputs, the
    oldest course publish first, ties in reading order. Each teacher group is kept together in
    reading order and placed where its stalest member would be.
    """
    reading = sorted(metas, key=lambda p: (Path(p).name, str(p)))

    def staleness(path: Path) -> tuple:
        course = metas[path].get("profile") == "course"
        return course, _when(metas[path].get("date")) if course else dt.datetime.min, reading.index(path)

    units: dict[tuple[str, str], list[Path]] = {}
    for path in reading:
        units.setdefault(_group(path, metas[path]), []).append(path)
    return [p for unit in sorted(units.values(), key=lambda u: min(map(staleness, u))) for p in unit]


def predict(meta: Mapping, gpu: str, warm: bool = False) -> tuple[Optional[float], str]:
    """Predicted wall time (s) of a notebook on a GPU of class ``gpu``, and where it comes from.

    The last measured course run on that class, if any (a run of the other warmness adjusted by
    ``teacher_s``), else the cold ``estimate_s``; ``warm`` takes ``teacher_s`` off.
    ``(None, 'no estimate')`` when there is neither.
    """
    teacher = float(meta.get("teacher_s") or 0)
    runs = [r for r in meta.get("course_runs") or [] if r.get("gpu_class") == gpu and r.get("wall_s") is not None]
    if runs:
        cold, source = float(runs[-1]["wall_s"]) + (teacher if runs[-1].get("warm") else 0.0), f"measured on {gpu}"
    elif meta.get("estimate_s") is not None:
        cold, source = float(meta["estimate_s"]), "estimate"
    else:
        return None, "no estimate"
    if warm:
        return round(max(cold - teacher, 0.0), 1), source + ", warm"
    return round(max(cold, 0.0), 1), source


_Runner = Callable[[Path, Optional[float], dict], dict]


def _walk(order: list[Path], metas: Mapping[Path, Mapping], budget: Optional[float], gpu: str,
          run: _Runner, **common: Any) -> list[dict]:
    """Go through ``order``: predict each notebook, skip what has no prediction or does not fit in
    what is left of ``budget`` (no budget: run everything), else ``run(path, seconds_left, record)``,
    which returns the record's status and wall_s. Only a notebook that ran ok warms its group."""
    used, trained, records = 0.0, set(), []
    for path in order:
        meta = metas[path]
        warm = _group(path, meta) in trained
        predicted, source = predict(meta, gpu, warm)
        rec = {"notebook": str(path), "group": meta.get("teacher_group"), "predicted_s": predicted,
               "source": source, "warm": warm, **common, "wall_s": None}
        left = None if budget is None else budget - used
        if left is not None and predicted is None:
            rec["status"] = "skipped: no estimate"
        elif left is not None and predicted > left:
            rec["status"] = "skipped: does not fit"
        else:
            rec.update(run(path, left, rec))
            used += rec["wall_s"]
            rec["cumulative_s"] = round(used, 1)
            if rec["status"] in ("ok", "fits"):
                trained.add(_group(path, meta))
        records.append(rec)
    return records


def plan(metas: Mapping[Path, Mapping], budget: float, gpu: str) -> list[dict]:
    """What ``--budget`` would do if every prediction held: the records of :func:`publish`, in
    order, with status ``fits`` or ``skipped: ...``. Executes nothing."""
    return _walk(publishing_order(metas), metas, budget, gpu,
                 lambda path, left, rec: {"status": "fits", "wall_s": rec["predicted_s"]})


def stamp(meta: Mapping, run: Mapping, profile: str) -> dict:
    """``metadata.minidistill`` after a finished run: ``run`` (device, gpu_class, torch, wall_s,
    date, warm) and the profile written over it, every other key kept; a course run is also
    appended to ``course_runs`` (the last five kept)."""
    new = {**meta, "profile": profile, **run}
    if profile == "course":
        new["course_runs"] = [*(meta.get("course_runs") or []), dict(run)][-KEEP_RUNS:]
    return new


def _kill(child: subprocess.Popen, pgid_file: Path) -> None:
    """Kill the child's process group and its kernel's (it has a session of its own)."""
    text = pgid_file.read_text() if pgid_file.exists() else ""
    for group in [child.pid] + ([int(text)] if text.isdigit() and int(text) > 1 else []):
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    child.wait()


def _execute(path: Path, profile: str, cell_timeout: int, deadline_s: Optional[float]) -> tuple[str, Any]:
    """Execute one notebook in a child process: ``('ok', executed notebook)``, else a status
    (``failed: ...`` or ``timeout``) and None. Past ``deadline_s`` the child and kernel are killed."""
    import nbformat

    tmp = Path(tempfile.mkdtemp(prefix="minidistill-publish-"))
    (tmp / "matplotlibrc").write_text(f"figure.dpi: {FIGURE_DPI}\n")
    env = {**os.environ, "MINIDISTILL_PROFILE": profile, "MINIDISTILL_PROGRESS": "0",
           "PYTHONWARNINGS": "ignore", "JUPYTER_RUNTIME_DIR": str(tmp), "MATPLOTLIBRC": str(tmp / "matplotlibrc")}
    try:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(tmp / "out.ipynb"), str(tmp),
                                  str(cell_timeout)], env=env, start_new_session=True)
        try:
            rc = child.wait(timeout=None if deadline_s is None else max(deadline_s, 0.0))
        except BaseException as e:  # the deadline passed (or we were interrupted): stop it all
            _kill(child, tmp / "kernel.pgid")
            if isinstance(e, subprocess.TimeoutExpired):
                return "timeout", None
            raise
        if rc != 0:
            error = tmp / "error.txt"
            return f"failed: {error.read_text() if error.exists() else f'exit status {rc}'}", None
        return "ok", nbformat.read(tmp / "out.ipynb", as_version=4)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_class(device: torch.device) -> str:
    """The class predictions are for by default: the visible GPU's, else ``DEFAULT_GPU_CLASS``."""
    return gpu_class(device_name(device)) if device.type == "cuda" else DEFAULT_GPU_CLASS


def publish(notebooks: list[Path], profile: str = "course", timeout: int = 1800, budget: Optional[float] = None,
            device_class: Optional[str] = None) -> list[dict]:
    """Execute notebooks in place under ``profile``; return one record per notebook.

    Without ``budget`` all run, in the order given. With ``budget`` (seconds) they run stalest
    first, each only if its prediction fits in what is left, and each is killed when the budget is
    spent. ``device_class`` is the GPU class predictions are for (default: the visible GPU's, else
    ``DEFAULT_GPU_CLASS``); ``timeout`` is the limit per cell.
    """
    import nbformat

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    device = get_device()
    if profile != "smoke" and device.type == "cpu":
        raise SystemExit(f"the {profile} profile needs a GPU and none is visible; use --profile smoke on a CPU")
    name, gpu = device_name(device), device_class or _default_class(device)
    kernel_threads = cpu_threads(Profile(profile, device)) if device.type == "cpu" else None
    if kernel_threads is not None:   # the stamp names the threads the notebooks' kernels compute with
        name = _cpu_name(kernel_threads)
    metas = {Path(p): read_meta(p) for p in notebooks}
    order = [Path(p) for p in notebooks] if budget is None else publishing_order(metas)

    def run(path: Path, left: Optional[float], rec: dict) -> dict:
        t0 = time.perf_counter()
        status, nb = _execute(path, profile, timeout, left)
        wall = round(time.perf_counter() - t0, 1)
        if nb is not None:  # write it at once, atomically, so that a kill later keeps it
            done = {"device": name, "gpu_class": gpu_class(name), "torch": torch.__version__, "wall_s": wall,
                    "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "warm": rec["warm"]}
            nb.metadata["minidistill"] = stamp(nb.metadata.get("minidistill", {}), done, profile)
            shrink_figures(nb)
            part = path.with_name(path.name + ".part")
            nbformat.write(nb, part)
            os.replace(part, path)
        print(f"{path.name}: {status} in {wall:.1f} s", flush=True)
        return {"status": status, "wall_s": wall}

    return _walk(order, metas, budget, gpu, run, device=name, profile=profile)


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds, not negative."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _fmt(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def _table(records: list[dict]) -> str:
    lines = ["| notebook | profile | device | predicted (s) | wall time (s) | warm | status |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {Path(r['notebook']).name} | {r['profile']} | {r['device']} | {_fmt(r['predicted_s'])} | "
              f"{_fmt(r['wall_s'])} | {'yes' if r['warm'] else 'no'} | {r['status']} |" for r in records]
    return "\n".join(lines)


def _plan_table(records: list[dict], budget: float, gpu: str) -> str:
    lines = [f"Plan for a budget of {budget:.0f} s, predictions for {gpu}:",
             f"{'#':>2}  {'notebook':<26} {'group':<14} {'predicted':>9}  {'from':<24} {'cumulative':>10}  fits"]
    for i, r in enumerate(records, 1):
        fits = "yes" if r["status"] == "fits" else "no: " + r["status"].split(": ", 1)[1]
        lines.append(f"{i:>2}  {Path(r['notebook']).name:<26} {r['group'] or '-':<14} {_fmt(r['predicted_s']):>9}  "
                     f"{r['source']:<24} {_fmt(r.get('cumulative_s')):>10}  {fits}")
    known = [r["predicted_s"] for r in records if r["predicted_s"] is not None]
    lines.append(f"Sum of all predictions: {sum(known):.1f} s ({len(known)} of {len(records)} notebooks).")
    if len(known) < len(records):
        lines.append(f"{len(records) - len(known)} notebook(s) have no estimate (no measured course run on {gpu}, "
                     "no metadata.minidistill.estimate_s) and are skipped under a budget.")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidistill.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)")
    parser.add_argument("--profile", default="course", choices=PROFILES)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--budget", type=_seconds, metavar="SECONDS",
                        help="run stalest first, only what fits, and stop everything after SECONDS")
    parser.add_argument("--plan", action="store_true", help="print the order and predictions, execute nothing")
    parser.add_argument("--device-class", metavar="NAME",
                        help=f"GPU class to predict for (default: the visible GPU's, else {DEFAULT_GPU_CLASS})")
    parser.add_argument("--report", type=Path, help="also write the records as JSON here")
    parser.add_argument("--shrink", action="store_true",
                        help="only re-encode the stored figures of the notebooks with a palette (executes nothing)")
    args = parser.parse_args(argv)
    if args.plan and args.budget is None:
        parser.error("--plan needs --budget SECONDS")
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    missing = [str(p) for p in notebooks if not p.exists()]
    if missing:
        parser.error(f"no such notebook(s): {missing}")
    if args.shrink:
        import nbformat

        for path in notebooks:
            nb = nbformat.read(path, as_version=4)
            before, after = shrink_figures(nb)
            if after < before:
                nbformat.write(nb, path)
            print(f"{path.name}: figures {before / 1e3:.0f} kB -> {after / 1e3:.0f} kB")
        return 0
    gpu = args.device_class or _default_class(get_device())
    if args.plan:
        records = plan({p: read_meta(p) for p in notebooks}, args.budget, gpu)
        print(_plan_table(records, args.budget, gpu))
    else:
        records = publish(notebooks, args.profile, args.timeout, args.budget, gpu)
    used = round(sum(r["wall_s"] or 0 for r in records), 1)
    if not args.plan:
        print("\n" + _table(records))
        print(f"\nUsed {used} s" + ("" if args.budget is None else f" of a budget of {args.budget:.0f} s") + ".")
    if args.report:
        report = {"profile": args.profile, "plan": args.plan, "budget_s": args.budget, "used_s": used,
                  "gpu_class": gpu, "records": records}
        args.report.write_text(json.dumps(report, indent=2))
    return 0 if all(r["status"] in ("ok", "fits") or r["status"].startswith("skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
