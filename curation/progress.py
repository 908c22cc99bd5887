"""Progress of long stages: how much is done of how much, the rate and the time left.

`Progress(label, total, unit)` counts (`update(n)`, or `set(done)` from a poller) and shows
`label: done/total unit (pct), rate unit/s, ETA t, elapsed t [note]`:

- on a terminal (stderr is a TTY, and this is not a worker process: a Spark task, a multiprocessing child), as one
  line redrawn in place with '\\r' at most 5 times a second, ended with a newline by `finish()`. Progresses that
  run at once (the pipeline's Spark monitor and a stage's own counter) share that line, joined by ' | '; a log
  record written to the same terminal first clears the line, which is redrawn after it;
- otherwise as a `logging` INFO line (logger `curation.progress`) every `interval` seconds (default 30 s, or
  `CURATION_PROGRESS_INTERVAL`) and one at the end.

The rate is taken over the last 30 seconds (over everything before that), so the ETA follows a changing pace.
`polling(read)` calls a reader (of a counter other tasks advance) in a daemon thread while a block runs; the Spark
jobs' progress (`curation.spark.progress`) is one such reader.
"""

import contextlib
import logging
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

INTERVAL_ENV = "CURATION_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
REDRAW_SECONDS = 0.2  # at most 5 redraws a second on a terminal
RATE_WINDOW_SECONDS = 30.0
_SAMPLE_SECONDS = 0.25  # rate samples closer together than this are merged
DEFAULT_POLL_SECONDS = 0.5


def default_interval() -> float:
    """Seconds between two progress log lines: CURATION_PROGRESS_INTERVAL, else 30."""
    configured = os.environ.get(INTERVAL_ENV)
    if configured:
        try:
            value = float(configured)
            if value >= 0 and math.isfinite(value):
                return value
        except ValueError:
            pass
        logger.warning("%s=%r is not a number of seconds >= 0; using %g", INTERVAL_ENV, configured, DEFAULT_INTERVAL)
    return DEFAULT_INTERVAL


def in_worker() -> bool:
    """True inside a Spark task or a multiprocessing child: places where a redrawn terminal line would garble."""
    if multiprocessing.parent_process() is not None:
        return True
    if "pyspark" in sys.modules:
        try:
            from pyspark import TaskContext

            return TaskContext.get() is not None
        except Exception:  # an odd pyspark install must not break progress reporting
            return False
    return False


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_rate(rate: float) -> str:
    if rate >= 100:
        return f"{rate:,.0f}"
    if rate >= 1:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


