/*
 * Prometheus metrics of the programs: the text exposition format of the
 * library's statistics, and a small HTTP server (libmicrohttpd) that
 * serves a service process's on GET /metrics. It lives with the programs,
 * not in libmqrpc: an embedding program has its own metrics stack and reads
 * mqrpc_service_get_stats/mqrpc_client_get_stats itself.
 */
#ifndef MQRPC_METRICS_H
#define MQRPC_METRICS_H

#include "mqrpc/mqrpc.h"

#include <stdio.h>

/* What a service process reports beside its statistics. */
struct metrics_service_info {
    const char *program; /* "service_soma" */
    const char *queue;
    unsigned workers;   /* --workers */
    unsigned max_queue; /* --max-queue; 0: unbounded */
};

/* metrics_write_service writes the Prometheus text of a service process:
 * st summed over its workers, n of them connected so far. */
void metrics_write_service(FILE *f, const struct metrics_service_info *info,
                           const mqrpc_service_stats *st);

/* metrics_write_client writes the Prometheus text of a client program's
 * statistics (summed over its clients), all of its calls to queue. */
void metrics_write_client(FILE *f, const char *program, const char *queue,
                          const mqrpc_client_stats *st);

/* metrics_sum_service adds the counters and gauges of add into sum. */
void metrics_sum_service(mqrpc_service_stats *sum,
                         const mqrpc_service_stats *add);
/* metrics_sum_client adds the counters and gauges of add into sum. */
void metrics_sum_client(mqrpc_client_stats *sum, const mqrpc_client_stats *add);

struct metrics_server;

/* Why metrics_server_start failed; the exit code follows from it. */
enum metrics_fail {
    METRICS_BAD_ADDRESS = 1, /* not HOST:PORT: a usage error */
    METRICS_CANNOT_LISTEN    /* resolve, bind or listen failed */
};

/*
 * metrics_server_start listens on addr ("HOST:PORT", "[v6]:PORT") and
 * serves GET /metrics from a thread of its own, reading the services given
 * to metrics_server_add (a service not yet connected counts as such).
 * Returns NULL with *why and one line in err on failure.
 */
struct metrics_server *
metrics_server_start(const char *addr, const struct metrics_service_info *info,
                     enum metrics_fail *why, char *err, size_t errlen);

/* metrics_server_add makes s part of the sums; thread-safe. s must stay
 * valid until metrics_server_stop. */
void metrics_server_add(struct metrics_server *m, mqrpc_service *s);

/* metrics_server_stop stops serving (waiting for a scrape in progress) and
 * frees m. Accepts NULL. */
void metrics_server_stop(struct metrics_server *m);

#endif
