"""scripts/bench_stages.py: per-stage seconds of CopyDetector.match on a saved collection, per settings variant."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import pair_vit
from pair_vit.bench import stages
from pair_vit.match.detector import CopyDetector


def test_parse_variant():
    assert stages.parse_variant("default") == {}
    assert stages.parse_variant("token_recall=0 verify=none") == {"token_recall": 0, "verify": "none"}
    assert stages.parse_variant("token_geometry=false amp=True") == {"token_geometry": False, "amp": True}
    with pytest.raises(ValueError, match="setting=value"):
        stages.parse_variant("token_recall")


def test_stage_seconds_per_variant(tmp_path):
    photos = sorted((Path(str(pair_vit.demo_dir())) / "skimage").glob("*.jpg"))[:4]
    detector = CopyDetector(num_workers=0)
    detector.add(photos)
    folder = detector.save(tmp_path / "collection")
    queries = tmp_path / "queries"
    queries.mkdir()
    for p in photos[:2]:
        shutil.copy(p, queries / p.name)
    rows = stages.run(stages.StagesBenchConfig(collection=str(folder), queries=str(queries), out=str(tmp_path / "out"),
                                               variants=["default", "token_recall=0 verify=none calibration=none"]))
    default, bare = rows
    assert default["n"] == 2 and default["references"] == 4
    assert default["token_recall_s"] > 0 and default["verify_s"] > 0 and default["pair_s"] > 0
    assert bare["token_recall_s"] == 0 and bare["verify_s"] == 0 and bare["options"]["verify"] == "none"
    for r in rows:  # the stages happen inside the call
        assert r["shortlist_s"] + r["token_recall_s"] + r["pair_s"] + r["verify_s"] <= r["median_s"] * 1.5
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| token_recall=0 verify=none calibration=none |" in text and "4 references" in text
