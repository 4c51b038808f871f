/* spawn.c - nslab's clone trampoline: start a child in new and joined namespaces, let the
 * parent configure it, then exec; report exactly which step failed if it does not exec.
 *
 * Why C: the child of a raw clone from a Python process must not run Python (cffi released the
 * GIL; the interpreter's locks were copied mid-use by other threads). So everything between
 * clone and execve is here: raw system calls only, no allocation, no errno, no locks.
 *
 * The handshake (kernel-notes.md, "A clone3 trampoline"; CPython's _posixsubprocess and
 * util-linux unshare.c do the same dance):
 *
 *   parent                                     child
 *   socketpair(sync), pipe2(err), both CLOEXEC
 *   block all signals
 *   clone(CLONE_NEW*|CLONE_PIDFD|...)
 *   restore signals; return pid to Python       default signal handlers, PR_SET_PDEATHSIG,
 *                                               close every fd it will not need,
 *                                               restore the caller's signal mask,
 *   (optionally: other work, then               unshare() the namespaces left to it,
 *    nslab_spawn_wait_ready() <------------     setns() each fd to join (user first), "r",
 *    until the child says "r")                  run the setup program it was given
 *   Python writes uid/gid maps, wires the       (sysctls, lo up: in parallel with the
 *   network, runs before_exec(child) ...         parent), block reading the sync socket
 *   nslab_spawn_configure(): "c" + program -->  run that program too (eth0's address,
 *                                               route...), block again
 *   nslab_spawn_release(): send "go" ------->   sethostname, chdir, dup2 stdio, mark every fd
 *                                               but 0-2 and pass_fds close-on-exec, execve
 *   read err pipe: EOF = exec succeeded  <----  or: write {step, errno, index}, _exit(127)
 *
 * If the parent dies or gives up before "go", the child reads EOF on the sync socket and exits
 * without running anything.
 *
 * Two ways to clone, one child:
 *   - CLONE_VM (the default, as glibc's posix_spawn does): the child borrows our memory, on a
 *     small stack of its own, until it execs. Nothing is copied, so the cost does not grow with
 *     the size of the Python process (a copy made spawning 2-3x slower than posix_spawn here).
 *     This is why the child uses raw syscalls: it shares the calling thread's TLS, and glibc
 *     wrappers would write that thread's errno. The stack is freed only once the child has
 *     provably left it (EOF on the error pipe happens after exec or exit released the memory).
 *     Cloned by the spawner thread, it also shares our fd table at first (CLONE_FILES) and
 *     takes one of its own with only the low fds it needs, so the cost does not grow with the
 *     fds a lab holds either (see "the child's fd table" below).
 *   - fork mode: clone3 with no stack copies the address space. Needed for CLONE_INTO_CGROUP
 *     (glibc's clone() wrapper passes 32-bit flags) and for time namespaces (CLONE_NEWTIME is
 *     ignored with CLONE_VM, and setns refuses a task sharing its mm: EUSERS); also used on
 *     architectures without raw syscalls here.
 *
 * Parent death: PR_SET_PDEATHSIG fires when the *thread* that created the child exits, not the
 * process (kernel-notes.md, verified). nslab_spawn_via_spawner() therefore hands the clone to
 * one detached pthread that nslab starts on first use and that never exits: the signal then
 * fires only when the whole process dies. That thread is plain C, invisible to Python, blocks
 * every signal, and is re-created after fork() in a forked child (pthread_atfork). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "spawn.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLONE_CLEAR_SIGHAND
#define CLONE_CLEAR_SIGHAND 0x100000000ULL
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

/* The clone3 ABI (include/uapi/linux/sched.h, CLONE_ARGS_SIZE_VER2). Declared here so the
 * build does not depend on the installed kernel headers having it. */
struct nslab_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

/* The kernel's struct sigaction for rt_sigaction (x86_64 and the generic layout agree on
 * the fields we use: the handler first, all zero means SIG_DFL). */
struct kernel_sigaction_ {
    void *handler;
    unsigned long flags;
    void *restorer;
    unsigned long mask;
};

