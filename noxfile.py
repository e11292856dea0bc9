"""Developer sessions: ``nox -s tests``, ``lint``, ``typecheck``, ``bench``, ``docs``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite (real threads, signals and subprocesses) on each Python found."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint and check formatting of the package, tests, benchmarks and examples with ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "termsafe", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package and its tests with mypy in strict mode."""
    session.install("-e", ".[test]", "mypy>=1.10")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ in strict mode: a broken link or reference fails."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks; prints every figure beside its target, fails on a miss."""
    session.install("-e", ".")
    session.run("python", "benchmarks/run.py", *(session.posargs or ["--quick"]))
