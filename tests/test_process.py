"""Child processes: the clone trampoline, pidfd ownership, parent death, and call_in_child.

Namespace identities are read independently of nslab, with ``os.stat`` on ``/proc/PID/ns/*``.
Tests that create namespaces are ``root``; the rest run unprivileged too.
"""
import ctypes
import errno
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nslab import _native
from nslab.errors import InputError, NslabError, NslabTimeoutError, SpawnError
from nslab.namespaces import KINDS, Namespace
from nslab.process import (DEVNULL, PIPE, STDOUT, Child, ChildDiedError, RemoteTraceback,
                           SpawnFileNotFoundError, SpawnPermissionError, call_in_child)

lib = _native.lib
ALL_KINDS = sorted(KINDS)
SPAWN_PATHS = {
    "clone_vm": 0,
    "fork_clone3": lib.NSLAB_SPAWN_FORK_MODE,
    "fork_no_clear_sighand": lib.NSLAB_SPAWN_FORK_MODE | lib.NSLAB_SPAWN_NO_CLEAR_SIGHAND,
    "fork_clone2": lib.NSLAB_SPAWN_NO_CLONE3,
    "no_close_range": lib.NSLAB_SPAWN_NO_CLOSE_RANGE,
    "fork_no_close_range": lib.NSLAB_SPAWN_FORK_MODE | lib.NSLAB_SPAWN_NO_CLOSE_RANGE,
}


def ns_id(pid, kind):
    st = os.stat(f"/proc/{pid}/ns/{kind}")
    return (st.st_dev, st.st_ino)


def fds_of(pid):
    return {int(x) for x in os.listdir(f"/proc/{pid}/fd")}


def wait_until(predicate, timeout=2.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def status_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1]
    raise KeyError(name)


class CustomError(Exception):
    """An exception class only this test module defines."""

    def __init__(self, code, text):
        super().__init__(code, text)
        self.code = code


def raise_custom(code):
    raise CustomError(code, "raised in the child")


def add(a, b, *, scale=1):
    return (a + b) * scale


def exit_hard():
    os._exit(3)


def sleep_forever():
    time.sleep(60)


# --- input validation (nothing is started) ------------------------------------------------
@pytest.mark.parametrize("argv", [[], "sleep 1", ["sle\0ep"], [""], [1]])
def test_bad_argv_is_input_error(argv):
    """A malformed argv is refused before any clone, naming the field."""
    with pytest.raises(InputError) as info:
        Child.spawn(argv, new=())
    assert info.value.field == "argv"


@pytest.mark.parametrize("kwargs, field", [
    ({"new": ("nett",)}, "namespace kind"),
    ({"new": "net"}, "new"),
    ({"pass_fds": (1,)}, "pass_fds"),
    ({"pass_fds": (987654,)}, "pass_fds"),
    ({"hostname": "box"}, "hostname"),
    ({"new": ("uts",), "hostname": "x" * 65}, "hostname"),
    ({"user_map": object()}, "user_map"),
    ({"stdout": "nope"}, "stdout"),
    ({"env": {"A=B": "c"}}, "env"),
])
def test_bad_options_are_input_errors(kwargs, field):
    """Each bad option raises InputError naming it (hostname without a new uts never reaches
    the host's hostname)."""
    kwargs.setdefault("new", ())
    with pytest.raises(InputError) as info:
        Child.spawn(["true"], **kwargs)
    assert info.value.field == field


def test_join_validation():
    """Joining a pid namespace, a closed handle, a kind also created, or two of a kind is
    refused."""
    pid_ns = Namespace.current("pid")
    with pid_ns, Namespace.current("net") as net, Namespace.current("net") as net2:
        with pytest.raises(InputError, match="pid namespace"):
            Child.spawn(["true"], new=(), join=[pid_ns])
        with pytest.raises(InputError, match="both created"):
            Child.spawn(["true"], new=("net",), join=[net])
        with pytest.raises(InputError, match="two net"):
            Child.spawn(["true"], new=(), join=[net, net2])
        with pytest.raises(InputError, match="holds a net"):
            Child.spawn(["true"], new=(), join={"uts": net})
    with pytest.raises(InputError, match="closed"):
        Child.spawn(["true"], new=(), join=[net])


def test_missing_program_in_path():
    """A program name not found in PATH fails before spawning, as FileNotFoundError."""
    with pytest.raises(FileNotFoundError) as info:
        Child.spawn(["nslab-no-such-program"], new=())
    assert isinstance(info.value, SpawnError)
    assert info.value.step == "execve(nslab-no-such-program)"


# --- lifecycle (unprivileged) -------------------------------------------------------------
def test_lifecycle_and_repr():
    """repr shows argv, state and pid through running, killed, and closed; close is
    idempotent."""
    child = Child.spawn(["sleep", "30"], new=())
    assert repr(child) == f"<Child ['sleep', '30']: running, pid {child.pid}>"
    assert child.poll() is None and not child.closed
    assert child.kill() is True
    assert child.wait(timeout=5) == -signal.SIGKILL
    assert repr(child) == f"<Child ['sleep', '30']: killed by SIGKILL, pid {child.pid}>"
    child.close()
    child.close()
    assert child.closed
    with Child.spawn(["true"], new=()) as done:
        assert done.wait(5) == 0
        assert "exited 0" in repr(done)


