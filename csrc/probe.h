/* probe.h - nslab's datapath probe: the measurement loops (probe.c) and their structs.
 * The cffi cdef in probe.cdef mirrors this file; the generated module nslab._probe
 * includes it. Every function returns >= 0 on success or -errno, and on failure
 * records in stats->err_call which call failed (NSLAB_PROBE_CALL_*). */
#ifndef NSLAB_PROBE_H
#define NSLAB_PROBE_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stddef.h>
#include <stdint.h>

/* Latency histogram: log-linear ("HDR-like") buckets. Values below 2^SUB_BITS ns have a
 * bucket each; above that every power of two is cut into 2^SUB_BITS equal buckets, so a
 * bucket is at most 1/128 (0.8%) of its value wide, from 1 ns up to 2^64 ns. */
#define NSLAB_PROBE_HIST_SUB_BITS 7
#define NSLAB_PROBE_HIST_BUCKETS ((64 - NSLAB_PROBE_HIST_SUB_BITS + 1) << NSLAB_PROBE_HIST_SUB_BITS)

/* Which call failed (stats->err_call), so Python can name it in the error. */
#define NSLAB_PROBE_CALL_NONE 0
#define NSLAB_PROBE_CALL_SOCKET 1
#define NSLAB_PROBE_CALL_CONNECT 2
#define NSLAB_PROBE_CALL_SEND 3
#define NSLAB_PROBE_CALL_RECV 4
#define NSLAB_PROBE_CALL_ACCEPT 5
#define NSLAB_PROBE_CALL_POLL 6
#define NSLAB_PROBE_CALL_SETSOCKOPT 7
#define NSLAB_PROBE_CALL_CLOCK 8
#define NSLAB_PROBE_CALL_SHUTDOWN 9
#define NSLAB_PROBE_CALL_ADDRESS 10

/* What a loop should do. Zero means "not set" for every field but the fds. */
struct nslab_probe_cfg {
    int64_t duration_ns;       /* measured phase length (0: use count) */
    int64_t warmup_ns;         /* discarded phase, before the measured one */
    uint64_t count;            /* measured transactions; stream: total bytes to send (0: use duration) */
    uint64_t warmup_count;     /* discarded transactions (at least this many, and warmup_ns) */
    uint32_t req_size;         /* bytes per request (client -> server) */
    uint32_t resp_size;        /* bytes per response (server -> client) */
    uint32_t buf_size;         /* stream: bytes per send()/recv() */
    int64_t timeout_ns;        /* UDP: wait per request before counting it lost */
    int64_t io_timeout_ns;     /* TCP: a blocked send/recv longer than this fails (ETIMEDOUT) */
    int64_t idle_timeout_ns;   /* servers: return when nothing arrives for this long (0: never) */
    int stop_fd;               /* readable = stop (an eventfd or a pipe); -1: none */
};

/* What a loop did. Counters include the warm-up unless their name says "measured". */
struct nslab_probe_stats {
    uint64_t transactions;         /* measured transactions (client) / served (server) */
    uint64_t warmup_transactions;  /* client: transactions discarded as warm-up */
    uint64_t bytes_sent;           /* all bytes written */
    uint64_t bytes_received;       /* all bytes read */
    uint64_t measured_bytes;       /* stream receiver: bytes read in the measured phase */
    int64_t measured_ns;           /* length of the measured phase */
    int64_t total_ns;              /* from the loop's start to its end */
    uint64_t lost;                 /* UDP: requests that timed out */
    uint64_t late;                 /* UDP: stale replies to earlier, timed-out requests */
    uint64_t aborted;              /* servers: connections closed before a full request */
    uint64_t min_ns, max_ns, sum_ns; /* latency of measured transactions */
    uint64_t samples_stored;       /* raw latencies written to the caller's array */
    int stopped;                   /* 1: ended by stop_fd; 2: ended by idle timeout */
    int err_call;                  /* NSLAB_PROBE_CALL_* of the failing call */
};

/* Pin the calling thread to one CPU (sched_setaffinity(0, ...): this thread only). */
int nslab_probe_pin_cpu(int cpu);
/* A new fd for the network namespace a socket lives in (ioctl SIOCGSKNS). */
int nslab_probe_socket_netns(int fd);
int64_t nslab_probe_now_ns(void);

/* Wait for a connection on a listening socket, or the stop fd, or the timeout (0: none).
 * Returns the accepted fd (close-on-exec), -ECANCELED when stopped, -ETIMEDOUT. */
int nslab_probe_accept(int listen_fd, int stop_fd, int64_t timeout_ns);

/* TCP request/response on a connected socket. hist (NSLAB_PROBE_HIST_BUCKETS counters,
 * may be NULL) and samples (cap raw latencies, may be NULL) receive measured latencies. */
int nslab_probe_tcp_rr_client(int fd, const struct nslab_probe_cfg *cfg,
                              struct nslab_probe_stats *st, uint64_t *hist,
                              uint64_t *samples, size_t cap);
/* Serves req_size-byte requests with resp_size-byte responses until EOF or stop. */
int nslab_probe_tcp_rr_server(int fd, const struct nslab_probe_cfg *cfg,
                              struct nslab_probe_stats *st);

/* TCP stream: the sender writes buf_size blocks for warmup+duration (or exactly count
 * bytes), shuts down its write side and waits for the receiver's close. The receiver
 * counts bytes until EOF; its measured phase runs from warmup_ns after the first byte to
 * the last byte. */
int nslab_probe_stream_send(int fd, const struct nslab_probe_cfg *cfg,
                            struct nslab_probe_stats *st);
int nslab_probe_stream_recv(int fd, const struct nslab_probe_cfg *cfg,
                            struct nslab_probe_stats *st);

/* TCP connect/request/response/close. The client makes its own sockets, so the calling
 * thread must be inside the client's network namespace. address is numeric (inet_pton). */
int nslab_probe_crr_client(int family, const char *address, int port,
                           const struct nslab_probe_cfg *cfg, struct nslab_probe_stats *st,
                           uint64_t *hist, uint64_t *samples, size_t cap);
/* Accepts, reads one request, answers, closes; until stop or idle timeout. */
int nslab_probe_crr_server(int listen_fd, const struct nslab_probe_cfg *cfg,
                           struct nslab_probe_stats *st);

/* UDP request/response on a connected datagram socket: a request unanswered within
 * timeout_ns counts as lost. Requests of 8 bytes or more carry a sequence number, so a
 * late reply is never taken for the current one. */
int nslab_probe_udp_rr_client(int fd, const struct nslab_probe_cfg *cfg,
                              struct nslab_probe_stats *st, uint64_t *hist,
                              uint64_t *samples, size_t cap);
int nslab_probe_udp_rr_server(int fd, const struct nslab_probe_cfg *cfg,
                              struct nslab_probe_stats *st);

/* Histogram helpers: bucket of a value, a bucket's lowest and highest value, and the
 * nearest-rank percentile (q in 0..100) as the middle of its bucket, clamped to
 * [min_ns, max_ns] of the run. */
int nslab_probe_hist_index(uint64_t value);
uint64_t nslab_probe_hist_lowest(int index);
uint64_t nslab_probe_hist_highest(int index);
uint64_t nslab_probe_hist_percentile(const uint64_t *hist, double q,
                                     uint64_t min_ns, uint64_t max_ns);

#endif
