/* probe.c - nslab's datapath probe: tight TCP/UDP measurement loops.
 *
 * Why C: a CPython echo loop is ~4.5x slower than netperf's on loopback (performance.md),
 * so a Python probe would measure the interpreter, not the kernel path between two
 * namespaces. These loops make the same syscalls netperf, iperf3 and sockperf make, and
 * nothing else: cffi releases the GIL around each call, so a client and a server can run
 * on two Python threads of one process, each pinned to its own CPU.
 *
 * The loops work on sockets Python already made (and so already placed in a network
 * namespace: a socket stays in the netns it was created in). Only the CRR client makes
 * sockets itself; its calling thread must be inside the client's netns.
 *
 * Contract, as in core.c: return >= 0 or -errno, never touch Python objects, and record in
 * stats->err_call which call failed, so the Python error can name it. EINTR is retried,
 * short reads and writes are completed, blocking sends and receives are bounded by
 * cfg->io_timeout_ns (SO_SNDTIMEO/SO_RCVTIMEO: a timeout surfaces as -ETIMEDOUT).
 *
 * Servers stay stoppable: they wait in ppoll() on their socket and cfg->stop_fd together
 * (what sockperf's server does with epoll), so a stop costs one syscall per wait. Clients
 * end by themselves (duration or count) and glance at stop_fd every 1024 transactions. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "probe.h"

#define SUB NSLAB_PROBE_HIST_SUB_BITS
#define STOP_CHECK_MASK 1023u
#define UDP_MAX 65536

/* --- small helpers ------------------------------------------------------------------ */

int64_t nslab_probe_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int fail(struct nslab_probe_stats *st, int call)
{
    int err = errno ? errno : EIO;
    st->err_call = call;
    /* A blocking socket with SO_RCVTIMEO/SO_SNDTIMEO reports its timeout as EAGAIN. */
    if (err == EAGAIN || err == EWOULDBLOCK)
        err = ETIMEDOUT;
    return -err;
}

static int fail_with(struct nslab_probe_stats *st, int call, int err)
{
    st->err_call = call;
    return -err;
}

static struct timeval to_timeval(int64_t ns)
{
    struct timeval tv = { .tv_sec = ns / 1000000000LL, .tv_usec = (ns % 1000000000LL) / 1000 };
    if (ns > 0 && tv.tv_sec == 0 && tv.tv_usec == 0)
        tv.tv_usec = 1;        /* 0 would mean "no timeout" */
    return tv;
}

static int set_timeouts(int fd, int64_t ns, int which, struct nslab_probe_stats *st)
{
    if (ns <= 0)
        return 0;
    struct timeval tv = to_timeval(ns);
    if ((which & 1) && setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0)
        return fail(st, NSLAB_PROBE_CALL_SETSOCKOPT);
    if ((which & 2) && setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        return fail(st, NSLAB_PROBE_CALL_SETSOCKOPT);
    return 0;
}

static int set_nodelay(int fd, struct nslab_probe_stats *st)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        return fail(st, NSLAB_PROBE_CALL_SETSOCKOPT);
    return 0;
}

/* Has stop_fd become readable? (Never consumes it: every loop sharing it sees the stop.) */
static int stop_requested(int stop_fd)
{
    if (stop_fd < 0)
        return 0;
    struct pollfd p = { .fd = stop_fd, .events = POLLIN };
    return poll(&p, 1, 0) > 0;
}

enum { WAIT_READY = 1, WAIT_STOPPED = 0, WAIT_IDLE = 2 };

