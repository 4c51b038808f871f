"""cffi builder for nslab's datapath probe (API mode, out of line).

Like ``_ffi_build.py`` it only declares: the cdef and the C come from csrc/ (probe.cdef,
probe.c, probe.h). A second extension rather than more of ``_core``: the probe's loops are
compiled with their own flags and are imported only by ``nslab.probe``. setup.py runs this
through ``cffi_modules``; ``python3 nslab/_probe_build.py`` from the project root builds
``nslab/_probe.*.so`` in place.
"""
import pathlib

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CDEFS = ["probe.cdef"]
SOURCES = ["probe.c"]

ffi = FFI()
ffi.cdef("\n".join((CSRC / h).read_text() for h in CDEFS))
ffi.set_source(
    "nslab._probe",
    '#include "probe.h"\n',
    # Relative paths: setuptools runs builders from the project root and refuses absolute ones.
    sources=["csrc/" + s for s in SOURCES],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
