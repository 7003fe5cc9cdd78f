"""Submission, ground-truth and edits CSVs of the ISC2021 / DISC21 matching track: read and strictly validated.

A submission is `query_id,reference_id,score` (higher = more likely a copy), the ground truth
`query_id,reference_id` (an empty reference id: a distractor query), the edits table `query_id,reference_id,edits`
(the edit chain of each query, `;`-separated). A malformed file raises `EvalInputError` naming the file and row.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

SUBMISSION_COLUMNS = ("query_id", "reference_id", "score")
GROUND_TRUTH_COLUMNS = ("query_id", "reference_id")
EDITS_COLUMNS = ("query_id", "reference_id", "edits")
PAIR = ["query_id", "reference_id"]


class EvalInputError(ValueError):
    """A submission, ground-truth or edits table is malformed; the message names the file and the row."""


# ----------------------------------------------------------------------------- reading and validation

def _read_csv(path: str | Path, columns: Sequence[str], kind: str) -> pd.DataFrame:
    """Read a CSV as strings (ids like `Q000123` stay strings) and check its header names `columns`."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{kind} file {path}: not found")
    try:
        with warnings.catch_warnings():  # rows longer than the header only warn: make that an error
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False)
    except pd.errors.EmptyDataError:
        raise EvalInputError(f"{kind} file {path}: empty; expected header '{','.join(columns)}'") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[-1]
        raise EvalInputError(f"{kind} file {path}: not a valid CSV ({reason})") from None
    df.columns = [str(c).strip() for c in df.columns]
    _check_header(df, columns, f"{kind} file {path}")
    return df


def _check_header(df: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if len(missing) == len(columns):
        raise EvalInputError(f"{source}: missing header; the first line must be '{','.join(columns)}', "
                             f"got '{','.join(df.columns)}'")
    if missing:
        raise EvalInputError(f"{source}: missing column(s) {missing}; header is {list(df.columns)}")


def _clean_ids(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Copy of `df` with id columns as stripped strings."""
    df = df.copy()
    for c in columns:
        df[c] = df[c].fillna("").astype(str).str.strip()
    return df.reset_index(drop=True)


def _reject_empty(df: pd.DataFrame, column: str, source: str) -> None:
    empty = np.flatnonzero((df[column] == "").to_numpy())
    if empty.size:
        raise EvalInputError(f"{source}: {empty.size} row(s) have an empty {column} "
                             f"(first: data row {empty[0] + 1})")


def _reject_duplicates(df: pd.DataFrame, columns: list[str], source: str) -> None:
    dup = df.duplicated(columns, keep="first").to_numpy()
    if dup.any():
        example = ", ".join(f"{c}={df.loc[np.argmax(dup), c]!r}" for c in columns)
        raise EvalInputError(f"{source}: {int(dup.sum())} duplicate ({', '.join(columns)}) row(s), "
                             f"e.g. {example}")


def validate_submission(df: pd.DataFrame, source: str = "submission") -> pd.DataFrame:
    """Checked copy of a submission: string ids, float64 finite scores, no duplicate pairs."""
    _check_header(df, SUBMISSION_COLUMNS, source)
    df = _clean_ids(df[list(SUBMISSION_COLUMNS)], PAIR)
    _reject_empty(df, "query_id", source)
    _reject_empty(df, "reference_id", source)
    raw = df["score"]
    text = raw if pd.api.types.is_numeric_dtype(raw) else raw.astype(str).str.strip()
    scores = pd.to_numeric(text, errors="coerce")
    scores = scores.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        i = bad[0]
        raise EvalInputError(f"{source}: {bad.size} row(s) have a missing or non-numeric score, e.g. data row "
                             f"{i + 1} ({df.query_id[i]},{df.reference_id[i]}) score {raw[i]!r}")
    _reject_duplicates(df, PAIR, source)
    return df.assign(score=scores)


def validate_ground_truth(df: pd.DataFrame, source: str = "ground truth") -> pd.DataFrame:
    """Checked ground-truth pairs; rows with an empty reference_id (queries without a match) are dropped."""
    _check_header(df, GROUND_TRUTH_COLUMNS, source)
    df = _clean_ids(df[PAIR], PAIR)
    df = df[df.reference_id != ""].reset_index(drop=True)
    _reject_empty(df, "query_id", source)
    _reject_duplicates(df, PAIR, source)
    return df


def read_submission(path: str | Path) -> pd.DataFrame:
    """A validated submission CSV `query_id,reference_id,score`; a header-only file is a valid, empty one."""
    return validate_submission(_read_csv(path, SUBMISSION_COLUMNS, "submission"), f"submission file {path}")


def read_ground_truth(path: str | Path) -> pd.DataFrame:
    """Validated ground-truth pairs from a CSV `query_id,reference_id` (empty reference_id rows dropped)."""
    df = _read_csv(path, GROUND_TRUTH_COLUMNS, "ground-truth")
    return validate_ground_truth(df, f"ground-truth file {path}")


def read_edits(path: str | Path) -> pd.DataFrame:
    """Edit chains `query_id,reference_id,edits` (edits: family names joined by ';'), one row per query."""
    source = f"edits file {path}"
    df = _clean_ids(_read_csv(path, EDITS_COLUMNS, "edits")[list(EDITS_COLUMNS)], EDITS_COLUMNS)
    _reject_empty(df, "query_id", source)
    _reject_duplicates(df, ["query_id"], source)
    return df
