"""pair_vit.cache: the chunk layout, resuming from cached chunks, sharing chunks between processes."""
import pandas as pd

from pair_vit.cache import chunk_plan, run_chunks


def test_chunk_plan_is_sorted_and_independent_of_order():
    assert chunk_plan(["c", "a", "b", "a", "d"], 3) == [["a", "b", "c"], ["d"]]
    assert chunk_plan(["d", "c", "b", "a"], 3) == chunk_plan(["a", "b", "c", "d"], 3)


def shortlist():
    return pd.DataFrame([(q, r, 0.1 * i) for i, (q, r) in enumerate((q, r) for q in "abcde" for r in "xy")],
                        columns=["query_id", "reference_id", "score"])


def test_run_chunks_resumes_and_shares(tmp_path):
    calls = []

    def double(rows):
        calls.append(sorted(set(rows.query_id)))
        return rows.assign(out=rows.score * 2)

    empty = shortlist().iloc[:0].assign(out=[])
    first, n = run_chunks(shortlist(), double, empty, tmp_path, chunk_queries=2)
    assert n == 10 and calls == [["a", "b"], ["c", "d"], ["e"]]
    files = sorted(tmp_path.glob("chunk_*.csv"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == 3
    again, n_again = run_chunks(shortlist(), double, empty, tmp_path, chunk_queries=2)
    assert n_again == 0 and len(calls) == 3
    pd.testing.assert_frame_equal(first, again)
    parts = [run_chunks(shortlist(), double, empty, None, chunk_queries=2, rank=r, world=2)[0] for r in range(2)]
    assert sorted(set(parts[0].query_id)) == ["a", "b", "e"] and sorted(set(parts[1].query_id)) == ["c", "d"]
    nothing, n_none = run_chunks(shortlist(), double, empty, None, chunk_queries=5, rank=1, world=2)
    assert nothing.empty and list(nothing.columns) == list(empty.columns) and n_none == 0


def test_run_chunks_reuses_pairs_of_another_shortlist(tmp_path):
    """A changed shortlist computes only its new pairs; the shortlist's own columns come from the new rows."""
    calls = []

    def double(rows):
        calls.append(list(zip(rows.query_id, rows.reference_id)))
        return rows[rows.reference_id != "bad"].assign(out=rows.score * 2 + 100 * len(calls))

    empty = shortlist().iloc[:0].assign(out=[])
    first, _ = run_chunks(shortlist(), double, empty, tmp_path, chunk_queries=2)
    changed = shortlist()
    changed.loc[changed.query_id == "c", "score"] = 5.0       # same pairs, another descriptor score
    changed.loc[3, "reference_id"] = "z"                      # b: y -> z, a new pair
    changed = pd.concat([changed, pd.DataFrame([("a", "bad", 1.0)], columns=changed.columns)])
    calls.clear()
    again, n = run_chunks(changed, double, empty, tmp_path, chunk_queries=3)
    assert sorted(calls[0]) == [("a", "bad"), ("b", "z")] and len(calls) == 1 and n == 1
    got = again.set_index(["query_id", "reference_id"])
    before = first.set_index(["query_id", "reference_id"])
    assert got.loc[("b", "z"), "out"] == 0.3 * 2 + 100          # computed now (first call of this run)
    assert got.loc[("c", "x"), "out"] == before.loc[("c", "x"), "out"]  # reused, not recomputed
    assert got.loc[("c", "x"), "score"] == 5.0                  # the new shortlist's own column
    assert ("a", "bad") not in got.index and len(got) == 10
    assert list(again.query_id) == sorted(again.query_id) and list(again.columns) == list(empty.columns)