/* Wait until fd is readable, stop_fd is readable, or timeout_ns (0: forever) passes. */
static int wait_in(int fd, int stop_fd, int64_t timeout_ns, struct nslab_probe_stats *st)
{
    struct pollfd p[2] = { { .fd = fd, .events = POLLIN }, { .fd = stop_fd, .events = POLLIN } };
    nfds_t n = stop_fd >= 0 ? 2 : 1;
    int64_t deadline = timeout_ns > 0 ? nslab_probe_now_ns() + timeout_ns : 0;
    for (;;) {
        struct timespec ts, *tsp = NULL;
        if (deadline) {
            int64_t left = deadline - nslab_probe_now_ns();
            if (left < 0)
                left = 0;
            ts.tv_sec = left / 1000000000LL;
            ts.tv_nsec = left % 1000000000LL;
            tsp = &ts;
        }
        int rc = ppoll(p, n, tsp, NULL);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            return fail(st, NSLAB_PROBE_CALL_POLL);
        }
        if (rc == 0) {
            st->stopped = 2;
            return WAIT_IDLE;
        }
        /* POLLNVAL: the stop eventfd was closed under us (a close() that gave up waiting):
         * that is a stop too, not a reason to spin. */
        if (n == 2 && (p[1].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) {
            st->stopped = 1;
            return WAIT_STOPPED;
        }
        /* POLLERR/POLLHUP on the socket: let the next recv() report what happened. */
        if (p[0].revents)
            return WAIT_READY;
    }
}

static int send_all(int fd, const char *buf, size_t len, struct nslab_probe_stats *st)
{
    while (len) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(st, NSLAB_PROBE_CALL_SEND);
        }
        buf += n;
        len -= (size_t)n;
        st->bytes_sent += (uint64_t)n;
    }
    return 0;
}

/* Read exactly len bytes (blocking socket). EOF before that is ECONNRESET. */
static int recv_all(int fd, char *buf, size_t len, struct nslab_probe_stats *st)
{
    while (len) {
        ssize_t n = recv(fd, buf, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(st, NSLAB_PROBE_CALL_RECV);
        }
        if (n == 0)
            return fail_with(st, NSLAB_PROBE_CALL_RECV, ECONNRESET);
        buf += n;
        len -= (size_t)n;
        st->bytes_received += (uint64_t)n;
    }
    return 0;
}

static void record(struct nslab_probe_stats *st, uint64_t *hist, uint64_t *samples, size_t cap,
                   uint64_t ns)
{
    if (hist)
        hist[nslab_probe_hist_index(ns)]++;
    if (samples && st->samples_stored < cap)
        samples[st->samples_stored++] = ns;
    if (st->transactions == 0 || ns < st->min_ns)
        st->min_ns = ns;
    if (ns > st->max_ns)
        st->max_ns = ns;
    st->sum_ns += ns;
    st->transactions++;
}

/* The warm-up/measure/stop schedule shared by the client loops. */
struct phase {
    int64_t start, measure_start, last;
    int warm;
};

static void phase_begin(struct phase *ph, const struct nslab_probe_cfg *cfg)
{
    ph->start = ph->last = nslab_probe_now_ns();
    ph->warm = cfg->warmup_ns > 0 || cfg->warmup_count > 0;
    ph->measure_start = ph->warm ? 0 : ph->start;
}

/* Called before each transaction at time t: 1 to run it, 0 when the run is over. */
static int phase_next(struct phase *ph, const struct nslab_probe_cfg *cfg,
                      const struct nslab_probe_stats *st, int64_t t, uint64_t done)
{
    if (ph->warm) {
        if (st->warmup_transactions < cfg->warmup_count || t - ph->start < cfg->warmup_ns)
            return 1;
        ph->warm = 0;
        ph->measure_start = t;
    }
    if (cfg->count && done >= cfg->count)
        return 0;
    if (cfg->duration_ns && t - ph->measure_start >= cfg->duration_ns)
        return 0;
    return 1;
}

static void phase_end(struct phase *ph, struct nslab_probe_stats *st)
{
    st->total_ns = ph->last - ph->start;
    st->measured_ns = ph->warm ? 0 : ph->last - ph->measure_start;
}

/* --- public helpers --------------------------------------------------------------- */

int nslab_probe_pin_cpu(int cpu)
{
    cpu_set_t set;
    if (cpu < 0 || cpu >= CPU_SETSIZE)
        return -EINVAL;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    /* pid 0 = the calling thread only: the other threads keep their masks. */
    return sched_setaffinity(0, sizeof set, &set) < 0 ? -errno : 0;
}

int nslab_probe_socket_netns(int fd)
{
    int rc = ioctl(fd, SIOCGSKNS);   /* Linux 4.9; the new fd is close-on-exec */
    return rc < 0 ? -errno : rc;
}

