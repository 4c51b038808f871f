"""What every experiment shares: the :class:`Result` it returns, the :class:`Context` it runs
in, and the small vocabulary it uses to turn measurements into a verdict.

An experiment is a module with ``ID``, ``CLAIM``, ``SABOTAGE`` and ``run(ctx) -> Result``.
It builds its labs through ``ctx.lab()``, measures, and then *computes* the verdict from
what it measured, through a :class:`Checks` list::

    checks = Checks()
    checks.add("own netns", child_net != host_net, f"child {label(child_net)}, host {label(host_net)}")
    ...
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

So a verdict is never written down in advance: a kernel that behaved otherwise, or a
regression in nslab, turns a check false and the verdict with it.

Sabotage
--------
To show that an experiment *can* fail, the context can run it against a deliberately wrong
lab. The faults (``SABOTAGES``) are injected where nslab places children, by a :class:`Lab`
subclass that rewrites the mode a child asks for — "host" children put in a netns of their
own, bridge children put in the host's netns, ports silently not published — exactly the
kind of regression the experiments exist to catch. Each experiment names in ``SABOTAGE``
the fault that should flip its verdict, and the tests check that it does.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import time
import warnings
from typing import Any, Callable, Iterable

from ..errors import InputError, NslabError
from ..modes import parse_mode

__all__ = ["Result", "Context", "Checks", "ExperimentError", "SABOTAGES", "HOLDS", "DOES_NOT_HOLD",
           "NUANCE", "COULD_NOT_RUN", "nuance", "errname", "label", "ident", "proc_netns", "view_of",
           "proc_ns", "sentence_list"]

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
NUANCE = "holds with a nuance"
COULD_NOT_RUN = "could not run"

#: The deliberate faults a Context can inject, and what each does.
SABOTAGES = {
    "host-in-own-netns": "children asking for --network host get a network namespace of their own (mode none)",
    "host-on-bridge": "children asking for --network host are put on the default bridge network",
    "bridge-shares-host": "children asking for a bridge network share the host's network namespace",
    "publish-nothing": "published ports (-p) are silently dropped",
    "desktop-without-vm": "M2 only: the 'laptop' is the Docker VM itself (no VM in between)",
}


def nuance(text: str) -> str:
    """The verdict ``holds with a nuance: TEXT``."""
    return f"{NUANCE}: {text}"


class ExperimentError(NslabError):
    """The experiment could not measure what it needs (a setup step or a control failed)."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