def test_wait_timeout_raises_timeout_error():
    """wait(timeout) raises a TimeoutError (NslabTimeoutError) and leaves the child running."""
    with Child.spawn(["sleep", "30"], new=()) as child:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            child.wait(timeout=0.1)
        assert isinstance(info.value, NslabTimeoutError)
        assert 0.09 < time.monotonic() - t0 < 2
        assert child.poll() is None


def test_close_terminates_running_child():
    """close() on a running child stops it with SIGTERM and reaps it."""
    child = Child.spawn(["sleep", "30"], new=())
    pidfd = os.dup(child.pidfd)
    try:
        child.close()
        assert child.returncode == -signal.SIGTERM
        with pytest.raises(ChildProcessError):  # reaped: nothing left to wait for
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    finally:
        os.close(pidfd)


def test_terminate_escalates_to_sigkill():
    """A child that ignores SIGTERM is SIGKILLed after the timeout."""
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "print('ready', flush=True); time.sleep(30)"
    with Child.spawn([sys.executable, "-c", code], new=(), stdout=PIPE) as child:
        assert child.stdout.readline() == b"ready\n"
        t0 = time.monotonic()
        assert child.terminate(timeout=0.3) == -signal.SIGKILL
        assert 0.25 < time.monotonic() - t0 < 3


def test_send_signal_after_reap_is_a_noop():
    """Once reaped, send_signal does nothing and says so; the pidfd itself answers ESRCH."""
    child = Child.spawn(["true"], new=())
    try:
        assert child.wait(5) == 0
        assert child.send_signal(signal.SIGKILL) is False
        assert child.kill() is False
        with pytest.raises(ProcessLookupError):
            signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
    finally:
        child.close()
    assert child.send_signal(signal.SIGTERM) is False  # closed: still a no-op


def test_stdio_pipe_devnull_stdout_and_file(tmp_path):
    """PIPE gives file objects, STDOUT merges stderr, DEVNULL and file objects work."""
    with Child.spawn(["cat"], new=(), stdin=PIPE, stdout=PIPE) as child:
        out, err = child.communicate(b"hello\n", timeout=5)
        assert (out, err, child.returncode) == (b"hello\n", None, 0)
    code = "import sys; print('out'); print('err', file=sys.stderr)"
    with Child.spawn([sys.executable, "-c", code], new=(), stdout=PIPE, stderr=STDOUT) as child:
        out, _ = child.communicate(timeout=10)
        assert sorted(out.split()) == [b"err", b"out"]
    with Child.spawn(["cat"], new=(), stdin=DEVNULL, stdout=PIPE) as child:
        assert child.communicate(timeout=5) == (b"", None)
    target = tmp_path / "out.txt"
    with open(target, "wb") as f, Child.spawn(["echo", "to file"], new=(), stdout=f) as child:
        assert child.wait(5) == 0
    assert target.read_bytes() == b"to file\n"
    with Child.spawn(["sh", "-c", "echo swapped >&2"], new=(), stdout=PIPE, stderr=1) as child:
        # stderr=1 is *our* stdout fd, not the pipe: slots are filled from our fds.
        assert child.communicate(timeout=5)[0] == b""


def test_env_cwd_and_argv0_lookup(tmp_path):
    """env replaces the environment, cwd is applied, and argv[0] is found in env's PATH."""
    with Child.spawn(["sh", "-c", 'printf "%s %s" "$NSLAB_X" "$PWD"'], new=(), stdout=PIPE,
                     env={"NSLAB_X": "42", "PATH": "/usr/bin:/bin"}, cwd=tmp_path) as child:
        assert child.communicate(timeout=5)[0] == f"42 {tmp_path}".encode()


@pytest.mark.parametrize("path", sorted(SPAWN_PATHS))
def test_child_fds_are_exactly_stdio_and_pass_fds(path):
    """An inheritable fd, a netlink socket and a pipe left in the parent never reach the
    child; pass_fds do, with their numbers (every clone path and close fallback)."""
    leaky = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaky, True)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    sock.set_inheritable(True)
    r, w = os.pipe()
    passed = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Child.spawn(["sleep", "30"], new=(), pass_fds=(passed,),
                         _trampoline_flags=SPAWN_PATHS[path]) as child:
            # EOF on the error pipe is seen during exec's close-on-exec pass: let it finish.
            assert wait_until(lambda: fds_of(child.pid) == {0, 1, 2, passed}), fds_of(child.pid)
            assert os.readlink(f"/proc/{child.pid}/fd/{passed}") == "/dev/zero"
            with open(f"/proc/{child.pid}/comm") as f:
                assert f.read().strip() == "sleep"
    finally:
        for fd in (leaky, r, w, passed):
            os.close(fd)
        sock.close()


