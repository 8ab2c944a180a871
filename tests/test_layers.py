"""The import rules of ARCHITECTURE.md hold for the real code, and the checker catches a broken one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.layers import PACKAGES, ROOT, cycles, import_graph, violations


def test_every_import_follows_the_layer_rules() -> None:
    found = violations(import_graph())
    assert not found, "imports against ARCHITECTURE.md:\n" + "\n".join(map(str, found))


def test_no_module_imports_itself_back_through_others() -> None:
    assert cycles(import_graph()) == []


def test_the_checker_reports_a_forbidden_import_added_to_a_copy_of_the_code(tmp_path: Path) -> None:
    for package in PACKAGES:
        subprocess.run(["cp", "-r", str(ROOT / package), str(tmp_path / package)], check=True)
    assert violations(import_graph(tmp_path)) == violations(import_graph())  # the copy reads the same
    settings = tmp_path / "llmserve" / "settings.py"
    settings.write_text(settings.read_text() + "\n\ndef _late() -> None:\n    from router.app import create_app\n")
    split = tmp_path / "router" / "traffic" / "split.py"
    split.write_text(split.read_text() + "\nimport router.api.openai\n")
    found = {(v.importer, v.imported) for v in violations(import_graph(tmp_path))}
    assert ("llmserve.settings", "router.app") in found  # a lazy import inside a function counts
    assert ("router.traffic.split", "router.api.openai") in found
    sqlite = tmp_path / "router" / "store" / "sqlite.py"
    sqlite.write_text(sqlite.read_text() + "\nimport router.jobs.models\n")
    found = {(v.importer, v.imported) for v in violations(import_graph(tmp_path))}
    assert ("router.store.sqlite", "router.jobs.models") in found  # jobs -> store, one way


def test_the_checker_finds_a_cycle_and_the_modules_in_it() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_tools_reach_the_router_only_through_its_leaves() -> None:
    found = violations({"loadtest.runner": {"router.app"}, "fallback.speed": {"router.relay.sse"}})
    assert [(v.importer, v.imported) for v in found] == [("loadtest.runner", "router.app")]


def test_importing_a_small_router_module_does_not_load_the_app() -> None:
    code = ("import sys, router.traffic.split; "
            "print(any(m.startswith(('fastapi', 'router.app', 'aiohttp')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_no_module_is_longer_than_400_lines() -> None:
    lengths = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
               for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    assert {path: n for path, n in lengths.items() if n > 400} == {}
