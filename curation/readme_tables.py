"""The README's stage, option and stage-command tables, generated from the stage registry (`make docs`).

`python -m curation.readme_tables README.md` rewrites the text between each pair of markers
`<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; `--check` only reports whether it would change
anything (a test runs that, so the README cannot drift from the declarations).
"""

import argparse
import logging
import sys
from pathlib import Path

from curation.stage import OptionSpec, Stage
from curation.stages import all_stages

logger = logging.getLogger(__name__)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def stage_table() -> list[str]:
    lines = ["| stage | what it does | drops (ledger reason) |", "|---|---|---|"]
    lines += [f"| `{s.name}` | {_cell(s.description)} | {_cell(s.drops)} |" for s in all_stages()]
    return lines


def _spec_key(spec: OptionSpec) -> tuple:
    return spec.name, spec.describe_default(), spec.help, spec.limits()


def option_table() -> list[str]:
    """One row per option, stages sharing an option with the same default and help on one row."""
    rows: dict[tuple, list[str]] = {}
    for stage in all_stages():
        for spec in stage.specs():
            rows.setdefault(_spec_key(spec), []).append(stage.name)
    lines = ["| stage | option | default | meaning |", "|---|---|---|---|"]
    for (name, default, help_text, limits), stages in rows.items():
        meaning = help_text + (f" ({limits})" if limits else "")
        lines.append(f"| {', '.join(stages)} | `{name}` | {_cell(default)} | {_cell(meaning)} |")
    return lines


def _usage(stage: Stage) -> str:
    inputs = "IN..." if stage.takes_raw_shards else "IN"
    return f"curation {stage.command} --input {inputs} --output OUT [options]"


def stage_command_table() -> list[str]:
    lines = ["| command | what |", "|---|---|"]
    for stage in all_stages():
        flags = ", ".join(f"`{spec.flag}`" for spec in stage.specs())
        raw = "; IN may also be raw parquet shards (ingest runs first, into `OUT/_ingest`, with the ingest flags)" \
            if stage.input_kind == "either" else ""
        what = f"{stage.summary}; IN: {stage.input_help}{raw}" + (f"; flags: {flags}" if flags else "")
        lines.append(f"| `{_usage(stage)}` | {_cell(what)} |")
    return lines


TABLES = {"stages": stage_table, "options": option_table, "stage-commands": stage_command_table}


def render(text: str) -> str:
    """`text` with every generated section replaced by its current table."""
    for name, table in TABLES.items():
        begin, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
        if begin not in text or end not in text:
            raise ValueError(f"the README has no {begin} ... {end} section")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + begin + "\n" + "\n".join(table()) + "\n" + end + tail
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curation.readme_tables", description=__doc__)
    parser.add_argument("readme", type=Path, help="README.md to update")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date; write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    current = args.readme.read_text()
    wanted = render(current)
    if wanted == current:
        logger.info("%s: tables up to date", args.readme)
        return 0
    if args.check:
        logger.error("%s: tables out of date; run `make docs`", args.readme)
        return 1
    args.readme.write_text(wanted)
    logger.info("%s: tables regenerated", args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
