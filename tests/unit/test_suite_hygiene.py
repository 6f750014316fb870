"""The suite's own rules: every unit test that starts a process is marked ``slow`` (``pytest -m "not slow"``
is the quick loop; tests/integration is marked slow as a whole by conftest), and no test module or
script edits ``sys.path`` (shared code is ``tests/support``, on the path through pytest's ``pythonpath``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPAWNS = ("subprocess.", "Popen(", "launch_cfg(", "torch.distributed.run")


def _spawning_tests(path: Path) -> list[tuple[str, bool]]:
    """(name, marked slow) of each test function of ``path`` that starts a process, itself or through a
    module-level helper."""
    src = path.read_text()
    tree = ast.parse(src)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    module_slow = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                      and "slow" in ast.get_source_segment(src, n) for n in tree.body)

    def spawns(node: ast.FunctionDef, seen: frozenset[str]) -> bool:
        if any(k in ast.get_source_segment(src, node) for k in SPAWNS):
            return True
        calls = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        return any(spawns(funcs[c], seen | {node.name}) for c in calls if c in funcs and c not in seen | {node.name})

    def slow(node: ast.FunctionDef) -> bool:
        return module_slow or any("slow" in ast.get_source_segment(src, d) for d in node.decorator_list)

    return [(n.name, slow(n)) for n in funcs.values() if n.name.startswith("test_") and spawns(n, frozenset())]


@pytest.mark.parametrize("path", sorted((ROOT / "tests" / "unit").glob("test_*.py")), ids=lambda p: p.name)
def test_process_spawning_unit_tests_are_marked_slow(path):
    unmarked = [name for name, slow in _spawning_tests(path) if not slow]
    assert not unmarked, f"{path.name}: start a process but are not marked slow: {unmarked}"


def test_the_check_sees_a_spawning_test():
    found = dict(_spawning_tests(ROOT / "tests" / "unit" / "test_distributed.py"))
    assert found == {"test_two_ranks_agree": True}


def test_nothing_edits_sys_path():
    offenders = []
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]:
        if path.name in ("test_suite_hygiene.py", "mutation.py"):  # this rule's text; mutation's copy under test
            continue
        if "sys.path.insert(" in path.read_text() or "sys.path.append(" in path.read_text():
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
