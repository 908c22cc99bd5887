"""The house's floors hold (docs: contracts -> ops -> gpu -> spark -> stages -> pipeline/cli): checked on the source's
imports, including the ones inside functions, and on what importing the CLI loads."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from curation.stage import RowFilterStage
from curation.stages import all_stages
from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "curation"
CONTRACTS = ("config", "schema", "io", "manifest", "stage", "run_folder")
HEAVY = ("pyspark", "torch", "faiss", "open_clip", "onnxruntime", "pandas")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_gpu_imports_nothing_from_spark():
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(m for m in _imports(p) if m.startswith("curation.spark"))
                 for p in _modules("gpu")}
    assert not {p: m for p, m in offenders.items() if m}


@pytest.mark.parametrize("contract", CONTRACTS)
def test_contracts_import_no_op_and_no_upper_floor(contract):
    upper = ("curation.ops", "curation.gpu", "curation.spark", "curation.stages", "curation.pipeline", "curation.cli")
    imported = _imports(PACKAGE / f"{contract}.py")
    assert not sorted(m for m in imported if m.startswith(upper))


@pytest.mark.parametrize("floor", ["ops", "gpu", "spark"])
def test_lower_floors_import_no_stage_declaration_pipeline_or_cli(floor):
    upper = ("curation.stages", "curation.pipeline", "curation.cli", "curation.dry_run", "curation.report")
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(m for m in _imports(p) if m.startswith(upper))
                 for p in _modules(floor)}
    assert not {p: m for p, m in offenders.items() if m}


# A run folder's layout is known to its writer (io.StageWriter) and its one reader (run_folder) only.
RUN_LAYOUT_OWNERS = (PACKAGE / "io.py", PACKAGE / "run_folder.py")
RUN_LAYOUT_NAMES = {"STAGE_RECORD", "SUCCESS_MARKER", "STAGES_DIR", "RELEASE_DIR"}
RUN_LAYOUT_STRINGS = ("_stage.json", "_SUCCESS")
RUN_LAYOUT_FOLDERS = {"stages", "publish"}


def _run_layout_uses(path: Path) -> list[str]:
    """The names, strings (docstrings aside) and `/ "stages"`-style paths of a run folder's layout in `path`."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in RUN_LAYOUT_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.ImportFrom):
            found.extend(alias.name for alias in node.names if alias.name in RUN_LAYOUT_NAMES)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.extend(text for text in RUN_LAYOUT_STRINGS if text in node.value)
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
              and node.right.value in RUN_LAYOUT_FOLDERS):
            found.append(f'/ "{node.right.value}"')
    return found


def test_only_the_run_folder_reader_lists_stages_or_opens_stage_records():
    offenders = {str(p.relative_to(REPO_ROOT)): _run_layout_uses(p) for p in PACKAGE.rglob("*.py")
                 if p not in RUN_LAYOUT_OWNERS}
    assert not {p: uses for p, uses in offenders.items() if uses}


def test_torch_only_in_the_gpu_package():
    offenders = [str(p.relative_to(REPO_ROOT)) for p in PACKAGE.rglob("*.py")
                 if "gpu" not in p.relative_to(PACKAGE).parts and {"torch", "open_clip", "faiss"} & _imports(p)]
    assert not offenders


def test_the_cli_runs_as_a_script():
    """A module of the package named like a standard-library module that the CLI's imports need (inspect, once)
    shadows it when a file of the package is run as a script."""
    result = subprocess.run([sys.executable, str(PACKAGE / "cli.py"), "--help"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


def test_importing_the_cli_loads_no_heavy_library():
    script = f"import sys, curation.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["cli.py", "pipeline.py", *(f"dry_run/{p.name}" for p in _modules("dry_run"))])
def test_no_stage_is_dispatched_by_name(module):
    """No comparison of a stage name with a declared stage's name: what differs per stage is in its declaration."""
    names = {stage.name for stage in all_stages()} | {stage.command for stage in all_stages()}
    tree = ast.parse((PACKAGE / module).read_text())
    compared = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                values = operand.elts if isinstance(operand, ast.Tuple | ast.Set | ast.List) else [operand]
                compared += [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]
        if isinstance(node, ast.Dict):
            compared += [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
    assert not compared, f"{module} dispatches on stage names {compared}"


@pytest.mark.parametrize("stage", all_stages(), ids=lambda stage: stage.name)
def test_each_declaration_names_a_spark_adapter_that_exists(stage):
    """A declaration names its adapter (a row filter its planner) as "module:function", so that importing it imports
    no Spark; a misspelt name would otherwise only fail when the stage runs."""
    named, method = ("planner", "plan") if isinstance(stage, RowFilterStage) else ("adapter", "run")
    if not hasattr(stage, named):
        assert method in vars(type(stage)), f"stage {stage.name} declares neither {named} nor {method}"
        return
    module, _, function = getattr(stage, named).partition(":")
    assert module.startswith("curation.spark."), f"stage {stage.name}: {named} {module} is not a Spark adapter"
    assert callable(getattr(importlib.import_module(module), function, None)), f"stage {stage.name}: no {function}"


@pytest.mark.parametrize("stage", all_stages(), ids=lambda stage: stage.name)
def test_each_declaration_names_a_dry_run_estimator_that_exists(stage):
    from curation.dry_run import Estimator

    estimate = getattr(Estimator, stage.estimated_by, None)
    assert callable(estimate), f"stage {stage.name}: no Estimator.{stage.estimated_by}"
