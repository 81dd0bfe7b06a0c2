"""What the delivery process imports before it becomes the spool's owner (`privsep.preload`) leaves nothing
for later: after the switch this Python's files may be unreadable (a virtualenv under /root).

The imports inside functions are read with `ast` in every module the delivery process may run, and a fresh
interpreter that has done what the delivery process does before the switch must already hold each of them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from test_architecture import GRAPH, PACKAGE, layer, module_file, resolve

from pymta.delivery import privsep

# Optional extras, imported only when the config uses them (a keyring password source, a certificate pin
# fetched with cryptography): preloading would fail where they are not installed. An installed pymta
# reads them from where any user can.
OPTIONAL = ("keyring", "cryptography")

PRELOADED = """
import json, sys
from pymta.delivery import privsep
privsep.PRELOAD_STDLIB = privsep.PRELOAD_STDLIB if {stdlib} else ()
names = privsep.preload()
print(json.dumps({{"after": sorted(sys.modules), "names": names}}))
"""


def loaded(stdlib: bool = True) -> dict[str, list[str]]:
    """sys.modules of a fresh interpreter after the preload (`stdlib`: with PRELOAD_STDLIB), and the names
    the preload imported."""
    code = PRELOADED.format(stdlib=stdlib)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found: dict[str, list[str]] = json.loads(result.stdout)
    return found


def delivery_modules() -> list[str]:
    """The modules whose code the delivery process may run: those of the preloaded packages and the leaves,
    with everything they import."""
    packages = tuple(f"{package}." for package in privsep.PRELOAD_PACKAGES)
    todo = [name for name in GRAPH if name.startswith(packages) or layer(name)[0] == "pymta"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen and name in GRAPH:
            seen.add(name)
            todo += [target for target, *_ in GRAPH[name]]
    return sorted(seen)


def imports_inside_functions(name: str) -> set[str]:
    """Every module (pymta's or not) that module `name` imports below its top level."""
    path = module_file(name)
    assert path is not None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` and `try: import x` at module level are the top level
        if isinstance(node, ast.If | ast.Try):
            top.update(id(child) for child in node.body)
    found = set()
    for node in ast.walk(tree):
        if id(node) in top:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if module_file(candidate) is not None else base)
    return found


def test_the_scan_sees_the_delivery_process() -> None:
    modules = delivery_modules()
    assert "pymta.delivery.flush" in modules and "pymta.delivery.smtp" in modules
    assert str(PACKAGE).endswith("pymta")


def test_every_import_inside_a_function_is_loaded_before_the_switch() -> None:
    after = set(loaded()["after"])
    missing = {
        f"{target} (imported in {name})"
        for name in delivery_modules()
        for target in imports_inside_functions(name)
        if target not in after and target.split(".")[0] not in OPTIONAL
    }
    assert sorted(missing) == [], "add the standard library's to privsep.PRELOAD_STDLIB"


def test_every_preloaded_package_module_is_imported() -> None:
    found = loaded()
    for package in privsep.PRELOAD_PACKAGES:
        on_disk = {path.stem for path in (PACKAGE.parent / package.replace(".", "/")).glob("*.py")}
        on_disk.discard("__init__")
        assert {f"{package}.{stem}" for stem in on_disk} <= set(found["names"]), package
    assert set(found["names"]) <= set(found["after"])


def test_each_standard_library_name_is_still_needed() -> None:
    """A name the rest of the preload imports anyway is dead weight: remove it from PRELOAD_STDLIB."""
    without = set(loaded(stdlib=False)["after"])
    assert [name for name in privsep.PRELOAD_STDLIB if name in without] == []
