/*
 * service_resumo: a service that calls services. {"numeros": [1, 2, 3, 4]}
 * -> {"quantidade": 4, "soma": 10, "media": 2.5}: the sum comes from
 * service_soma (pairs added as their sums come back, so a list of n numbers
 * takes n-1 calls in about log2(n) rounds), the mean from one service_media
 * call, made at the same time.
 *
 * No handler thread waits on them: resumo_request hands the request to the
 * thread that owns an mqrpc_client (woken with mqrpc_client_wake), whose
 * callbacks start the next calls and finally answer the request
 * (mqrpc_request_reply, a deferred reply). A failed call fails the request:
 * an error reply of service_soma or service_media keeps its code, anything
 * else (timeout, connection lost, no service) is "unavailable". The calls
 * share the caller's deadline, less a tenth (at most 0.5 s) to answer in.
 */
#ifndef MQRPC_RESUMO_H
#define MQRPC_RESUMO_H

#include "mqrpc/mqrpc.h"

#include <stddef.h>

/* Longest list, as service_media's own default limit. */
#define RESUMO_DEFAULT_MAX_ITEMS 100000
/* Time given to the calls when the caller set no deadline, in ms. */
#define RESUMO_DEFAULT_TIMEOUT_MS 5000

typedef struct resumo resumo;

/* resumo_open connects a client (opts: the client options; the private
 * broker's clients account by default) and starts its thread. NULL with
 * one line in err on failure. */
resumo *resumo_open(const mqrpc_client_opts *opts, size_t max_items,
                    char *err, size_t errlen);

/* resumo_request is the service's mqrpc_request_fn (arg: a resumo). */
void resumo_request(mqrpc_request *req, void *arg);

/* resumo_close stops the thread (after the requests in hand ended) and
 * frees everything. */
void resumo_close(resumo *r);

#endif
