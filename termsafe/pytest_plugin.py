"""pytest plugin: test your workflows under kills that land at exact places.

Registered through the ``pytest11`` entry point, so pytest loads it in every
run where termsafe is installed. Loading it only defines hooks, fixtures and
two markers: it installs no signal handler, starts no thread and opens no
file; ``termsafe.testing`` (which builds terminators) is imported only when a
fixture is used. See docs/testing.md.

Fixtures:

* ``terminator``: an isolated ``Terminator`` (``MemorySink``, short phases,
  also the default terminator during the test), torn down with every workflow
  ended; teardown fails the test if a workflow was still live, a hook never
  ran or hung, or a kill armed with ``kill`` never fired.
* ``kill``: a ``termsafe.testing.KillScheduler`` on that terminator.
* ``audit_events``: a ``termsafe.testing.AuditEvents`` of that terminator.
* ``chaos``: a ``termsafe.testing.Chaos``, seeded from ``--chaos-seed``.
* ``termsafe_backend``: ``"asyncio"`` or ``"trio"`` (see the marker).

Markers:

* ``termsafe_phases(graceful=1.0, forced=1.0, hook_timeout=5.0)``: the
  ``terminator`` fixture's ladder.
* ``termsafe_backends`` / ``termsafe_backends("trio")``: run an ``async def``
  test once per backend (default both), with ``anyio.run``.

When a test fails after a kill was injected, its report gains a section
saying where each kill was requested, where it took effect, and the audit
timeline of the killed workflow.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from termsafe import Terminator
    from termsafe.testing import AuditEvents, Chaos, KillScheduler, _Harness

__all__ = [
    "audit_events",
    "chaos",
    "kill",
    "terminator",
    "termsafe_backend",
]

_BACKENDS = ("asyncio", "trio")
_DEFAULT_PHASES = {"graceful": 1.0, "forced": 1.0}
_DEFAULT_HOOK_TIMEOUT = 5.0
_SECTION_TITLE = "termsafe: where the kill landed"

_SEED = pytest.StashKey[int]()
_HARNESS = pytest.StashKey["_Harness"]()
_CALL_FAILED = pytest.StashKey[bool]()
_REPORTED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--chaos-seed``."""
    group = parser.getgroup("termsafe", "termsafe: kill-safety testing")
    group.addoption(
        "--chaos-seed",
        action="store",
        type=int,
        default=None,
        dest="termsafe_chaos_seed",
        metavar="SEED",
        help="seed of the `chaos` fixture's random kills (default: a random seed, "
        "shown in the report header)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers and pick the chaos seed."""
    config.addinivalue_line(
        "markers",
        "termsafe_phases(graceful=1.0, forced=1.0, hook_timeout=5.0): "
        "phase ladder of the termsafe `terminator` fixture",
    )
    config.addinivalue_line(
        "markers",
        "termsafe_backends(*backends): run this async test once per anyio backend "
        "(default: asyncio and trio) through the `termsafe_backend` fixture",
    )
    seed = config.getoption("termsafe_chaos_seed", None)
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**32)
    config.stash[_SEED] = seed


def pytest_report_header(config: pytest.Config) -> str:
    """Show the chaos seed, so that a run can be reproduced."""
    seed = config.stash.get(_SEED, None)
    return f"termsafe: chaos seed {seed} (reproduce with --chaos-seed={seed})"


# -- termsafe_backends -------------------------------------------------------------------


def _has_backends_marker(collector: pytest.Module | pytest.Class, obj: object) -> bool:
    own = getattr(obj, "pytestmark", ())
    if any(getattr(m, "name", None) == "termsafe_backends" for m in own):
        return True
    return collector.get_closest_marker("termsafe_backends") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> None:
    """Make tests marked ``termsafe_backends`` use the ``termsafe_backend`` fixture."""
    if (
        inspect.isfunction(obj)
        and collector.istestfunction(obj, name)
        and _has_backends_marker(collector, obj)
    ):
        pytest.mark.usefixtures("termsafe_backend")(obj)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``termsafe_backend`` from the ``termsafe_backends`` marker."""
    marker = metafunc.definition.get_closest_marker("termsafe_backends")
    if marker is None or "termsafe_backend" not in metafunc.fixturenames:
        return
    backends = tuple(marker.args) or _BACKENDS
    unknown = [b for b in backends if b not in _BACKENDS]
    if unknown or marker.kwargs:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: termsafe_backends takes backend names "
            f"({', '.join(_BACKENDS)}), got {marker.args!r} {marker.kwargs!r}"
        )
    metafunc.parametrize("termsafe_backend", list(backends), ids=list(backends))


@pytest.fixture
def termsafe_backend(request: pytest.FixtureRequest) -> str:
    """The anyio backend an ``async def`` test marked ``termsafe_backends`` runs under.

    ``"asyncio"`` when the test is not parametrized by the marker. A test
    for ``trio`` is skipped when trio is not installed.

    Returns:
        ``"asyncio"`` or ``"trio"``.
    """
    backend: str = getattr(request, "param", "asyncio")
    if backend == "trio":
        pytest.importorskip("trio")
    return backend


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``async def`` test that uses ``termsafe_backend`` with ``anyio.run``."""
    backend = pyfuncitem.funcargs.get("termsafe_backend")
    if backend is None or not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    if "anyio_backend" in pyfuncitem.funcargs:
        return None  # anyio's own plugin runs it
    import anyio

    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    anyio.run(functools.partial(pyfuncitem.obj, **kwargs), backend=str(backend))
    return True


