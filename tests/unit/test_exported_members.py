"""The public API: ``mesh.__all__`` is sorted, complete and names only things that exist."""

from __future__ import annotations

import inspect

import mesh


def _defined_in_package(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == "mesh" or module.startswith("mesh.")


def test_all_is_sorted() -> None:
    """``__all__`` is sorted and has no duplicates."""
    assert mesh.__all__ == sorted(set(mesh.__all__))


def test_all_names_exist() -> None:
    """Every name in ``__all__`` is an attribute of the package."""
    missing = [name for name in mesh.__all__ if not hasattr(mesh, name)]

    assert missing == []


def test_public_members_are_exported() -> None:
    """Every public class or function the package defines at top level is in ``__all__``."""
    public = {
        name
        for name, value in vars(mesh).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and _defined_in_package(value)
    }

    assert sorted(public - set(mesh.__all__)) == []


def test_star_import_matches_all() -> None:
    """``from mesh import *`` binds exactly the names in ``__all__``."""
    namespace: dict[str, object] = {}
    exec("from mesh import *", namespace)
    namespace.pop("__builtins__")

    assert sorted(namespace) == sorted(mesh.__all__)
