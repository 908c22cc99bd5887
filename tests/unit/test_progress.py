"""Progress with a fake clock: rate over a window, ETA, log lines every interval and at the end, the redrawn
terminal line (throttled, shared, cleared around log records), unknown totals, thread safety."""

import io
import logging
import threading

import pytest

from curation import progress as progress_module
from curation.progress import Progress, default_interval, format_duration, polling
from curation.spark import progress as spark_progress_module


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "curation.progress"]


def test_rate_eta_and_line_with_a_known_total():
    clock = Clock()
    progress = Progress("embed", 1_000, "samples", clock=clock, tty=False, interval=1e9)
    assert progress.rate() is None and progress.eta() is None
    clock.advance(10)
    progress.update(100)
    progress.update(100)
    assert progress.done == 200
    assert progress.rate() == pytest.approx(20.0)
    assert progress.eta() == pytest.approx(40.0)
    assert progress.line() == "embed: 200/1,000 samples (20%), 20.0 samples/s, ETA 40s, elapsed 10s"


def test_rate_follows_the_last_window():
    clock = Clock()
    progress = Progress("download", 10_000, "rows", clock=clock, tty=False, interval=1e9)
    for _ in range(60):  # 10 rows/s for a minute
        clock.advance(1)
        progress.update(10)
    for _ in range(60):  # then 100 rows/s
        clock.advance(1)
        progress.update(100)
    assert progress.rate() == pytest.approx(100.0)
    assert progress.eta() == pytest.approx((10_000 - 6_600) / 100)
    clock.advance(30)  # nothing more for 30 s: the rate falls
    assert progress.rate() < 100.0


def test_unknown_total_shows_count_and_rate_only():
    clock = Clock()
    progress = Progress("scan", None, "rows", clock=clock, tty=False, interval=1e9)
    clock.advance(4)
    progress.update(12_345)
    assert progress.eta() is None
    assert progress.line() == "scan: 12,345 rows, 3,086 rows/s, elapsed 4s"


def test_logs_every_interval_and_at_the_end(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="curation.progress"):
        progress = Progress("shards", 10, "shards", clock=clock, tty=False, interval=30)
        for _ in range(10):
            clock.advance(10)
            progress.update()
        progress.finish()
        progress.finish()  # idempotent
        progress.update(5)  # ignored once finished
    assert messages(caplog) == [
        "shards: 3/10 shards (30%), 0.10 shards/s, ETA 1m10s, elapsed 30s",
        "shards: 6/10 shards (60%), 0.10 shards/s, ETA 40s, elapsed 1m00s",
        "shards: 9/10 shards (90%), 0.10 shards/s, ETA 10s, elapsed 1m30s",
        "shards: 10/10 shards in 1m40s (0.10 shards/s)",
    ]
    assert progress.done == 10 and progress.finished


def test_interval_from_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("CURATION_PROGRESS_INTERVAL", "5")
    assert default_interval() == 5.0
    assert Progress("x", tty=False).interval == 5.0
    monkeypatch.setenv("CURATION_PROGRESS_INTERVAL", "soon")
    with caplog.at_level(logging.WARNING, logger="curation.progress"):
        assert default_interval() == 30.0
    assert "CURATION_PROGRESS_INTERVAL" in caplog.text
    monkeypatch.delenv("CURATION_PROGRESS_INTERVAL")
    assert default_interval() == 30.0


def test_context_manager_reports_a_stop(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="curation.progress"), pytest.raises(KeyError):
        with Progress("embed", 50, "samples", clock=clock, tty=False) as progress:
            clock.advance(3)
            progress.update(7)
            raise KeyError("x")
    assert messages(caplog) == ["embed: stopped at 7/50 samples after 3s (KeyError)"]


