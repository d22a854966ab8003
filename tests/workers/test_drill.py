"""The fault-drill hooks (workers/drill.py): off unless set, and the pause file holds a batch."""
from __future__ import annotations

import threading
import time

from workers.drill import BATCH_DELAY_ENV, PAUSE_FILE_ENV, Drill, drill_env


def test_drills_are_off_unless_set(monkeypatch):
    for name in (BATCH_DELAY_ENV, PAUSE_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    drill = Drill()
    assert not drill.paused and drill.batch_delay_s == 0.0
    t0 = time.perf_counter()
    drill.after_batch()
    assert time.perf_counter() - t0 < 0.1


def test_pause_file_holds_after_batch_until_it_is_removed(tmp_path, monkeypatch):
    hold = tmp_path / "hold"
    monkeypatch.setenv(PAUSE_FILE_ENV, str(hold))
    assert drill_env()[PAUSE_FILE_ENV] == str(hold)   # passed on to actors and jobs
    drill = Drill()
    assert not drill.paused                            # set but absent: no hold
    hold.touch()
    assert drill.paused
    threading.Timer(0.6, hold.unlink).start()
    t0 = time.perf_counter()
    drill.after_batch()
    waited = time.perf_counter() - t0
    assert 0.5 <= waited < 5.0, waited
    assert not drill.paused