int nslab_probe_accept(int listen_fd, int stop_fd, int64_t timeout_ns)
{
    struct nslab_probe_stats st = { 0 };
    for (;;) {
        int w = wait_in(listen_fd, stop_fd, timeout_ns, &st);
        if (w < 0)
            return w;
        if (w == WAIT_STOPPED)
            return -ECANCELED;
        if (w == WAIT_IDLE)
            return -ETIMEDOUT;
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0)
            return fd;
        if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
            return -errno;
    }
}

/* --- TCP request/response ------------------------------------------------------------ */

int nslab_probe_tcp_rr_client(int fd, const struct nslab_probe_cfg *cfg,
                              struct nslab_probe_stats *st, uint64_t *hist,
                              uint64_t *samples, size_t cap)
{
    int rc;
    char *req = calloc(1, cfg->req_size ? cfg->req_size : 1);
    char *resp = malloc(cfg->resp_size ? cfg->resp_size : 1);
    if (!req || !resp) {
        rc = fail_with(st, NSLAB_PROBE_CALL_NONE, ENOMEM);
        goto out;
    }
    if ((rc = set_nodelay(fd, st)) < 0 || (rc = set_timeouts(fd, cfg->io_timeout_ns, 3, st)) < 0)
        goto out;
    struct phase ph;
    phase_begin(&ph, cfg);
    for (uint64_t i = 0;; i++) {
        int64_t t0 = nslab_probe_now_ns();
        if (!phase_next(&ph, cfg, st, t0, st->transactions))
            break;
        if ((i & STOP_CHECK_MASK) == STOP_CHECK_MASK && stop_requested(cfg->stop_fd)) {
            st->stopped = 1;
            break;
        }
        if ((rc = send_all(fd, req, cfg->req_size, st)) < 0 ||
            (rc = recv_all(fd, resp, cfg->resp_size, st)) < 0)
            goto out;
        int64_t t1 = nslab_probe_now_ns();
        ph.last = t1;
        if (ph.warm)
            st->warmup_transactions++;
        else
            record(st, hist, samples, cap, (uint64_t)(t1 - t0));
    }
    phase_end(&ph, st);
    rc = 0;
out:
    free(req);
    free(resp);
    return rc;
}

int nslab_probe_tcp_rr_server(int fd, const struct nslab_probe_cfg *cfg,
                              struct nslab_probe_stats *st)
{
    int rc;
    char *req = malloc(cfg->req_size ? cfg->req_size : 1);
    char *resp = calloc(1, cfg->resp_size ? cfg->resp_size : 1);
    int64_t start = nslab_probe_now_ns();
    if (!req || !resp) {
        rc = fail_with(st, NSLAB_PROBE_CALL_NONE, ENOMEM);
        goto out;
    }
    if ((rc = set_nodelay(fd, st)) < 0 || (rc = set_timeouts(fd, cfg->io_timeout_ns, 2, st)) < 0)
        goto out;
    for (;;) {
        size_t got = 0;
        while (got < cfg->req_size) {
            /* Poll first: a request/response server nearly always waits for the next
             * request, and ppoll+recv is the same cost as sockperf's epoll_wait+recv. */
            int w = wait_in(fd, cfg->stop_fd, cfg->idle_timeout_ns, st);
            if (w < 0) {
                rc = w;
                goto out;
            }
            if (w != WAIT_READY)
                goto done;
            ssize_t n = recv(fd, req + got, cfg->req_size - got, MSG_DONTWAIT);
            if (n > 0) {
                got += (size_t)n;
                st->bytes_received += (uint64_t)n;
            } else if (n == 0 || errno == ECONNRESET) {
                /* The client hung up: between requests is the normal end. */
                if (got)
                    st->aborted++;
                goto done;
            } else if (errno != EINTR && errno != EAGAIN) {
                rc = fail(st, NSLAB_PROBE_CALL_RECV);
                goto out;
            }
        }
        if ((rc = send_all(fd, resp, cfg->resp_size, st)) < 0)
            goto out;
        st->transactions++;
    }
done:
    rc = 0;
out:
    st->total_ns = nslab_probe_now_ns() - start;
    free(req);
    free(resp);
    return rc;
}