# -- the terminator and its instruments ---------------------------------------------------


def _harness(request: pytest.FixtureRequest) -> _Harness:
    harness: _Harness = request.node.stash[_HARNESS]
    return harness


@pytest.fixture
def terminator(request: pytest.FixtureRequest) -> Iterator[Terminator]:
    """An isolated ``Terminator`` for this test, ended and closed afterwards.

    It has a ``MemorySink``, a short ladder (1 s + 1 s; change it with
    ``@pytest.mark.termsafe_phases(graceful=..., forced=..., hook_timeout=...)``)
    and is the default terminator during the test, so
    ``termsafe.workflow(...)`` without ``terminator=`` registers with it.

    Teardown kills (with ``force=True``) every workflow still live, then fails
    the test if one was, if a workflow ended with a hook that never ran, if a
    hook hung, or if a kill armed with the ``kill`` fixture never fired.

    Yields:
        The ``Terminator``.

    Raises:
        pytest.fail.Exception: at setup for a bad ``termsafe_phases`` marker;
            at teardown for the problems above (unless the test already failed).
    """
    from termsafe import ConfigurationError, InvalidArgumentType, Phases
    from termsafe.testing import _Harness

    options = dict(_DEFAULT_PHASES)
    hook_timeout = _DEFAULT_HOOK_TIMEOUT
    marker = request.node.get_closest_marker("termsafe_phases")
    try:
        if marker is not None:
            kwargs = dict(marker.kwargs)
            hook_timeout = kwargs.pop("hook_timeout", hook_timeout)
            if len(marker.args) > 2:
                raise TypeError(f"at most 2 positional arguments (got {marker.args!r})")
            options.update(zip(("graceful", "forced"), marker.args, strict=False))
            options.update(kwargs)
        phases = Phases(**options)
        harness = _Harness(
            phases,
            hook_timeout=hook_timeout,
            seed=request.config.stash[_SEED],
            salt=request.node.nodeid,
        )
    except (TypeError, ConfigurationError, InvalidArgumentType) as exc:
        pytest.fail(f"bad termsafe_phases marker: {exc}", pytrace=False)
    request.node.stash[_HARNESS] = harness
    yield harness.term
    problems = harness.close()
    if problems and not request.node.stash.get(_CALL_FAILED, False):
        pytest.fail("termsafe teardown:\n" + "\n".join(f"  - {p}" for p in problems), pytrace=False)


@pytest.fixture
def kill(terminator: Terminator, request: pytest.FixtureRequest) -> KillScheduler:
    """Arm kills of the ``terminator`` fixture's workflows at exact places.

    ``kill.at_point(id, n)``, ``kill.on_section_entry(id, kind)``,
    ``kill.on_grace_expiry(id, kind)``, ``kill.after(id, seconds)``; each
    takes ``force=`` and returns a ``ScheduledKill``. See
    ``termsafe.testing.KillScheduler``.

    Returns:
        A ``KillScheduler`` bound to the ``terminator`` fixture.
    """
    return _harness(request).scheduler()


@pytest.fixture
def audit_events(terminator: Terminator, request: pytest.FixtureRequest) -> AuditEvents:
    """The audit events of the ``terminator`` fixture, flushed on every read.

    ``.types(workflow_id=None)``, ``.of_type(t)``, ``.timeline()``,
    ``.assert_sequence("kill_requested", "kill_deferred", ...)``. See
    ``termsafe.testing.AuditEvents``.

    Returns:
        An ``AuditEvents`` of the ``terminator`` fixture.
    """
    return _harness(request).audit


@pytest.fixture
def chaos(terminator: Terminator, request: pytest.FixtureRequest) -> Chaos:
    """A seeded random kill injector on the ``terminator`` fixture (call ``chaos.arm()``).

    The seed is ``--chaos-seed`` or a random one shown in the report header;
    each test mixes its own id in, so one test reproduces alone.

    Returns:
        A ``Chaos`` bound to the ``terminator`` fixture (disarmed).
    """
    return _harness(request).chaos()


# -- reporting ----------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Add where each injected kill landed to the report of a failed test."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    if report.failed and not item.stash.get(_REPORTED, False):
        harness = item.stash.get(_HARNESS, None)
        if harness is not None:
            text = harness.report_section()
            if text:
                item.stash[_REPORTED] = True
                report.sections.append((_SECTION_TITLE, text))
    return report