@dataclasses.dataclass
class Result:
    """What one experiment measured and concluded. JSON-ready through :meth:`to_dict`."""

    id: str
    claim: str
    verdict: str                      # holds / does not hold / holds with a nuance: ... / could not run
    evidence: dict
    explanation: str
    duration: float
    key: str = ""                     # the one-line key evidence shown in the tour's table
    error: str | None = None          # set when the experiment could not run
    sabotage: list = dataclasses.field(default_factory=list)

    @property
    def ran(self) -> bool:
        return self.error is None

    @property
    def holds(self) -> bool:
        """True for ``holds`` and ``holds with a nuance: ...``."""
        return self.ran and self.verdict.startswith(HOLDS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Checks:
    """Named boolean checks with the measured detail behind each; the verdict is computed
    from them: all true -> ``holds`` (or the nuance given), else ``does not hold``."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append({"check": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(i["ok"] for i in self.items)

    def failed(self) -> list[str]:
        return [i["check"] for i in self.items if not i["ok"]]

    def verdict(self, nuance_text: str | None = None) -> str:
        if not self.ok:
            return f"{DOES_NOT_HOLD} ({', '.join(self.failed())} failed)"
        return nuance(nuance_text) if nuance_text else HOLDS

    def to_list(self) -> list[dict]:
        return list(self.items)


# --- sabotage: a Lab that places children in the wrong place on purpose ----------------------
_LAB_CLASS: list = []


def _experiment_lab_class():
    """The Lab subclass experiments use, made on first use: importing this package (as every
    ``lab.run`` child does, to find its function) must not import the whole lab."""
    if _LAB_CLASS:
        return _LAB_CLASS[0]
    from ..lab import Lab

    class ExperimentLab(Lab):
        """A Lab whose spawn/run apply the context's sabotage, and which records the warnings
        a spawn emitted (so the tour's output stays clean and M3 can still show them)."""

        def __init__(self, ctx: "Context", *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._ctx = ctx

        def spawn(self, argv, *, mode="bridge", publish=(), **kwargs):
            mode, publish = self._ctx.rewrite(mode, publish)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                container = super().spawn(argv, mode=mode, publish=publish, **kwargs)
            container.emitted_warnings = [str(w.message) for w in caught]
            return container

        def run(self, fn, *args, mode="bridge", publish=(), **kwargs):
            mode, publish = self._ctx.rewrite(mode, publish)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return super().run(fn, *args, mode=mode, publish=publish, **kwargs)

    _LAB_CLASS.append(ExperimentLab)
    return ExperimentLab


@dataclasses.dataclass
class Context:
    """How experiments run: sabotage, measurement lengths, and whether labs outlive the run.

    ``sabotage``: names from :data:`SABOTAGES`. ``perf_seconds``/``perf_rounds``: the length
    of one datapath measurement and how many interleaved rounds C5a runs. ``keep_labs``:
    labs made by ``ctx.lab()`` stay open (children running) in ``ctx.kept`` so a test can
    check the evidence against the kernel; :meth:`close` closes them.
    """

    sabotage: frozenset = frozenset()
    perf_seconds: float = 0.1
    perf_rounds: int = 3
    keep_labs: bool = False
    kept: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.sabotage, str):
            self.sabotage = (self.sabotage,)
        unknown = [s for s in self.sabotage if s not in SABOTAGES]
        if unknown:
            raise InputError("sabotage", f"unknown fault(s) {unknown}; known: {', '.join(SABOTAGES)}",
                             sorted(self.sabotage))
        self.sabotage = frozenset(self.sabotage)
        if not isinstance(self.perf_seconds, (int, float)) or not 0.01 <= self.perf_seconds <= 10:
            raise InputError("perf_seconds", "seconds per measurement, 0.01 to 10", self.perf_seconds)
        if not isinstance(self.perf_rounds, int) or not 1 <= self.perf_rounds <= 20:
            raise InputError("perf_rounds", "an int from 1 to 20", self.perf_rounds)

    # --- labs --------------------------------------------------------------------------
    def lab(self, **kwargs) -> "_LabScope":
        """``with ctx.lab() as lab:`` — a sandbox lab with the context's sabotage applied."""
        return _LabScope(self, kwargs)

    def rewrite(self, mode, publish):
        """The mode (and publish list) a sabotaged lab really uses for what was asked."""
        asked = mode
        m = parse_mode(mode)
        if m.kind == "host":
            if "host-in-own-netns" in self.sabotage:
                mode = "none"
            elif "host-on-bridge" in self.sabotage:
                mode = "bridge"
        elif m.kind == "bridge" and "bridge-shares-host" in self.sabotage:
            mode = "host"
        if "publish-nothing" in self.sabotage:
            publish = ()
        if mode is not asked and parse_mode(mode).kind not in ("bridge", "host"):
            publish = ()         # none mode takes no ports: the rewritten child gets none
        return mode, publish

    def close(self) -> None:
        """Close the labs kept open (PID-1 children first: they ignore SIGTERM)."""
        labs, self.kept = self.kept, []
        for lab in reversed(labs):
            close_lab(lab)

    # --- results -------------------------------------------------------------------------
    def result(self, id: str, claim: str, verdict: str, evidence: dict, explanation: str, key: str,
               started: float) -> Result:
        """The Result of a finished experiment (duration counted from ``started``)."""
        return Result(id, claim, verdict, evidence, explanation,
                      round(time.monotonic() - started, 3), key, None, sorted(self.sabotage))


class _LabScope:
    def __init__(self, ctx: Context, kwargs: dict):
        self.ctx, self.kwargs, self.lab = ctx, kwargs, None

    def __enter__(self):
        self.lab = _experiment_lab_class()(self.ctx, **self.kwargs)
        return self.lab

    def __exit__(self, *exc) -> None:
        if self.ctx.keep_labs and exc[0] is None:
            self.ctx.kept.append(self.lab)
        else:
            close_lab(self.lab)


def close_lab(lab) -> None:
    """Close a lab quickly: SIGKILL children first, since an init of a new pid namespace
    ignores SIGTERM and Lab.close would wait its 2 s grace period for each."""
    for container in list(lab.containers.values()):
        try:
            if container.running:
                container.kill()
        except NslabError:
            pass
    lab.close()


# --- small measuring vocabulary -------------------------------------------------------------
def errname(exc: BaseException) -> str:
    """``ECONNREFUSED`` for an OSError, ``ETIMEDOUT`` for a timeout, else the class name."""
    if isinstance(exc, TimeoutError):            # socket.timeout is TimeoutError (errno None)
        return "ETIMEDOUT"
    code = getattr(exc, "errno", None)
    if code:
        return errno.errorcode.get(code, str(code))
    return type(exc).__name__


def ident(ns) -> list[int]:
    """``[st_dev, st_ino]`` of a Namespace handle (JSON-friendly identity)."""
    return list(ns.identity)


def proc_ns(pid: int, kind: str = "net") -> list[int] | None:
    """``[st_dev, st_ino]`` of ``/proc/PID/ns/KIND``: what the kernel says the process is in."""
    try:
        st = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def proc_netns(container) -> list[int] | None:
    """The netns a container's process is really in, as ``/proc/PID/ns/net`` says — not the
    handle the lab holds (for host mode that handle *is* the host's, which would make a
    check circular). For a child that has exited already (a failed bind), the netns the lab
    placed it in, which its handle still pins."""
    if container.running:
        found = proc_ns(container.pid, "net")
        if found is not None:
            return found
    return list(container.netns.identity)


def view_of(lab, container):
    """A :class:`~nslab.evidence.View` of a container read through ``/proc/PID`` while it
    runs (the kernel's answer), else through the handles the lab kept."""
    from ..evidence import View
    if container.running:
        try:
            return View.gather(container.name, {}, pid=container.pid)
        except InputError:
            pass                                 # exited in between
    return lab.view(container)


def label(identity: Iterable[int] | None, kind: str = "net") -> str:
    if identity is None:
        return f"{kind}:[?]"
    return f"{kind}:[{list(identity)[1]}]"


def sentence_list(items: Iterable[Any]) -> str:
    items = [str(i) for i in items]
    if not items:
        return "nothing"
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started
