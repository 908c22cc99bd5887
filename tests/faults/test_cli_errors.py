"""Mistakes a user makes on the command line or in a run configuration (issue 17, cases 10, 12 and 13): each is
refused by `python -m curation` (a subprocess) with exit code 2 and one ERROR line naming the key, no traceback, and
no output folder, before Spark starts. An unexpected failure is one line too, with the traceback only under
--verbose. Messages and stdout lines escape the control characters of what they echo."""

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from curation import cli
from tests.conftest import REPO_ROOT


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    """`python -m curation ARGS` of this checkout, run in `cwd` (the relative paths in the cases are the user's)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "curation", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


def _refused_in_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = _error_lines(result)
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], result.stderr


@pytest.fixture
def blank_entry_metadata(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text('[\n  "dog",\n  "",\n  "cat"\n]\n')
    return path


# --- `curation run CONFIG`: the configuration names the key that is wrong

@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        # case 10: option values are type-checked
        ("stages: [{ingest: {skip_bad_files: 'false'}}]",
         ["stage ingest: option skip_bad_files is 'false'; allowed: true | false"]),
        ("stages: [ingest, match, {balance: {target_size: 0}}]",
         ["stage balance: option target_size is 0; allowed: an integer >= 1 | null"]),
        ("seed: 1.7\nstages: [ingest]", ["`seed` must be an integer, got 1.7"]),
        ("stages: [ingest, {sample: {seed: 1.7}}]", ["stage sample: option seed is 1.7; allowed: an integer"]),
        # case 13
        ("stages: [ingest, count, ingest]", ["`stages`: ingest is listed again at position 3"]),
        ("stages: [ingest, publish, sample]",
         ["`stages`: sample comes after publish (position 2); publish writes the release and must be the last"]),
        ("stages: [{ingest: {partitions: -1}}]", ["stage ingest: option partitions is -1; allowed: an integer >= 1"]),
        ("spark: {partitions: -1}\nstages: [ingest]", ["`spark.partitions` must be an integer >= 1"]),
        ("seed: [1, 2]\nstages: [ingest]", ["`seed` must be an integer, got [1, 2]"]),
        ("seed: abc\nstages: [ingest]", ["`seed` must be an integer, got 'abc'"]),
        ("stages: [{ingest: {keep_columns: WIDTH}}]",
         ["stage ingest: option keep_columns is 'WIDTH'; allowed: a list of non-empty strings"]),
    ],
    ids=["bool-from-string", "target-size-0", "seed-float", "stage-seed-float", "ingest-twice", "after-publish",
         "partitions-negative", "spark-partitions-negative", "seed-list", "seed-string", "keep-columns-string"],
)
def test_a_bad_run_configuration_is_one_line_naming_the_key(tmp_path, config, fragments):
    path = tmp_path / "run.yaml"
    path.write_text(f"input: shards\nmetadata: metadata.json\n{config}\n")
    result = _cli("run", path, "--output", tmp_path / "run", cwd=tmp_path)
    _refused_in_one_line(result, str(path), *fragments)
    assert not (tmp_path / "run").exists()


def test_a_blank_metadata_entry_is_refused_naming_the_file_and_line(tmp_path, blank_entry_metadata):
    """Case 10: an empty entry matched 12% of the captions. Refused before Spark starts, whichever stage reads it."""
    path = tmp_path / "run.yaml"
    path.write_text(f"input: shards\nmetadata: {blank_entry_metadata}\nstages: [ingest, match]\n")
    result = _cli("run", path, "--output", tmp_path / "run", cwd=tmp_path)
    _refused_in_one_line(result, f"metadata file {blank_entry_metadata}, line 3: entry 1 is ''")
    assert not (tmp_path / "run").exists()


# --- the stage commands' flags

@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["balance", "--target-size", "0"], ["stage balance: option target_size is 0; allowed: an integer >= 1"]),
        (["ingest", "--partitions", "-1"], ["stage ingest: option partitions is -1"]),
        (["ingest", "--keep-columns", ""], ["stage ingest: option keep_columns is ['']"]),
        (["match", "--metadata", "metadata.json"], ["metadata.json, line 3: entry 1 is ''"]),
    ],
    ids=["target-size-0", "partitions-negative", "keep-columns-blank", "blank-metadata-entry"],
)
def test_a_bad_stage_flag_is_one_line_naming_the_option(tmp_path, blank_entry_metadata, args, fragments):
    command, *flags = args
    result = _cli(command, "--input", "shards", "--output", tmp_path / "out", *flags, cwd=tmp_path)
    _refused_in_one_line(result, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "usage_error"),
    [
        (["sample", "--input", "shards", "--seed", "1.7"], "argument --seed: invalid int value: '1.7'"),
        (["ingest", "--input", "shards", "--skip-bad-files", "false"], "unrecognized arguments: false"),
        (["run", "run.yaml", "--dry-run", "--sample-rows", "-1"], "argument --sample-rows: must be an integer >= 0, "
                                                                  "got '-1'"),
    ],
    ids=["seed-float", "switch-given-a-value", "sample-rows-negative"],
)
def test_a_flag_of_the_wrong_type_is_a_usage_error(tmp_path, args, usage_error):
    """argparse refuses these itself: its usage line and one `error:` line, exit 2."""
    result = _cli(*args, "--output", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].endswith(f"error: {usage_error}"), result.stderr
    assert not (tmp_path / "out").exists()


# --- an unexpected failure

def test_an_unexpected_failure_is_one_line_and_its_traceback_is_shown_with_verbose(tmp_path):
    """A folder given where a file is expected raises IsADirectoryError, which no check anticipates."""
    result = _cli("metadata", "check", tmp_path, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [line.split(" ERROR ", 1)[1] for line in _error_lines(result)] == [
        f"curation: IsADirectoryError: [Errno 21] Is a directory: '{tmp_path}' (run with --verbose for the traceback)"
    ]
    verbose = _cli("--verbose", "metadata", "check", tmp_path, cwd=tmp_path)
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr and "in load_metadata" in verbose.stderr


def test_an_interrupt_is_one_line(monkeypatch, caplog):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["verify", "anything"]) == 130
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR] == ["interrupted"]


# --- case 12: control characters of the input reach neither the log nor stdout raw

HOSTILE_NAME = "a\x1b[31mred\u202eevil\nFORGED ERROR line\x7f\x9b.parquet"
ESCAPED_NAME = "a\\x1b[31mred\\u202eevil\\nFORGED ERROR line\\x7f\\x9b.parquet"


def test_a_file_name_with_control_characters_is_logged_escaped_on_one_line(tmp_path):
    """The message naming an unusable shard (a 0-byte one) echoes its name; the dry run plans without Spark."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / HOSTILE_NAME).write_bytes(b"")
    config = tmp_path / "run.yaml"
    config.write_text("input: shards\nstages: [ingest]\n")
    result = _cli("run", config, "--output", tmp_path / "run", "--dry-run", cwd=tmp_path)
    _refused_in_one_line(result, f"cannot use input shard {tmp_path / 'shards'}/{ESCAPED_NAME}: Parquet file size")
    assert not set("\x1b\u202e\x7f\x9b") & set(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_formatter_escapes_the_message_and_keeps_the_traceback_lines():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(cli.EscapingFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("tests.cli_errors")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("shard %s skipped", HOSTILE_NAME)
        try:
            raise ValueError(f"bad {HOSTILE_NAME}")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"WARNING shard {ESCAPED_NAME} skipped"
    assert lines[1:3] == ["ERROR failed", "Traceback (most recent call last):"]
    assert f"ValueError: bad {ESCAPED_NAME}".split("\\n")[0] in lines[-2]  # the traceback splits at the newline
    assert not set("\x1b\u202e\x7f\x9b") & set(stream.getvalue())


def test_stdout_lines_are_escaped_and_json_stays_valid(capsys):
    cli._write(f"report: {HOSTILE_NAME}")
    cli._write_json({"never_match_sample": [HOSTILE_NAME]}, indent=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"report: {ESCAPED_NAME}"
    assert not set("\x1b\u202e\x7f\x9b") & set("".join(lines))
    assert json.loads("\n".join(lines[1:])) == {"never_match_sample": [HOSTILE_NAME]}

