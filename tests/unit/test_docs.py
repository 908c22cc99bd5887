"""The README documents every stage, every stage option and every command (the guide: docs for every flag).

The stage, option and stage-command tables are generated from the stage declarations (`make docs`); the test
compares them, defaults and help texts included, with what the README holds."""

import re

from curation.cli import STAGE_COMMANDS, build_parser
from curation.readme_tables import render
from curation.stages import all_stages
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def _option_rows() -> dict[str, set[str]]:
    """stage -> the options its rows of the README's option table name."""
    documented: dict[str, set[str]] = {}
    for line in README.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not line.startswith("|"):
            continue
        stages = [s.strip() for s in cells[0].split(",")]
        options = set(re.findall(r"`([a-z_0-9]+)`", cells[1]))
        for stage in stages:
            documented.setdefault(stage, set()).update(options)
    return documented


def test_the_generated_tables_match_the_readme():
    assert render(README) == README, "README tables are out of date with the stage declarations: run `make docs`"


def test_every_stage_option_is_in_the_readme_table():
    documented = _option_rows()
    missing = [f"{stage.name}.{spec.name}" for stage in all_stages() for spec in stage.specs()
               if spec.name not in documented.get(stage.name, set())]
    assert not missing, f"stage options missing from README's option table: {missing}"


def test_every_stage_is_in_the_stage_table():
    missing = [stage.name for stage in all_stages() if f"| `{stage.name}` |" not in README]
    assert not missing, f"stages missing from README's stage table: {missing}"


def test_every_command_is_in_the_command_table():
    parser = build_parser()
    commands = next(a for a in parser._subparsers._group_actions).choices  # noqa: SLF001
    missing = [name for name in commands if f"`curation {name}" not in README]
    assert not missing, f"commands missing from README's command table: {missing}"
    assert set(STAGE_COMMANDS) <= set(commands)