class Progress:
    """Counts work done of `total` (None: unknown) `unit`s and shows it on a terminal or in the log.

    Thread-safe. `clock` (seconds, monotonic), `stream` (default: sys.stderr), `tty` (default:
    the stream is a TTY and this is not a worker process), `interval` (seconds between log lines; default
    `default_interval()`) and `log` (the logger) can be injected.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "rows",
        *,
        interval: float | None = None,
        stream=None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger | None = None,
    ):
        self.label = label
        self.unit = unit
        self.interval = default_interval() if interval is None else float(interval)
        self._total = total
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._log = log or logger
        self._lock = threading.RLock()
        self._done = 0
        self._note = ""
        self._finished = False
        self._visible = True
        self._started = clock()
        self._last_log = self._started
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])
        if tty is None:
            tty = _isatty(self.stream) and not in_worker()
        self.tty = tty
        if self.tty:
            _console(self.stream).add(self)

    # ------------------------------------------------------------------------------------------------ counting
    @property
    def stream(self):
        return self._stream

    @property
    def done(self) -> int:
        return self._done

    @property
    def total(self) -> int | None:
        return self._total

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def visible(self) -> bool:
        return self._visible

    def show(self, visible: bool = True) -> None:
        """Shows or hides this progress on the terminal line (a Spark monitor between jobs has nothing to show)."""
        with self._lock:
            changed, self._visible = self._visible != visible, visible
        if changed and self.tty and not self._finished:
            _console(self.stream).refresh(self._clock(), force=True)

    def update(self, n: int = 1, note: str | None = None) -> None:
        """`n` more units done."""
        with self._lock:
            shown = self._advance(self._done + n, note)
        self._show(shown)

    def set(self, done: int, total: int | None = None, note: str | None = None) -> None:
        """`done` units done so far (a poller's reading); `total` replaces the total when given."""
        with self._lock:
            if total is not None:
                self._total = total
            shown = self._advance(done, note)
        self._show(shown)

    def reset(self, done: int = 0, total: int | None = None, note: str | None = None) -> None:
        """Start counting a new piece of work (a new Spark stage): count, total and rate start afresh, the elapsed
        time does not."""
        with self._lock:
            self._done = done
            self._total = total
            self._samples = deque([(self._clock(), done)])
            shown = self._advance(done, note)
        self._show(shown)

    def _advance(self, done: int, note: str | None) -> tuple[float, str | None] | None:
        """Counts under the lock; returns what to show (the time and, in log mode, the line) or None."""
        if self._finished:
            return None
        now = self._clock()
        if done < self._done:  # a count that went back (a retried task): the old rate means nothing now
            self._samples = deque([(now, done)])
        self._done = done
        if note is not None:
            self._note = note
        if now - self._samples[-1][0] >= _SAMPLE_SECONDS:
            self._samples.append((now, done))
        while len(self._samples) > 1 and self._samples[1][0] <= now - RATE_WINDOW_SECONDS:
            self._samples.popleft()
        if self.tty:
            return now, None
        if now - self._last_log >= self.interval:
            self._last_log = now
            return now, self.line(now)
        return None

    def _show(self, shown: tuple[float, str | None] | None) -> None:
        # Outside this progress's lock: the console's lock is taken before progress locks, never after.
        if shown is None:
            return
        now, text = shown
        if self.tty:
            _console(self.stream).refresh(now)
        else:
            self._log.info("%s", text)

    def rate(self, now: float | None = None) -> float | None:
        """Units per second over the rate window; None until some time has passed."""
        with self._lock:
            now = self._clock() if now is None else now
            since, done_then = self._samples[0]
            if now - since <= 0:
                return None
            return max(0.0, (self._done - done_then) / (now - since))

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the current rate; None when the total or the rate is unknown, or the rate is 0."""
        with self._lock:
            rate = self.rate(now)
            if self._total is None or not rate:
                return None
            return max(0, self._total - self._done) / rate

    def elapsed(self, now: float | None = None) -> float:
        return (self._clock() if now is None else now) - self._started

    # ------------------------------------------------------------------------------------------------ output
    def line(self, now: float | None = None) -> str:
        """The progress line as shown: label, count, percentage, rate, ETA, elapsed time, note."""
        with self._lock:
            now = self._clock() if now is None else now
            if self._total is not None:
                share = f" ({100 * self._done / self._total:.0f}%)" if self._total else ""
                parts = [f"{self._done:,}/{self._total:,} {self.unit}{share}"]
            else:
                parts = [f"{self._done:,} {self.unit}"]
            rate = self.rate(now)
            if rate is not None:
                parts.append(f"{format_rate(rate)} {self.unit}/s")
            eta = self.eta(now)
            if eta is not None:
                parts.append(f"ETA {format_duration(eta)}")
            parts.append(f"elapsed {format_duration(self.elapsed(now))}")
            note = f" [{self._note}]" if self._note else ""
            return f"{self.label}: {', '.join(parts)}{note}"

    def finish(self, summary: str | None = None) -> None:
        """The last line: `label: summary`, or the count, the average rate and the time taken. Idempotent."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            now = self._clock()
            elapsed = self.elapsed(now)
            if summary is None:
                average = f" ({format_rate(self._done / elapsed)} {self.unit}/s)" if elapsed > 0 else ""
                note = f" [{self._note}]" if self._note else ""
                summary = f"{self._count()} {self.unit} in {format_duration(elapsed)}{average}{note}"
            text = f"{self.label}: {summary}"
        if self.tty:
            _console(self.stream).remove(self, text, now)
        else:
            self._log.info("%s", text)

    def _count(self) -> str:
        return f"{self._done:,}/{self._total:,}" if self._total is not None else f"{self._done:,}"

    close = finish

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.finish(f"stopped at {self._count()} {self.unit} after {format_duration(self.elapsed())} "
                        f"({exc_type.__name__})")
        self.finish()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _Console:
    """The one redrawn line of a terminal stream, shared by the progresses shown on it."""

    def __init__(self, stream):
        self.stream = stream
        self.active: list[Progress] = []
        self.lock = threading.RLock()
        self.shown = False  # a progress line is on the screen, with the cursor at its end
        self.last_draw: float | None = None
        self.filter = _ClearLineFilter(self)
        self.handlers: list[logging.Handler] = []

    def add(self, progress: Progress) -> None:
        with self.lock:
            self.active.append(progress)
            if len(self.active) == 1:
                self.handlers = [h for h in _all_handlers() if getattr(h, "stream", None) is self.stream]
                for handler in self.handlers:
                    handler.addFilter(self.filter)

    def refresh(self, now: float, force: bool = False) -> None:
        with self.lock:
            if not force and self.last_draw is not None and now - self.last_draw < REDRAW_SECONDS:
                return
            self.last_draw = now
            text = " | ".join(progress.line(now) for progress in self.active if progress.visible)
            if text:
                self._write("\r" + _fit(text) + "\x1b[K")
                self.shown = True
            else:
                self.clear()

    def clear(self) -> None:
        with self.lock:
            if self.shown:
                self._write("\r\x1b[K")
                self.shown = False
                self.last_draw = None  # redraw at the next update

    def remove(self, progress: Progress, final: str, now: float) -> None:
        with self.lock:
            if progress in self.active:
                self.active.remove(progress)
            self.clear()
            self._write(final + "\n")
            if self.active:
                self.refresh(now, force=True)
            else:
                for handler in self.handlers:
                    handler.removeFilter(self.filter)
                self.handlers = []
                _CONSOLES.pop(id(self.stream), None)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not end the stage
            pass


class _ClearLineFilter(logging.Filter):
    """Clears the progress line before a handler writes a log record to the same terminal."""

    def __init__(self, console: _Console):
        super().__init__()
        self.console = console

    def filter(self, record) -> bool:
        self.console.clear()
        return True


def _all_handlers() -> list[logging.Handler]:
    handlers = list(logging.getLogger().handlers)
    for candidate in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(candidate, logging.Logger):
            handlers.extend(candidate.handlers)
    return handlers


_CONSOLES: dict[int, _Console] = {}
_CONSOLES_LOCK = threading.Lock()


def _console(stream) -> _Console:
    with _CONSOLES_LOCK:
        console = _CONSOLES.get(id(stream))
        if console is None or console.stream is not stream:
            console = _CONSOLES[id(stream)] = _Console(stream)
        return console


def _fit(text: str) -> str:
    width = shutil.get_terminal_size((120, 24)).columns - 1
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


# ---------------------------------------------------------------------------------------------------- polling
@contextlib.contextmanager
def polling(read: Callable[[], None], every: float = DEFAULT_POLL_SECONDS, name: str = "progress") -> Iterator[None]:
    """Calls `read` every `every` seconds in a daemon thread while the block runs, and once more at its end; the
    thread is joined on exit, also when the block raises. An exception in `read` is logged at debug level only."""
    stop = threading.Event()

    def safe_read():
        try:
            read()
        except Exception:
            logger.debug("progress poll %s failed", name, exc_info=True)

    def loop():
        while not stop.wait(every):
            safe_read()

    thread = threading.Thread(target=loop, name=f"curation-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        safe_read()
