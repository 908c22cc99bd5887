"""The dry run's first part: each configured stage, its folder and whether `curation run` would redo it."""

import json
import os
from pathlib import Path

from curation.config import RunConfig, StageConfig
from curation.pipeline import current_input_fingerprint, is_up_to_date, stage_folder
from curation.run_folder import StageFolderError, is_complete, read_stage_record
from curation.stages import get_stage, hashed_config


def _non_default_options(stage: StageConfig) -> dict:
    defaults = {spec.name: spec.default for spec in get_stage(stage.name).specs()}
    return {key: value for key, value in stage.options.items() if value != defaults[key]}


def _stage_status(stage: StageConfig, config: dict, folder: Path, input_location) -> str:
    """Why the stage would run, or that it is up to date (the check `run_pipeline` makes)."""
    if not is_complete(folder):
        return "will run: no finished stage folder"
    try:
        if is_up_to_date(stage, config, folder, input_location):
            return "up to date (skipped)"
    except (StageFolderError, OSError, ValueError) as error:
        return f"will run: its input cannot be fingerprinted ({error})"
    record = read_stage_record(folder)
    stored = record.get("config") or {}
    if stored != config:
        return f"will run: config changed ({_config_change(stored, config)})"
    if record["input"].get("fingerprint") != current_input_fingerprint(stage, input_location):
        return "will run: its input changed"
    return "will run"


def _config_change(stored: dict, config: dict) -> str:
    changed = sorted(key for key in set(stored) & set(config) if stored[key] != config[key])
    added = sorted(set(config) - set(stored))
    removed = sorted(set(stored) - set(config))
    parts = [f"{key}: {json.dumps(stored[key])} -> {json.dumps(config[key])}" for key in changed]
    parts += [f"new option {key}" for key in added] + [f"option {key} gone" for key in removed]
    return "; ".join(parts)


def stage_lines(run_config: RunConfig, run_dir: Path) -> list[str]:
    lines = [f"stages ({len(run_config.stages)}):"]
    input_location = run_config.inputs
    upstream_runs = False
    first_to_run = None
    for position, stage in enumerate(run_config.stages, start=1):
        folder = stage_folder(run_dir, position, stage)
        try:
            config = hashed_config(stage)
        except (OSError, ValueError) as error:
            config, status = None, f"will fail: {error}"
        if config is not None:
            if upstream_runs:
                status = "will run: an upstream stage runs" if is_complete(folder) else (
                    "will run: no finished stage folder")
            else:
                status = _stage_status(stage, config, folder, input_location)
        if not status.startswith("up to date"):
            upstream_runs = True
            first_to_run = first_to_run or (position, stage.name)
        label = os.path.relpath(folder, run_dir)
        lines.append(f"  {position:>2} {stage.name:<13} {label:<24} {status}")
        options = _non_default_options(stage)
        if options:
            lines.append(f"     {'':<13} options: {_options_text(options)}")
        input_location = folder
    if first_to_run is None:
        lines.append("  every stage is up to date: `curation run` would skip them all")
    else:
        lines.append(f"  a run starts at stage {first_to_run[0]} ({first_to_run[1]}) and redoes every stage after it")
    return lines


def _options_text(options: dict) -> str:
    return ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in options.items())
