"""How ``mesh`` and ``mesh.control_plane`` present what they export."""

from __future__ import annotations

import inspect
import typing
from typing import Any

__all__ = ["publish"]


def publish(member: Any, module: str) -> None:
    """Make an exported class or function name ``module``, where users import it from, as
    its ``__module__`` (in reprs, ``help``, tracebacks and pickles), the way httpx does.

    A class's string annotations (``from __future__ import annotations``) are looked up in the
    module ``__module__`` names, so they are evaluated first, in the module that defines them:
    ``typing.get_type_hints`` and pydantic (a dataclass as a field type) keep working. Those
    that name what is imported only for type checking stay strings, unresolvable as before.
    """
    if inspect.isclass(member):
        try:
            hints = typing.get_type_hints(member, include_extras=True)
        except (NameError, TypeError):
            hints = {}
        own = inspect.get_annotations(member)
        if hints and own:
            member.__annotations__ = {name: hints[name] for name in own}
            for field in getattr(member, "__dataclass_fields__", {}).values():
                field.type = hints.get(field.name, field.type)
    member.__module__ = module
