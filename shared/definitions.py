"""Event definitions: per-account property schemas, compiled to msgspec types for cheap checks."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import yaml

from shared import keys
from shared.errors import EventgateError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import redis.asyncio as aioredis

PropType = Literal["string", "integer", "number", "boolean", "datetime", "array", "object"]


class PropertySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One property: its type, whether it must be present, and what an array or object holds."""

    type: PropType
    required: bool = False
    items: PropertySpec | None = None  # arrays: the spec of each element
    properties: dict[str, PropertySpec] | None = None  # objects: their own properties


DefinitionName = msgspec.Meta(min_length=1, max_length=256)


class Definition(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """An event name and the schema of its properties. Properties not listed are kept as sent."""

    name: Annotated[str, DefinitionName]
    properties: dict[str, PropertySpec] = {}
    description: str = ""


class DefinitionError(EventgateError):
    """A definition that cannot be used; the message says which part."""


DEFINITIONS_DECODER = msgspec.json.Decoder(list[Definition])

_SCALARS: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "datetime": datetime,
}


def _python_type(spec: PropertySpec, path: str) -> Any:  # noqa: ANN401 - a type expression
    if spec.type in _SCALARS:
        return _SCALARS[spec.type]
    if spec.type == "array":
        return list[_python_type(spec.items, f"{path}[]") if spec.items else Any]  # type: ignore[misc]
    if spec.properties is None:
        return dict[str, Any]
    return _struct_type(path, spec.properties)


def _struct_type(name: str, properties: Mapping[str, PropertySpec]) -> type[msgspec.Struct]:
    fields: list[tuple[str, Any, Any]] = []
    for number, (prop, spec) in enumerate(properties.items()):
        kind = _python_type(spec, f"{name}.{prop}")
        # Property names are any JSON key ("df-order id", "1", "__init__"); the struct's
        # attributes are made-up identifiers renamed to them, so every name compiles.
        if spec.required:
            fields.append((f"p{number}", kind, msgspec.field(name=prop)))
        else:
            fields.append((f"p{number}", kind | None, msgspec.field(default=None, name=prop)))
    # Unknown properties are allowed (and kept by the caller, who validates, not converts).
    try:
        return msgspec.defstruct(name or "properties", fields, kw_only=True)
    except ValueError as exc:  # a property name msgspec cannot rename to: `"`, `\`, controls
        raise DefinitionError(f"{name or 'properties'}: {exc}") from None


class CompiledDefinition:
    """A definition ready to check properties: compiled once, used for every event."""

    __slots__ = ("_type", "definition")

    def __init__(self, definition: Definition) -> None:
        self.definition = definition
        self._type = _struct_type(definition.name, definition.properties)

    def check(self, properties: Mapping[str, Any]) -> msgspec.ValidationError | None:
        """None if the properties match, else msgspec's error naming the property path."""
        try:
            msgspec.convert(properties, self._type, strict=False)
        except msgspec.ValidationError as exc:
            return exc
        return None


def compile_definitions(definitions: Iterable[Definition]) -> dict[str, CompiledDefinition]:
    """Raises:
    DefinitionError: a name used twice, or a property name msgspec cannot take.
    """
    compiled: dict[str, CompiledDefinition] = {}
    for definition in definitions:
        if definition.name in compiled:
            raise DefinitionError(f"event {definition.name!r} is defined twice")
        compiled[definition.name] = CompiledDefinition(definition)
    return compiled


