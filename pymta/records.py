"""Records: value classes made the way `dataclasses` makes them, without loading it (issue 12). A leaf.

`record` does what `dataclasses.dataclass` does for the options pymta uses (eq, frozen, slots): __init__ with
defaults and default factories, __repr__, __eq__, __hash__ (frozen), a frozen __setattr__/__delattr__,
__slots__ and __match_args__; `field`, `replace`, `fields` and `asdict` likewise. `pymta flush` runs after
every message: `import dataclasses` loads inspect, ast, dis and tokenize, and a dataclass compiles six
methods, each with its own exec; together about a fifth of the flush's start-up. A record compiles only its
__init__ and makes the other methods as closures.

For mypy these names ARE dataclasses' (the `TYPE_CHECKING` branch at the end), so its dataclass plugin checks
each record, constructor call and `replace` as it checks a dataclass; the implementation below is
type-checked under its own names. An option or feature this module does not implement is a TypeError when
the class is made (at import), never a silent difference. A class is a record or a dataclass: neither
inherits from the other.
"""

from __future__ import annotations

from _thread import get_ident
from operator import attrgetter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["FrozenInstanceError", "asdict", "field", "fields", "record", "replace"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # no default (dataclasses.MISSING's role)
# What a record writes itself (or would have to call): a class that defines one is refused, not overridden.
_WRITTEN = "__init__ __repr__ __eq__ __hash__ __setattr__ __delattr__ __getstate__ __setstate__ __post_init__"
# Annotations dataclasses reads as something other than a field; a record supports none of them.
_NOT_FIELDS = frozenset({"ClassVar", "typing.ClassVar", "InitVar", "dataclasses.InitVar", "KW_ONLY"})
# What asdict copies, as copy.deepcopy would: immutable values stay as they are.
_PLAIN = frozenset({str, int, float, bool, bytes, complex, type(None)})


class Field:
    """One field of a record, in order from `fields()`: its name, its annotation (a string under
    `from __future__ import annotations`), its default or default factory (MISSING when it has none)."""

    __slots__ = ("name", "type", "default", "default_factory")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = ""
        self.type: Any = None
        self.default = default
        self.default_factory = default_factory

    def __repr__(self) -> str:
        return (
            f"Field(name={self.name!r},type={self.type!r},default={self.default!r},"
            f"default_factory={self.default_factory!r})"
        )


def _field(*, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A field's default or default factory; any other option of dataclasses.field is a TypeError."""
    return Field(default, default_factory)


def _record(cls: type | None = None, /, *, eq: bool = True, frozen: bool = False, slots: bool = False) -> Any:
    """Make `cls` a record: `@record`, or `@record(eq=..., frozen=..., slots=...)` as with dataclass."""

    def wrap(cls: type) -> type:
        return _make(cls, eq, frozen, slots)

    return wrap if cls is None else wrap(cls)


def _make(cls: type, eq: bool, frozen: bool, slots: bool) -> type:
    own = cls.__dict__
    for name in _WRITTEN.split():
        if name in own:
            raise TypeError(f"{cls.__qualname__} defines {name}, which @record does not support")
    found = _fields_of(cls, frozen)
    names = tuple(found)
    if not slots:
        for item in found.values():
            if item.name in own.get("__annotations__", {}):  # the class attribute is the default, if any
                if item.default is MISSING:
                    if isinstance(own.get(item.name), Field):
                        delattr(cls, item.name)
                else:
                    setattr(cls, item.name, item.default)
    else:
        cls = _with_slots(cls, names)
    data = {"__record_fields__": tuple(found.values()), "__record_frozen__": frozen, "__match_args__": names}
    for name, value in data.items():
        setattr(cls, name, value)
    methods: dict[str, Callable[..., Any] | None] = {"__init__": _init(cls, found, frozen)}
    methods["__repr__"] = _repr(names)
    if eq:
        methods["__eq__"], methods["__hash__"] = _eq_and_hash(names, frozen)
    if frozen:
        methods["__setattr__"], methods["__delattr__"] = _frozen(cls, frozenset(names))
        if slots:  # pickle and copy set a frozen slots instance's fields through __setstate__
            methods["__getstate__"], methods["__setstate__"] = _state(names)
    for name, method in methods.items():
        if method is not None:
            method.__qualname__ = f"{cls.__qualname__}.{method.__name__}"
        setattr(cls, name, method)
    return cls


def _fields_of(cls: type, frozen: bool) -> dict[str, Field]:
    """The fields of `cls` in dataclasses' order: its record bases' first, then its own annotations."""
    found: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        if "__dataclass_fields__" in base.__dict__:
            raise TypeError(
                f"{cls.__qualname__}: a record cannot inherit from a dataclass ({base.__qualname__})"
            )
        inherited = base.__dict__.get("__record_fields__")
        if inherited is not None:
            if base.__dict__["__record_frozen__"] != frozen:
                raise TypeError(
                    f"{cls.__qualname__}: frozen and mutable records cannot inherit from each other"
                )
            found.update((item.name, item) for item in inherited)
    own = cls.__dict__
    annotations = own.get("__annotations__", {})
    for name, kind in annotations.items():
        text = kind if isinstance(kind, str) else repr(kind)
        if text.partition("[")[0] in _NOT_FIELDS or text.startswith("typing.ClassVar"):
            raise TypeError(f"{cls.__qualname__}.{name}: a record supports no {text.partition('[')[0]}")
        if name == "self" or name.startswith("_record_"):
            raise TypeError(f"{cls.__qualname__}.{name}: a record cannot have a field of that name")
        value = own.get(name, MISSING)
        item = value if isinstance(value, Field) else Field(default=value)
        if item.default is not MISSING and type(item.default).__hash__ is None:
            raise ValueError(
                f"mutable default {type(item.default)} for field {name} is not allowed: use default_factory"
            )
        item.name, item.type = name, kind
        found[name] = item
    for name, value in own.items():
        if isinstance(value, Field) and name not in annotations:
            raise TypeError(f"{name!r} is a field but has no type annotation")
    defaulted = False
    for item in found.values():
        if item.default is not MISSING or item.default_factory is not MISSING:
            defaulted = True
        elif defaulted:
            raise TypeError(f"non-default argument {item.name!r} follows default argument")
    return found


def _with_slots(cls: type, names: tuple[str, ...]) -> type:
    """A new class with `__slots__` for the fields and no instance dict, as dataclasses builds it: a class
    cannot gain slots once made."""
    body = dict(cls.__dict__)
    inherited: set[str] = set()
    for base in cls.__mro__[1:-1]:
        slots = base.__dict__.get("__slots__", ())
        inherited.update((slots,) if isinstance(slots, str) else slots)
    body["__slots__"] = tuple(name for name in names if name not in inherited)
    for name in (*names, "__dict__", "__weakref__"):
        body.pop(name, None)  # the defaults live in __init__; the descriptors are the new class's own
    made = type(cls)(cls.__name__, cls.__bases__, body)
    made.__qualname__ = cls.__qualname__
    return made


def _init(cls: type, found: dict[str, Field], frozen: bool) -> Callable[..., None]:
    """__init__, compiled as dataclasses writes it: one parameter per field, in order."""
    namespace: dict[str, Any] = {"__name__": cls.__module__, "_record_setattr": object.__setattr__}
    namespace["_record_factory"] = _Missing()  # "not given" for a field with a default factory
    parameters = []
    lines = []
    for name, item in found.items():
        value = name
        if item.default_factory is not MISSING:
            namespace[f"_record_factory_{name}"] = item.default_factory
            parameters.append(f"{name}=_record_factory")
            value = f"_record_factory_{name}() if {name} is _record_factory else {name}"
        elif item.default is not MISSING:
            namespace[f"_record_default_{name}"] = item.default
            parameters.append(f"{name}=_record_default_{name}")
        else:
            parameters.append(name)
        lines.append(f"_record_setattr(self, {name!r}, {value})" if frozen else f"self.{name} = {value}")
    source = f"def __init__(self, {', '.join(parameters)}):\n    " + ("\n    ".join(lines) or "pass") + "\n"
    exec(source, namespace)  # noqa: S102 - built from the class's own field names, checked above
    init: Callable[..., None] = namespace["__init__"]
    return init


def _repr(names: tuple[str, ...]) -> Callable[[Any], str]:
    running: set[tuple[int, int]] = set()  # a record that holds itself shows "..." there, as dataclasses does

    def __repr__(self: Any) -> str:
        key = (id(self), get_ident())
        if key in running:
            return "..."
        running.add(key)
        try:
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
            return f"{self.__class__.__qualname__}({shown})"
        finally:
            running.discard(key)

    return __repr__


def _values(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The tuple of an instance's field values, in order (attrgetter gives a bare value for one name)."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda instance: (one(instance),)
    return lambda instance: ()


def _eq_and_hash(
    names: tuple[str, ...], frozen: bool
) -> tuple[Callable[[Any, object], Any], Callable[[Any], int] | None]:
    """__eq__ (same class, the fields' tuples equal) and __hash__: the fields' tuple's when frozen, else
    None (unhashable), as dataclasses decides with eq and frozen."""
    values = _values(names)

    def __eq__(self: Any, other: object) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    def __hash__(self: Any) -> int:
        return hash(values(self))

    return __eq__, (__hash__ if frozen else None)


def _frozen(cls: type[Any], names: frozenset[str]) -> tuple[Callable[..., None], Callable[..., None]]:
    def __setattr__(self: Any, name: str, value: object) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    return __setattr__, __delattr__


def _state(names: tuple[str, ...]) -> tuple[Callable[[Any], list[Any]], Callable[[Any, list[Any]], None]]:
    def __getstate__(self: Any) -> list[Any]:
        return [getattr(self, name) for name in names]

    def __setstate__(self: Any, state: list[Any]) -> None:
        for name, value in zip(names, state, strict=True):
            object.__setattr__(self, name, value)

    return __getstate__, __setstate__


def _fields(class_or_instance: object) -> tuple[Field, ...]:
    """The record's fields, in order; a TypeError for anything that is no record."""
    found: tuple[Field, ...] | None = getattr(class_or_instance, "__record_fields__", None)
    if found is None:
        raise TypeError("must be called with a record type or instance")
    return found


def _replace(obj: Any, /, **changes: Any) -> Any:
    """A new record like `obj` with `changes`; a name that is not a field is __init__'s TypeError."""
    for item in _fields(obj):
        if item.name not in changes:
            changes[item.name] = getattr(obj, item.name)
    return obj.__class__(**changes)


def _asdict(obj: Any) -> dict[str, Any]:
    """The record as a dict, records in it as dicts too; lists, tuples and dicts copied, as dataclasses
    does. A value of any other kind than plain immutable ones is a TypeError (dataclasses would deepcopy)."""
    if isinstance(obj, type):
        raise TypeError("asdict() should be called on record instances")
    _fields(obj)
    plain: dict[str, Any] = _plain(obj)
    return plain


def _plain(value: Any) -> Any:
    kind = type(value)
    found = getattr(kind, "__record_fields__", None)
    if found is not None:
        return {item.name: _plain(getattr(value, item.name)) for item in found}
    if kind is list or kind is tuple:
        return kind(_plain(one) for one in value)
    if kind is dict:
        return {_plain(key): _plain(one) for key, one in value.items()}
    if kind in _PLAIN:
        return value
    raise TypeError(
        f"asdict() copies no {kind.__qualname__}: only records, lists, tuples, dicts, plain values"
    )


if TYPE_CHECKING:
    from dataclasses import FrozenInstanceError as FrozenInstanceError
    from dataclasses import asdict as asdict
    from dataclasses import dataclass as record
    from dataclasses import field as field
    from dataclasses import fields as fields
    from dataclasses import replace as replace
else:

    class FrozenInstanceError(AttributeError):
        """An assignment to (or deletion of) a field of a frozen record."""

    record, field, fields, replace, asdict = _record, _field, _fields, _replace, _asdict
