"""pymta.records: a record behaves as the same class made with dataclasses (equality, hash, repr, defaults
and factories, frozen errors, slots, replace, asdict, fields, pickling), and an option it does not implement
is refused when the class is made. Each test makes the class twice from one body, once with each."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pickle
import pkgutil
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pymta
from pymta import records
from pymta.records import FrozenInstanceError, asdict, fields, record, replace

# The option sets pymta's records use.
OPTIONS = [
    {},
    {"frozen": True},
    {"frozen": True, "slots": True},
    {"eq": False, "slots": True},
    {"slots": True},
]


def shape(field: Callable[..., Any]) -> type:
    class Shape:
        """A class with each kind of field: required, plain default, tuple default, default factory."""

        name: str
        size: int = 0
        tags: tuple[str, ...] = field(default=())
        items: list[int] = field(default_factory=list)

        def total(self) -> int:
            return self.size + sum(self.items)

    return Shape


def twins(make: Callable[[Callable[..., Any]], type], **options: bool) -> tuple[Any, Any]:
    """The class `make` builds, once a record and once a dataclass."""
    return record(**options)(make(records.field)), dataclasses.dataclass(**options)(make(dataclasses.field))


values = st.fixed_dictionaries(
    {"name": st.text(max_size=5), "size": st.integers(-3, 3)},
    optional={"tags": st.tuples(st.text(max_size=2)), "items": st.lists(st.integers(0, 2), max_size=2)},
)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@given(first=values, second=values)
def test_a_record_behaves_as_a_dataclass(
    options: dict[str, bool], first: dict[str, Any], second: dict[str, Any]
) -> None:
    ours, theirs = twins(shape, **options)
    a, b, a_dc, b_dc = ours(**first), ours(**second), theirs(**first), theirs(**second)
    assert repr(a) == repr(a_dc) and repr(b) == repr(b_dc)
    assert (a == b) == (a_dc == b_dc) and (a != b) == (a_dc != b_dc)
    assert (a == ours(**first)) == (a_dc == theirs(**first))  # eq=False: only the same object
    assert a.total() == a_dc.total()
    assert (a == a_dc) is False  # another class, even with the same fields
    if ours.__hash__ is None:
        assert theirs.__hash__ is None
    elif options.get("frozen"):  # the fields' tuple's hash; a list in it makes it unhashable, as there
        with pytest.raises(TypeError, match="unhashable"):
            hash(a)
        hashable = {**first, "items": tuple(first.get("items", ()))}
        assert hash(ours(**hashable)) == hash(theirs(**hashable))
    else:
        assert hash(a) == object.__hash__(a)  # eq=False keeps identity
    assert asdict(a) == dataclasses.asdict(a_dc)
    assert repr(replace(a, **second)) == repr(dataclasses.replace(a_dc, **second))
    assert ours.__match_args__ == theirs.__match_args__ == ("name", "size", "tags", "items")


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_defaults_factories_and_signature_errors(options: dict[str, bool]) -> None:
    ours, theirs = twins(shape, **options)
    one, two = ours("x"), ours("y")
    assert (one.size, one.tags, one.items) == (0, (), [])
    assert one.items is not two.items  # the factory runs once per instance
    assert ours("x", 1, ("t",), [2]).items == [2]
    for args, kwargs in [
        ((), {}),
        (("x",), {"nosuch": 1}),
        (("x", 1, (), [], 5), {}),
        (("x",), {"name": "y"}),
    ]:
        with pytest.raises(TypeError):
            theirs(*args, **kwargs)
        with pytest.raises(TypeError):
            ours(*args, **kwargs)
    assert [(f.name, f.type, f.default) for f in fields(ours)] == [
        (f.name, f.type, f.default if f.default is not dataclasses.MISSING else records.MISSING)
        for f in dataclasses.fields(theirs)
    ]
    assert fields(one) == fields(ours)
    if not options.get("slots"):  # the class attribute is the default, as with dataclasses
        assert (ours.size, ours.tags, hasattr(ours, "items")) == (theirs.size, theirs.tags, False)


@pytest.mark.parametrize("slots", [False, True])
def test_a_frozen_record_refuses_a_change_as_a_dataclass_does(slots: bool) -> None:
    ours, theirs = twins(shape, frozen=True, slots=slots)
    for instance, error in [(ours("x"), FrozenInstanceError), (theirs("x"), dataclasses.FrozenInstanceError)]:
        with pytest.raises(error) as assigned:
            instance.size = 2
        with pytest.raises(error) as deleted:
            del instance.name
        assert isinstance(assigned.value, AttributeError)
        assert (str(assigned.value), str(deleted.value)) == (
            "cannot assign to field 'size'",
            "cannot delete field 'name'",
        )
        assert (instance.size, instance.name) == (0, "x")
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'other'"):
        ours("x").other = 1  # as a dataclass without slots says (3.11's with slots fails in super())


@pytest.mark.parametrize("frozen", [False, True])
def test_slots_leave_no_instance_dict(frozen: bool) -> None:
    ours, theirs = twins(shape, frozen=frozen, slots=True)
    assert ours.__slots__ == theirs.__slots__ == ("name", "size", "tags", "items")
    instance = ours("x")
    assert not hasattr(instance, "__dict__")
    if not frozen:
        instance.size = 3
        assert instance.size == 3
        with pytest.raises(AttributeError):
            instance.other = 1
    assert ours.__doc__ == theirs.__doc__ and ours.__qualname__ == theirs.__qualname__
    assert ours.__init__.__qualname__.endswith("Shape.__init__") and ours.__module__ == __name__


def relay(field: Callable[..., Any]) -> type:
    class Host:
        host: str
        port: int = 25

    return Host


def test_a_record_inherits_fields_as_a_dataclass_does() -> None:
    # delivery.direct.MxRelay(config.model.Smarthost): a frozen slots record under another.
    bases = twins(relay, frozen=True, slots=True)
    made = []
    for base, decorate in [(bases[0], record), (bases[1], dataclasses.dataclass)]:

        class Mx(base):  # type: ignore[misc,valid-type]
            address: str = ""
            port: int = 26  # a field given again keeps its place

        made.append(decorate(frozen=True, slots=True)(Mx))
    ours, theirs = made
    assert (
        repr(ours("h"))
        == repr(theirs("h"))
        == "test_a_record_inherits_fields_as_a_dataclass_does.<locals>.Mx(host='h', port=26, address='')"
    )
    assert ours.__slots__ == theirs.__slots__ == ("address",)
    assert hash(ours("h", 1, "a")) == hash(theirs("h", 1, "a")) and ours("h") == ours("h")
    assert ours("h") != bases[0]("h", 26)  # not the same class
    with pytest.raises(FrozenInstanceError):
        ours("h").host = "x"
    assert not hasattr(ours("h"), "__dict__")
    assert replace(ours("h"), address="a", host="g") == ours("g", 26, "a")


def test_match_finds_the_fields_by_position() -> None:
    ours = record(frozen=True, slots=True)(shape(records.field))
    match ours("x", 2):
        case ours(name, size):  # type: ignore[misc]
            assert (name, size) == ("x", 2)
        case _:
            pytest.fail("no match")


def test_asdict_copies_nested_records_and_containers() -> None:
    ours, theirs = twins(shape, frozen=True, slots=True)

    def outer(field: Callable[..., Any]) -> type:
        class Outer:
            inner: Any
            many: list[Any]
            by_name: dict[str, Any]

        return Outer

    our_outer, their_outer = twins(outer)
    nested = our_outer(ours("a", items=[1]), [ours("b"), (1, None)], {"k": [ours("c")]})
    expected = their_outer(theirs("a", items=[1]), [theirs("b"), (1, None)], {"k": [theirs("c")]})
    plain = asdict(nested)
    assert plain == dataclasses.asdict(expected)
    assert plain["inner"]["items"] is not nested.inner.items  # copied, as dataclasses copies
    with pytest.raises(TypeError, match="asdict"):
        asdict(our_outer(object(), [], {}))  # dataclasses would deepcopy it: a record refuses
    with pytest.raises(TypeError):
        asdict(ours)  # a class, not an instance
    with pytest.raises(TypeError):
        replace(expected, name="x")  # a dataclass is not a record


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_pickle_and_copy_give_an_equal_record(options: dict[str, bool]) -> None:
    ours = record(**options)(shape(records.field))
    ours.__qualname__ = "Shape"
    globals()["Shape"] = ours  # pickle finds a class by its module and qualified name
    try:
        instance = ours("x", 3, ("t",), [1, 2])
        for twin in (pickle.loads(pickle.dumps(instance)), copy.copy(instance), copy.deepcopy(instance)):
            assert repr(twin) == repr(instance) and type(twin) is ours
            assert twin == instance or options.get("eq") is False
    finally:
        del globals()["Shape"]


def refused_shapes() -> list[tuple[str, Callable[[], object]]]:
    def post_init() -> object:
        class C:
            a: int

            def __post_init__(self) -> None:
                pass

        return record(C)

    def own_eq() -> object:
        class C:
            a: int

            def __eq__(self, other: object) -> bool:
                return True

        return record(frozen=True)(C)

    def class_var() -> object:
        class C:
            a: ClassVar[int] = 1  # noqa: F821 - read as text, never evaluated

        return record(C)

    def mutable_default() -> object:
        class C:
            a: list[int] = []  # noqa: RUF012

        return record(C)

    def default_first() -> object:
        class C:
            a: int = 1
            b: int

        return record(C)

    def from_a_dataclass() -> object:
        @dataclasses.dataclass
        class C:
            a: int

        class D(C):
            b: int = 0

        return record(D)

    def frozen_from_mutable() -> object:
        @record
        class C:
            a: int

        class D(C):
            b: int = 0

        return record(frozen=True)(D)

    def unannotated_field() -> object:
        class C:
            a = records.field(default=1)

        return record(C)

    return [
        ("order", lambda: record(order=True)(type("C", (), {"__annotations__": {"a": "int"}}))),  # type: ignore[call-overload]
        ("kw_only", lambda: record(kw_only=True)(type("C", (), {}))),  # type: ignore[call-overload]
        ("field repr", lambda: records.field(default=1, repr=False)),  # type: ignore[call-overload]
        ("field init", lambda: records.field(init=False)),  # type: ignore[call-overload]
        ("both defaults", lambda: records.field(default=1, default_factory=list)),  # type: ignore[call-overload]
        ("__post_init__", post_init),
        ("own __eq__", own_eq),
        ("own __setstate__", lambda: record(type("C", (), {"__setstate__": lambda self, state: None}))),
        ("ClassVar", class_var),
        ("mutable default", mutable_default),
        ("default first", default_first),
        ("inherits a dataclass", from_a_dataclass),
        ("frozen from mutable", frozen_from_mutable),
        ("field without annotation", unannotated_field),
    ]


@pytest.mark.parametrize(("what", "make"), refused_shapes(), ids=[what for what, _ in refused_shapes()])
def test_what_a_record_does_not_implement_is_refused_when_the_class_is_made(
    what: str, make: Callable[[], object]
) -> None:
    with pytest.raises((TypeError, ValueError)):
        make()


def test_the_flush_path_s_classes_are_records_and_none_mixes_with_a_dataclass() -> None:
    from pymta.config.model import Config, Smarthost
    from pymta.delivery.direct import MxRelay
    from pymta.delivery.flush import FlushReport
    from pymta.delivery.smtp.session import Transaction

    for cls in (Config, Smarthost, MxRelay, FlushReport, Transaction):
        assert hasattr(cls, "__record_fields__") and not dataclasses.is_dataclass(cls), cls
    config = replace(Config(), max_message_size=5)
    assert config.max_message_size == 5 and config.smarthosts == () and config == replace(config)
    report = FlushReport(attempted=2, sent=1)
    assert FlushReport(**asdict(report)) == report  # privsep sends it so
    assert {item.name: item.type for item in fields(FlushReport)}["sent"] == "int"
    mixed = []
    for module in pkgutil.walk_packages(pymta.__path__, "pymta."):
        if module.name == "pymta.__main__":
            continue  # it runs the command line
        for value in vars(importlib.import_module(module.name)).values():
            if isinstance(value, type) and any("__record_fields__" in c.__dict__ for c in value.__mro__):
                if any("__dataclass_fields__" in c.__dict__ for c in value.__mro__):
                    mixed.append(f"{module.name}.{value.__qualname__}")
    assert mixed == []
