"""The launchers' finder of pymta's own modules (`pymta.setup.launcher`): `pymta.x.y` is the file x/y.py,
or the package x/y/__init__.py, of one pymta directory, found with a stat instead of a search of
`sys.path` (which lists lib-dynload, site-packages and each of pymta's packages on every message: about a
third of sendmail's import time). What it does not find there is left to the usual search.

A launcher runs this file's code (from its cached bytecode, through the loader the import system is made
of, so that nothing is compiled or imported for it) and calls `install` with its pymta directory. It
imports nothing that Python has not loaded before the first line of a script: no pymta module, nothing of
the standard library but what the import system itself is.
"""

import sys
from _frozen_importlib_external import spec_from_file_location
from posix import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec


class PymtaFinder:
    """A `sys.meta_path` finder of the modules of the pymta package in `parent` (the directory that holds
    it). NAME.py is taken before NAME/__init__.py (the usual search: the other way round), which agree
    while no module of pymta has the name of a package (a test holds that)."""

    def __init__(self, parent: str) -> None:
        self.parent = parent.rstrip("/") + "/"

    def find_spec(self, name: str, path: object = None, target: object = None) -> "ModuleSpec | None":
        if name != "pymta" and not name.startswith("pymta."):
            return None
        base = self.parent + name.replace(".", "/")
        for file, where in ((base + ".py", None), (base + "/__init__.py", [base])):
            try:
                stat(file)
            except OSError:
                continue
            return spec_from_file_location(name, file, submodule_search_locations=where)
        return None


def install(parent: str) -> None:
    """Put a `PymtaFinder` of `parent` first on `sys.meta_path`."""
    sys.meta_path.insert(0, PymtaFinder(parent))
