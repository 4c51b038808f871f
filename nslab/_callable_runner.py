"""The child side of :func:`nslab.process.call_in_child`; run as a script,
``python -P /path/to/nslab/_callable_runner.py IN_FD OUT_FD``, so that starting it does not
import the nslab package (only what the callable itself needs gets imported).

It is a fresh interpreter (exec'd by nslab's trampoline inside the requested namespaces),
so none of the caller's threads or locks exist here. The protocol is two pickles in, one out:

1. preparation data (``sys.path``, ``sys.argv``, and -- only when the call refers to
   ``__main__`` -- how to re-import the caller's main module as ``__mp_main__``, the way
   multiprocessing's spawn start method does);
2. ``(fn, args, kwargs)``;

and back ``(True, result, None)`` or ``(False, exception, traceback_text)``. If the result
or the exception cannot be pickled, what comes back says so instead. Imports stay minimal:
the child pays only for what the callable needs.
"""
import pickle
import sys
import traceback

# Set while the caller's main module is being re-imported: call_in_child refuses to run then
# (an unguarded call at module level would otherwise recurse, one child per level).
PREPARING = False


def _prepare(data: dict) -> None:
    global PREPARING
    sys.path[:] = data["sys_path"]
    sys.argv[:] = data["sys_argv"]
    if "init_main_from_name" in data or "init_main_from_path" in data:
        import multiprocessing.process
        import multiprocessing.spawn
        multiprocessing.process.ORIGINAL_DIR = data["orig_dir"]
        PREPARING = True
        try:
            multiprocessing.spawn.prepare({k: data[k] for k in
                                           ("init_main_from_name", "init_main_from_path")
                                           if k in data})
        finally:
            PREPARING = False


def _reply(out, ok: bool, value, tb) -> None:
    try:
        blob = pickle.dumps((ok, value, tb), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - reported to the caller instead
        what = "result" if ok else f"exception {type(value).__name__}: {value}"
        error = TypeError(f"the child could not pickle its {what}: {exc!r}")
        blob = pickle.dumps((False, error, tb or ""), protocol=pickle.HIGHEST_PROTOCOL)
    out.write(blob)
    out.flush()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    in_fd, out_fd = int(argv[0]), int(argv[1])
    with open(in_fd, "rb") as inp, open(out_fd, "wb") as out:
        _prepare(pickle.load(inp))
        try:
            fn, args, kwargs = pickle.load(inp)
        except BaseException as exc:  # noqa: BLE001 - e.g. the function's module is missing
            _reply(out, False, exc, traceback.format_exc())
            return 1
        inp.close()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            _reply(out, False, exc, traceback.format_exc())
            return 1
        _reply(out, True, result, None)
    return 0


if __name__ == "__main__":
    # One module object under both names, so nslab.process can see PREPARING.
    sys.modules.setdefault("nslab._callable_runner", sys.modules[__name__])
    sys.exit(main())
