"""The package's layering, read from the source: the stages are siblings (none imports the GRPO trainer), and
the scripts share code through the package, never through each other."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGES = ["rejection.py", "sft_trainer.py", "evaluate.py", "runs.py", "step.py", "data/traces.py"]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_the_grpo_trainer(stage):
    modules = imported_modules(ROOT / "grpo_jax" / stage)
    assert not {"grpo_jax.trainer", "grpo_jax.rejection"} & modules, sorted(modules)


def test_no_script_imports_another_script():
    scripts = {path.stem: path for path in (ROOT / "experiments").glob("*.py")}
    assert {"r1zero", "r1", "distill", "sft", "benchmark", "hf_peer_bench"} <= set(scripts)
    for name, path in scripts.items():
        assert not set(scripts) & imported_modules(path), name
