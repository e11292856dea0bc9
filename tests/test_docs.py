"""The documentation site cannot drift from the code and the test suite.

These tests read the Markdown sources in docs/ (they do not build the site:
``mkdocs build --strict`` in CI and ``nox -s docs`` does that) and check what
a build cannot: that every test the requirements map cites exists, that every
``::: name`` in the API reference names an importable object, that every
public name is in the reference, and that the getting-started example still
runs and prints what the page shows.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import termsafe

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REQUIREMENTS_PAGE = DOCS / "requirements.md"
REFERENCE = DOCS / "reference"

# A pytest node id as the requirements map writes it: a file, then one or two names.
NODE_ID = re.compile(r"\b(tests/[\w/]+\.py)((?:::\w+){1,2})")
DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.MULTILINE)

# The sections of the requirements document, each a heading of the map.
REQUIRED_SECTIONS = (
    "Overview",
    "Core safety principles",
    "1. No data loss",
    "2. Resource cleanup",
    "3. State consistency",
    "Termination phases",
    "Phase 1: graceful shutdown (0-5 seconds)",
    "Phase 2: forced shutdown (5-10 seconds)",
    "Phase 3: system kill (10+ seconds)",
    "Critical sections",
    "Git operations",
    "Database transactions",
    "File system operations",
    "External API calls",
    "Permission model",
    "Who can kill",
    "Who cannot kill",
    "Safety checks",
    "Pre-kill validation",
    "Kill safety wrapper",
    "Monitoring requirements",
    "Real-time monitoring",
    "Alerting thresholds",
    "Audit requirements",
    "Recovery procedures",
    "Failed kill recovery",
    "Data recovery",
    "Testing requirements",
    "Unit tests",
    "Integration tests",
    "Chaos testing",
    "Compliance considerations",
    "Data retention",
    "Security",
    "Performance",
)


@functools.cache
def _test_names(path: str) -> dict[str, frozenset[str]]:
    """Module-level names of a test file, each with the test methods of its class."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)
    names: dict[str, frozenset[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = frozenset(
                item.name
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                and item.name.startswith("test")
            )
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names[node.name] = frozenset()
        elif isinstance(node, ast.Assign):
            # ``TestMachine = Machine.TestCase``: hypothesis's stateful tests.
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.startswith("Test"):
                    names[target.id] = frozenset()
    return names


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a Markdown page, as (info string, body) pairs."""
    blocks: list[tuple[str, str]] = []
    info: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if info is None:
            if line.startswith("```"):
                info, body = line[3:].strip(), []
        elif line.startswith("```"):
            blocks.append((info, "\n".join(body) + "\n"))
            info = None
        else:
            body.append(line)
    return blocks


def _cited_node_ids() -> list[str]:
    text = REQUIREMENTS_PAGE.read_text(encoding="utf-8")
    return sorted({m.group(1) + m.group(2) for m in NODE_ID.finditer(text)})


def _directives() -> list[str]:
    found: set[str] = set()
    for page in sorted(REFERENCE.glob("*.md")):
        found.update(DIRECTIVE.findall(page.read_text(encoding="utf-8")))
    return sorted(found)


def _resolve(dotted: str) -> object:
    """Import ``dotted`` as a module, or as an attribute path below the longest module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


class TestRequirementsMap:
    def test_cites_tests(self) -> None:
        """The map names at least one test for most requirements (the regex still matches)."""
        assert len(_cited_node_ids()) >= 100

    @pytest.mark.parametrize("node_id", _cited_node_ids())
    def test_cited_test_exists(self, node_id: str) -> None:
        """Every test node id the requirements map cites names a real test."""
        path, *names = node_id.split("::")
        assert (ROOT / path).is_file(), f"{node_id}: no file {path}"
        defined = _test_names(path)
        assert names[0] in defined, f"{node_id}: {path} defines no {names[0]}"
        if len(names) == 2:
            assert names[1] in defined[names[0]], f"{node_id}: {names[0]} has no {names[1]}"

    def test_every_section_of_the_requirements_is_mapped(self) -> None:
        """Each section of the requirements document has its heading on the map."""
        headings = {
            line.lstrip("#").strip()
            for line in REQUIREMENTS_PAGE.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")
        }
        assert [] == [section for section in REQUIRED_SECTIONS if section not in headings]


class TestApiReference:
    @pytest.mark.parametrize("dotted", _directives())
    def test_directive_resolves(self, dotted: str) -> None:
        """Every ``::: name`` in docs/reference names an importable object."""
        assert _resolve(dotted) is not None

    def test_every_public_name_is_documented(self) -> None:
        """Every name in ``termsafe.__all__`` has its own ``::: termsafe.NAME``."""
        documented = set(_directives())
        missing = [name for name in termsafe.__all__ if f"termsafe.{name}" not in documented]
        assert [] == missing

    def test_test_toolkit_is_documented(self) -> None:
        """The reference covers termsafe.testing and the pytest plugin."""
        documented = set(_directives())
        assert {"termsafe.testing", "termsafe.pytest_plugin"} <= documented


class TestGettingStarted:
    def test_first_workflow_prints_what_the_page_shows(self, tmp_path: Path) -> None:
        """The first workflow of the getting-started page runs and prints its documented output."""
        page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
        blocks = _fenced_blocks(page)
        program = next(body for info, body in blocks if info == "python" and "term.kill(" in body)
        shown = next(body for info, body in blocks if info == "" and body.startswith("cleanup:"))
        script = tmp_path / "first_workflow.py"
        script.write_text(program, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert 0 == done.returncode, done.stderr
        # The batch the kill lands at depends on timing; the rest is exact.
        expected = re.sub(r"\{'batch': \d+\}", "{'batch': N}", shown).splitlines()
        actual = re.sub(r"\{'batch': \d+\}", "{'batch': N}", done.stdout).splitlines()
        assert expected == actual
        verified = termsafe.verify_audit_log(tmp_path / "audit.jsonl")
        assert verified.ok, verified.message