@pytest.mark.parametrize("passed_high", [False, True], ids=["shared table", "a pass_fd above the bound"])
def test_child_fds_with_a_crowded_fd_table(passed_high):
    """A controller holding hundreds of fds (a lab holds two per container): the child still
    gets exactly stdio and pass_fds, whether it takes only the low part of our table (the
    spawner's CLONE_FILES path) or, with an fd it needs above the bound, a full copy."""
    Child.spawn(["true"], new=()).wait()    # the spawner reserves its low slots before the crowd
    passed = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)     # low: before the crowd
    crowd = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(300)]
    if passed_high:
        high = fcntl.fcntl(passed, fcntl.F_DUPFD_CLOEXEC, 400)
        os.close(passed)
        passed = high
    try:
        with Child.spawn(["sleep", "30"], new=(), pass_fds=(passed,)) as child:
            assert wait_until(lambda: fds_of(child.pid) == {0, 1, 2, passed}), fds_of(child.pid)
            assert os.readlink(f"/proc/{child.pid}/fd/{passed}") == "/dev/zero"
    finally:
        for fd in crowd + [passed]:
            os.close(fd)


def test_fds_a_program_reopened_where_the_spawner_kept_its_slots_are_left_alone(tmp_path):
    """The spawner keeps two low fd numbers for the children's ends of their sockets. A
    program that closes every fd and reopens its own there (as daemons do) keeps them: the
    spawner sees its placeholders gone, copies the whole table instead, and never dups
    over the program's files."""
    script = tmp_path / "closer.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from nslab.process import Child
        Child.spawn(["true"]).wait()                  # the spawner and its slots exist now
        os.closerange(3, 64)
        mine = {{}}
        for i in range(3, 64):                        # files of its own: one inode each
            fd = os.open(os.path.join({str(tmp_path)!r}, f"f{{i}}"), os.O_RDWR | os.O_CREAT)
            mine[fd] = os.fstat(fd).st_ino
        child = Child.spawn(["sleep", "30"], new=())
        try:
            kept = {{fd: os.fstat(fd).st_ino for fd in mine}} == mine
            import time
            for _ in range(200):
                fds = set(map(int, os.listdir(f"/proc/{{child.pid}}/fd")))
                if fds == {{0, 1, 2}}:
                    break
                time.sleep(0.01)
            print(kept, sorted(fds))
        finally:
            child.kill()
            child.wait()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 1) == ["True", "[0, 1, 2]\n"], out.stdout


@pytest.mark.parametrize("path", sorted(SPAWN_PATHS))
def test_child_signal_state(path):
    """The child starts with SIGPIPE not ignored and the calling thread's signal mask
    (here with SIGUSR1 blocked on a worker thread), on every clone path."""
    seen = {}

    def worker():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        child = Child.spawn(["sleep", "30"], new=(), _trampoline_flags=SPAWN_PATHS[path])
        seen["child"] = child

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    with seen["child"] as child:
        assert wait_until(lambda: open(f"/proc/{child.pid}/comm").read().strip() == "sleep")
        ignored = int(status_field(child.pid, "SigIgn"), 16)
        blocked = int(status_field(child.pid, "SigBlk"), 16)
        assert not ignored & (1 << (signal.SIGPIPE - 1))
        assert blocked & (1 << (signal.SIGUSR1 - 1))
        ours = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert blocked == sum(1 << (s - 1) for s in ours | {signal.SIGUSR1})


@pytest.mark.parametrize("path", sorted(SPAWN_PATHS))
def test_failed_exec_reports_step_and_errno(path):
    """execve of a missing file raises SpawnError naming the step and ENOENT, child reaped."""
    with pytest.raises(SpawnFileNotFoundError) as info:
        Child.spawn(["/nonexistent"], new=(), _trampoline_flags=SPAWN_PATHS[path])
    assert info.value.errno == errno.ENOENT
    assert info.value.step == "execve(/nonexistent)"
    assert "execve(/nonexistent) failed in the child" in str(info.value)


def test_failed_chdir_reports_step():
    """A missing cwd is reported as the chdir step with ENOENT."""
    with pytest.raises(SpawnError) as info:
        Child.spawn(["true"], new=(), cwd="/nonexistent-dir")
    assert (info.value.errno, info.value.step) == (errno.ENOENT, "chdir(/nonexistent-dir)")


def test_exec_permission_denied_is_permission_error(tmp_path):
    """A non-executable file fails execve with EACCES, as a PermissionError."""
    script = tmp_path / "not-exec"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(SpawnPermissionError) as info:
        Child.spawn([str(script)], new=())
    assert info.value.errno == errno.EACCES and isinstance(info.value, PermissionError)