/* --- TCP stream ---------------------------------------------------------------------- */

int nslab_probe_stream_send(int fd, const struct nslab_probe_cfg *cfg,
                            struct nslab_probe_stats *st)
{
    int rc = 0;
    size_t size = cfg->buf_size ? cfg->buf_size : 131072;
    char *buf = calloc(1, size);
    if (!buf)
        return fail_with(st, NSLAB_PROBE_CALL_NONE, ENOMEM);
    if ((rc = set_timeouts(fd, cfg->io_timeout_ns, 3, st)) < 0)
        goto out;
    int64_t start = nslab_probe_now_ns(), t = start;
    int64_t end = start + cfg->warmup_ns + cfg->duration_ns;
    for (uint64_t i = 0;; i++) {
        size_t len = size;
        if (cfg->count) {
            if (st->bytes_sent >= cfg->count)
                break;
            if (cfg->count - st->bytes_sent < len)
                len = (size_t)(cfg->count - st->bytes_sent);
        } else if (t >= end) {
            break;
        }
        if ((i & 63) == 63 && stop_requested(cfg->stop_fd)) {
            st->stopped = 1;
            break;
        }
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = fail(st, NSLAB_PROBE_CALL_SEND);
            goto out;
        }
        st->bytes_sent += (uint64_t)n;
        t = nslab_probe_now_ns();
    }
    st->measured_ns = t - start;
    /* Half-close, then wait for the receiver's close: when we return, it has counted
     * every byte (its EOF comes after the last one). */
    if (shutdown(fd, SHUT_WR) < 0) {
        rc = fail(st, NSLAB_PROBE_CALL_SHUTDOWN);
        goto out;
    }
    for (;;) {
        ssize_t n = recv(fd, buf, size, 0);
        if (n > 0) {
            st->bytes_received += (uint64_t)n;
            continue;
        }
        if (n == 0 || errno == ECONNRESET)
            break;
        if (errno != EINTR) {
            rc = fail(st, NSLAB_PROBE_CALL_RECV);
            goto out;
        }
    }
    st->total_ns = nslab_probe_now_ns() - start;
out:
    free(buf);
    return rc;
}

int nslab_probe_stream_recv(int fd, const struct nslab_probe_cfg *cfg,
                            struct nslab_probe_stats *st)
{
    int rc = 0;
    size_t size = cfg->buf_size ? cfg->buf_size : 131072;
    char *buf = malloc(size);
    if (!buf)
        return fail_with(st, NSLAB_PROBE_CALL_NONE, ENOMEM);
    int64_t start = nslab_probe_now_ns(), first = 0, mstart = 0, last = 0;
    uint64_t mbytes = 0;
    int measuring = 0;
    for (;;) {
        /* Read first: while a stream flows, data is usually waiting already. */
        ssize_t n = recv(fd, buf, size, MSG_DONTWAIT);
        if (n > 0) {
            int64_t t = nslab_probe_now_ns();
            st->bytes_received += (uint64_t)n;
            if (!first)
                first = t;
            if (!measuring && t - first >= cfg->warmup_ns) {
                /* The measured phase starts after this read: its bytes count as warm-up. */
                measuring = 1;
                mstart = t;
                mbytes = st->bytes_received;
            }
            last = t;
            continue;
        }
        if (n == 0)
            break;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            int w = wait_in(fd, cfg->stop_fd, cfg->idle_timeout_ns, st);
            if (w < 0) {
                rc = w;
                break;
            }
            if (w != WAIT_READY)
                break;
            continue;
        }
        rc = fail(st, NSLAB_PROBE_CALL_RECV);
        break;
    }
    if (measuring) {
        st->measured_bytes = st->bytes_received - mbytes;
        st->measured_ns = last - mstart;
    }
    st->total_ns = (last ? last : nslab_probe_now_ns()) - start;
    free(buf);
    return rc;
}

/* --- TCP connect/request/response/close ---------------------------------------------- */

