"""Re-execute notebooks in place and keep their outputs: the command that publishes the course.

    python -m minidistill.publish                      # every notebook, course profile
    python -m minidistill.publish notebooks/01_kd_basics.ipynb --profile smoke

Each notebook runs top to bottom in a fresh kernel (working directory ``notebooks/``) with
``MINIDISTILL_PROFILE`` set and progress bars off, and is written back with its outputs and
a ``minidistill`` metadata entry (profile, device, torch, wall time, date). A table of wall
times follows; ``--report FILE`` also writes it as JSON. The course profile refuses to run
without a GPU, so a CPU can never publish outputs that claim to be course-sized.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from .runtime import PROFILES, device_name, get_device

__all__ = ["publish", "main"]

ROOT = Path(__file__).resolve().parent.parent


def publish(notebooks: list[Path], profile: str = "course", timeout: int = 1800) -> list[dict]:
    """Execute each notebook in place under ``profile``; return one record per notebook."""
    import nbformat
    from nbclient import NotebookClient

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    device = get_device()
    if profile != "smoke" and device.type == "cpu":
        raise SystemExit(f"the {profile} profile needs a GPU and none is visible; use --profile smoke on a CPU")
    os.environ.update(MINIDISTILL_PROFILE=profile, MINIDISTILL_PROGRESS="0", PYTHONWARNINGS="ignore")
    records = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        status = "ok"
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        except Exception as e:  # keep going: report which notebook failed and why
            import re

            last = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
            status = f"failed: {type(e).__name__}: {last[-1][:200] if last else ''}"
            print(re.sub(r"\x1b\[[0-9;]*m", "", str(e))[-3000:], file=sys.stderr)
        wall = time.perf_counter() - t0
        record = {"notebook": str(path), "profile": profile, "device": device_name(device),
                  "torch": torch.__version__, "wall_s": round(wall, 1),
                  "date": datetime.date.today().isoformat(), "status": status}
        if status == "ok":
            nb.metadata["minidistill"] = {k: v for k, v in record.items() if k not in ("notebook", "status")}
            nbformat.write(nb, path)
        records.append(record)
        print(f"{path.name}: {status} in {wall:.1f} s", flush=True)
    return records


def _table(records: list[dict]) -> str:
    lines = ["| notebook | profile | device | wall time (s) | status |", "|---|---|---|---|---|"]
    lines += [f"| {Path(r['notebook']).name} | {r['profile']} | {r['device']} | {r['wall_s']} | {r['status']} |"
              for r in records]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidistill.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)")
    parser.add_argument("--profile", default="course", choices=PROFILES)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--report", type=Path, help="also write the records as JSON here")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    missing = [str(p) for p in notebooks if not p.exists()]
    if missing:
        parser.error(f"no such notebook(s): {missing}")
    records = publish(notebooks, args.profile, args.timeout)
    print("\n" + _table(records))
    if args.report:
        args.report.write_text(json.dumps(records, indent=2))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
