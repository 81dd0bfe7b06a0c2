"""The config file's YAML read strictly: PyYAML's safe loader, except that a key given twice is an error.

The one place pymta parses YAML (`pymta.config.load` turns the document into a `Config`); an error is one
`ConfigError` line naming the file, the line and the fix.
"""

from __future__ import annotations

import json

import yaml

from pymta.config.paths import yaml_problem
from pymta.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _refuse_duplicates(loader: yaml.constructor.SafeConstructor, node: yaml.MappingNode) -> None:
    """A key given twice is an error rather than the last one winning."""
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_shown(key)}; remove one of them", key_node.start_mark
            )
        seen.add(key if isinstance(key, str | int | float | bool) else id(key))


def _shown(key: str | int | float | bool) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return json.dumps(key, ensure_ascii=False) if isinstance(key, str) else str(key)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice is an error (`_refuse_duplicates`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_duplicates(self, node)
        return super().construct_mapping(node, deep=deep)


# libyaml's parser, when PyYAML was built with it, reads a config several times faster than the pure Python
# one; the constructor, where a duplicate key is caught, is the same. Its error texts are terser (no hint for
# a tab), so a file it refuses is read again by the Python parser for the error the admin sees.
if TYPE_CHECKING:
    _CSafeLoader = yaml.SafeLoader
else:
    _CSafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _FastStrictLoader(_CSafeLoader):
    """`_StrictLoader` on libyaml's parser."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_duplicates(self, node)
        return super().construct_mapping(node, deep=deep)


def _fail(source: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {problem}".replace("\r", "\\r").replace("\n", "\\n"))


def read_yaml(text: str | bytes, source: str) -> object:
    """The YAML document in `text` (None for an empty one), naming `source` in errors."""
    if _CSafeLoader is not yaml.SafeLoader:
        try:
            return yaml.load(text, Loader=_FastStrictLoader)
        except (yaml.YAMLError, RecursionError):
            pass  # the Python parser below says what is wrong in its own words
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise _fail(source, yaml_problem(error)) from None
    except RecursionError:  # PyYAML recurses once per level of nesting: `[[[[...` a few thousand deep
        raise _fail(
            source,
            "is nested too deeply to read (lists or mappings inside each other thousands of times); "
            "no pymta setting nests more than a few levels",
        ) from None