def test_before_exec_runs_while_child_waits_and_failure_kills_it():
    """before_exec sees the child before exec; if it raises, the child is killed and reaped
    and the exception propagates."""
    seen = {}

    def check(child):
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            seen["cmdline"] = f.read()
        seen["child"] = child
        raise KeyError("wiring failed")

    with pytest.raises(KeyError):
        Child.spawn(["sleep", "30"], new=(), before_exec=check)
    child = seen["child"]
    assert b"sleep" not in seen["cmdline"]  # still the trampoline, not yet sleep
    assert child.closed and child.returncode == -signal.SIGKILL
    assert not os.path.exists(f"/proc/{child.pid}/cmdline") or \
        open(f"/proc/{child.pid}/cmdline", "rb").read() != seen["cmdline"]


def test_child_dying_before_release_is_reported():
    """A child that dies while held (here killed and reaped in before_exec) makes spawn raise
    a SpawnError at the sync step saying how it died."""
    with pytest.raises(SpawnError) as info:
        Child.spawn(["sleep", "30"], new=(), before_exec=lambda c: (c.kill(), c.wait()))
    assert info.value.step == "sync" and "killed by SIGKILL" in str(info.value)


def test_spawner_thread_is_the_parent():
    """Children are cloned by nslab's spawner thread, not by the calling thread."""
    with Child.spawn(["sleep", "30"], new=()) as child:
        tid = lib.nslab_spawner_tid()
        assert tid and tid != _native.gettid()
        path = f"/proc/self/task/{tid}/children"
        if os.path.exists(path):
            with open(path) as f:
                assert str(child.pid) in f.read().split()
        assert int(status_field(child.pid, "PPid")) == os.getpid()


def test_child_survives_the_thread_that_spawned_it():
    """PDEATHSIG does not fire when a short-lived thread that asked for the spawn exits."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("c", Child.spawn(["sleep", "30"], new=())))
    t.start()
    t.join()
    with box["c"] as child:
        time.sleep(0.3)
        assert child.poll() is None
        assert int(status_field(child.pid, "PPid")) == os.getpid()


def test_die_with_parent_false_uses_calling_thread():
    """die_with_parent=False clones on the calling thread, with no parent-death signal."""
    with Child.spawn(["sleep", "30"], new=(), die_with_parent=False) as child:
        path = f"/proc/self/task/{_native.gettid()}/children"
        if os.path.exists(path):
            with open(path) as f:
                assert str(child.pid) in f.read().split()


OWNER = textwrap.dedent("""
    import sys, threading, time
    from nslab.process import Child
    new = tuple(k for k in sys.argv[2].split(",") if k)
    box = {}
    def start():
        box["c"] = Child.spawn(["sleep", "1000"], new=new)
    if sys.argv[1] == "thread":
        t = threading.Thread(target=start); t.start(); t.join(); time.sleep(0.2)
    else:
        start()
    print(box["c"].pid, flush=True)
    time.sleep(1000)
""")


@pytest.mark.parametrize("where, new", [
    ("main", ""),
    ("thread", ""),
    pytest.param("main", "pid,net", marks=pytest.mark.root),
    pytest.param("thread", "net", marks=pytest.mark.root),
])
def test_children_die_when_their_owner_dies(where, new):
    """SIGKILL the owning process: its nslab child (spawned from the main thread or from a
    thread that already exited) is gone within 2 s."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, where, new], stdout=subprocess.PIPE)
    pidfd = None
    try:
        line = owner.stdout.readline()
        assert line, "owner did not start its child"
        grandchild = int(line)
        pidfd = os.pidfd_open(grandchild)
        assert not select.select([pidfd], [], [], 0.1)[0], "grandchild died too early"
        owner.kill()
        owner.wait(5)
        assert select.select([pidfd], [], [], 2.0)[0], "grandchild outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if pidfd is not None:
            try:  # belt and braces: never leave a sleep 1000 behind
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(pidfd)


def test_no_fd_leak_over_1000_spawns(no_fd_leak):
    """1,000 spawn/wait/close cycles of /bin/true leave the controller's fd table as it was."""
    for _ in range(1000):
        with Child.spawn(["/bin/true"], new=()) as child:
            assert child.wait(5) == 0


def test_no_fd_leak_on_failures(no_fd_leak):
    """Failed spawns (exec, before_exec) and PIPEs close everything they opened."""
    for _ in range(50):
        with pytest.raises(SpawnError):
            Child.spawn(["/nonexistent"], new=(), stdout=PIPE, stdin=PIPE)
        with pytest.raises(ZeroDivisionError):
            Child.spawn(["true"], new=(), stdout=PIPE, before_exec=lambda c: 1 / 0)


def test_concurrent_spawns_from_threads(no_fd_leak):
    """Four threads spawning at once (some children held in before_exec meanwhile) all get
    their own child, and a child held back never delays another's exec."""
    errors_seen = []
    slow_released = []

    def slow_hold(child):
        time.sleep(0.5)  # this child waits; spawns on other threads must not

    def worker(n):
        try:
            if n == 0:
                t0 = time.monotonic()
                with Child.spawn(["/bin/true"], new=(), before_exec=slow_hold) as c:
                    assert c.wait(5) == 0
                slow_released.append(time.monotonic() - t0)
                return
            for _ in range(40):
                t0 = time.monotonic()
                with Child.spawn(["/bin/true"], new=()) as c:
                    assert c.wait(5) == 0
                assert time.monotonic() - t0 < 0.4, "a spawn waited for another's child"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors_seen.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors_seen, errors_seen
    assert 0.5 <= slow_released[0] < 2


