"""Import a script of experiments/ (not a package) as a module, for tests of its functions."""

import importlib.util
import pathlib
import sys

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load(name: str):
    """experiments/<name>.py as the module `experiments_<name>` (registered, so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
