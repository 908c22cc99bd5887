"""Outputs that must not destroy data (issue 17, cases 1, 2 and 9): a command replaces only a folder of ours, keeps
its output apart from its inputs, and two runs never write one folder at once.

The command-line cases run the CLI as a subprocess: the checks come before Spark starts, so each takes about a
second, and stderr must hold one line of error and no traceback.
"""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import OutputError, OutputLock, StageWriter, _one_at_a_time, check_apart
from curation.pipeline import run_pipeline
from curation.run_folder import RUN_LOCK
from curation.stages import load_run_config
from tests.conftest import REPO_ROOT


@pytest.fixture
def raw(tmp_path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    pq.write_table(pa.table({"url": ["http://a.example/1.jpg"], "caption": ["a cat"]}), folder / "part-0.parquet")
    return folder


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "notes" / "ideas.txt").write_text("more work")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curation", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def _refused(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_a_stage_command_does_not_replace_a_users_folder(raw, user_folder):
    before = _snapshot(user_folder)
    _refused(_cli("ingest", "--input", raw, "--output", user_folder), str(user_folder), "not a stage folder")
    assert _snapshot(user_folder) == before


def test_a_stage_command_does_not_write_over_its_input(raw):
    before = _snapshot(raw)
    _refused(_cli("ingest", "--input", raw, "--output", raw), "input")
    assert _snapshot(raw) == before


def test_a_stage_command_does_not_rename_a_users_file(raw, tmp_path):
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF precious")
    _refused(_cli("ingest", "--input", raw, "--output", target), "not a folder")
    assert target.read_bytes() == b"%PDF precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "report.pdf"]  # no hidden .report.pdf.old-*


def test_a_stage_output_inside_its_input_folder_is_refused(raw):
    _refused(_cli("ingest", "--input", raw, "--output", raw / "out"), "inside the input")
    assert not (raw / "out").exists()


def _run_config(tmp_path: Path, inputs: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"name": "t", "input": str(inputs), "stages": ["ingest"]}))
    return config


def test_a_run_does_not_write_among_a_users_files(raw, user_folder, tmp_path):
    before = _snapshot(user_folder)
    _refused(_cli("run", _run_config(tmp_path, raw), "--output", user_folder), "not a run folder")
    assert _snapshot(user_folder) == before


def test_a_run_inside_its_input_folder_is_refused(raw, tmp_path):
    """A run folder inside the input folder would be read as input by every rerun (rows in grew 3,176 -> 12,446)."""
    _refused(_cli("run", _run_config(tmp_path, raw), "--output", raw / "run"), "inside the input")
    assert not (raw / "run").exists()


def test_a_run_folder_containing_its_input_is_refused(raw, tmp_path):
    _refused(_cli("run", _run_config(tmp_path, raw), "--output", tmp_path), "contains the input")


def test_the_writer_itself_refuses_a_users_folder_and_file(user_folder, tmp_path):
    """The same rule below the CLI: any code path that builds a stage folder goes through StageWriter."""
    with pytest.raises(OutputError, match="not a stage folder"):
        StageWriter(user_folder)
    target = tmp_path / "file.txt"
    target.write_text("mine")
    with pytest.raises(OutputError, match="not a folder"):
        StageWriter(target)
    appeared = tmp_path / "late"
    with StageWriter(appeared) as writer, pytest.raises(OutputError, match="not a stage folder"):
        (appeared / "sub").mkdir(parents=True)  # a user's folder created while the stage ran
        (appeared / "sub" / "x").write_text("mine")
        writer.commit({"stage": "t"})
    assert (appeared / "sub" / "x").read_text() == "mine"


