/* core.h - prototypes and constants of nslab's syscall shims (core.c). The cffi cdef
 * in core.cdef mirrors this file; the generated module includes it. */
#ifndef NSLAB_CORE_H
#define NSLAB_CORE_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sched.h>
#include <stddef.h>
#include <sys/mount.h>
#include "compat.h"

#define NSLAB_CLONE_NEWNS CLONE_NEWNS
#define NSLAB_CLONE_NEWUTS CLONE_NEWUTS
#define NSLAB_CLONE_NEWIPC CLONE_NEWIPC
#define NSLAB_CLONE_NEWUSER CLONE_NEWUSER
#define NSLAB_CLONE_NEWPID CLONE_NEWPID
#define NSLAB_CLONE_NEWNET CLONE_NEWNET
#define NSLAB_CLONE_NEWCGROUP CLONE_NEWCGROUP
#define NSLAB_CLONE_NEWTIME CLONE_NEWTIME
#define NSLAB_NS_GET_USERNS NS_GET_USERNS
#define NSLAB_NS_GET_PARENT NS_GET_PARENT
#define NSLAB_NS_GET_NSTYPE NS_GET_NSTYPE
#define NSLAB_PIDFD_GET_CGROUP_NAMESPACE PIDFD_GET_CGROUP_NAMESPACE
#define NSLAB_PIDFD_GET_IPC_NAMESPACE PIDFD_GET_IPC_NAMESPACE
#define NSLAB_PIDFD_GET_MNT_NAMESPACE PIDFD_GET_MNT_NAMESPACE
#define NSLAB_PIDFD_GET_NET_NAMESPACE PIDFD_GET_NET_NAMESPACE
#define NSLAB_PIDFD_GET_PID_NAMESPACE PIDFD_GET_PID_NAMESPACE
#define NSLAB_PIDFD_GET_TIME_NAMESPACE PIDFD_GET_TIME_NAMESPACE
#define NSLAB_PIDFD_GET_USER_NAMESPACE PIDFD_GET_USER_NAMESPACE
#define NSLAB_PIDFD_GET_UTS_NAMESPACE PIDFD_GET_UTS_NAMESPACE
#define NSLAB_MS_BIND MS_BIND
#define NSLAB_MS_REC MS_REC
#define NSLAB_MS_SHARED MS_SHARED
#define NSLAB_MNT_DETACH MNT_DETACH

int nslab_unshare(int flags);
int nslab_setns(int fd, int nstype);
int nslab_pidfd_open(int pid, unsigned int flags);
int nslab_ns_ioctl(int fd, unsigned long request);
int nslab_ns_get_owner_uid(int fd, unsigned int *uid);
int nslab_mount(const char *source, const char *target, const char *fstype,
                unsigned long flags, const char *data);
int nslab_umount2(const char *target, int flags);
int nslab_gettid(void);

#endif
