"""The launchers' finder of pymta's own modules (`pymta.setup.launcher`): `pymta.x.y` is the file x/y.py,
or the package x/y/__init__.py, of one pymta directory, found with a stat instead of a search of
`sys.path` (which lists lib-dynload, site-packages and each of pymta's packages on every message: about a
third of sendmail's import time), and loaded by Python's own loader with the file reads made plainer
(`PymtaLoader`). What it does not find there is left to the usual search.

A launcher runs this file's code (from its cached bytecode, through the loader the import system is made
of, so that nothing is compiled or imported for it) and calls `install` with its pymta directory. It
imports nothing that Python has not loaded before the first line of a script: no pymta module, nothing of
the standard library but what the import system itself is.
"""

import posix
import sys
from _frozen_importlib_external import SourceFileLoader, spec_from_file_location

TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec


class PymtaLoader(SourceFileLoader):
    """Python's loader of a source file and its cached bytecode, reading each with the system calls
    alone: the file object it makes (through `io.open_code`) adds an fstat, an ioctl and a seek or two to
    every module sendmail loads."""

    def get_data(self, path: str) -> bytes:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            parts = []
            while chunk := posix.read(fd, 65536):  # a module's .pyc: one read and the end
                parts.append(chunk)
        finally:
            posix.close(fd)
        return b"".join(parts)


class PymtaFinder:
    """A `sys.meta_path` finder of the modules of the pymta package in `parent` (the directory that holds
    it). NAME/__init__.py is taken before NAME.py, as the usual search does: an install upgraded in place
    may keep a module of an older layout beside the package that replaced it (pymta/cli.py beside
    pymta/cli/), and the package is the one its version imports."""

    def __init__(self, parent: str) -> None:
        self.parent = parent.rstrip("/") + "/"

    def find_spec(self, name: str, path: object = None, target: object = None) -> "ModuleSpec | None":
        if name != "pymta" and not name.startswith("pymta."):
            return None
        base = self.parent + name.replace(".", "/")
        for file, where in ((base + "/__init__.py", [base]), (base + ".py", None)):
            try:
                posix.stat(file)
            except OSError:
                continue
            loader = PymtaLoader(name, file)
            return spec_from_file_location(name, file, loader=loader, submodule_search_locations=where)
        return None


def install(parent: str) -> None:
    """Put a `PymtaFinder` of `parent` first on `sys.meta_path`."""
    sys.meta_path.insert(0, PymtaFinder(parent))