def parse_definitions(data: bytes) -> list[Definition]:
    """Definitions from JSON (a list, or one object) or YAML text.

    Raises:
        DefinitionError: malformed, or not the definition shape; the message says where.
    """
    stripped = data.lstrip()
    if stripped[:1] not in (b"[", b"{"):
        try:
            data = json.dumps(yaml.safe_load(data), default=str).encode()
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: a cycle
            raise DefinitionError(f"invalid YAML: {exc}") from None
    if data.lstrip()[:1] == b"{":
        data = b"[" + data + b"]"
    try:
        return DEFINITIONS_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise DefinitionError(f"invalid definitions: {_locate(data) or exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DefinitionError(f"invalid definitions: {exc}") from None


class _Loose(msgspec.Struct):
    """A definition or property with its properties undecoded, to find the bad one."""

    properties: dict[str, msgspec.Raw] | None = None
    items: msgspec.Raw = msgspec.Raw()  # empty: none (msgspec takes no `Raw | None`)


_LOOSE_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
_SPEC_DECODER = msgspec.json.Decoder(PropertySpec)


def _locate(data: bytes) -> str | None:
    """`definition #1 (name): property x.y: why`; msgspec says only `properties[...]`."""
    try:
        raws = _LOOSE_DECODER.decode(data)
    except msgspec.ValidationError:
        return None  # not a list: msgspec's own message says so
    for index, raw in enumerate(raws):
        found = bad_property(raw)
        if found:
            name = msgspec.json.decode(raw, type=dict[str, Any]).get("name")
            return f"definition #{index + 1} ({name}): {found}"
    return None


def bad_property(raw: msgspec.Raw, path: str = "") -> str | None:
    """`property path: why` of the first property of a raw definition (or property spec)
    that is not a valid PropertySpec, or None."""
    try:
        loose = msgspec.json.decode(raw, type=_Loose)
    except msgspec.ValidationError:
        return None
    children = list((loose.properties or {}).items())
    if loose.items:
        children.append(("[]", loose.items))
    for name, child in children:
        where = f"{path}{name}" if name == "[]" or not path else f"{path}.{name}"
        try:
            _SPEC_DECODER.decode(child)
        except msgspec.ValidationError as exc:
            return bad_property(child, where) or f"property {where}: {exc}"
    return None


@cache
def builtin_definitions(dialect: str) -> dict[str, CompiledDefinition]:
    """The definitions a dialect ships with (`shared/definitions/<dialect>.json`), if any."""
    source = resources.files("shared").joinpath("definitions", f"{dialect}.json")
    if not source.is_file():
        return {}
    return compile_definitions(parse_definitions(source.read_bytes()))


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Definition)


async def put_definition(client: aioredis.Redis, account: str, definition: Definition) -> None:
    """Create or replace one definition; front doors see it within their cache time."""
    CompiledDefinition(definition)  # refuse what cannot compile before storing it
    async with client.pipeline(transaction=True) as pipe:
        # Pipeline methods only queue commands (redis-py types them as awaitables).
        _ = pipe.hset(keys.definitions(account), definition.name, _ENCODER.encode(definition))
        _ = pipe.incr(keys.definitions_version(account))
        await pipe.execute()


async def put_definitions(
    client: aioredis.Redis, account: str, definitions: Iterable[Definition]
) -> int:
    """Create or replace several definitions at once; returns how many."""
    compiled = compile_definitions(definitions)
    if not compiled:
        return 0
    async with client.pipeline(transaction=True) as pipe:
        _ = pipe.hset(
            keys.definitions(account),
            mapping={n: _ENCODER.encode(c.definition) for n, c in compiled.items()},
        )
        _ = pipe.incr(keys.definitions_version(account))
        await pipe.execute()
    return len(compiled)


async def delete_definition(client: aioredis.Redis, account: str, name: str) -> bool:
    """Remove a definition; False if there was none."""
    async with client.pipeline(transaction=True) as pipe:
        _ = pipe.hdel(keys.definitions(account), name)
        _ = pipe.incr(keys.definitions_version(account))
        removed, _version = await pipe.execute()
    return bool(removed)


async def get_definition(client: aioredis.Redis, account: str, name: str) -> Definition | None:
    raw = await client.hget(keys.definitions(account), name)
    return None if raw is None else _DECODER.decode(raw)


async def list_definitions(client: aioredis.Redis, account: str) -> list[Definition]:
    raw = await client.hgetall(keys.definitions(account))
    return sorted((_DECODER.decode(v) for v in raw.values()), key=lambda d: d.name)
