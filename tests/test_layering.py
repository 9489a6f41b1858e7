"""The package map, read statically from every module's imports (docs/architecture.md).

Imports are read with `ast`, so an import inside a function counts as much as
one at the top; the subprocess checks in test_runtime_package.py and
test_deploy_config.py see what importing actually loads.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {"dpstack": "dpstack", "data": "dpstack.data", "policy": "dpstack.policy", "runtime": "dpstack.runtime",
           "sim": "dpstack.sim", "deploy": "dpstack.deploy"}
BARE = ("data", "policy", "runtime", "sim", "deploy")
HEAVY = ("torch", "mujoco", "robosuite")

# layer -> the dpstack layers it may import (itself included). The command line
# (dpstack.cli, dpstack.bench_cli) imports its commands by name, when they run.
MAY_IMPORT = {
    "dpstack": {"dpstack.core"},  # the shared vocabulary (exit codes); commands by name only
    "dpstack.core": set(),
    "dpstack.data": {"dpstack.core"},
    "dpstack.runtime": {"dpstack.core"},
    "dpstack.deploy": {"dpstack.core", "dpstack.data", "dpstack.runtime"},  # data: `dpstack record` writes stores
    "dpstack.policy": {"dpstack.core", "dpstack.data", "dpstack.runtime"},
    "dpstack.sim": {"dpstack.core", "dpstack.data", "dpstack.runtime"},
    "dpstack.demo": {"dpstack.core", "dpstack.data", "dpstack.policy", "dpstack.runtime", "dpstack.sim"},
}
# layer -> third-party packages it must never import (its pip extra does not bring them)
NEVER = {"dpstack": HEAVY, "dpstack.core": HEAVY, "dpstack.data": HEAVY, "dpstack.runtime": HEAVY,
         "dpstack.deploy": HEAVY, "dpstack.sim": ("torch",)}


def product_modules() -> dict[str, Path]:
    """Installed module name -> file, for every module of the product."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def imported_names(tree: ast.AST, module: str = "", is_package: bool = False) -> set[str]:
    """Every module name an import statement names; relative imports resolved against `module`;
    `from X import y` also yields X.y, so `from dpstack import policy` counts as dpstack.policy."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def layer(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in MAY_IMPORT else parts[0]


def python_sources() -> dict[str, str]:
    """Every Python text of the repository: product, tests, scripts, and the docs' python blocks."""
    out = {str(p.relative_to(ROOT)): p.read_text() for folder in (*FOLDERS, "tests", "docs")
           for p in sorted((ROOT / folder).rglob("*.py"))}
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", md.read_text(), re.S)):
            out[f"{md.relative_to(ROOT)} python block {i + 1}"] = block
    return out


def test_the_product_modules_are_found():
    modules = product_modules()
    assert {"dpstack.cli", "dpstack.core.spec", "dpstack.runtime.server", "dpstack.deploy.bridge",
            "dpstack.policy.nets.unet", "dpstack.sim.arm", "dpstack.demo.pipeline"} <= set(modules)


def test_no_module_imports_a_bare_top_level_folder():
    """`import runtime` works only from a checkout and breaks when a user's project has its own."""
    bad = []
    for where, text in python_sources().items():
        for name in imported_names(ast.parse(text)):
            if name.split(".")[0] in BARE:
                bad.append(f"{where}: {name}")
    assert not bad, "import these as dpstack.<folder>:\n" + "\n".join(sorted(bad))


def test_no_usage_line_names_a_bare_module():
    """`python -m` with a bare folder name (runtime.x) does not run from an installed dpstack."""
    pattern = re.compile(r"python -m (?:%s)\.[\w.]+" % "|".join(BARE))
    texts = {**python_sources(), **{str(p.relative_to(ROOT)): p.read_text()
                                    for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                                              *sorted((ROOT / "deploy" / "systemd").glob("*"))]}}
    bad = [f"{where}: {m.group(0)}" for where, text in texts.items() for m in pattern.finditer(text)]
    assert not bad, "write python -m dpstack.<folder>.<module>:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_layer_imports_only_the_layers_below_it(package):
    bad = []
    for name, path in product_modules().items():
        if layer(name) != package:
            continue
        tree = ast.parse(path.read_text())
        for imported in imported_names(tree, name, path.name == "__init__.py"):
            top = imported.split(".")[0]
            if top == "dpstack" and imported != "dpstack":
                target = layer(imported)
                if target != package and target not in MAY_IMPORT[package]:
                    bad.append(f"{path.relative_to(ROOT)} imports {imported}")
            elif top in NEVER.get(package, ()):
                bad.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not bad, f"{package} may import only {sorted(MAY_IMPORT[package]) or 'no other dpstack package'}" \
                    f" and never {list(NEVER.get(package, ()))}:\n" + "\n".join(sorted(set(bad)))


def test_the_checker_sees_relative_and_late_imports():
    tree = ast.parse("def f():\n    from ..policy import model\n    import torch\nfrom dpstack import sim\n")
    names = imported_names(tree, "dpstack.runtime.x")
    assert {"dpstack.policy", "dpstack.policy.model", "torch", "dpstack.sim"} <= names
    assert layer("dpstack.policy.model") == "dpstack.policy" and layer("dpstack.cli") == "dpstack"
