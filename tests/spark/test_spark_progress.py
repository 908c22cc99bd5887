"""spark_progress on a real local session: task progress of a running job in the log, one summary line at the
end, the polling thread gone after the block (also when the block raises)."""

import logging
import re
import threading
import time

import pytest

from curation.spark.progress import spark_progress

pytestmark = pytest.mark.spark


def _slow_batches():
    # Made in a function, so that cloudpickle ships it by value (workers cannot import the test module).
    def run(batches):
        for batch in batches:
            time.sleep(0.4)
            yield batch

    return run


def _monitor_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("curation-spark-progress")]


def test_reports_task_progress_of_a_running_job(spark, caplog):
    frame = spark.range(0, 8_000, numPartitions=8).mapInArrow(_slow_batches(), "id long")
    with caplog.at_level(logging.INFO, logger="curation.progress"):
        with spark_progress(spark, "3/9 slow", poll=0.1, interval=0.0, tty=False):
            assert _monitor_threads()
            assert frame.count() == 8_000
    lines = [record.getMessage() for record in caplog.records if record.name == "curation.progress"]
    pattern = re.compile(r"3/9 slow: (\d+)/(\d+) tasks .*\[Spark stage (\d+), (\d+) running\]")
    progress = [match for match in map(pattern.match, lines) if match]
    assert progress, lines
    # The stage reading the 8 partitions: its tasks are counted while they run, never beyond its task count.
    counts = [(int(m.group(1)), int(m.group(2))) for m in progress if m.group(2) == "8"]
    assert counts and all(0 <= done <= 8 for done, _ in counts), lines
    assert any(done < 8 for done, _ in counts), lines
    assert [done for done, _ in counts] == sorted(done for done, _ in counts), lines
    assert re.fullmatch(r"3/9 slow: [12] Spark jobs?, \d+ tasks in \d+s", lines[-1]), lines
    assert not _monitor_threads()


def test_thread_is_joined_and_failure_reported_when_the_block_raises(spark, caplog):
    with caplog.at_level(logging.INFO, logger="curation.progress"), pytest.raises(RuntimeError, match="boom"):
        with spark_progress(spark, "failing", poll=0.05, tty=False):
            spark.range(10).count()
            raise RuntimeError("boom")
    assert not _monitor_threads()
    last = [record.getMessage() for record in caplog.records if record.name == "curation.progress"][-1]
    assert re.fullmatch(r"failing: failed \(RuntimeError\) after \d+ Spark jobs?, \d+ tasks in \d+s", last), last


def test_a_broken_tracker_never_reaches_the_block(spark, caplog, monkeypatch):
    class Broken:
        def getJobIdsForGroup(self, group=None):
            return []

        def getActiveStageIds(self):
            raise RuntimeError("tracker gone")

        def getStageInfo(self, stage):
            return None

    monkeypatch.setattr(type(spark.sparkContext), "statusTracker", lambda self: Broken())
    with caplog.at_level(logging.DEBUG, logger="curation.progress"):
        with spark_progress(spark, "broken", poll=0.02, tty=False):
            time.sleep(0.1)
    assert "tracker gone" in caplog.text
    assert not _monitor_threads()
