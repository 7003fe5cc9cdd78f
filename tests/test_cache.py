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
    (tmp_path / "chunk_000001.csv").unlink()  # as if killed while computing the second chunk
    calls.clear()
    again, n_again = run_chunks(shortlist(), double, empty, tmp_path, chunk_queries=2)
    assert calls == [["c", "d"]] and n_again == 4
    pd.testing.assert_frame_equal(first, again)
    parts = [run_chunks(shortlist(), double, empty, None, chunk_queries=2, rank=r, world=2)[0] for r in range(2)]
    assert sorted(set(parts[0].query_id)) == ["a", "b", "e"] and sorted(set(parts[1].query_id)) == ["c", "d"]
    nothing, n_none = run_chunks(shortlist(), double, empty, None, chunk_queries=5, rank=1, world=2)
    assert nothing.empty and list(nothing.columns) == list(empty.columns) and n_none == 0
