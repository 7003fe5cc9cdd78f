"""scripts/sweep_token_recall.py (pair_vit.bench.token_sweep): one row per setting, recall per edit family."""
import math

import pandas as pd

from pair_vit.bench import token_sweep


def test_a_grid_of_settings_gets_one_row_each(demo_benchmark, tmp_path):
    cfg = token_sweep.TokenSweepConfig(benchmark=str(demo_benchmark), k=4, scales=["1,2", "1"], floors=[0.5],
                                       sizes=["1,0.5", "1,0.7,0.5,0.35"], candidates=[0, 2], out=str(tmp_path / "sweep"))
    table = token_sweep.run(cfg, command="test")
    # candidates 0 (the descriptor alone) once, then each reading and size set with 2 voted places
    assert table[["candidates", "scales", "sizes"]].values.tolist() == [
        [0, "", ""], [2, "1,2", "1,0.5"], [2, "1,2", "1,0.7,0.5,0.35"], [2, "1", "1,0.5"], [2, "1", "1,0.7,0.5,0.35"]]
    assert math.isnan(table["votes rank-1"][0])
    assert (table["votes rank-1"][1:] >= 0.5).all()  # demo copies: the votes find most sources first
    assert table["R@4"].between(0, 1).all() and table["R@4"][1] >= table["R@4"][0] - 0.2
    family = [c for c in table.columns if "(" in c]
    assert family and all(table[c].between(0, 1).all() for c in family)
    assert pd.read_csv(tmp_path / "sweep" / "results.csv").shape == table.shape
    assert "`test`" in (tmp_path / "sweep" / "results.md").read_text()
