"""`pair-vit serve` refuses bad options with one line and exit status 2, before any model loads."""
from __future__ import annotations

import pytest

from pair_vit import console
from pair_vit.serve.run import read_token


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], "port must be in 0..65535"),
    (["--workers", "0"], "workers must be >= 1"),
    (["--max-request-mb", "0"], "max_request_mb must be > 0"),
    (["--token-file", "EMPTY"], "is empty"),
    (["--token-file", "MISSING"], "No such file"),
    (["--shortlist-typo", "3"], None),
])
def test_bad_options_exit_2(tmp_path, capsys, args, words):
    (tmp_path / "EMPTY").write_text(" \n")
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    if words is None:  # argparse's own refusal
        with pytest.raises(SystemExit) as exit_:
            console.main(["serve", str(tmp_path / "c"), *args])
        assert exit_.value.code == 2
        return
    assert console.main(["serve", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1


def test_read_token(tmp_path):
    (tmp_path / "t").write_text("  abc123 \n")
    assert read_token(str(tmp_path / "t")) == "abc123" and read_token("") is None
