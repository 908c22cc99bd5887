"""Run configurations that must not exhaust memory (issue 17, case 6): refused by `curation run` with one line, exit
code 2 and no traceback, before anything is parsed into memory or Spark starts."""

import subprocess
import sys

from tests.conftest import REPO_ROOT


def _run(config, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curation", "run", str(config), "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def _refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_yaml_aliases_are_refused_so_a_billion_laughs_cannot_expand(tmp_path):
    """Nine levels of ten aliases would expand to 1e9 strings."""
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    config = tmp_path / "run.yaml"
    config.write_text("\n".join(levels) + "\ninput: x\nstages: [ingest]\n")
    _refused(_run(config, tmp_path), "YAML aliases (*a0) are not allowed in a run configuration (line 2)")
    assert not (tmp_path / "run").exists()


def test_an_oversized_config_is_refused_before_it_is_parsed(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("input: x\nstages: [ingest]\n" + "# padding\n" * 200_000)
    _refused(_run(config, tmp_path), "more than the 1,048,576 a configuration may have")
