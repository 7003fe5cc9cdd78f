"""The `pair-vit` command (pair_vit/console.py): index add|remove|info and match, thin over CopyDetector."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import pair_vit
from pair_vit import console, data

ROOT = Path(__file__).resolve().parents[1]


def test_index_add_match_remove_info(tmp_path, capsys):
    photos = sorted(data.list_images(Path(str(pair_vit.demo_dir())) / "clothing_cc0").values())[:5]
    refs, queries, index = tmp_path / "refs", tmp_path / "queries", tmp_path / "index"
    refs.mkdir()
    queries.mkdir()
    for p in photos[:4]:
        shutil.copy(p, refs / p.name)
    shutil.copy(photos[1], queries / "copy.jpg")
    (queries / "bad.jpg").write_bytes(b"not an image")

    assert console.main(["index", "add", str(index), str(refs), "--num-workers", "0", "--shortlist", "3"]) == 0
    assert "added 4 references (0 already" in capsys.readouterr().out
    assert console.main(["index", "add", str(index), str(refs), str(photos[4])]) == 0
    assert "added 1 reference (4 already in the collection); 5 references" in capsys.readouterr().out

    assert console.main(["match", str(index), str(queries), "--k", "2"]) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[1].split()
    assert first[:2] == ["copy", photos[1].stem] and first[-1] == "True" and len(out.splitlines()) == 3
    assert "skipped query bad: not an image" in err
    csv = tmp_path / "found.csv"
    assert console.main(["match", str(index), str(queries / "copy.jpg"), "--output", str(csv), "--threshold",
                         "1.1"]) == 0
    found = pd.read_csv(csv)
    assert list(found.columns) == ["query_id", "reference_id", "score", "is_copy"] and not found.is_copy.any()
    assert len(found) == 3  # the shortlist the collection was created with

    assert console.main(["index", "remove", str(index), photos[4].stem]) == 0
    assert "4 left" in capsys.readouterr().out
    assert console.main(["index", "info", str(index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["references"] == 4 and info["settings"]["shortlist"] == 3 and info["saved_store_bytes"] > 0

    assert console.main(["index", "add", str(index), str(refs), "--reference-views", "full"]) == 2
    assert "reference_views='halves'" in capsys.readouterr().err
    assert console.main(["match", str(tmp_path / "nowhere"), str(queries)]) == 2
    assert capsys.readouterr().err.startswith("error: no saved detector")


def test_the_command_is_installed_with_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"pair-vit": "pair_vit.console:main"}
    command = Path(sys.executable).parent / "pair-vit"
    args = [str(command)] if command.is_file() else [sys.executable, "-m", "pair_vit.console"]
    proc = subprocess.run([*args, "match", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--shortlist" in proc.stdout and "--threshold" in proc.stdout