def test_outputs_apart_from_inputs(tmp_path):
    inputs = tmp_path / "in"
    check_apart(tmp_path / "out", [inputs, "s3a://bucket/x"])
    check_apart(tmp_path / "out", str(tmp_path / "in" / "*.parquet"))  # a glob's folder may hold the output's sibling
    for output in (inputs, inputs / "run", tmp_path):
        with pytest.raises(OutputError):
            check_apart(output, [inputs])
    with pytest.raises(OutputError):
        check_apart(tmp_path, str(tmp_path / "in" / "*.parquet"))


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [
        ("in/**/*.parquet", True),  # any depth: run/stages/01_ingest/part-0.parquet would match on a rerun
        ("glob:in/**/*.parquet", True),
        ("in/*/*/*/*.parquet", True),  # run/stages/01_ingest/part-0.parquet, exactly
        ("glob:in/[r]*/*/*/*.parquet", True),
        ("in/*.parquet", False),  # nothing inside run/ is one level deep
        ("in/s*/*/*.parquet", False),  # run does not match s*
        ("in/[r]*/*/*/*.parquet", False),  # brackets are literal outside glob:
        ("file://in", True),  # a file:// URI is a local path
        ("glob:file://in/**/*.parquet", True),
    ],
)
def test_an_output_inside_a_patterns_folder_is_refused_when_the_pattern_could_match_its_files(
    tmp_path, monkeypatch, pattern, refused
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    pattern = pattern.replace("file://in", f"file://{tmp_path}/in")
    if refused:
        with pytest.raises(OutputError, match="is inside the input"):
            check_apart(tmp_path / "in" / "run", [pattern])
    else:
        check_apart(tmp_path / "in" / "run", [pattern])


def test_a_live_lock_refuses_a_second_run_and_its_in_flight_work_survives(raw, tmp_path):
    run_dir = tmp_path / "run"
    in_flight = run_dir / "stages" / ".01_ingest.tmp-0123456789ab"
    in_flight.mkdir(parents=True)
    run_config = load_run_config(_run_config(tmp_path, raw))
    with OutputLock(run_dir / RUN_LOCK, run_dir):
        # The second run is refused before it touches anything (Spark is not even needed to find that out).
        holder = rf"in use by another run \(host {socket.gethostname()}, pid {os.getpid()}"
        with pytest.raises(OutputError, match=holder):
            run_pipeline(None, run_config, run_dir)
    assert in_flight.is_dir()
    assert not (run_dir / RUN_LOCK).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    lock_path = tmp_path / "x.lock"
    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": finished.pid, "since": "then"}))
    with OutputLock(lock_path, tmp_path):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()


def test_a_stale_lock_is_taken_over_by_one_run_at_a_time(tmp_path):
    """Two runs finding one stale lock must not both take it: each would remove it, the second removing the first's
    new lock. The takeover waits while another process (here: the test) changes the lock folder's lock files."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    lock_path = tmp_path / "x.lock"
    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": finished.pid, "since": "then"}))
    taken = threading.Event()

    def take_over():
        with OutputLock(lock_path, tmp_path):
            taken.set()

    with _one_at_a_time(tmp_path):
        runner = threading.Thread(target=take_over)
        runner.start()
        assert not taken.wait(0.5)
        assert json.loads(lock_path.read_text())["pid"] == finished.pid
    runner.join(10)
    assert taken.is_set() and not lock_path.exists()


def test_a_run_removes_only_its_own_lock(tmp_path):
    lock_path = tmp_path / "x.lock"
    with OutputLock(lock_path, tmp_path):
        # Someone removed our lock by hand and another run took the folder meanwhile.
        lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "since": "now"}))
    assert json.loads(lock_path.read_text())["pid"] == 1


def test_a_lock_held_by_a_zombie_is_stale(tmp_path):
    """A run killed with SIGKILL whose parent has not reaped it yet still has a pid; it holds nothing."""
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    try:
        os.waitid(os.P_PID, killed.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
        lock_path = tmp_path / "x.lock"
        lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": killed.pid, "since": "then"}))
        with OutputLock(lock_path, tmp_path):
            pass
    finally:
        killed.wait()


def test_another_hosts_lock_is_reported_not_taken(tmp_path):
    lock_path = tmp_path / "x.lock"
    lock_path.write_text(json.dumps({"host": "elsewhere.example", "pid": 1, "since": "then"}))
    with pytest.raises(OutputError, match=f"if that run is gone, remove {lock_path}"), OutputLock(lock_path, tmp_path):
        pass
    assert json.loads(lock_path.read_text())["host"] == "elsewhere.example"
