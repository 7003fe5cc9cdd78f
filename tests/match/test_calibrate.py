"""scripts/calibrate.py's stage (pair_vit.match.calibrate): the fit written as JSON and into a checkpoint, with the
features the options ask for."""
import json
import shutil

import pytest

from pair_vit.match import calibrate
from pair_vit.match.calibration import Calibration
from pair_vit.match.rerank import load_pair
from pair_vit.match.config import RerankConfig
from pair_vit.pair.model import SHIPPED_WEIGHTS


def test_calibrate_writes_the_fit_and_the_vote_features_only_when_asked(demo_benchmark, tmp_path):
    pair = tmp_path / "pair.pt"
    shutil.copy(SHIPPED_WEIGHTS, pair)
    common = dict(benchmark=str(demo_benchmark), checkpoint=str(pair), k=4, token_recall=2, verify="none")
    plain = calibrate.run(calibrate.CalibrateConfig(**common, out=str(tmp_path / "plain.json")))
    written = Calibration.read(tmp_path / "plain.json")
    assert written == plain and plain.w_votes == 0.0 and plain.w_inliers == 0.0
    assert plain.w_desc != 0.0 and plain.threshold_p90 is not None
    assert "token recall 2" in plain.fitted_on and "verify none" in plain.fitted_on
    voted = calibrate.run(calibrate.CalibrateConfig(**common, votes=True, out=str(tmp_path / "votes.json"),
                                                    write_checkpoint=True))
    assert voted.w_votes != 0.0 and voted.needs_votes
    assert json.loads((tmp_path / "votes.json").read_text())["w_votes"] == voted.w_votes
    assert load_pair(RerankConfig(checkpoint=str(pair)))[2] == voted  # stored with the weights rerank.py reads
    with pytest.raises(ValueError, match="--benchmark"):
        calibrate.run(calibrate.CalibrateConfig())