struct linux_dirent64_ {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* ------------------------------------------------------------------------------------ */
/* Raw system calls: return the result or -errno, and never touch errno (see above).     */

#if defined(__x86_64__)
#define HAVE_RAW_SYSCALL 1
static long raw6(long n, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
#define HAVE_RAW_SYSCALL 1
static long raw6(long n, long a, long b, long c, long d, long e, long f)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory", "cc");
    return x0;
}
#else
/* Elsewhere glibc's syscall() (which writes errno) is fine, because only fork mode is used. */
#define HAVE_RAW_SYSCALL 0
static long raw6(long n, long a, long b, long c, long d, long e, long f)
{
    long r = syscall(n, a, b, c, d, e, f);
    return r < 0 ? -errno : r;
}
#endif

#define sys0(n) raw6((n), 0, 0, 0, 0, 0, 0)
#define sys1(n, a) raw6((n), (long)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) raw6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define sys3(n, a, b, c) raw6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) raw6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define sys5(n, a, b, c, d, e) raw6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* Everything the child needs besides the caller's arguments. In CLONE_VM mode it lives at the
 * top of the child's own stack mapping; in fork mode on the parent's stack (copied). */
struct child_ctx {
    const struct nslab_spawn_args *a;
    int sync_fd;
    int err_fd;
    int handlers_cleared;             /* CLONE_CLEAR_SIGHAND took effect */
    sigset_t mask;                    /* the signal mask the exec'd program starts with */
    int needed[NSLAB_SPAWN_MAX_FDS];  /* sorted: every fd the child may still use */
    int n_needed;
    unsigned int own_files_below;     /* > 0: cloned with CLONE_FILES; take a table of our own
                                         holding only the fds below this (see spawn_impl) */
    int files_pending;                /* futex: 1 until we no longer share the parent's table */
};

/* ------------------------------------------------------------------------------------ */
/* The child.                                                                            */

static void __attribute__((noreturn)) child_exit(int status)
{
    for (;;)
        sys1(SYS_exit_group, status);
}

static void __attribute__((noreturn)) child_fail(const struct child_ctx *c, int step, long rc,
                                                  int index)
{
    struct nslab_spawn_report rep = {step, (int)-rc, index};
    while (sys3(SYS_write, c->err_fd, &rep, sizeof rep) == -EINTR)
        ;
    child_exit(127);
}

static int is_needed(const struct child_ctx *c, int fd)
{
    for (int i = 0; i < c->n_needed; i++)
        if (c->needed[i] == fd)
            return 1;
    return 0;
}

/* Fallback for kernels without close_range (< 5.9): list /proc/self/fd with getdents64 (no
 * malloc, unlike opendir) and close what is not needed, as CPython's _posixsubprocess does. */
static long close_fds_by_listing(const struct child_ctx *c)
{
    long dir = sys4(SYS_openat, AT_FDCWD, "/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (dir < 0) {
        /* No /proc: close by brute force up to the fd limit. */
        struct rlimit rl;
        long max = 65536;
        if (sys4(SYS_prlimit64, 0, RLIMIT_NOFILE, 0, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
            max = (long)rl.rlim_cur;
        for (long fd = 3; fd < max; fd++)
            if (!is_needed(c, (int)fd))
                sys1(SYS_close, fd);
        return 0;
    }
    char buf[2048];
    for (;;) {
        long n = sys3(SYS_getdents64, dir, buf, sizeof buf);
        if (n < 0) {
            sys1(SYS_close, dir);
            return n;
        }
        if (n == 0)
            break;
        for (long off = 0; off < n;) {
            struct linux_dirent64_ *d = (struct linux_dirent64_ *)(buf + off);
            off += d->d_reclen;
            int fd = 0, digits = 0;
            for (const char *p = d->d_name; *p >= '0' && *p <= '9'; p++, digits++)
                fd = fd * 10 + (*p - '0');
            if (digits == 0 || fd < 3 || fd == dir || is_needed(c, fd))
                continue;
            sys1(SYS_close, fd);
        }
    }
    sys1(SYS_close, dir);
    return 0;
}

/* Close every fd >= 3 that is not in c->needed (sorted): each gap between needed fds is one
 * close_range(). Done first thing, so fds of other spawns (their sync and error pipes, say) do
 * not stay open in this child while it waits for its parent. */
static long close_unneeded_fds(const struct child_ctx *c)
{
    if (!(c->a->flags & NSLAB_SPAWN_NO_CLOSE_RANGE)) {
        unsigned int lo = 3;
        long rc = 0;
        for (int i = 0; i < c->n_needed && rc == 0; i++) {
            unsigned int fd = (unsigned int)c->needed[i];
            if (fd < lo)
                continue;
            if (fd > lo)
                rc = sys3(SYS_close_range, lo, fd - 1, 0);
            lo = fd + 1;
        }
        if (rc == 0)
            rc = sys3(SYS_close_range, lo, ~0U, 0);
        if (rc != -ENOSYS)
            return rc;
    }
    return close_fds_by_listing(c);
}

static void reset_signal_handlers(const struct child_ctx *c)
{
    struct kernel_sigaction_ dfl = {0, 0, 0, 0}, old;
    long rc;
    if (!c->handlers_cleared) {
        /* Every handled signal back to SIG_DFL, so no handler of the parent (CPython's, or
         * glibc's own) can run in this copy of it. CLONE_CLEAR_SIGHAND does it in fork mode. */
        for (int sig = 1; sig <= 64; sig++) {
            if (sig == SIGKILL || sig == SIGSTOP)
                continue;
            if (sys4(SYS_rt_sigaction, sig, 0, &old, 8) < 0)
                continue;
            if (old.handler != (void *)SIG_DFL && old.handler != (void *)SIG_IGN &&
                (rc = sys4(SYS_rt_sigaction, sig, &dfl, 0, 8)) < 0)
                child_fail(c, NSLAB_STEP_SIGNALS, rc, sig);
        }
    }
    /* CPython ignores SIGPIPE and SIGXFSZ for itself; an ignored signal survives exec, so put
     * them back as subprocess's restore_signals does. */
    if ((rc = sys4(SYS_rt_sigaction, SIGPIPE, &dfl, 0, 8)) < 0)
        child_fail(c, NSLAB_STEP_SIGNALS, rc, SIGPIPE);
    if ((rc = sys4(SYS_rt_sigaction, SIGXFSZ, &dfl, 0, 8)) < 0)
        child_fail(c, NSLAB_STEP_SIGNALS, rc, SIGXFSZ);
}

static void set_pdeathsig(const struct child_ctx *c, long ppid)
{
    long rc;
    if (c->a->pdeathsig <= 0)
        return;
    if ((rc = sys5(SYS_prctl, PR_SET_PDEATHSIG, c->a->pdeathsig, 0, 0, 0)) < 0)
        child_fail(c, NSLAB_STEP_PDEATHSIG, rc, c->a->pdeathsig);
    /* The parent died before prctl took effect: we were reparented and nobody will signal. */
    if (sys0(SYS_getppid) != ppid)
        child_exit(127);
}

/* Drop capabilities before exec (raw syscalls: see the top of this file). A root child's
 * permitted set after execve is its bounding set, so PR_CAPBSET_DROP is what sticks; the
 * effective, permitted and inheritable bits go too, so nothing can carry them across (the
 * kernel then drops them from the ambient set as well). */
struct nslab_cap_header { unsigned int version; int pid; };
struct nslab_cap_data { unsigned int effective, permitted, inheritable; };

static void drop_caps(const struct child_ctx *c, unsigned long long mask)
{
    long rc;
    for (int cap = 0; cap < 64; cap++)
        if ((mask >> cap) & 1ULL) {
            rc = sys5(SYS_prctl, PR_CAPBSET_DROP, cap, 0, 0, 0);
            if (rc < 0 && rc != -EINVAL)      /* EINVAL: a capability this kernel lacks */
                child_fail(c, NSLAB_STEP_CAPS, rc, cap);
        }
    struct nslab_cap_header h = {0x20080522 /* _LINUX_CAPABILITY_VERSION_3 */, 0};
    struct nslab_cap_data d[2];
    if ((rc = sys2(SYS_capget, &h, d)) < 0)
        child_fail(c, NSLAB_STEP_CAPS, rc, -1);
    for (int i = 0; i < 2; i++) {
        unsigned int keep = ~(unsigned int)(mask >> (32 * i));
        d[i].effective &= keep;
        d[i].permitted &= keep;
        d[i].inheritable &= keep;
    }
    if ((rc = sys2(SYS_capset, &h, d)) < 0)
        child_fail(c, NSLAB_STEP_CAPS, rc, -1);
}

#define CLOSE_RANGE_UNSHARE_ (1U << 1)
#define FUTEX_WAIT_ 0                 /* shared (not _PRIVATE): the kernel's CLONE_CHILD_CLEARTID */
#define FUTEX_WAKE_ 1                 /* wake-up on exit is a shared one */

/* ---- setup programs (spawn.h) ------------------------------------------------------- */

#ifndef SYS_fsopen                 /* the same number on every architecture (Linux 5.2+) */
#define SYS_fsopen 430
#define SYS_fsconfig 431
#define SYS_fsmount 432
#endif
#define FSOPEN_CLOEXEC_ 1
#define FSCONFIG_CMD_CREATE_ 6
#define FSMOUNT_CLOEXEC_ 1

/* The /proc/sys the setup writes through: a private procfs instance, detached (never
 * mounted anywhere), when the kernel lets us make one; else the shared /proc/sys.
 *
 * Why: sysctl dentries of every netns hang under one shared /proc/sys/net dentry in the
 * shared procfs, so the first lookup of net/ipv4 (or ipv6) in a new netns compares against
 * the entry of every other live netns (proc_sys_compare, under a spinlock: ~0.3 ms per lookup
 * at 1,000 containers, measured). In an instance of our own the chain holds only ours, and
 * it is freed with the instance (Linux 5.8+ gives each procfs mount its own superblock).
 * Making it costs ~0.1 ms, done while the parent makes the veth. Needs CAP_SYS_ADMIN over
 * our mount and pid namespaces: refused in a rootless lab, which then uses /proc/sys. */
static long open_proc_sys(void)
{
    long fs = sys2(SYS_fsopen, "proc", FSOPEN_CLOEXEC_);
    if (fs >= 0) {
        long mnt = sys5(SYS_fsconfig, fs, FSCONFIG_CMD_CREATE_, 0, 0, 0);
        if (mnt >= 0)
            mnt = sys3(SYS_fsmount, fs, FSMOUNT_CLOEXEC_, 0);
        sys1(SYS_close, fs);
        if (mnt >= 0) {
            long dir = sys4(SYS_openat, mnt, "sys", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
            sys1(SYS_close, mnt);   /* the directory fd keeps the instance alive */
            if (dir >= 0)
                return dir;
        }
    }
    return sys4(SYS_openat, AT_FDCWD, "/proc/sys", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
}

static size_t cstrlen(const char *p, size_t max)
{
    size_t n = 0;
    while (n < max && p[n])
        n++;
    return n;
}

/* One NSLAB_SETUP_NETLINK step: send its requests in one datagram, check every ack. */
static void setup_netlink(const struct child_ctx *c, int *nl, const unsigned char *msgs, size_t len,
                          int index)
{
    long rc;
    if (*nl < 0) {
        if ((rc = sys3(SYS_socket, AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)) < 0)
            child_fail(c, NSLAB_STEP_SETUP, rc, index);
        *nl = (int)rc;
        int one = 1;  /* acks without a copy of the request: small, fixed-size */
        sys5(SYS_setsockopt, *nl, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
    }
    int n = 0;
    for (size_t off = 0; off < len; n++) {
        const struct nlmsghdr *h = (const struct nlmsghdr *)(msgs + off);
        if (len - off < sizeof *h || h->nlmsg_len < sizeof *h || h->nlmsg_len > len - off)
            child_fail(c, NSLAB_STEP_SETUP, -EINVAL, index);
        /* One ack per request is awaited below: a request that asks for none would hang us. */
        if ((h->nlmsg_flags & (NLM_F_REQUEST | NLM_F_ACK)) != (NLM_F_REQUEST | NLM_F_ACK) ||
            h->nlmsg_type < NLMSG_MIN_TYPE)
            child_fail(c, NSLAB_STEP_SETUP, -EINVAL, index | (n + 1));
        off += NLMSG_ALIGN(h->nlmsg_len);
    }
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    while ((rc = raw6(SYS_sendto, *nl, (long)msgs, (long)len, 0, (long)&kernel, sizeof kernel)) == -EINTR)
        ;
    if (rc < 0)
        child_fail(c, NSLAB_STEP_SETUP, rc, index);
    unsigned char buf[4096] __attribute__((aligned(8)));
    for (int acked = 0; acked < n;) {
        while ((rc = raw6(SYS_recvfrom, *nl, (long)buf, sizeof buf, 0, 0, 0)) == -EINTR)
            ;
        if (rc < 0)
            child_fail(c, NSLAB_STEP_SETUP, rc, index);
        for (size_t off = 0; off + sizeof(struct nlmsghdr) <= (size_t)rc;) {
            const struct nlmsghdr *h = (const struct nlmsghdr *)(buf + off);
            if (h->nlmsg_len < sizeof *h || h->nlmsg_len > (size_t)rc - off)
                break;
            if (h->nlmsg_type == NLMSG_ERROR) {
                const struct nlmsgerr *e = (const struct nlmsgerr *)NLMSG_DATA(h);
                if (e->error != 0)  /* which request: its sequence number (1..n) */
                    child_fail(c, NSLAB_STEP_SETUP, e->error, index | (int)(h->nlmsg_seq & 0xff));
                acked++;
            }
            off += NLMSG_ALIGN(h->nlmsg_len);
        }
    }
}

/* Run one setup program. Steps are numbered across all programs of one child (*step), so
 * Python can name the one that failed: index = step << 8 | request. */
static void run_setup(const struct child_ctx *c, const unsigned char *p, size_t len, int *nl,
                      int *sysfd, int *step)
{
    size_t off = 0;
    while (off < len) {
        const struct nslab_setup_step *st = (const struct nslab_setup_step *)(p + off);
        int index = (*step)++ << 8;
        if (len - off < sizeof *st || st->len > len - off - sizeof *st)
            child_fail(c, NSLAB_STEP_SETUP, -EINVAL, index);
        const char *payload = (const char *)(st + 1);
        long rc, fd;
        switch (st->op) {
        case NSLAB_SETUP_WRITE:
        case NSLAB_SETUP_WRITE_OPT: {
            size_t plen = cstrlen(payload, st->len);
            if (plen >= st->len)
                child_fail(c, NSLAB_STEP_SETUP, -EINVAL, index);
            if (*sysfd < 0 && (*sysfd = (int)open_proc_sys()) < 0)
                child_fail(c, NSLAB_STEP_SETUP, *sysfd, index);
            fd = sys4(SYS_openat, *sysfd, payload, O_WRONLY | O_CLOEXEC, 0);
            if (fd == -ENOENT && st->op == NSLAB_SETUP_WRITE_OPT)
                break;
            if (fd < 0)
                child_fail(c, NSLAB_STEP_SETUP, fd, index);
            rc = sys3(SYS_write, fd, payload + plen + 1, st->len - plen - 1);
            sys1(SYS_close, fd);
            if (rc < 0)
                child_fail(c, NSLAB_STEP_SETUP, rc, index);
            break;
        }
        case NSLAB_SETUP_TOUCH:
            if (cstrlen(payload, st->len) >= st->len)
                child_fail(c, NSLAB_STEP_SETUP, -EINVAL, index);
            if (*sysfd < 0 && (*sysfd = (int)open_proc_sys()) < 0)
                child_fail(c, NSLAB_STEP_SETUP, *sysfd, index);
            fd = sys4(SYS_openat, *sysfd, payload, O_PATH | O_CLOEXEC, 0);
            if (fd >= 0)
                sys1(SYS_close, fd);
            break;
        case NSLAB_SETUP_NETLINK:
            setup_netlink(c, nl, (const unsigned char *)payload, st->len, index);
            break;
        default:
            child_fail(c, NSLAB_STEP_SETUP, -EINVAL, index);
        }
        off += sizeof *st + ((st->len + 3) & ~3u);
    }
}

/* Read exactly n bytes from the sync socket: 1, or 0 on EOF (the parent gave up). */
static int sync_read(const struct child_ctx *c, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        long rc = sys3(SYS_read, c->sync_fd, (char *)buf + got, n - got);
        if (rc == -EINTR)
            continue;
        if (rc < 0)
            child_fail(c, NSLAB_STEP_SYNC, rc, 0);
        if (rc == 0)
            return 0;
        got += (size_t)rc;
    }
    return 1;
}

static int __attribute__((noreturn)) child_main(void *arg)
{
    const struct child_ctx *c = arg;
    const struct nslab_spawn_args *a = c->a;
    long ppid = sys0(SYS_getppid);  /* 0 in a new pid namespace: the parent is outside it */
    long rc;

    if (c->own_files_below > 0) {
        /* Still the parent's fd table: touch nothing in it. Take a table of our own with the
         * low fds only (Linux 5.9+; before, a copy of the whole table, closed down below as
         * usual), then let the parent go on. */
        rc = sys3(SYS_close_range, c->own_files_below, ~0U, CLOSE_RANGE_UNSHARE_);
        if (rc < 0)
            rc = sys1(SYS_unshare, CLONE_FILES);
        int *pending = &((struct child_ctx *)c)->files_pending;
        __atomic_store_n(pending, 0, __ATOMIC_RELEASE);
        if (raw6(SYS_futex, (long)pending, FUTEX_WAKE_, 1, 0, 0, 0) > 0)
            sys0(SYS_sched_yield);   /* the spawner may be queued behind us on this CPU */
        if (rc < 0)
            child_fail(c, NSLAB_STEP_CLOSE_FDS, rc, 0);
    }
    reset_signal_handlers(c);
    set_pdeathsig(c, ppid);
    if ((rc = close_unneeded_fds(c)) < 0)
        child_fail(c, NSLAB_STEP_CLOSE_FDS, rc, 0);
    if ((rc = sys4(SYS_rt_sigprocmask, SIG_SETMASK, &c->mask, 0, 8)) < 0)
        child_fail(c, NSLAB_STEP_SIGMASK, rc, 0);

    /* Namespaces the parent left to us, so that making them overlaps its own work. */
    if (a->unshare_flags && (rc = sys1(SYS_unshare, a->unshare_flags)) < 0)
        child_fail(c, NSLAB_STEP_UNSHARE, rc, 0);

    /* Join before waiting, so the parent's before_exec already sees the joined namespaces.
     * Python orders the list: user first (it grants the rights the others need). */
    for (int i = 0; i < a->n_join; i++)
        if ((rc = sys2(SYS_setns, a->join_fds[i], a->join_types ? a->join_types[i] : 0)) < 0)
            child_fail(c, NSLAB_STEP_SETNS, rc, i);
    if (a->n_join > 0)
        set_pdeathsig(c, ppid);  /* joining a user namespace changes credentials, which may
                                    clear the parent-death signal */

    /* Our namespaces exist (made or joined): the parent may look at them and wire them (a
     * veth into our netns) while we run our own share of the setup (sysctls, lo up...). */
    if (a->unshare_flags || a->n_join > 0) {
        /* A parent with nothing to look at may have sent "go" and closed its end already
         * (it reads "r" only when it waits): then this finds EPIPE, which is fine, and the
         * read below finds the "go" (or EOF if it gave up). MSG_NOSIGNAL: no SIGPIPE. */
        char ready = 'r';
        while ((rc = raw6(SYS_sendto, c->sync_fd, (long)&ready, 1, MSG_NOSIGNAL, 0, 0)) == -EINTR)
            ;
        if (rc < 0 && rc != -EPIPE && rc != -ECONNRESET)
            child_fail(c, NSLAB_STEP_SYNC, rc, 0);
    }
    int nl = -1, sysfd = -1, step = 0;
    if (a->setup)
        run_setup(c, a->setup, a->setup_len, &nl, &sysfd, &step);

    /* Wait for the parent: it configures us meanwhile, and may send more setup ('c', length,
     * program) before "go" ('g'). EOF means it gave up or died. */
    for (;;) {
        char cmd = 0;
        if (!sync_read(c, &cmd, 1))
            child_exit(127);
        if (cmd != 'c')
            break;
        unsigned int plen = 0;
        unsigned char prog[NSLAB_SETUP_MAX] __attribute__((aligned(8)));
        if (!sync_read(c, &plen, sizeof plen))
            child_exit(127);
        if (plen > sizeof prog)
            child_fail(c, NSLAB_STEP_SYNC, -E2BIG, 0);
        if (!sync_read(c, prog, plen))
            child_exit(127);
        run_setup(c, prog, plen, &nl, &sysfd, &step);
    }
    if (nl >= 0)
        sys1(SYS_close, nl);
    if (sysfd >= 0)
        sys1(SYS_close, sysfd);

    if (a->hostname && (rc = sys2(SYS_sethostname, a->hostname, a->hostname_len)) < 0)
        child_fail(c, NSLAB_STEP_HOSTNAME, rc, 0);
    if (a->cwd && (rc = sys1(SYS_chdir, a->cwd)) < 0)
        child_fail(c, NSLAB_STEP_CHDIR, rc, 0);
    if (a->caps_drop)
        drop_caps(c, a->caps_drop);

    /* stdio: first move any source that is itself 0-2 (but not its own slot) above 2, so a
     * swap like stdout=2, stderr=1 cannot clobber itself. dup3 clears close-on-exec. */
    long src[3] = {a->stdio[0], a->stdio[1], a->stdio[2]};
    for (int i = 0; i < 3; i++)
        if (src[i] >= 0 && src[i] < 3 && src[i] != i &&
            (src[i] = sys3(SYS_fcntl, src[i], F_DUPFD_CLOEXEC, 3)) < 0)
            child_fail(c, NSLAB_STEP_DUP2, src[i], i);
    for (int i = 0; i < 3; i++) {
        if (src[i] < 0)
            continue;
        rc = src[i] == i ? sys3(SYS_fcntl, i, F_SETFD, 0) : sys3(SYS_dup3, src[i], i, 0);
        if (rc < 0)
            child_fail(c, NSLAB_STEP_DUP2, rc, i);
    }

    /* Whatever we still hold (namespace fds, stdio sources, the pipes) closes at exec; only
     * the fds the caller passed survive it. */
    for (int i = 0; i < c->n_needed; i++)
        if (c->needed[i] >= 3 &&
            (rc = sys3(SYS_fcntl, c->needed[i], F_SETFD, FD_CLOEXEC)) < 0)
            child_fail(c, NSLAB_STEP_CLOEXEC, rc, c->needed[i]);
    for (int i = 0; i < a->n_keep; i++)
        if ((rc = sys3(SYS_fcntl, a->keep_fds[i], F_SETFD, 0)) < 0)
            child_fail(c, NSLAB_STEP_CLOEXEC, rc, a->keep_fds[i]);

    rc = sys3(SYS_execve, a->path, a->argv, a->envp);
    child_fail(c, NSLAB_STEP_EXECVE, rc, 0);
}

/* ------------------------------------------------------------------------------------ */
/* The parent.                                                                           */

/* The CLONE_VM child's mapping: a guard page, its stack, then its context at the top. */
#define CHILD_MAP_SIZE (128 * 1024)

static void add_needed(struct child_ctx *c, int fd)
{
    if (fd < 0)
        return;
    int i = c->n_needed;
    while (i > 0 && c->needed[i - 1] > fd)  /* insertion sort; lists are short */
        i--;
    if (i > 0 && c->needed[i - 1] == fd)
        return;
    memmove(&c->needed[i + 1], &c->needed[i], (size_t)(c->n_needed - i) * sizeof(int));
    c->needed[i] = fd;
    c->n_needed++;
}

static int use_vm_mode(const struct nslab_spawn_args *a)
{
    if (!HAVE_RAW_SYSCALL || (a->flags & (NSLAB_SPAWN_FORK_MODE | NSLAB_SPAWN_NO_CLEAR_SIGHAND |
                                          NSLAB_SPAWN_NO_CLONE3)))
        return 0;
    if (a->cgroup_fd >= 0 || (a->clone_flags >> 31) != 0)
        return 0;
    /* With CLONE_VM the kernel leaves a new time namespace out (measured on 6.18: the child
     * and its exec'd program stay in ours), as the vDSO page is shared: fork mode does it. */
    if (a->clone_flags & CLONE_NEWTIME)
        return 0;
    for (int i = 0; i < a->n_join; i++)
        if (!a->join_types || a->join_types[i] == 0 || a->join_types[i] == CLONE_NEWTIME ||
            a->join_types[i] == CLONE_NEWUSER)
            return 0;  /* joining time needs an unshared mm; an unknown kind might; joining a user
                          namespace commits new credentials, which resets the dumpable flag of
                          the mm, ours in CLONE_VM mode (verified: PR_GET_DUMPABLE 1 -> 0) */
    return 1;
}

/* ---- the child's fd table -----------------------------------------------------------
 *
 * A clone copies the whole fd table and the child then closes all but a few: O(open fds)
 * per spawn, and a lab holds two per container (pidfd, netns handle): +0.19 ms per spawn at
 * 2,000 fds (benchmarks/RESULTS.md). So the spawner thread's CLONE_VM children share our
 * table (CLONE_FILES) and, first thing, take one of their own holding only the fds below a
 * bound: close_range(bound, ~0, CLOSE_RANGE_UNSHARE) copies nothing above it. The child's
 * ends of its sync socket and error pipe are the only fds it needs that we make per spawn,
 * so they go into two low fd numbers reserved for that (slots, holding a placeholder pipe
 * end in between), and the spawner waits until the child has its own table before it puts
 * the placeholders back. Used only when every fd the child needs is below SLOT_BOUND. */

#define SLOT_BOUND 256

static int g_fd_slot[2] = {-1, -1};     /* the reserved fd numbers (spawner thread only) */
static int g_fd_slot_src = -1;          /* the placeholder: the read end of a pipe of ours */
static dev_t g_fd_slot_dev;
static ino_t g_fd_slot_ino;

static int slot_holds_placeholder(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == g_fd_slot_dev && st.st_ino == g_fd_slot_ino;
}

/* On the spawner thread, once. Without slots (no low fds to spare), every clone copies. */
static void reserve_slots(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return;
    close(p[1]);                      /* nobody writes: a placeholder never reads */
    struct stat st;
    int a = fcntl(p[0], F_DUPFD_CLOEXEC, 3), b = fcntl(p[0], F_DUPFD_CLOEXEC, 3);
    if (fstat(p[0], &st) < 0 || a < 0 || b < 0 || a >= SLOT_BOUND || b >= SLOT_BOUND) {
        close(p[0]);
        if (a >= 0)
            close(a);
        if (b >= 0)
            close(b);
        return;
    }
    g_fd_slot_dev = st.st_dev;
    g_fd_slot_ino = st.st_ino;
    g_fd_slot_src = p[0];
    g_fd_slot[0] = a;
    g_fd_slot[1] = b;
}

/* The bound below which the child keeps fds if it can share our table, else 0. */
static unsigned int shared_table_bound(const struct nslab_spawn_args *a, int vm, int via_spawner)
{
    if (!vm || !via_spawner || g_fd_slot[0] < 0 || (a->flags & NSLAB_SPAWN_NO_CLOSE_RANGE))
        return 0;
    int top = g_fd_slot[0] > g_fd_slot[1] ? g_fd_slot[0] : g_fd_slot[1];
    for (int i = 0; i < a->n_keep; i++)
        top = a->keep_fds[i] > top ? a->keep_fds[i] : top;
    for (int i = 0; i < a->n_join; i++)
        top = a->join_fds[i] > top ? a->join_fds[i] : top;
    for (int i = 0; i < 3; i++)
        top = a->stdio[i] > top ? a->stdio[i] : top;
    /* Someone closed a slot and the number may be theirs now: never dup over it. */
    if (top >= SLOT_BOUND || !slot_holds_placeholder(g_fd_slot[0]) || !slot_holds_placeholder(g_fd_slot[1]))
        return 0;
    return (unsigned int)top + 1;
}

/* Fork mode: clone3 without a stack, falling back to clone(2). Returns the pid or -errno. */
static long clone_fork_mode(const struct nslab_spawn_args *a, struct child_ctx *ctx, int *pidfd)
{
    struct nslab_clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = a->clone_flags | CLONE_PIDFD | CLONE_CLEAR_SIGHAND;
    ca.pidfd = (uint64_t)(uintptr_t)pidfd;
    ca.exit_signal = SIGCHLD;
    if (a->cgroup_fd >= 0) {
        ca.flags |= CLONE_INTO_CGROUP;
        ca.cgroup = (uint64_t)a->cgroup_fd;
    }
    if (a->flags & NSLAB_SPAWN_NO_CLEAR_SIGHAND)
        ca.flags &= ~(uint64_t)CLONE_CLEAR_SIGHAND;

    long pid = -ENOSYS;
    if (!(a->flags & NSLAB_SPAWN_NO_CLONE3)) {
        ctx->handlers_cleared = (ca.flags & CLONE_CLEAR_SIGHAND) != 0;
        pid = raw6(SYS_clone3, (long)&ca, sizeof ca, 0, 0, 0, 0);
        if (pid == -EINVAL && ctx->handlers_cleared) {
            /* Before 5.5 the flag is unknown (EINVAL): reset handlers in the child instead.
             * Any other EINVAL comes back the same from the retry. */
            ca.flags &= ~(uint64_t)CLONE_CLEAR_SIGHAND;
            ctx->handlers_cleared = 0;
            pid = raw6(SYS_clone3, (long)&ca, sizeof ca, 0, 0, 0, 0);
        }
    }
    if (pid == -ENOSYS && a->cgroup_fd < 0 && (a->clone_flags >> 32) == 0) {
        /* clone3 arrived in 5.3; clone(2) has CLONE_PIDFD since 5.2 and stores the pidfd
         * through parent_tid. Argument order per CONFIG_CLONE_BACKWARDS*; no stack either way. */
        ctx->handlers_cleared = 0;
        unsigned long fl = (unsigned long)a->clone_flags | CLONE_PIDFD | SIGCHLD;
#if defined(__s390__) || defined(__CRIS__)
        pid = raw6(SYS_clone, 0, (long)fl, (long)pidfd, 0, 0, 0);
#else
        pid = raw6(SYS_clone, (long)fl, 0, (long)pidfd, 0, 0, 0);
#endif
    }
    if (pid == 0)
        child_main(ctx);
    return pid;
}

static int spawn_impl(const struct nslab_spawn_args *a, struct nslab_spawn_result *r,
                      const sigset_t *child_mask)
{
    if (a->n_keep < 0 || a->n_join < 0 || a->n_keep + a->n_join + 5 > NSLAB_SPAWN_MAX_FDS)
        return -EINVAL;

    int vm = use_vm_mode(a);
    struct child_ctx local_ctx, *ctx = &local_ctx;
    char *map = NULL;
    if (vm) {
        map = mmap(NULL, CHILD_MAP_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (map == MAP_FAILED)
            return -errno;
        if (mprotect(map, 4096, PROT_NONE) < 0) {  /* an overflow faults instead of writing */
            int err = errno;
            munmap(map, CHILD_MAP_SIZE);
            return -err;
        }
        uintptr_t top = ((uintptr_t)map + CHILD_MAP_SIZE - sizeof *ctx) & ~(uintptr_t)63;
        ctx = (struct child_ctx *)top;
    }

    int sync_sv[2], errp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sync_sv) < 0)
        goto fail_map;
    if (pipe2(errp, O_CLOEXEC) < 0)
        goto fail_sync;

    ctx->a = a;
    ctx->sync_fd = sync_sv[1];
    ctx->err_fd = errp[1];
    ctx->handlers_cleared = 0;
    ctx->n_needed = 0;
    ctx->own_files_below = shared_table_bound(a, vm, child_mask != NULL);
    ctx->files_pending = 1;
    if (ctx->own_files_below > 0) {
        if (dup3(sync_sv[1], g_fd_slot[0], O_CLOEXEC) < 0 || dup3(errp[1], g_fd_slot[1], O_CLOEXEC) < 0) {
            dup3(g_fd_slot_src, g_fd_slot[0], O_CLOEXEC);
            ctx->own_files_below = 0;         /* (the error slot was not touched) */
        } else {
            ctx->sync_fd = g_fd_slot[0];
            ctx->err_fd = g_fd_slot[1];
        }
    }
    for (int i = 0; i < a->n_keep; i++)
        add_needed(ctx, a->keep_fds[i]);
    for (int i = 0; i < a->n_join; i++)
        add_needed(ctx, a->join_fds[i]);
    for (int i = 0; i < 3; i++)
        add_needed(ctx, a->stdio[i]);
    add_needed(ctx, ctx->sync_fd);
    add_needed(ctx, ctx->err_fd);

    /* Block every signal across the clone, so the child cannot run a handler before it has
     * reset them; it restores the caller's mask itself. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    ctx->mask = child_mask ? *child_mask : old;

    int pidfd = -1;
    long pid;
    if (vm) {
        /* glibc's clone() switches to the new stack and calls child_main there. With a shared
         * table, CLONE_CHILD_CLEARTID zeroes files_pending (and wakes us) should the child
         * exit or exec before it does so itself. */
        int shared = ctx->own_files_below > 0 ? CLONE_FILES | CLONE_CHILD_CLEARTID : 0;
        pid = clone(child_main, ctx, CLONE_VM | CLONE_PIDFD | shared | (int)a->clone_flags | SIGCHLD,
                    ctx, &pidfd, NULL, &ctx->files_pending);
        if (pid < 0)
            pid = -errno;
    } else {
        pid = clone_fork_mode(a, ctx, &pidfd);
    }

    if (ctx->own_files_below > 0) {
        /* The slots are the child's until it has its own table. */
        while (pid > 0 && __atomic_load_n(&ctx->files_pending, __ATOMIC_ACQUIRE) != 0)
            syscall(SYS_futex, &ctx->files_pending, FUTEX_WAIT_, 1, NULL, NULL, 0);
        dup3(g_fd_slot_src, g_fd_slot[0], O_CLOEXEC);
        dup3(g_fd_slot_src, g_fd_slot[1], O_CLOEXEC);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(sync_sv[1]);
    close(errp[1]);
    if (pid < 0) {
        close(sync_sv[0]);
        close(errp[0]);
        if (map)
            munmap(map, CHILD_MAP_SIZE);
        return (int)pid;
    }
    r->pid = (int)pid;
    r->pidfd = pidfd;
    r->sync_fd = sync_sv[0];
    r->err_fd = errp[0];
    r->vm = vm;
    r->priv = map;
    return (int)pid;

fail_sync : {
    int err = errno;
    close(sync_sv[0]);
    close(sync_sv[1]);
    errno = err;
}
fail_map : {
    int err = errno;
    if (map)
        munmap(map, CHILD_MAP_SIZE);
    return -err;
}
}

int nslab_spawn(const struct nslab_spawn_args *a, struct nslab_spawn_result *r)
{
    return spawn_impl(a, r, NULL);
}

/* Read the error pipe to EOF. EOF comes only after the child's exec or exit has dropped its
 * hold on our memory (the kernel switches or releases the mm before it closes the files), so
 * after this the CLONE_VM child's stack may be freed. */
static long drain_err_pipe(int err_fd, struct nslab_spawn_report *rep, size_t *got)
{
    char scratch[64];
    for (;;) {
        char *dst = *got < sizeof *rep ? (char *)rep + *got : scratch;
        size_t room = *got < sizeof *rep ? sizeof *rep - *got : sizeof scratch;
        ssize_t n = read(err_fd, dst, room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return 0;
        if (*got < sizeof *rep)
            *got += (size_t)n;
    }
}

/* ---- waiting for the exec with a short slice -------------------------------------------
 *
 * The child's exec wakes us (EOF on the error pipe). The scheduler may queue us on the CPU
 * where the program just exec'd now runs: on a machine whose other CPUs are busy, and on
 * this VM even when one idles (its guest kernel packs wake-ups onto busy vCPUs:
 * `sched_vcpu_pack=` on its command line). With the default slice we then wait until that
 * program blocks or its slice ends, 0.3-3 ms for a busy one (benchmarks/RESULTS.md, "where
 * a bridge spawn's time goes"). EEVDF (Linux 6.12+) lets a SCHED_OTHER thread ask for a shorter slice
 * (sched_attr.sched_runtime), and a woken thread with a shorter slice preempts the running
 * one. So the waiting thread asks for the shortest (0.1 ms) for this wait only, then gets
 * its own back. Older kernels report no slice: nothing is changed there. */

struct sched_attr_ {
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
    uint32_t sched_util_min, sched_util_max;
};
#define SCHED_FLAG_RESET_ON_FORK_ 0x01
#define WAIT_SLICE_NS 100000ULL      /* EEVDF's shortest custom slice */

/* The kernel's default slice, as the spawner thread reads it once it has asked for no slice
 * of its own (0 until then: no hint without it). The custom/default distinction is not
 * readable, so a slice equal to it is given back as "none asked for": the thread keeps
 * following the kernel's default. (A thread that asked for exactly the default loses the
 * request; one that asked for another slice keeps it.) */
static uint64_t g_default_slice;

struct slice_hint {
    int set;
    struct sched_attr_ old;
};

static void short_slice_begin(struct slice_hint *h)
{
    h->set = 0;
    struct sched_attr_ a;
    memset(&a, 0, sizeof a);
    /* Only a plain SCHED_OTHER thread (real-time, batch and idle are the caller's choice),
     * on a kernel with slices (it reports one), once the default is known, and never
     * longer than one it asked for. */
    if (__atomic_load_n(&g_default_slice, __ATOMIC_RELAXED) == 0 ||
        syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) < 0 || a.sched_policy != SCHED_OTHER ||
        a.sched_runtime <= WAIT_SLICE_NS)
        return;
    h->old = a;
    a.sched_flags &= SCHED_FLAG_RESET_ON_FORK_;   /* keep it; set nothing else */
    a.sched_runtime = WAIT_SLICE_NS;
    h->set = syscall(SYS_sched_setattr, 0, &a, 0) == 0;
}

static void short_slice_end(struct slice_hint *h)
{
    if (!h->set)
        return;
    int err = errno;
    h->set = 0;
    /* Only the slice goes back: a renice or chrt of this thread during the wait stays. If it
     * is no longer SCHED_OTHER, or its slice is not ours any more, it is not ours to touch. */
    struct sched_attr_ now;
    memset(&now, 0, sizeof now);
    if (syscall(SYS_sched_getattr, 0, &now, sizeof now, 0) == 0 && now.sched_policy == SCHED_OTHER &&
        now.sched_runtime == WAIT_SLICE_NS) {
        now.sched_flags &= SCHED_FLAG_RESET_ON_FORK_;
        now.sched_runtime = h->old.sched_runtime;
        if (now.sched_runtime == __atomic_load_n(&g_default_slice, __ATOMIC_RELAXED))
            now.sched_runtime = 0;
        syscall(SYS_sched_setattr, 0, &now, 0);
    }
    errno = err;
}

static void free_child_stack(struct nslab_spawn_result *r)
{
    if (r->priv)
        munmap(r->priv, CHILD_MAP_SIZE);
    r->priv = NULL;
}

int nslab_spawn_wait_ready(struct nslab_spawn_result *r)
{
    if (r->sync_fd < 0)
        return -EBADF;
    char ready = 0;
    ssize_t n;
    do
        n = read(r->sync_fd, &ready, 1);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    return n == 1 && ready == 'r' ? 0 : -EPIPE;
}

int nslab_spawn_configure(struct nslab_spawn_result *r, const void *prog, size_t len)
{
    if (r->sync_fd < 0)
        return -EBADF;
    if (len > NSLAB_SETUP_MAX)
        return -E2BIG;
    unsigned char head[5] = {'c'};
    unsigned int n32 = (unsigned int)len;
    memcpy(head + 1, &n32, sizeof n32);
    struct iovec iov[2] = {{head, sizeof head}, {(void *)prog, len}};
    size_t left = sizeof head + len;
    while (left > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
        ssize_t n = sendmsg(r->sync_fd, &m, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        left -= (size_t)n;
        for (int i = 0; i < 2 && n > 0; i++) {   /* a short send: skip what went */
            size_t k = (size_t)n < iov[i].iov_len ? (size_t)n : iov[i].iov_len;
            iov[i].iov_base = (char *)iov[i].iov_base + k;
            iov[i].iov_len -= k;
            n -= (ssize_t)k;
        }
    }
    return 0;
}

int nslab_spawn_release(struct nslab_spawn_result *r, struct nslab_spawn_report *rep)
{
    char go = 'g';
    ssize_t n;
    /* A socket, not a pipe, only for MSG_NOSIGNAL: a child killed meanwhile gives EPIPE
     * instead of a SIGPIPE to whoever owns the signal disposition. */
    do
        n = send(r->sync_fd, &go, 1, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    int died = n < 0;
    close(r->sync_fd);
    r->sync_fd = -1;

    size_t got = 0;
    struct slice_hint hint;
    short_slice_begin(&hint);
    long rc = drain_err_pipe(r->err_fd, rep, &got);
    short_slice_end(&hint);
    close(r->err_fd);
    r->err_fd = -1;
    if (rc < 0) {
        /* Cannot tell whether the child left its stack: leak it rather than pull it away. */
        r->priv = NULL;
        return (int)rc;
    }
    free_child_stack(r);
    if (got == sizeof *rep)
        return 1;
    if (got != 0)
        return -EIO;
    return died ? 2 : 0;
}

int nslab_spawn_abort(struct nslab_spawn_result *r, struct nslab_spawn_report *rep_out)
{
    if (r->pidfd >= 0)
        syscall(SYS_pidfd_send_signal, r->pidfd, SIGKILL, NULL, 0);
    if (r->sync_fd >= 0)
        close(r->sync_fd);  /* in case the kill was refused: EOF makes it exit too */
    r->sync_fd = -1;
    long rc = 0;
    if (r->err_fd >= 0) {
        struct nslab_spawn_report rep;
        size_t got = 0;
        rc = drain_err_pipe(r->err_fd, &rep, &got);
        close(r->err_fd);
        r->err_fd = -1;
        /* The child may have failed on its own before we gave up on it (a refused setns):
         * its report is the real cause, so hand it back. */
        if (rc == 0 && got == sizeof rep && rep_out) {
            *rep_out = rep;
            rc = 1;
        }
    }
    if (rc < 0)
        r->priv = NULL;
    free_child_stack(r);
    return (int)rc;
}

/* ------------------------------------------------------------------------------------ */
/* The spawner thread: one per process, started on first use, never exits.              */

struct spawn_request {
    const struct nslab_spawn_args *args;
    struct nslab_spawn_result *result;
    sigset_t mask;  /* the caller's mask, which the child should start with */
    int rc;
    int taken;
    int done;
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cond = PTHREAD_COND_INITIALIZER;
static struct spawn_request *g_slot;  /* the request being served, or waiting to be */
static pid_t g_owner;                 /* the process the spawner thread belongs to */
static int g_tid;
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

static void atfork_prepare(void) { pthread_mutex_lock(&g_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_lock); }
static void atfork_child(void)
{
    /* Only the forking thread exists in the child: no spawner, and no waiter either. */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    g_lock = m;
    g_cond = cv;
    g_slot = NULL;
    g_owner = 0;
    g_tid = 0;
    /* The slots are our parent's spawner's: closed here, a new spawner reserves its own. */
    for (int i = 0; i < 2; i++) {
        if (g_fd_slot[i] >= 0)
            close(g_fd_slot[i]);
        g_fd_slot[i] = -1;
    }
    if (g_fd_slot_src >= 0)
        close(g_fd_slot_src);
    g_fd_slot_src = -1;
}
static void register_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

static void *spawner_main(void *unused)
{
    (void)unused;
    prctl(PR_SET_NAME, "nslab-spawner", 0, 0, 0);
    /* This thread copied the scheduling of the thread that started it, a custom slice
     * included, and every child inherits this thread's: ask for none (policy and nice stay
     * as they are), then read what "none" is on this kernel. */
    struct sched_attr_ a;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) == 0 && a.sched_runtime != 0 &&
        (a.sched_policy == SCHED_OTHER || a.sched_policy == SCHED_BATCH || a.sched_policy == SCHED_IDLE)) {
        a.sched_flags &= SCHED_FLAG_RESET_ON_FORK_;
        a.sched_runtime = 0;
        if (syscall(SYS_sched_setattr, 0, &a, 0) == 0 &&
            syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) == 0)
            __atomic_store_n(&g_default_slice, a.sched_runtime, __ATOMIC_RELAXED);
    }
    reserve_slots();
    pthread_mutex_lock(&g_lock);
    g_tid = (int)syscall(SYS_gettid);
    for (;;) {
        while (!g_slot || g_slot->taken)
            pthread_cond_wait(&g_cond, &g_lock);
        struct spawn_request *req = g_slot;
        req->taken = 1;
        pthread_mutex_unlock(&g_lock);
        int rc = spawn_impl(req->args, req->result, &req->mask);
        pthread_mutex_lock(&g_lock);
        req->rc = rc;
        req->done = 1;
        pthread_cond_broadcast(&g_cond);
    }
    return NULL;
}

/* Called with g_lock held. */
static int ensure_spawner(void)
{
    if (g_owner == getpid())
        return 0;
    pthread_once(&g_atfork_once, register_atfork);
    /* The thread inherits this mask: it blocks everything, so process-directed signals go to
     * the application's threads, never to it. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    int rc = pthread_create(&t, &attr, spawner_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        return -rc;
    g_owner = getpid();
    return 0;
}

int nslab_spawn_via_spawner(const struct nslab_spawn_args *a, struct nslab_spawn_result *r)
{
    struct spawn_request req;
    memset(&req, 0, sizeof req);
    req.args = a;
    req.result = r;
    pthread_sigmask(SIG_BLOCK, NULL, &req.mask);

    pthread_mutex_lock(&g_lock);
    int rc = ensure_spawner();
    if (rc < 0) {
        pthread_mutex_unlock(&g_lock);
        return rc;
    }
    while (g_slot)
        pthread_cond_wait(&g_cond, &g_lock);
    g_slot = &req;
    pthread_cond_broadcast(&g_cond);
    while (!req.done)
        pthread_cond_wait(&g_cond, &g_lock);
    g_slot = NULL;
    pthread_cond_broadcast(&g_cond);
    pthread_mutex_unlock(&g_lock);
    return req.rc;
}

int nslab_spawner_tid(void)
{
    pthread_mutex_lock(&g_lock);
    int tid = g_owner == getpid() ? g_tid : 0;
    pthread_mutex_unlock(&g_lock);
    return tid;
}