static int make_sockaddr(int family, const char *address, int port,
                         struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    if (port < 0 || port > 65535)
        return -EINVAL;
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        *len = sizeof *a;
        return inet_pton(AF_INET, address, &a->sin_addr) == 1 ? 0 : -EINVAL;
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        *len = sizeof *a;
        return inet_pton(AF_INET6, address, &a->sin6_addr) == 1 ? 0 : -EINVAL;
    }
    return -EAFNOSUPPORT;
}

/* connect() on a blocking socket; an EINTR leaves it connecting in the background. */
static int connect_blocking(int fd, const struct sockaddr *sa, socklen_t len,
                            struct nslab_probe_stats *st)
{
    if (connect(fd, sa, len) == 0)
        return 0;
    if (errno == EINPROGRESS)      /* a blocking connect whose SO_SNDTIMEO ran out */
        return fail_with(st, NSLAB_PROBE_CALL_CONNECT, ETIMEDOUT);
    if (errno != EINTR)
        return fail(st, NSLAB_PROBE_CALL_CONNECT);
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    while (poll(&p, 1, -1) < 0)
        if (errno != EINTR)
            return fail(st, NSLAB_PROBE_CALL_POLL);
    int err = 0;
    socklen_t elen = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
        return fail(st, NSLAB_PROBE_CALL_CONNECT);
    return err ? fail_with(st, NSLAB_PROBE_CALL_CONNECT, err) : 0;
}

int nslab_probe_crr_client(int family, const char *address, int port,
                           const struct nslab_probe_cfg *cfg, struct nslab_probe_stats *st,
                           uint64_t *hist, uint64_t *samples, size_t cap)
{
    struct sockaddr_storage ss;
    socklen_t slen;
    int rc = make_sockaddr(family, address, port, &ss, &slen);
    if (rc < 0)
        return fail_with(st, NSLAB_PROBE_CALL_ADDRESS, -rc);
    char *req = calloc(1, cfg->req_size ? cfg->req_size : 1);
    char *resp = malloc(cfg->resp_size ? cfg->resp_size : 1);
    if (!req || !resp) {
        rc = fail_with(st, NSLAB_PROBE_CALL_NONE, ENOMEM);
        goto out;
    }
    struct phase ph;
    phase_begin(&ph, cfg);
    for (uint64_t i = 0;; i++) {
        int64_t t0 = nslab_probe_now_ns();
        if (!phase_next(&ph, cfg, st, t0, st->transactions))
            break;
        if ((i & 63) == 63 && stop_requested(cfg->stop_fd)) {
            st->stopped = 1;
            break;
        }
        int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            rc = fail(st, NSLAB_PROBE_CALL_SOCKET);
            goto out;
        }
        if ((rc = set_nodelay(fd, st)) < 0 ||
            (rc = set_timeouts(fd, cfg->io_timeout_ns, 3, st)) < 0 ||
            (rc = connect_blocking(fd, (struct sockaddr *)&ss, slen, st)) < 0 ||
            (rc = send_all(fd, req, cfg->req_size, st)) < 0 ||
            (rc = recv_all(fd, resp, cfg->resp_size, st)) < 0) {
            close(fd);
            goto out;
        }
        /* The server closes first (so TIME_WAIT stays on its side and the client's
         * ephemeral ports never run out); wait for its FIN, then close. */
        for (;;) {
            ssize_t n = recv(fd, resp, 1, 0);
            if (n == 0 || (n < 0 && errno == ECONNRESET))
                break;
            if (n < 0 && errno == EINTR)
                continue;
            rc = n < 0 ? fail(st, NSLAB_PROBE_CALL_RECV)
                       : fail_with(st, NSLAB_PROBE_CALL_RECV, EPROTO);
            close(fd);
            goto out;
        }
        close(fd);
        int64_t t1 = nslab_probe_now_ns();
        ph.last = t1;
        if (ph.warm)
            st->warmup_transactions++;
        else
            record(st, hist, samples, cap, (uint64_t)(t1 - t0));
    }
    phase_end(&ph, st);
    rc = 0;
out:
    free(req);
    free(resp);
    return rc;
}

