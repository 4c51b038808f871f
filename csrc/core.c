/* core.c - thin, libc-shaped shims over the namespace syscalls nslab needs.
 *
 * Why C: Python 3.11 has no os.setns/os.unshare, and glibc 2.36 has no pidfd_open
 * wrapper. Each shim makes exactly one syscall and returns its result, or -errno;
 * all policy (validation, messages, retries, cleanup) lives in Python. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "core.h"


static int neg_errno(long rc) { return rc < 0 ? -errno : (int)rc; }

int nslab_unshare(int flags) { return neg_errno(unshare(flags)); }

/* nstype 0 accepts any kind; with a pidfd, nstype is a mask of CLONE_NEW* (Linux 5.8+). */
int nslab_setns(int fd, int nstype) { return neg_errno(setns(fd, nstype)); }

int nslab_pidfd_open(int pid, unsigned int flags)
{
    return neg_errno(syscall(SYS_pidfd_open, pid, flags));
}

/* NS_GET_USERNS / NS_GET_PARENT return a new fd; NS_GET_NSTYPE returns a CLONE_NEW* value;
 * PIDFD_GET_*_NAMESPACE on a pidfd returns a new nsfs fd. */
/* The third argument must be 0: pidfs rejects PIDFD_GET_*_NAMESPACE with anything else (EINVAL). */
int nslab_ns_ioctl(int fd, unsigned long request) { return neg_errno(ioctl(fd, request, 0)); }

int nslab_ns_get_owner_uid(int fd, unsigned int *uid)
{
    return neg_errno(ioctl(fd, NS_GET_OWNER_UID, uid));
}

int nslab_mount(const char *source, const char *target, const char *fstype,
                unsigned long flags, const char *data)
{
    return neg_errno(mount(source, target, fstype, flags, data));
}

int nslab_umount2(const char *target, int flags) { return neg_errno(umount2(target, flags)); }

int nslab_gettid(void) { return (int)syscall(SYS_gettid); }