def test_spawn_with_busy_threads():
    """Spawning works, and stays fast, while four Python threads spin."""
    stop = threading.Event()

    def spin():
        n = 0
        while not stop.is_set():
            n += 1

    threads = [threading.Thread(target=spin) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        t0 = time.monotonic()
        for _ in range(20):
            with Child.spawn(["/bin/true"], new=()) as child:
                assert child.wait(10) == 0
        assert time.monotonic() - t0 < 10
        assert call_in_child(add, 2, 3, new=(), timeout=30) == 5
    finally:
        stop.set()
        for t in threads:
            t.join()


# --- namespaces (root) --------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_new_namespace_of_each_kind(kind):
    """A child started with new=(kind,) is in a namespace of that kind different from ours,
    and child.namespace(kind) is that namespace."""
    with Child.spawn(["sleep", "30"], new=(kind,)) as child:
        assert ns_id(child.pid, kind) != ns_id("self", kind)
        assert child.namespace(kind).identity == ns_id(child.pid, kind)
        for other in ALL_KINDS:
            if other != kind and not (kind == "user" and other == "user"):
                if other in ("pid", "time"):
                    continue  # for_children variants: compared below for our own kind only
                assert ns_id(child.pid, other) == ns_id("self", other)
        child.kill()  # an init of a new pid namespace ignores SIGTERM


@pytest.mark.root
@pytest.mark.parametrize("path", ["clone_vm", "fork_clone3"])
def test_all_kinds_at_once(path):
    """All eight kinds can be created in one clone, on both clone paths."""
    with Child.spawn(["sleep", "30"], new=ALL_KINDS,
                     _trampoline_flags=SPAWN_PATHS[path]) as child:
        for kind in ALL_KINDS:
            assert ns_id(child.pid, kind) != ns_id("self", kind), kind
        child.kill()


@pytest.mark.root
@pytest.mark.parametrize("kind", ["net", "uts", "ipc", "cgroup"])
def test_join_created_namespace(kind):
    """Joining a Namespace.create() handle puts the child in exactly that namespace."""
    with Namespace.create(kind) as ns, Child.spawn(["sleep", "30"], new=(), join=[ns]) as child:
        assert ns_id(child.pid, kind) == ns.identity
        assert child.namespace(kind) == ns


@pytest.mark.root
@pytest.mark.parametrize("kind", ["mnt", "user", "time", "net"])
def test_join_another_childs_namespace(kind):
    """A namespace held by one child (mnt, user, time: process-only kinds) can be joined by
    another; time needs the fork path, which nslab picks by itself."""
    with Child.spawn(["sleep", "30"], new=(kind,)) as holder:
        ns = holder.namespace(kind)
        with Child.spawn(["sleep", "30"], new=(), join=[ns]) as child:
            assert ns_id(child.pid, kind) == ns_id(holder.pid, kind) == ns.identity


@pytest.mark.root
def test_join_user_first_whatever_the_order():
    """Joining a user namespace and a netns it owns works given in any order (user first)."""
    with Child.spawn(["sleep", "30"], new=("user", "net")) as holder:
        net, user = holder.namespace("net"), holder.namespace("user")
        with Child.spawn(["sleep", "30"], new=(), join=[net, user]) as child:
            assert ns_id(child.pid, "net") == net.identity
            assert ns_id(child.pid, "user") == user.identity


@pytest.mark.root
def test_failed_setns_reports_step_and_errno():
    """setns into our own user namespace (EINVAL) and into a non-namespace fd (EINVAL) fail in
    the child with the step naming kind and fd."""
    with Namespace.current("user") as own:
        with pytest.raises(SpawnError) as info:
            Child.spawn(["true"], new=(), join=[own])
        assert info.value.errno == errno.EINVAL
        assert info.value.step == f"setns(user fd {own.fileno()})"
    with Namespace.create("net") as ns:
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, ns.fileno())  # the handle now holds a file that is no namespace
        os.close(devnull)
        with pytest.raises(SpawnError) as info:
            Child.spawn(["true"], new=(), join=[ns])
        assert info.value.errno == errno.EINVAL
        assert info.value.step == f"setns(net fd {ns.fileno()})"


@pytest.mark.root
def test_new_user_cannot_join_host_owned_netns():
    """A child in a new user namespace cannot enter a netns owned by the initial one: EPERM,
    raised as a PermissionError naming setns."""
    with Namespace.create("net") as ns:
        with pytest.raises(SpawnPermissionError) as info:
            Child.spawn(["true"], new=("user",), join=[ns])
        assert info.value.step.startswith("setns(net fd")


@pytest.mark.root
def test_hostname_in_new_uts():
    """hostname= is set inside the child's new uts namespace; ours is untouched."""
    ours = socket.gethostname()
    with Child.spawn(["hostname"], new=("uts",), hostname="nslab-box", stdout=PIPE) as child:
        assert child.communicate(timeout=5)[0] == b"nslab-box\n"
    assert socket.gethostname() == ours


