"""Lua scripts in shared/lua, read once; register each on a client with register_script."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def lua(name: str) -> str:
    """The source of `shared/lua/<name>.lua`."""
    return resources.files("shared").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