def test_terminal_line_is_redrawn_in_place_at_most_five_times_a_second(caplog):
    clock = Clock()
    terminal = Terminal()
    with caplog.at_level(logging.INFO, logger="curation.progress"):
        progress = Progress("embed", 100, "samples", clock=clock, stream=terminal)
        assert progress.tty
        for _ in range(100):  # 16 updates a second for 6.25 s (1/16 s is exact in binary)
            clock.advance(1 / 16)
            progress.update()
        progress.finish()
    output = terminal.getvalue()
    draws = output.count("\r") - output.count("\r\x1b[K")
    assert draws == 25  # the first update, then every fourth (0.25 s apart: the least gap of 0.2 s)
    assert "\n" not in output[:-1] and output.endswith("embed: 100/100 samples in 6s (16.0 samples/s)\n")
    assert "\rembed: 49/100 samples (49%), 16.0 samples/s, ETA 3s, elapsed 3s\x1b[K" in output
    assert messages(caplog) == []  # a terminal gets the line, not the log
    assert not progress_module._CONSOLES


def test_progresses_share_the_terminal_line():
    clock = Clock()
    terminal = Terminal()
    stage = Progress("3/9 download", 8, "tasks", clock=clock, stream=terminal)
    shards = Progress("download", 4, "shards", clock=clock, stream=terminal)
    clock.advance(1)
    shards.update(1)
    assert terminal.getvalue().endswith("\r3/9 download: 0/8 tasks (0%), 0.00 tasks/s, elapsed 1s | "
                                        "download: 1/4 shards (25%), 1.0 shards/s, ETA 3s, elapsed 1s\x1b[K")
    shards.finish()
    assert terminal.getvalue().endswith("\r\x1b[Kdownload: 1/4 shards in 1s (1.0 shards/s)\n"
                                        "\r3/9 download: 0/8 tasks (0%), 0.00 tasks/s, elapsed 1s\x1b[K")
    stage.finish("done")
    assert terminal.getvalue().endswith("\r\x1b[K3/9 download: done\n")


def test_log_records_on_the_terminal_clear_the_line_first():
    clock = Clock()
    terminal = Terminal()
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(message)s"))
    other = logging.getLogger("test_progress.other")
    other.addHandler(handler)
    other.propagate = False
    try:
        progress = Progress("embed", 10, "samples", clock=clock, stream=terminal)
        clock.advance(1)
        progress.update(5)
        other.warning("a warning")
        clock.advance(0.01)
        progress.update(1)  # redrawn at once after the record, on its own line
        progress.finish()
        other.warning("after")
    finally:
        other.removeHandler(handler)
    output = terminal.getvalue()
    assert "elapsed 1s\x1b[K\r\x1b[Ka warning\n\rembed: 6/10 samples" in output
    assert output.endswith("embed: 6/10 samples in 1s (5.9 samples/s)\nafter\n")
    assert not handler.filters


def test_non_terminal_and_worker_processes_do_not_redraw(monkeypatch):
    assert not Progress("x", stream=io.StringIO()).tty
    monkeypatch.setattr(progress_module, "in_worker", lambda: True)
    assert not Progress("x", stream=Terminal()).tty


def test_reset_starts_a_new_count_and_rate():
    clock = Clock()
    progress = Progress("stage", 8, "tasks", clock=clock, tty=False, interval=1e9)
    clock.advance(2)
    progress.set(8, note="Spark stage 1")
    progress.reset(0, 4, note="Spark stage 2")
    clock.advance(1)
    progress.set(2)
    assert (progress.done, progress.total) == (2, 4)
    assert progress.rate() == pytest.approx(2.0)
    assert progress.line() == "stage: 2/4 tasks (50%), 2.0 tasks/s, ETA 1s, elapsed 3s [Spark stage 2]"


def test_updates_from_many_threads_are_all_counted():
    progress = Progress("threads", 80_000, "rows", tty=False, interval=1e9)

    def work():
        for _ in range(10_000):
            progress.update()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert progress.done == 80_000