int nslab_probe_crr_server(int listen_fd, const struct nslab_probe_cfg *cfg,
                           struct nslab_probe_stats *st)
{
    int rc = 0;
    char *req = malloc(cfg->req_size ? cfg->req_size : 1);
    char *resp = calloc(1, cfg->resp_size ? cfg->resp_size : 1);
    int64_t start = nslab_probe_now_ns();
    if (!req || !resp) {
        rc = fail_with(st, NSLAB_PROBE_CALL_NONE, ENOMEM);
        goto out;
    }
    for (;;) {
        int w = wait_in(listen_fd, cfg->stop_fd, cfg->idle_timeout_ns, st);
        if (w < 0) {
            rc = w;
            break;
        }
        if (w != WAIT_READY)
            break;
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED)
                continue;
            rc = fail(st, NSLAB_PROBE_CALL_ACCEPT);
            break;
        }
        /* A client that misbehaves costs one aborted connection, not the server. */
        struct nslab_probe_stats one = { 0 };
        if (set_nodelay(fd, &one) < 0 || set_timeouts(fd, cfg->io_timeout_ns, 3, &one) < 0 ||
            recv_all(fd, req, cfg->req_size, &one) < 0 ||
            send_all(fd, resp, cfg->resp_size, &one) < 0)
            st->aborted++;
        else
            st->transactions++;
        st->bytes_received += one.bytes_received;
        st->bytes_sent += one.bytes_sent;
        close(fd);
    }
out:
    st->total_ns = nslab_probe_now_ns() - start;
    free(req);
    free(resp);
    return rc;
}

/* --- UDP request/response ------------------------------------------------------------ */

int nslab_probe_udp_rr_client(int fd, const struct nslab_probe_cfg *cfg,
                              struct nslab_probe_stats *st, uint64_t *hist,
                              uint64_t *samples, size_t cap)
{
    int rc;
    if (cfg->timeout_ns <= 0)
        return fail_with(st, NSLAB_PROBE_CALL_NONE, EINVAL);
    char *req = calloc(1, cfg->req_size ? cfg->req_size : 1);
    char *resp = malloc(UDP_MAX);
    if (!req || !resp) {
        rc = fail_with(st, NSLAB_PROBE_CALL_NONE, ENOMEM);
        goto out;
    }
    if ((rc = set_timeouts(fd, cfg->timeout_ns, 1, st)) < 0)
        goto out;
    int numbered = cfg->req_size >= 8 && cfg->resp_size >= 8;
    uint64_t measured_requests = 0;
    struct phase ph;
    phase_begin(&ph, cfg);
    for (uint64_t seq = 1;; seq++) {
        int64_t t0 = nslab_probe_now_ns();
        if (!phase_next(&ph, cfg, st, t0, measured_requests))
            break;
        if ((seq & STOP_CHECK_MASK) == STOP_CHECK_MASK && stop_requested(cfg->stop_fd)) {
            st->stopped = 1;
            break;
        }
        if (numbered)
            memcpy(req, &seq, sizeof seq);
        ssize_t n;
        while ((n = send(fd, req, cfg->req_size, 0)) < 0 && errno == EINTR)
            ;
        if (n < 0) {
            rc = fail(st, NSLAB_PROBE_CALL_SEND);
            goto out;
        }
        st->bytes_sent += (uint64_t)n;
        int answered = 0;
        for (;;) {
            n = recv(fd, resp, UDP_MAX, 0);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;             /* SO_RCVTIMEO ran out: lost */
                rc = fail(st, NSLAB_PROBE_CALL_RECV);
                goto out;
            }
            st->bytes_received += (uint64_t)n;
            uint64_t got;
            if (numbered && n >= 8 && (memcpy(&got, resp, sizeof got), got != seq)) {
                st->late++;
                if (nslab_probe_now_ns() - t0 >= cfg->timeout_ns)
                    break;
                continue;
            }
            answered = 1;
            break;
        }
        int64_t t1 = nslab_probe_now_ns();
        ph.last = t1;
        if (ph.warm) {
            st->warmup_transactions++;
            continue;
        }
        measured_requests++;
        if (answered)
            record(st, hist, samples, cap, (uint64_t)(t1 - t0));
        else
            st->lost++;
    }
    phase_end(&ph, st);
    rc = 0;
