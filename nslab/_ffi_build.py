"""cffi builder for nslab's native core (API mode, out of line).

It only declares: the cdef and the C come from real files in csrc/, so they can be read,
diffed and compiled on their own. setup.py runs this through ``cffi_modules``.
"""
import pathlib

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CDEFS = ["core.cdef", "spawn.cdef"]
SOURCES = ["core.c", "spawn.c"]

ffi = FFI()
ffi.cdef("\n".join((CSRC / h).read_text() for h in CDEFS))
ffi.set_source(
    "nslab._core",
    '#include "core.h"\n#include "spawn.h"\n',
    # Relative paths: setuptools runs builders from the project root and refuses absolute ones.
    sources=["csrc/" + s for s in SOURCES],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