def test_polling_joins_its_thread_and_swallows_errors(caplog):
    calls = []

    def read():
        calls.append(1)
        raise RuntimeError("tracker gone")

    with caplog.at_level(logging.DEBUG, logger="curation.progress"), pytest.raises(ValueError):
        with polling(read, every=0.01, name="test-poll"):
            raise ValueError("block")
    assert calls  # at least the final read
    assert "tracker gone" in caplog.text
    assert not [thread for thread in threading.enumerate() if thread.name == "curation-test-poll"]


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3_725, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_hidden_progress_leaves_the_terminal_line():
    clock = Clock()
    terminal = Terminal()
    monitor = Progress("3/9 embed", None, "tasks", clock=clock, stream=terminal)
    monitor.show(False)
    local = Progress("embed", 10, "samples", clock=clock, stream=terminal)
    clock.advance(1)
    local.update(2)
    assert terminal.getvalue().endswith("\rembed: 2/10 samples (20%), 2.0 samples/s, ETA 4s, elapsed 1s\x1b[K")
    local.finish()
    monitor.finish("done")
    assert terminal.getvalue().endswith("\r\x1b[Kembed: 2/10 samples in 1s (2.0 samples/s)\n3/9 embed: done\n")


class FakeStage:
    def __init__(self, stage_id, tasks, completed=0, active=0, failed=0):
        self.stageId, self.numTasks, self.numCompletedTasks = stage_id, tasks, completed
        self.numActiveTasks, self.numFailedTasks = active, failed


class FakeJob:
    def __init__(self, stage_ids):
        self.stageIds = stage_ids


class FakeTracker:
    def __init__(self):
        self.jobs: dict[int, FakeJob] = {0: FakeJob([0])}  # a job from before the block
        self.stages: dict[int, FakeStage] = {0: FakeStage(0, 3, 3)}
        self.active: list[int] = []

    def getJobIdsForGroup(self, group=None):
        return list(self.jobs) if group is None else []

    def getActiveStageIds(self):
        return list(self.active)

    def getStageInfo(self, stage_id):
        return self.stages.get(stage_id)

    def getJobInfo(self, job_id):
        return self.jobs.get(job_id)


class FakeContext:
    def __init__(self, tracker):
        self.tracker = tracker

    def statusTracker(self):
        return self.tracker

    def getLocalProperty(self, key):
        return None


def test_spark_monitor_follows_the_active_stage_and_sums_up_the_jobs(caplog):
    clock = Clock()
    tracker = FakeTracker()
    progress = Progress("4/9 cluster", None, "tasks", clock=clock, tty=False, interval=0)
    monitor = spark_progress_module._SparkMonitor(FakeContext(tracker), progress)
    monitor.poll()
    assert progress.done == 0 and not progress.visible
    tracker.jobs[1] = FakeJob([1, 2])
    tracker.stages[1] = FakeStage(1, 8, 2, active=2)
    tracker.active = [1]
    with caplog.at_level(logging.INFO, logger="curation.progress"):
        clock.advance(1)
        monitor.poll()
        clock.advance(1)
        tracker.stages[1] = FakeStage(1, 8, 6, active=2, failed=1)
        monitor.poll()
        tracker.stages[2] = FakeStage(2, 4, 0, active=2)
        tracker.stages[1] = FakeStage(1, 8, 8, failed=1)
        tracker.active = [2]
        clock.advance(1)
        monitor.poll()
        tracker.active = []
        monitor.poll()
    assert messages(caplog) == [
        "4/9 cluster: 2/8 tasks (25%), elapsed 1s [Spark stage 1, 2 running]",
        "4/9 cluster: 6/8 tasks (75%), 4.0 tasks/s, ETA 0s, elapsed 2s [Spark stage 1, 2 running, 1 failed]",
        "4/9 cluster: 0/4 tasks (0%), elapsed 3s [Spark stage 2, 2 running]",
    ]
    assert not progress.visible
    tracker.stages[2] = FakeStage(2, 4, 4)
    assert monitor.summary(65) == "1 Spark job, 12 tasks (1 failed attempts) in 1m05s"


def test_spark_progress_without_spark_reports_the_time(caplog):
    with caplog.at_level(logging.INFO, logger="curation.progress"):
        with spark_progress_module.spark_progress(None, "1/2 ingest", tty=False):
            pass
    assert messages(caplog) == ["1/2 ingest: done in 0s"]
