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
