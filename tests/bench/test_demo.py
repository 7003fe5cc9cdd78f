"""End-to-end smoke test of README command 1 (the demo) on a few shipped photos."""
import subprocess
import sys
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def test_demo_script_runs_and_caches_its_benchmark(tmp_path):
    args = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--n-references", "16", "--n-queries", "8",
            "--workers", "1"]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "pdq : uAP" in first.stdout and "phash : uAP" in first.stdout and "sift : uAP" in first.stdout
    table = pd.read_csv(tmp_path / "results.csv")
    assert set(table.method) == {"pdq", "phash", "sift", "descriptor", "rerank"} and table["uAP"].between(0, 1).all()
    assert "descriptor only  uAP" in first.stdout and "reranked         uAP" in first.stdout
    assert (tmp_path / "matches.png").stat().st_size > 0 and (tmp_path / "pr_rerank_full.png").is_file()
    assert (tmp_path / "pr_pdq.png").stat().st_size > 0 and (tmp_path / "results.md").is_file() and (tmp_path / "pdq.csv").is_file()
    second = subprocess.run(args, capture_output=True, text=True)
    assert second.returncode == 0 and "reusing benchmark" in second.stdout