@pytest.mark.root
def test_user_namespace_maps_root():
    """With new=('user',) the child is uid/gid 0 inside, mapped to us outside."""
    code = "import os; print(os.getuid(), os.getgid())"
    with Child.spawn([sys.executable, "-c", code], new=("user",), stdout=PIPE) as child:
        assert child.communicate(timeout=10)[0] == b"0 0\n"


@pytest.mark.root
def test_before_exec_sees_child_netns():
    """In before_exec, child.namespace('net') is the child's new netns and can be wired:
    bringing its lo up there is what the program then sees."""
    def wire(child):
        ns = child.namespace("net")
        assert ns.identity == ns_id(child.pid, "net") != ns_id("self", "net")
        ns.call(subprocess.run, ["ip", "link", "set", "lo", "up"], check=True)

    with Child.spawn(["ip", "-o", "link", "show", "lo"], new=("net",), stdout=PIPE,
                     before_exec=wire) as child:
        out = child.communicate(timeout=5)[0]
    assert b"UP" in out.split(b">")[0]


@pytest.mark.root
def test_none_mode_child_sees_only_lo():
    """A child in a fresh netns (Docker's none mode) sees only its loopback."""
    assert call_in_child(socket.if_nameindex, new=("net",), timeout=30) == [(1, "lo")]


@pytest.mark.root
def test_no_fd_leak_over_200_netns_spawns(no_fd_leak):
    """Spawning in fresh network namespaces leaks no fd either."""
    host = ns_id("self", "net")
    for _ in range(200):
        # Ask for the netns while the child waits: a zombie has no /proc/PID/ns.
        with Child.spawn(["/bin/true"], new=("net",),
                         before_exec=lambda c: c.namespace("net")) as child:
            assert child.namespace("net").identity != host
            assert child.wait(5) == 0


def _cgroup2_root():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    return None


@pytest.mark.root
def test_spawn_into_cgroup():
    """cgroup= starts the child directly in that cgroup v2 directory (CLONE_INTO_CGROUP, fork
    path); a directory that is no cgroup fails the clone, naming the cgroup."""
    root = _cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy")
    path = os.path.join(root, f"nslab-test-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(path)
    try:
        with Child.spawn(["sleep", "30"], new=("net",), cgroup=path) as child:
            with open(f"/proc/{child.pid}/cgroup") as f:
                assert f"0::/{os.path.relpath(path, root)}" in f.read().splitlines()
            child.kill()
    finally:
        os.rmdir(path)
    with pytest.raises(NslabError, match="into cgroup /tmp") as info:
        Child.spawn(["true"], new=(), cgroup="/tmp")
    assert info.value.syscall == "clone"


def _pid_reuse_probe():
    """Runs as init of a new pid namespace: reap a child, force its pid onto a new process,
    and check that signalling the old Child never reaches the newcomer."""
    a = Child.spawn(["/bin/true"], new=())
    a.wait(5)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(a.pid - 1))
    b = subprocess.Popen(["sleep", "30"])
    facts = {"same_pid": b.pid == a.pid, "send_signal": a.send_signal(signal.SIGKILL)}
    try:
        signal.pidfd_send_signal(a.pidfd, signal.SIGKILL)
        facts["pidfd"] = "delivered"
    except ProcessLookupError:
        facts["pidfd"] = "ESRCH"
    time.sleep(0.1)
    facts["b_alive"] = b.poll() is None
    b.kill()
    b.wait()
    a.close()
    return facts


@pytest.mark.root
def test_signal_after_reap_never_hits_pid_reuser():
    """With the reaped child's pid handed to a new process (ns_last_pid, in a private pid
    namespace), send_signal and the pidfd both leave the newcomer alone."""
    facts = call_in_child(_pid_reuse_probe, new=("pid",), timeout=30)
    assert facts == {"same_pid": True, "send_signal": False, "pidfd": "ESRCH", "b_alive": True}


# --- call_in_child ------------------------------------------------------------------------
def test_call_in_child_returns_value():
    """The callable's return value comes back, with args and kwargs passed through."""
    assert call_in_child(add, 2, 3, scale=10, new=(), timeout=30) == 50
    assert call_in_child(os.getpid, new=(), timeout=30) != os.getpid()


def test_call_in_child_reraises_custom_exception():
    """An exception class defined in this test module is re-raised here, with its attributes
    and the remote traceback as __cause__."""
    with pytest.raises(CustomError) as info:
        call_in_child(raise_custom, 7, new=(), timeout=30)
    assert info.value.code == 7
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_custom" in info.value.remote_traceback
    assert "raised in the child" in info.value.remote_traceback


def test_call_in_child_child_dies_without_result():
    """A child that exits without replying raises ChildDiedError."""
    with pytest.raises(ChildDiedError):
        call_in_child(exit_hard, new=(), timeout=30)


