"""Fault injection: `curation run` is killed with SIGKILL inside and between stages, rerun, and must publish the same
bytes as a run that was never interrupted (DESIGN.md section 3; issue "Crash-safe, resumable runs").

The whole demo pipeline runs on a ~2,000-row demo corpus whose images come from the demo image server on
127.0.0.1. The run is a subprocess in its own process group (driver, JVM and Spark workers), watched through the
run folder: a kill point is a state of that folder (a stage's temporary folder exists: mid-write; its work folder
holds a finished shard: after N tasks; its `_SUCCESS` exists: between stages). `make test` kills once per stage at
a seeded choice of point, resuming each time, so every stage is interrupted and resumed in one chain; `make
test-slow` (marker slow) runs every point of every stage.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from curation.demo_images import demo_resolver
from curation.image_server import ImageServer
from curation.manifest import without_volatile
from tests.demo_stages import DEMO_STAGES, demo_run_config, write_demo_inputs

pytestmark = pytest.mark.spark

KILL_POINTS = ("mid_write", "after_task", "between_stages")
# Stages whose finished shards survive a kill in a work folder (`.<stage>.work/<kind>/<files>`).
WORK_FILES = {"download": "images/*_stats.json", "embed": "embeddings/*.parquet", "mine_logos": "blocks/block-*"}
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with ImageServer(demo_resolver(seed=0)) as server:
        write_demo_inputs(root, 2_000, server.port)
        config = demo_run_config(root, "faults", server.port, {"master": "local[2]", "partitions": 2})
        (root / "run.yaml").write_text(yaml.safe_dump(config))
        reference = root / "reference"
        _run(root / "run.yaml", reference)
        yield root, reference


def _command(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "curation", "run", str(config), "--output", str(run_dir)]


def _environment() -> dict:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}


def _run(config: Path, run_dir: Path) -> None:
    completed = subprocess.run(_command(config, run_dir), env=_environment(), capture_output=True, text=True,
                               timeout=RUN_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-4000:]


def _folder(run_dir: Path, position: int, stage: str) -> tuple[Path, str]:
    if stage == "publish":
        return run_dir, "publish"
    return run_dir / "stages", f"{position:02d}_{stage}"


def _reached(run_dir: Path, position: int, stage: str, point: str) -> bool:
    parent, name = _folder(run_dir, position, stage)
    if point == "between_stages":
        return (parent / name / "_SUCCESS").is_file()
    if point == "after_task":
        return stage in WORK_FILES and any((parent / f".{name}.work").glob(WORK_FILES[stage]))
    return any(parent.glob(f".{name}.tmp-*"))


def _run_until_killed(config: Path, run_dir: Path, position: int, stage: str, point: str) -> str:
    """Start the run and SIGKILL its whole process group once the run folder shows `point` of `stage`; the
    outcome: "killed", or "finished" when the run ended first."""
    process = subprocess.Popen(_command(config, run_dir), env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if _reached(run_dir, position, stage, point):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return "killed"
            time.sleep(0.005)
        assert process.returncode == 0, f"the run failed on its own (exit {process.returncode})"
        return "finished"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _release(run_dir: Path) -> dict[str, bytes]:
    publish = run_dir / "publish"
    files = {str(p.relative_to(publish)): p.read_bytes() for p in sorted(publish.rglob("*"))
             if p.is_file() and p.parent != publish}
    manifest = json.loads((publish / "manifest.json").read_text())
    files["manifest.json"] = json.dumps(without_volatile(manifest), sort_keys=True).encode()
    return files


def _assert_same_release(run_dir: Path, reference: Path) -> None:
    got, expected = _release(run_dir), _release(reference)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if got[name] != expected[name]]
    assert not different, different


def _kill_chain(demo_setup, tmp_path, choose_point) -> list[tuple[str, str, str]]:
    root, reference = demo_setup
    run_dir = tmp_path / "run"
    outcomes = []
    for position, (stage, _) in enumerate(DEMO_STAGES, start=1):
        point = choose_point(stage)
        outcomes.append((stage, point, _run_until_killed(root / "run.yaml", run_dir, position, stage, point)))
    _run(root / "run.yaml", run_dir)
    _assert_same_release(run_dir, reference)
    assert not list((run_dir / "stages").glob(".*.tmp-*")), "leftovers of killed writers were not removed"
    return outcomes


def test_a_seeded_kill_in_every_stage_resumes_to_identical_output(demo_setup, tmp_path):
    chooser = random.Random(20261130)

    def choose(stage: str) -> str:
        points = KILL_POINTS if stage in WORK_FILES else ("mid_write", "between_stages")
        return chooser.choice(points)

    outcomes = _kill_chain(demo_setup, tmp_path, choose)
    assert sum(outcome == "killed" for _, _, outcome in outcomes) >= len(DEMO_STAGES) - 2, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_every_kill_point_of_every_stage_resumes_to_identical_output(demo_setup, tmp_path, point):
    _kill_chain(demo_setup, tmp_path, lambda stage: point)
