"""Shared by the benchmark scripts: the CPU model, and the peak resident memory of this process and everything it
started (Spark's JVM and Python workers)."""

import os
import platform
import threading
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_rss_bytes(root: int) -> int:
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
            total += int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        stack.extend(_children(pid))
    return total


class PeakMemory(threading.Thread):
    """Samples the process tree's RSS every 0.2 s until `stop()`; `peak` is the largest sum seen, in bytes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self._running = True

    def run(self):
        while self._running:
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))
            time.sleep(0.2)

    def stop(self) -> int:
        self._running = False
        self.join()
        return self.peak


def demo_corpus_and_spark(prefix: str, rows: int, shards: int, master: str):
    """A temporary folder with `metadata.json` and the seeded demo corpus under `raw/`, and a Spark session."""
    import tempfile

    from curation.demo import generate_demo_corpus
    from curation.ops.metadata import build_metadata, write_metadata
    from curation.spark.session import get_spark

    work = Path(tempfile.mkdtemp(prefix=prefix))
    entries, _ = build_metadata()
    write_metadata(work / "metadata.json", entries)
    generate_demo_corpus(work / "raw", entries, rows=rows, shards=shards, seed=0)
    return work, get_spark(master=master, conf={"spark.driver.memory": "4g"})


def torch_machine(device) -> dict:
    """The machine a torch benchmark ran on: CPU, threads, GPU and library versions."""
    import open_clip
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }


def provenance() -> dict:
    """What a result was measured on: the commit (with `+dirty` when the work tree had uncommitted changes to
    tracked files) and the command line, so that a figure can be traced to the code that produced it, and the
    machine's load average when it was written (figures taken beside other jobs say so)."""
    import shlex
    import subprocess
    import sys

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"commit": commit, "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "load_average_1_5_15_min": [round(load, 2) for load in os.getloadavg()]}


def write_result(result: dict, out: Path) -> None:
    """Write a benchmark's result as JSON at `out`, with its `provenance`, and log it."""
    import json
    import logging

    result = {**provenance(), **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logging.getLogger("bench").info("result: %s", json.dumps(result))