def test_call_in_child_timeout_kills_child(no_fd_leak):
    """A call that outlives its timeout raises TimeoutError and leaves no child or fd."""
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        call_in_child(sleep_forever, new=(), timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_call_in_child_function_from_main_script(tmp_path):
    """A function defined in a script's __main__ runs in the child (re-imported as
    __mp_main__, guarded code skipped), as with multiprocessing's spawn."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from nslab.process import call_in_child
        MARK = "module level ran in " + str(os.getpid())
        def where():
            return __name__, MARK.split()[-1] == str(os.getpid())
        if __name__ == "__main__":
            print(call_in_child(where, new=(), timeout=30))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == b"('__mp_main__', True)"


@pytest.mark.root
def test_call_in_child_hostname_and_uts():
    """hostname= works for callables too, in a new uts namespace."""
    assert call_in_child(socket.gethostname, new=("uts",), hostname="inside",
                         timeout=30) == "inside"


@pytest.mark.root
def test_example_01_runs():
    """examples/01_namespaces_side_by_side.py runs and confirms its own claims (exit 0)."""
    script = os.path.join(os.path.dirname(__file__), "..", "examples",
                          "01_namespaces_side_by_side.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gamma shares the host's:                    True" in out.stdout


@pytest.mark.root
def test_the_childs_own_failure_wins_over_what_before_exec_tripped_on():
    """A child whose setns was refused dies before it is released; if before_exec then fails
    on the gone child, the error still names the child's failed step (the parent's error is
    its __cause__), not just 'no such process'."""
    import time as _time

    def look_too_late(child):
        _time.sleep(0.2)               # the child has failed its setns by now
        child.namespace("uts")         # ... so this fails: ESRCH / ENOENT
    own_userns = Namespace.current("user")  # joining the userns we are in: EINVAL
    try:
        with pytest.raises(SpawnError) as info:
            Child.spawn(["true"], new=(), join=[own_userns], before_exec=look_too_late)
    finally:
        own_userns.close()
    assert info.value.step.startswith("setns(user") and info.value.errno == errno.EINVAL
    assert isinstance(info.value.__cause__, OSError)


# --- found in review: interrupts, joins, user namespaces, programs ----------------------------
@pytest.mark.root
def test_an_interrupt_as_the_clone_returns_leaves_no_parked_child(monkeypatch, no_fd_leak):
    """A signal (Ctrl-C) that arrives during the clone is raised when it returns, with the
    child made: spawn aborts and reaps it, so it neither stays parked nor keeps fds."""
    from nslab import process
    real, made = process.lib, []

    class Interrupted:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if not name.startswith("nslab_spawn") or name not in ("nslab_spawn", "nslab_spawn_via_spawner"):
                return fn

            def clone(a, r):
                fn(a, r)
                made.append(r.pid)
                raise KeyboardInterrupt
            return clone
    monkeypatch.setattr(process, "lib", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        Child.spawn(["sleep", "30"], new=("net",))
    monkeypatch.undo()
    assert made and not os.path.exists(f"/proc/{made[0]}")        # killed and reaped


@pytest.mark.root
def test_a_failure_handing_over_a_pipe_closes_it_once(monkeypatch, no_fd_leak):
    """If wrapping our end of a PIPE fails, that exception is what spawn raises (not an EBADF
    from closing the same fd twice: each end is closed once, by its file object or by spawn),
    and the child is discarded."""
    from nslab import process

    def broken_open(fd, mode):
        raise MemoryError("simulated")
    monkeypatch.setattr(process, "open", broken_open, raising=False)
    with pytest.raises(MemoryError):
        Child.spawn(["sleep", "30"], new=(), stdout=PIPE)


@pytest.mark.root
def test_before_exec_sees_the_joined_namespaces(no_fd_leak):
    """With join= and no new namespace, before_exec runs only once the child is in them."""
    with Namespace.create("net") as target:
        seen = []
        for _ in range(30):
            with Child.spawn(["true"], new=(), join=[target],
                             before_exec=lambda c: seen.append(c.namespace("net") == target)) as c:
                c.wait()
        assert seen == [True] * 30


@pytest.mark.root
def test_joining_a_user_namespace_leaves_our_dumpable_flag():
    """Joining a user namespace commits new credentials, which resets the dumpable flag of the
    caller's memory: a child sharing ours (CLONE_VM) must not, so nslab forks for it (with
    fs.suid_dumpable=0, the flag would drop to 0: no core dumps, no ptrace by our user)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_GET_DUMPABLE = 3
    holder = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "unshare", "-U", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while ns_id(holder.pid, "user") == ns_id(os.getpid(), "user"):
            assert time.monotonic() < deadline, "the holder never made its user namespace"
            time.sleep(0.01)
        with Namespace.open(f"/proc/{holder.pid}/ns/user", "user") as userns:
            assert libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1
            with Child.spawn(["true"], new=(), join=[userns]) as c:
                assert c.wait() == 0
            assert libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1
    finally:
        holder.kill()
        holder.wait()


