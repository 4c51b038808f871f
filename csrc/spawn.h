/* spawn.h - nslab's clone trampoline (spawn.c): types, steps and prototypes.
 *
 * The cffi cdef in spawn.cdef mirrors this file; the generated module includes it. */
#ifndef NSLAB_SPAWN_H
#define NSLAB_SPAWN_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stddef.h>

/* At most this many fds may reach the child (pass_fds + stdio + namespaces to join). The child
 * cannot allocate memory (it is a fork of a multithreaded process), so the list lives in a
 * fixed array on the stack. */
#define NSLAB_SPAWN_MAX_FDS 512

/* Switches that force one path of the trampoline, so both sides of every fallback are tested
 * (spawn.c explains the paths). */
#define NSLAB_SPAWN_FORK_MODE        1  /* copy the address space (clone3, no stack) */
#define NSLAB_SPAWN_NO_CLOSE_RANGE   2  /* close fds by listing /proc/self/fd */
#define NSLAB_SPAWN_NO_CLEAR_SIGHAND 4  /* fork mode: reset handlers one by one in the child */
#define NSLAB_SPAWN_NO_CLONE3        8  /* fork mode: clone(2) with CLONE_PIDFD, not clone3 */

/* The step of the child that failed, reported on the error pipe with its errno. `index` says
 * which item of a list (a join fd, a stdio slot, a kept fd) it was about. */
#define NSLAB_STEP_PDEATHSIG  1  /* prctl(PR_SET_PDEATHSIG) */
#define NSLAB_STEP_SIGMASK    2  /* sigprocmask(SIG_SETMASK) */
#define NSLAB_STEP_CLOSE_FDS  3  /* close_range / the /proc/self/fd loop */
#define NSLAB_STEP_SETNS      4  /* setns(join_fds[index]) */
#define NSLAB_STEP_SYNC       5  /* read of the sync socket */
#define NSLAB_STEP_HOSTNAME   6  /* sethostname */
#define NSLAB_STEP_CHDIR      7  /* chdir(cwd) */
#define NSLAB_STEP_DUP2       8  /* dup2(stdio[index], index) */
#define NSLAB_STEP_CLOEXEC    9  /* fcntl(F_SETFD) on fd `index` */
#define NSLAB_STEP_EXECVE    10  /* execve(path) */
#define NSLAB_STEP_SIGNALS   11  /* sigaction(SIG_DFL) */
#define NSLAB_STEP_CAPS      12  /* prctl(PR_CAPBSET_DROP, index) / capget / capset */
#define NSLAB_STEP_SETUP     13  /* a setup step: index = step number << 8 | request number */
#define NSLAB_STEP_UNSHARE   14  /* unshare(unshare_flags) */

/* Setup programs: work the child does itself, in its final namespaces, before it execs —
 * with raw syscalls, so it runs truly in parallel with the parent (no GIL, no thread). A
 * program is a sequence of steps, each `struct nslab_setup_step` followed by `len` bytes of
 * payload, padded to 4. One program comes with the arguments and runs before the child waits
 * (it overlaps the parent's work); more may come over the sync socket
 * (nslab_spawn_configure) while it waits. */
#define NSLAB_SETUP_WRITE      1  /* payload "name\0value": write value to /proc/sys/name
                                     (name relative, like net/ipv4/ip_forward) */
#define NSLAB_SETUP_WRITE_OPT  2  /* the same, but a missing file is not an error */
#define NSLAB_SETUP_TOUCH      3  /* payload "name": look /proc/sys/name up (missing: fine) */
#define NSLAB_SETUP_NETLINK    4  /* payload: rtnetlink requests (NLM_F_ACK set, seq 1..n),
                                     sent in one sendmsg; every ack is checked */
#define NSLAB_SETUP_MAX        8192  /* bytes of one program */

struct nslab_setup_step {
    unsigned int op;             /* NSLAB_SETUP_* */
    unsigned int len;            /* payload bytes that follow */
};

