"""Progress of the Spark jobs a block runs: the active Spark stages' tasks done of their tasks, shown through a
`curation.progress.Progress`, and one summary line when the block ends (Spark jobs, tasks, seconds).

`spark_progress(spark, label)` wraps the block: a daemon thread (`curation.progress.polling`) reads Spark's status
tracker. It takes the session as an argument and imports no pyspark, so the CLI and the pipeline import it freely.
"""

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from curation.progress import DEFAULT_POLL_SECONDS, Progress, format_duration, polling

logger = logging.getLogger(__name__)


class _SparkMonitor:
    """Reads the status tracker into a Progress: the active stages' tasks done of their tasks."""

    def __init__(self, spark, progress: Progress):
        self.context = getattr(spark, "sparkContext", spark)
        self.tracker = self.context.statusTracker()
        self.progress = progress
        self.group = self.context.getLocalProperty("spark.jobGroup.id")
        self.jobs_before = self._job_ids()
        self.stages: tuple[int, ...] = ()

    def _job_ids(self) -> set[int]:
        ids = set(self.tracker.getJobIdsForGroup(None))
        if self.group:
            ids.update(self.tracker.getJobIdsForGroup(self.group))
        return ids

    def poll(self) -> None:
        infos = [info for info in map(self.tracker.getStageInfo, self.tracker.getActiveStageIds()) if info]
        if not infos:
            self.progress.show(False)
            return
        stages = tuple(info.stageId for info in infos)
        done = sum(info.numCompletedTasks for info in infos)
        total = sum(info.numTasks for info in infos)
        running = sum(info.numActiveTasks for info in infos)
        failed = sum(info.numFailedTasks for info in infos)
        note = f"Spark stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))}, {running} running"
        if failed:
            note += f", {failed} failed"
        if stages != self.stages:
            self.stages = stages
            self.progress.reset(done, total, note)
        else:
            self.progress.set(done, total, note)
        self.progress.show(True)

    def summary(self, elapsed: float) -> str:
        jobs = sorted(self._job_ids() - self.jobs_before)
        stage_ids = set()
        for job in jobs:
            info = self.tracker.getJobInfo(job)
            if info is not None:
                stage_ids.update(info.stageIds)
        tasks = failed = 0
        for stage in stage_ids:
            info = self.tracker.getStageInfo(stage)
            if info is not None:
                tasks += info.numCompletedTasks
                failed += info.numFailedTasks
        text = f"{len(jobs)} Spark job{'' if len(jobs) == 1 else 's'}, {tasks:,} tasks"
        if failed:
            text += f" ({failed} failed attempts)"
        return f"{text} in {format_duration(elapsed)}"


@contextlib.contextmanager
def spark_progress(
    spark, label: str, *, poll: float = DEFAULT_POLL_SECONDS, interval: float | None = None, stream=None,
    tty: bool | None = None, clock: Callable[[], float] = time.monotonic,
) -> Iterator[Progress]:
    """Shows the Spark tasks of the block's jobs while it runs: `label: done/total tasks, rate, ETA [Spark stage S,
    R running]` for the active stages (counted afresh when another stage starts), and at the end `label: J Spark
    jobs, T tasks in t`. `spark` is a SparkSession or SparkContext (None: only the time taken is reported).
    Monitoring never raises into the block; its thread is joined when the block ends."""
    progress = Progress(label, None, "tasks", interval=interval, stream=stream, tty=tty, clock=clock)
    progress.show(False)  # until a Spark stage runs
    monitor = None
    if spark is not None:
        try:
            monitor = _SparkMonitor(spark, progress)
        except Exception:
            logger.debug("no Spark status tracker for %s", label, exc_info=True)
    failure = None
    try:
        if monitor is None:
            yield progress
        else:
            with polling(monitor.poll, poll, name=f"spark-progress-{label}"):
                yield progress
    except BaseException as error:
        failure = error
        raise
    finally:
        elapsed = progress.elapsed()
        summary = f"done in {format_duration(elapsed)}"
        if monitor is not None:
            try:
                summary = monitor.summary(elapsed)
            except Exception:
                logger.debug("Spark job summary of %s failed", label, exc_info=True)
        if failure is not None:
            summary = f"failed ({type(failure).__name__}) after {summary}"
        progress.finish(summary)