out:
    free(req);
    free(resp);
    return rc;
}

int nslab_probe_udp_rr_server(int fd, const struct nslab_probe_cfg *cfg,
                              struct nslab_probe_stats *st)
{
    int rc = 0;
    char *buf = malloc(UDP_MAX);
    char *resp = calloc(1, cfg->resp_size ? cfg->resp_size : 1);
    int64_t start = nslab_probe_now_ns();
    if (!buf || !resp) {
        rc = fail_with(st, NSLAB_PROBE_CALL_NONE, ENOMEM);
        goto out;
    }
    for (;;) {
        int w = wait_in(fd, cfg->stop_fd, cfg->idle_timeout_ns, st);
        if (w < 0) {
            rc = w;
            break;
        }
        if (w != WAIT_READY)
            break;
        struct sockaddr_storage from;
        socklen_t flen = sizeof from;
        ssize_t n = recvfrom(fd, buf, UDP_MAX, MSG_DONTWAIT, (struct sockaddr *)&from, &flen);
        if (n < 0) {
            /* ECONNREFUSED: an ICMP error for an earlier reply; not this server's problem. */
            if (errno == EINTR || errno == EAGAIN || errno == ECONNREFUSED)
                continue;
            rc = fail(st, NSLAB_PROBE_CALL_RECV);
            break;
        }
        st->bytes_received += (uint64_t)n;
        if (n >= 8 && cfg->resp_size >= 8)
            memcpy(resp, buf, 8);      /* echo the sequence number */
        ssize_t m;
        while ((m = sendto(fd, resp, cfg->resp_size, 0, (struct sockaddr *)&from, flen)) < 0 &&
               errno == EINTR)
            ;
        if (m < 0) {
            rc = fail(st, NSLAB_PROBE_CALL_SEND);
            break;
        }
        st->bytes_sent += (uint64_t)m;
        st->transactions++;
    }
out:
    st->total_ns = nslab_probe_now_ns() - start;
    free(buf);
    free(resp);
    return rc;
}

/* --- histogram ----------------------------------------------------------------------- */

int nslab_probe_hist_index(uint64_t v)
{
    if (v < (2u << SUB))
        return (int)v;
    int e = 63 - __builtin_clzll(v);   /* v is in [2^e, 2^(e+1)) */
    int shift = e - SUB;
    return (shift << SUB) + (int)(v >> shift);
}

uint64_t nslab_probe_hist_lowest(int index)
{
    if (index < (2 << SUB))
        return (uint64_t)index;
    int shift = (index >> SUB) - 1;
    return (uint64_t)(index - (shift << SUB)) << shift;
}

uint64_t nslab_probe_hist_highest(int index)
{
    if (index < (2 << SUB))
        return (uint64_t)index;
    int shift = (index >> SUB) - 1;
    return nslab_probe_hist_lowest(index) + ((1ULL << shift) - 1);
}

uint64_t nslab_probe_hist_percentile(const uint64_t *hist, double q,
                                     uint64_t min_ns, uint64_t max_ns)
{
    uint64_t total = 0;
    for (int i = 0; i < NSLAB_PROBE_HIST_BUCKETS; i++)
        total += hist[i];
    if (!total)
        return 0;
    /* Nearest rank: the smallest value with at least q% of the samples at or below it. */
    double exact = q / 100.0 * (double)total;
    uint64_t rank = (uint64_t)exact;
    /* Ceiling, forgiving the last bits of rounding: 0.999 * 1000 is 999.0000000000001 in
     * doubles, and must give rank 999, not 1000. */
    if ((double)rank < exact - 1e-9 * exact)
        rank++;
    if (rank < 1)
        rank = 1;
    if (rank > total)
        rank = total;
    uint64_t seen = 0;
    for (int i = 0; i < NSLAB_PROBE_HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen >= rank) {
            uint64_t lo = nslab_probe_hist_lowest(i), hi = nslab_probe_hist_highest(i);
            uint64_t v = lo + (hi - lo) / 2;
            if (v < min_ns)
                v = min_ns;
            if (max_ns && v > max_ns)
                v = max_ns;
            return v;
        }
    }
    return max_ns;
}
