"""The import rules of docs/architecture.md, read from the source with ``ast`` (imports inside functions
count too): what may import what, so the layers cannot grow back into each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tempo_mega

PKG = Path(tempo_mega.__file__).parent


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every tempo_mega module ``path`` imports (``from a import b`` counts as a, and as a.b when a.b is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "tempo_mega" or m.startswith("tempo_mega.")}


MODULES = {module_name(p): p for p in PKG.rglob("*.py") if "configs" not in p.parts}
# what an import of a name resolves to: the module itself where it exists
REAL = lambda names: {n for n in names if n in MODULES or n.rpartition(".")[0] not in MODULES}  # noqa: E731


def deps(module: str) -> set[str]:
    return {m for m in REAL(imports_of(MODULES[module])) if m in MODULES}


def under(prefix: str) -> list[str]:
    return sorted(m for m in MODULES if m == prefix or m.startswith(prefix + "."))


# the engines: what builds, holds or drives a model or a server (the seams and config modules are not)
SEAMS_AND_CONFIGS = {"tempo_mega.backends", "tempo_mega.backends.base", "tempo_mega.backends.megatron",
                     "tempo_mega.backends.megatron.config", "tempo_mega.rollout", "tempo_mega.rollout.base",
                     "tempo_mega.rollout.sglang.config", "tempo_mega.rollout.parts", "tempo_mega.rollout.samples",
                     "tempo_mega.rollout.background"}
ENGINES = {m for m in under("tempo_mega.backends") + under("tempo_mega.rollout") if m not in SEAMS_AND_CONFIGS}
RUN_LAYER = {"tempo_mega.trainer", "tempo_mega.build", "tempo_mega.controller"}


def test_the_rules_see_the_package():
    assert "tempo_mega.rollout.sglang" in ENGINES and "tempo_mega.backends.torch" in ENGINES
    assert "tempo_mega.backends.megatron.backend" in ENGINES
    assert "tempo_mega.rollout.base" in deps("tempo_mega.controller")  # the reader finds real imports
    assert "tempo_mega.algo.recipes" in deps("tempo_mega.config")


@pytest.mark.parametrize("module", under("tempo_mega.algo"))
def test_algo_is_pure(module):
    """algo/: tensor math and recipes; it may read the text rewards (TTRL/EMPO), nothing with I/O,
    processes, models or config objects."""
    allowed = (*under("tempo_mega.algo"), *under("tempo_mega.rewards"), "tempo_mega._lazy")  # + the facade helper
    bad = sorted(d for d in deps(module) if d not in allowed)
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", under("tempo_mega.config"))
def test_config_imports_no_engine(module):
    """Engines import their config from config modules; config never imports an engine (or the run layer)."""
    bad = sorted(d for d in deps(module) if d in ENGINES | RUN_LAYER)
    assert not bad, f"{module} imports {bad}"


@pytest.mark.slow
def test_loading_a_config_imports_no_torch():
    """A run's config is composed and validated (every rollout.sglang.* and megatron.* key included)
    without torch: the package facades load their names on first use."""
    code = ("import sys; from tempo_mega.config import load_config; "
            "load_config(['experiment=debug_cpu', 'backend=megatron', 'rollout=sglang']); "
            "print(sorted(m for m in ('torch', 'transformers', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("module", under("tempo_mega.rollout"))
def test_no_rollout_engine_imports_a_backend(module):
    """One-way engines: a sampler is told weights and prompts; it never reaches into a trainer."""
    bad = sorted(d for d in deps(module) if d.startswith("tempo_mega.backends") or d in RUN_LAYER)
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", under("tempo_mega.backends"))
def test_backends_import_no_sampler_and_megatron_not_the_torch_backend(module):
    bad = sorted(d for d in deps(module) if d.startswith("tempo_mega.rollout") or d in RUN_LAYER)
    if module.startswith("tempo_mega.backends.megatron"):
        bad += sorted(d for d in deps(module) if d == "tempo_mega.backends.torch")
    assert not bad, f"{module} imports {bad}"


def test_controller_sees_only_the_seams():
    """The controller drives the step through TrainBackend and RolloutEngine, not through an engine."""
    bad = sorted(d for d in deps("tempo_mega.controller") if d in ENGINES | {"tempo_mega.trainer", "tempo_mega.build"})
    assert not bad, f"tempo_mega.controller imports {bad}"


def test_only_the_entry_points_import_the_run_layer():
    users = sorted(m for m in MODULES if "tempo_mega.trainer" in deps(m))
    assert set(users) <= {"tempo_mega.cli", "tempo_mega.demo", "tempo_mega.study", "tempo_mega.telemetry.throughput"}, users


def test_no_isinstance_on_a_concrete_backend_outside_it():
    for name, path in MODULES.items():
        if name == "tempo_mega.backends.torch":
            continue
        text = path.read_text()
        assert "isinstance(actor, TorchBackend)" not in text and ", TorchBackend)" not in text, name


def test_no_module_over_500_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"over 500 lines: {long}"


def _mode_comparisons(source: str, where: str, modes: set[str]) -> list[str]:
    """``x.mode == "ttrl"``, ``a.mode in ("ttrl", "empo")`` and the like: a comparison of an attribute named
    ``mode`` with an algorithm mode's name."""
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        if any(isinstance(s, ast.Attribute) and s.attr == "mode" for s in sides) and names & modes:
            found.append(f"{where}:{node.lineno}")
    return found


def test_no_mode_string_comparison_outside_the_recipes():
    from tempo_mega.algo.recipes import MODES

    allowed = {"tempo_mega.algo.recipes"} | set(under("tempo_mega.config"))  # the recipes, and parsing
    found = [hit for name, path in MODULES.items() if name not in allowed
             for hit in _mode_comparisons(path.read_text(), name, set(MODES))]
    assert not found, f"compare algo.mode with a mode name; ask the recipe instead: {found}"
    # the check sees them where they are, and not a mode of something else
    probe = 'if cfg.algo.mode == "ttrl": pass\nok = a.mode in ("empo", "x")\nsg = s.mode == "engine"\n'
    assert _mode_comparisons(probe, "probe", set(MODES)) == ["probe:1", "probe:2"]


def test_no_forward_hooks_on_the_models():
    """Both roles' heads are modules (backends/megatron/model.py), not hooks on megatron's layers."""
    for name in under("tempo_mega.backends"):
        text = MODULES[name].read_text()
        assert "register_forward_hook" not in text and "register_forward_pre_hook" not in text, name


def test_no_product_module_imports_test_support():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in mods if m == "support" or m.startswith("support.")}, name
