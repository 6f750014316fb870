"""Package facades that load their names on first use (PEP 562), so that importing a package for its
light parts (config validation, ``tempo-mega plan``) does not import torch or transformers."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``names`` maps each public name to the submodule that
    defines it, imported when the name is first asked for."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    return __getattr__
