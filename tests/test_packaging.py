"""rapidin as a package: every library it imports is declared in pyproject.toml (so `pip install .` works), and
every pin of requirements.txt satisfies the declared range."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared() -> dict[str, Requirement]:
    requirements = [Requirement(r) for r in PROJECT["dependencies"]]
    requirements += [Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in requirements if canonicalize_name(r.name) != "rapidin"}


def imported_modules() -> set[str]:
    """Top-level modules imported anywhere in the package (including imports inside functions)."""
    modules = set()
    for path in (ROOT / "rapidin").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"rapidin", "__future__"}


def test_every_imported_library_is_declared():
    distributions = packages_distributions()
    missing = {}
    for module in imported_modules():
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not names & set(declared()):
            missing[module] = sorted(names)
    assert missing == {}


def test_requirements_pins_satisfy_the_declared_ranges():
    ranges = declared()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            name = canonicalize_name(pin.name)
            if name in ranges:
                (version,) = [spec.version for spec in pin.specifier]
                assert ranges[name].specifier.contains(version, prereleases=True), (line, str(ranges[name]))