def test_a_netlink_request_without_an_ack_is_refused():
    """Every setup step waits for one ack per request: a request that asks for none would
    hang the child (and its parent), so it is an InputError when the program is built."""
    from nslab._netlink import Request, link_up
    from nslab.child_setup import ChildSetup
    req = link_up("lo")
    data = bytearray(req.data)
    data[6] &= ~0x4                                   # clear NLM_F_ACK
    with pytest.raises(InputError) as info:
        ChildSetup().netlink([Request(bytes(data), req.what)], "here")
    assert info.value.field == "requests"


@pytest.mark.root
def test_the_failed_step_is_named_as_it_was_sent():
    """Error reports name the step the child ran, even if the caller's builder grew after
    it was handed over."""
    from nslab.child_setup import ChildSetup
    setup = ChildSetup().write_sysctl("net/ipv4/conf/lo/arp_notify", "1")

    def grow(child):
        setup.write_sysctl("net/ipv4/conf/lo/arp_ignore", "1")      # after it was sent
        child.configure(ChildSetup().write_sysctl("net/ipv4/conf/nosuch0/arp_notify", "1"))
    with pytest.raises(SpawnError) as info:
        Child.spawn(["true"], new=("net",), setup=setup, before_exec=grow)
    assert "nosuch0" in str(info.value) and "arp_ignore" not in str(info.value)


def test_setup_in_a_new_user_namespace_is_refused():
    """A setup program would run before the uid/gid maps exist: refused, nothing started."""
    from nslab.child_setup import ChildSetup
    with pytest.raises(InputError) as info:
        Child.spawn(["true"], new=("user", "net"),
                    setup=ChildSetup().write_sysctl("net/ipv4/ip_forward", "1"))
    assert info.value.field == "setup"


def test_executable_runs_that_path_and_keeps_argv0():
    """executable= (a resolved path, as Lab.spawn passes after its own checks) skips the PATH
    walk; argv[0] stays what the caller gave, as with subprocess."""
    with Child.spawn(["nslab-named", "-c", 'echo "$0"'], new=(), executable="/bin/sh", stdout=PIPE) as c:
        assert c.stdout.read() == b"nslab-named\n" and c.wait() == 0
    with pytest.raises(InputError) as info:
        Child.spawn(["true"], new=(), executable=b"")
    assert info.value.field == "executable"


# --- the short slice spawn asks for while it waits for the exec ------------------------------
class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
                ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64),
                ("util_min", ctypes.c_uint32), ("util_max", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_sched_setattr, _SYS_sched_getattr = 314, 315   # x86_64


def _sched_attr(set_to=None, tid=0):
    """sched_getattr(tid) (0: this thread), after sched_setattr(set_to) if given."""
    if set_to is not None:
        set_to.size = ctypes.sizeof(_SchedAttr)
        assert _libc.syscall(_SYS_sched_setattr, 0, ctypes.byref(set_to), 0) == 0, \
            os.strerror(ctypes.get_errno())
    attr = _SchedAttr()
    assert _libc.syscall(_SYS_sched_getattr, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) == 0
    return attr


def _spawn_in_thread(make_attr):
    """Set this thread's attributes, spawn, and return them (before, after) the spawn, read
    in a thread of its own so the test runner's thread keeps its own."""
    out = {}

    def run():
        before = _sched_attr(make_attr())
        Child.spawn(["true"]).wait()
        after = _sched_attr()
        out["result"] = (before, after)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["result"]


needs_slices = pytest.mark.skipif(
    os.uname().machine != "x86_64" or _sched_attr().runtime == 0,
    reason="sched_getattr by number (x86_64), on a kernel with EEVDF custom slices (Linux 6.12+)")


@needs_slices
@pytest.mark.parametrize("policy, runtime", [(0, 0), (0, 7_000_000), (3, 0)],
                         ids=["default slice", "a slice of its own", "SCHED_BATCH"])
def test_spawn_gives_the_calling_thread_its_scheduling_back(policy, runtime):
    def attr():
        a = _SchedAttr()
        a.policy, a.runtime = policy, runtime
        return a
    before, after = _spawn_in_thread(attr)
    assert (after.policy, after.nice, after.runtime, after.flags) == \
        (before.policy, before.nice, before.runtime, before.flags)
    if runtime:
        assert after.runtime == runtime


@needs_slices
def test_a_spawned_child_gets_the_default_slice():
    # The short slice is the waiting parent's, for the wait only: never the child's. Nor a
    # slice the thread that started the spawner thread had asked for. (Policy and nice are
    # that thread's: not checked here.)
    def spawn_with_a_slice_of_its_own():
        a = _SchedAttr()
        a.runtime = 5_000_000
        _sched_attr(a)
        out.append(Child.spawn([sys.executable, "-c", "import time; time.sleep(30)"]))
    out = []
    t = threading.Thread(target=spawn_with_a_slice_of_its_own)
    t.start()
    t.join()
    child = out[0]
    default = _sched_attr().runtime      # the runner's thread asked for none
    try:
        attr = _sched_attr(tid=child.pid)
        assert attr.runtime == default
    finally:
        child.kill()
        child.wait()