struct nslab_spawn_args {
    const char *path;            /* what execve runs: resolved by Python (no PATH search here) */
    char *const *argv;           /* NULL-terminated */
    char *const *envp;           /* NULL-terminated */
    unsigned long long clone_flags;  /* CLONE_NEW* to create */
    int cgroup_fd;               /* >= 0: start in that cgroup (CLONE_INTO_CGROUP) */
    int pdeathsig;               /* 0: none; else PR_SET_PDEATHSIG with this signal */
    const int *join_fds;         /* nsfs fds to setns() into, in this order (user first) */
    const int *join_types;       /* CLONE_NEW* of each, checked by the kernel (0: any) */
    int n_join;
    int stdio[3];                /* fds to become 0, 1, 2; -1 inherits the parent's */
    const int *keep_fds;         /* fds >= 3 that survive exec with their numbers (pass_fds) */
    int n_keep;
    const char *cwd;             /* NULL: the parent's */
    const char *hostname;        /* NULL: unchanged (needs a new uts namespace) */
    size_t hostname_len;
    int flags;                   /* NSLAB_SPAWN_* path switches (tests, benchmarks) */
    unsigned long long caps_drop;    /* capabilities (bit n = CAP n) dropped before execve */
    const void *setup;           /* a setup program run before the wait (NULL: none) */
    size_t setup_len;
    unsigned long long unshare_flags;  /* CLONE_NEW* the child makes itself, first thing:
                                          in parallel with the parent. It then says "ready"
                                          (nslab_spawn_wait_ready) once it has them and has
                                          joined join_fds, and runs `setup` meanwhile. */
};

/* What the parent holds after the clone: the child is blocked on the sync socket. */
struct nslab_spawn_result {
    int pid;
    int pidfd;
    int sync_fd;                 /* the child waits for one byte here (nslab_spawn_release) */
    int err_fd;                  /* EOF: execve succeeded; else a struct nslab_spawn_report */
    int vm;                      /* 1: the child shares our memory until it execs (CLONE_VM) */
    void *priv;                  /* the child's stack in CLONE_VM mode; freed by release/abort */
};

struct nslab_spawn_report {
    int step;                    /* NSLAB_STEP_* */
    int err;                     /* errno */
    int index;
};

/* Clone on the calling thread. Returns the pid, or -errno (nothing is left open then). */
int nslab_spawn(const struct nslab_spawn_args *a, struct nslab_spawn_result *r);

/* The same, but the clone happens on nslab's one long-lived spawner thread, so the child's
 * parent (for PR_SET_PDEATHSIG) is a thread that lives as long as the process. */
int nslab_spawn_via_spawner(const struct nslab_spawn_args *a, struct nslab_spawn_result *r);

/* Wait until a child started with unshare_flags or join_fds has its namespaces (its setup may
 * still be running): only then may the parent look at them. Returns 0, or -EPIPE if the child died first (it
 * failed a step: nslab_spawn_release reports which), or -errno. */
int nslab_spawn_wait_ready(struct nslab_spawn_result *r);

/* Send a child blocked on its sync socket one more setup program; it runs it and waits
 * again. Returns 0 or -errno (EPIPE: the child is gone; release then says why). A failed
 * step is reported by nslab_spawn_release. */
int nslab_spawn_configure(struct nslab_spawn_result *r, const void *prog, size_t len);

/* Release a child blocked on its sync socket and wait for its exec. Closes sync_fd and err_fd
 * and frees the child's stack once the child has left it (the pidfd stays, for reaping).
 * Returns 0 (exec succeeded), 1 (*rep says which step failed), 2 (the child died before it
 * could be released), or -errno. */
int nslab_spawn_release(struct nslab_spawn_result *r, struct nslab_spawn_report *rep);

/* Give up on a child that was not released: SIGKILL it through its pidfd, close sync_fd and
 * err_fd, free its stack. The caller still reaps it through the pidfd. Returns 1 (and fills
 * *rep_out, if given) when the child had already failed a step on its own, else 0 or -errno. */
int nslab_spawn_abort(struct nslab_spawn_result *r, struct nslab_spawn_report *rep_out);

/* The spawner thread's tid in this process, 0 if it was not started yet (for tests). */
int nslab_spawner_tid(void);

#endif
