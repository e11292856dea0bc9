"""Griffe extension: give attrs classes the ``__init__`` signature attrs generates.

Griffe reads source code, and an ``@attrs.frozen`` class has no ``__init__`` in
its source, so the API reference would show ``Principal()`` and flag the
``Args:`` of its docstring as parameters that do not exist. This extension
imports each class, asks attrs for its fields, and adds the ``__init__`` that
attrs builds at runtime (aliases, defaults, keyword-only fields), taking the
annotations from the source so that they still link across the reference.

Used by ``mkdocs.yml`` (``extensions: [tools/griffe_attrs.py]``).
"""

from __future__ import annotations

from typing import Any

import attrs
import griffe

# griffe declares its ParameterKind members as plain strings.
_POSITIONAL: Any = griffe.ParameterKind.positional_or_keyword
_KEYWORD: Any = griffe.ParameterKind.keyword_only


def _default(field: attrs.Attribute[Any]) -> str | None:
    default = field.default
    if default is attrs.NOTHING:
        return None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        factory = getattr(default, "factory", None)
        return f"{getattr(factory, '__name__', 'factory')}()"
    return repr(default)


class AttrsInit(griffe.Extension):
    """Add the attrs-generated ``__init__`` to every attrs class griffe visits."""

    def on_class_members(
        self,
        *,
        node: griffe.ObjectNode | Any,
        cls: griffe.Class,
        agent: Any,
        **kwargs: Any,
    ) -> None:
        """Synthesise ``__init__`` for ``cls`` if it is an attrs class without one."""
        if isinstance(node, griffe.ObjectNode) or "__init__" in cls.members:
            return
        try:
            runtime = griffe.dynamic_import(cls.path)
        except ImportError:
            return
        if not (isinstance(runtime, type) and attrs.has(runtime)):
            return
        parameters = [griffe.Parameter("self", kind=_POSITIONAL)]
        for field in attrs.fields(runtime):
            if not field.init:
                continue
            member = cls.members.get(field.name)
            annotation = getattr(member, "annotation", None)
            if isinstance(member, griffe.Attribute):
                # The source value is ``attrs.field(validator=...)``: noise in
                # the reference, and the default is shown in the signature.
                member.value = None
            if annotation is None and field.type is not None:
                annotation = field.type if isinstance(field.type, str) else repr(field.type)
            parameters.append(
                griffe.Parameter(
                    field.alias or field.name,
                    annotation=annotation,
                    kind=_KEYWORD if field.kw_only else _POSITIONAL,
                    default=_default(field),
                )
            )
        init = griffe.Function(
            "__init__",
            lineno=cls.lineno,
            endlineno=cls.lineno,
            parameters=griffe.Parameters(*parameters),
            returns="None",
        )
        cls.set_member("__init__", init)
        cls.labels.add("attrs")
