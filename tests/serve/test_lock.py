"""The readers-writer lock file: readers share it, a writer excludes readers and writers, across threads and
processes; and the service holds it exclusively through an addition's save."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest

from pair_vit.serve.lock import CollectionLock


def can_take(path, mode) -> bool:
    """Whether a fresh open of the lock file could take `mode` now (without waiting)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_readers_share_writers_exclude(tmp_path):
    lock, path = CollectionLock(tmp_path / "l"), tmp_path / "l"
    with lock.read():
        assert can_take(path, fcntl.LOCK_SH) and not can_take(path, fcntl.LOCK_EX)
        with lock.read():  # a second reader in the same process
            pass
    with lock.write():
        assert not can_take(path, fcntl.LOCK_SH) and not can_take(path, fcntl.LOCK_EX)
    assert can_take(path, fcntl.LOCK_EX)  # released


def test_a_writer_waits_for_a_reader_in_another_thread(tmp_path):
    lock, events = CollectionLock(tmp_path / "l"), []
    reading = threading.Event()

    def reader():
        with lock.read():
            reading.set()
            time.sleep(0.3)
            events.append("read done")

    thread = threading.Thread(target=reader)
    thread.start()
    reading.wait(5)
    with lock.write():
        events.append("write")
    thread.join(5)
    assert events == ["read done", "write"]


def test_a_dead_holder_releases_the_lock(tmp_path):
    path = tmp_path / "l"
    code = f"import fcntl, os, time; fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT); " \
           "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not can_take(path, fcntl.LOCK_SH)  # another process's write excludes this one's reads
    finally:
        holder.kill()
        holder.wait(10)
    assert can_take(path, fcntl.LOCK_EX)


def test_an_addition_holds_the_lock_alone_through_its_save(collection, photos, monkeypatch):
    from pair_vit.serve import uploads
    from pair_vit.serve.service import LOCK_FILE, Collection

    served = Collection(collection, {"num_workers": 0})
    seen = []
    real_save = served.detector.save

    def save(*args, **kwargs):
        seen.append(can_take(collection / LOCK_FILE, fcntl.LOCK_SH))  # could a match start now?
        return real_save(*args, **kwargs)

    monkeypatch.setattr(served.detector, "save", save)
    upload = uploads.checked([("china", photos[6].read_bytes())], 10 ** 8, collection.parent)[0]
    assert served.add([upload])["added"] == ["china"]
    assert seen == [False]
    with pytest.raises(Exception, match="no reference 'nope'"):
        served.remove("nope")
    assert can_take(collection / LOCK_FILE, fcntl.LOCK_EX)  # released after a refusal too


def test_another_workers_save_is_reloaded_before_the_next_request(collection, photos):
    """Two Collections over one folder stand for two `--workers` processes: what one saves, the other serves."""
    from pair_vit.serve import uploads
    from pair_vit.serve.service import Collection

    first, second = Collection(collection, {"num_workers": 0}), Collection(collection, {"num_workers": 0})
    upload = uploads.checked([("china", photos[6].read_bytes())], 10 ** 8, collection.parent)[0]
    first.add([upload])
    assert "china" in second.ids(0, 100)["ids"] and second.detector is not None
    second.remove("chelsea")
    assert first.ids(0, 100)["total"] == 6 and "chelsea" not in first.ids(0, 100)["ids"]
