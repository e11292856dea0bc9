"""Who may kill: principals, decisions and the permission rule.

The rule follows the permission model of the requirements:

* the workflow's owner, an ``admin``, and a ``team-lead`` of the workflow's team
  may kill it;
* a ``system`` principal (an automated actor) may kill it when the policy named
  by its id is registered with the terminator and approves;
* ``read-only`` users, ``external`` principals and ``workflow`` principals never
  may, whatever other roles they carry (a workflow asks with
  ``request_termination()`` instead).

Trust boundary: inside one process, code that can construct a ``Principal`` is
trusted to say who it is (it could as well call the hooks directly). Across
processes, identity comes from the operating system, never from the caller's
claim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Literal

import attrs

from ._exceptions import ConfigurationError, InvalidArgumentType

if TYPE_CHECKING:
    from ._workflow import Workflow

__all__ = [
    "KILL_PERMITTED_ROLES",
    "PRINCIPAL_KINDS",
    "Decision",
    "Principal",
    "check_kill_args",
    "has_kill_permission",
]

PrincipalKind = Literal["user", "system", "external", "workflow"]
PRINCIPAL_KINDS: Final = ("external", "system", "user", "workflow")
KILL_PERMITTED_ROLES: Final = ("admin", "team-lead")

#: A kill policy decides whether a ``system`` principal may kill a workflow.
KillPolicy = Callable[["Workflow", "Principal"], bool]


def _frozen_strings(name: str) -> Callable[[Iterable[str]], frozenset[str]]:
    def convert(value: Iterable[str]) -> frozenset[str]:
        if isinstance(value, str):
            # A bare string is an iterable of characters: almost always a mistake.
            raise InvalidArgumentType(
                f"{name} must be an iterable of strings, not a string (got {value!r})"
            )
        try:
            items = frozenset(value)
        except TypeError:
            raise InvalidArgumentType(
                f"{name} must be an iterable of strings (got {value!r})"
            ) from None
        for item in items:
            if not isinstance(item, str):
                raise InvalidArgumentType(f"{name} must hold strings (got {item!r} in {value!r})")
        return items

    return convert


def _roles(value: Iterable[str]) -> frozenset[str]:
    return _frozen_strings("roles")(value)


def _teams(value: Iterable[str]) -> frozenset[str]:
    return _frozen_strings("teams")(value)


def _check_id(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise InvalidArgumentType(f"principal id must be a str (got {value!r})")
    if not value:
        raise ConfigurationError("principal id must not be empty (got '')")


def _check_kind(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in PRINCIPAL_KINDS:
        raise ConfigurationError(
            f"unknown principal kind {value!r} (known: {', '.join(PRINCIPAL_KINDS)})"
        )


@attrs.frozen(cache_hash=True)
class Principal:
    """Who asks for a kill.

    Args:
        id: The principal's identity (a user name, a service or policy name).
        kind: ``"user"``, ``"system"`` (automated, acting under the policy named
            by its ``id``), ``"external"`` or ``"workflow"``.
        roles: Any iterable of role names (``admin``, ``team-lead``,
            ``read-only``, ...); stored as a frozenset.
        teams: Any iterable of team names; stored as a frozenset.

    Raises:
        InvalidArgumentType: ``id`` is not a string, or ``roles``/``teams`` is
            not an iterable of strings.
        ConfigurationError: ``id`` is empty or ``kind`` is unknown.
    """

    id: str = attrs.field(validator=_check_id)
    kind: PrincipalKind = attrs.field(default="user", validator=_check_kind)
    roles: frozenset[str] = attrs.field(default=(), converter=_roles)
    teams: frozenset[str] = attrs.field(default=(), converter=_teams)

    def as_dict(self) -> dict[str, object]:
        """Return a JSON-ready mapping (roles and teams sorted); treat it as read-only."""
        return _principal_dict(self)


@functools.lru_cache(maxsize=1024)
def _principal_dict(principal: Principal) -> dict[str, object]:
    # Principals are frozen, and the same few ask again and again: a kill storm
    # should not sort their roles 10,000 times.
    return {
        "id": principal.id,
        "kind": principal.kind,
        "roles": sorted(principal.roles),
        "teams": sorted(principal.teams),
    }


@attrs.frozen(cache_hash=True)
class Decision:
    """The answer of ``Terminator.can_kill()``.

    Attributes:
        allowed: Whether the kill may proceed now.
        reason: ``"OK"`` or the refusal in the seed's wording: ``"Workflow not
            found"``, ``"Insufficient permissions"``, ``"Cannot kill finished
            workflow"``, ``"Workflow in critical section"``.
    """

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


OK: Final = Decision(True, "OK")
NOT_FOUND: Final = Decision(False, "Workflow not found")
NO_PERMISSION: Final = Decision(False, "Insufficient permissions")
FINISHED: Final = Decision(False, "Cannot kill finished workflow")
IN_SECTION: Final = Decision(False, "Workflow in critical section")


def check_kill_args(by: object, reason: object, force: object) -> None:
    """The argument checks every kill request shares (a terminator's, a supervisor's).

    Raises:
        InvalidArgumentType: ``by`` is not a ``Principal``, ``reason`` not a
            string, or ``force`` not a bool.
    """
    if not isinstance(by, Principal):
        raise InvalidArgumentType(f"by must be a Principal (got {by!r})")
    if not isinstance(reason, str):
        raise InvalidArgumentType(f"reason must be a str (got {reason!r})")
    if not isinstance(force, bool):
        raise InvalidArgumentType(f"force must be a bool (got {force!r})")


def has_kill_permission(
    principal: Principal,
    owner: str | None,
    team: str | None,
    policy: KillPolicy | None,
    workflow: Workflow,
) -> bool:
    """Apply the permission rule; ``policy`` is the one named by a system principal's id."""
    if principal.kind in ("external", "workflow") or "read-only" in principal.roles:
        return False
    if principal.kind == "system":
        if policy is None:
            return False
        try:
            return bool(policy(workflow, principal))
        except Exception:
            # A policy that crashes has not approved anything.
            return False
    if "admin" in principal.roles:
        return True
    if owner is not None and principal.id == owner:
        return True
    return "team-lead" in principal.roles and team is not None and team in principal.teams
