#include "resumo.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* One request being summed up; touched only by the client's thread once
 * it left the inbox. */
struct job {
    struct job *next; /* inbox */
    struct resumo *owner;
    mqrpc_request *req;
    json_t *numeros; /* the request's list (a reference of ours) */
    json_t *pool;    /* numbers and partial sums still to add */
    json_t *media;   /* service_media's answer, once in */
    unsigned in_flight;
    bool answered; /* req ended: only the calls in flight keep the job */
    struct timespec deadline;
    /* The request's trace context, which its calls continue (copied: the
     * request's own ends with it, while calls may still be out). */
    mqrpc_call_opts trace;
    char traceparent[MQRPC_TRACEPARENT_LEN + 1];
    char tracestate[MQRPC_TRACESTATE_MAX + 1];
};

struct resumo {
    mqrpc_client *client;
    size_t max_items;
    pthread_t thread;
    pthread_mutex_t lock;
    struct job *inbox_head, *inbox_tail; /* from handler threads */
    atomic_bool quit;
    unsigned jobs; /* alive, on the client's thread */
};

static int ms_left(const struct job *j)
{
    struct timespec now;
    long long ms;

    clock_gettime(CLOCK_MONOTONIC, &now);
    ms = (long long)(j->deadline.tv_sec - now.tv_sec) * 1000 +
         (j->deadline.tv_nsec - now.tv_nsec) / 1000000;
    return ms < 1 ? 1 : ms > 0x7fffffff ? 0x7fffffff : (int)ms;
}

static void job_free(resumo *r, struct job *j)
{
    json_decref(j->numeros);
    json_decref(j->pool);
    json_decref(j->media);
    free(j);
    r->jobs--;
}

/* Frees j once nothing refers to it: answered, no call in flight. */
static void maybe_free(resumo *r, struct job *j)
{
    if (j->answered && j->in_flight == 0)
        job_free(r, j);
}

static void fail(struct job *j, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail(struct job *j, const char *code, const char *fmt, ...)
{
    char msg[256];
    va_list ap;

    if (j->answered)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    mqrpc_request_fail(j->req, code, "%s", msg);
    j->answered = true;
}

/* A failed call fails the request: a service's own error keeps its code. */
static bool call_failed(struct job *j, const mqrpc_reply *reply)
{
    mqrpc_err e = mqrpc_reply_status(reply);

    if (e == MQRPC_OK)
        return false;
    if (e == MQRPC_EREMOTE)
        fail(j, mqrpc_reply_error_code(reply), "%s: %s",
             mqrpc_reply_queue(reply), mqrpc_reply_error_message(reply));
    else
        fail(j, "unavailable", "%s: %s", mqrpc_reply_queue(reply),
             mqrpc_reply_error_message(reply));
    return true;
}

static void finish_if_done(struct job *j)
{
    if (j->answered || j->in_flight || !j->media ||
        json_array_size(j->pool) != 1)
        return;
    mqrpc_request_reply(
        j->req, json_pack("{s:I, s:O, s:O}", "quantidade",
                          (json_int_t)json_array_size(j->numeros), "soma",
                          json_array_get(j->pool, 0), "media", j->media));
    j->answered = true;
}

static void soma_done(const mqrpc_reply *reply, void *arg);
static void media_done(const mqrpc_reply *reply, void *arg);

static void call(resumo *r, struct job *j, const char *queue, json_t *body,
                 mqrpc_done_fn done)
{
    char *text = json_dumps(body, JSON_COMPACT);
    mqrpc_err e;

    json_decref(body);
    if (!text) {
        fail(j, MQRPC_INTERNAL, "out of memory");
        return;
    }
    /* Both services only read: a call may be re-sent after a lost
     * connection (mqrpc_client_opts.retries). */
    e = mqrpc_call_async_ex(r->client, queue, text, strlen(text),
                            ms_left(j), MQRPC_CALL_IDEMPOTENT, &j->trace,
                            done, j);
    free(text);
    if (e == MQRPC_OK)
        j->in_flight++;
    else
        fail(j, "unavailable", "%s: %s", queue,
             mqrpc_client_errmsg(r->client));
}

/* Adds the numbers of the pool two by two, as long as there are two. */
static void pair_up(resumo *r, struct job *j)
{
    while (!j->answered && json_array_size(j->pool) >= 2) {
        if (mqrpc_request_cancelled(j->req)) {
            fail(j, "cancelled", "the caller gave up");
            return;
        }
        json_t *a = json_incref(json_array_get(j->pool, 0));
        json_t *b = json_incref(json_array_get(j->pool, 1));
        json_array_remove(j->pool, 0);
        json_array_remove(j->pool, 0);
        call(r, j, "service_soma", json_pack("{s:o, s:o}", "a", a, "b", b),
             soma_done);
    }
}

static void soma_done(const mqrpc_reply *reply, void *arg)
{
    struct job *j = arg;

    j->in_flight--;
    if (!j->answered && !call_failed(j, reply)) {
        json_array_append(j->pool, mqrpc_reply_result(reply));
        pair_up(j->owner, j);
        finish_if_done(j);
    }
    maybe_free(j->owner, j);
}

static void media_done(const mqrpc_reply *reply, void *arg)
{
    struct job *j = arg;

    j->in_flight--;
    if (!j->answered && !call_failed(j, reply)) {
        j->media = json_incref(mqrpc_reply_result(reply));
        finish_if_done(j);
    }
    maybe_free(j->owner, j);
}

static void start(resumo *r, struct job *j)
{
    r->jobs++;
    call(r, j, "service_media", json_pack("{s:O}", "numeros", j->numeros),
         media_done);
    pair_up(r, j);
    finish_if_done(j);
    maybe_free(r, j);
}

static void *client_thread(void *p)
{
    resumo *r = p;

    /* After a stop, the requests in hand still end: the service waits for
     * them before resumo_close. */
    while (!atomic_load(&r->quit) || r->jobs) {
        struct job *j, *next;
        mqrpc_err e = mqrpc_client_process(r->client, 1000);

        if (e == MQRPC_ECLOSED) {
            /* Not reconnecting: each new call fails at once. */
            struct timespec ts = {0, 100 * 1000000L};
            nanosleep(&ts, NULL);
        }
        pthread_mutex_lock(&r->lock);
        j = r->inbox_head;
        r->inbox_head = r->inbox_tail = NULL;
        pthread_mutex_unlock(&r->lock);
        for (; j; j = next) {
            next = j->next;
            start(r, j);
        }
    }
    return NULL;
}

void resumo_request(mqrpc_request *req, void *arg)
{
    resumo *r = arg;
    json_t *numeros = json_object_get(mqrpc_request_params(req), "numeros");
    int64_t left = mqrpc_request_time_left_ms(req);
    struct job *j;
    size_t i, n;

    if (!json_is_array(numeros) || json_array_size(numeros) == 0) {
        mqrpc_request_fail(req, MQRPC_BAD_REQUEST,
                           "field \"numeros\" must be a non-empty list of "
                           "numbers");
        return;
    }
    n = json_array_size(numeros);
    if (n > r->max_items) {
        mqrpc_request_fail(req, MQRPC_BAD_REQUEST,
                           "\"numeros\" has %zu items, at most %zu", n,
                           r->max_items);
        return;
    }
    for (i = 0; i < n; i++)
        if (!json_is_number(json_array_get(numeros, i))) {
            mqrpc_request_fail(req, MQRPC_BAD_REQUEST,
                               "\"numeros\"[%zu] must be a number, got %s", i,
                               mqrpc_json_typename(json_array_get(numeros, i)));
            return;
        }
    j = calloc(1, sizeof *j);
    if (!j || !(j->pool = json_copy(numeros))) {
        free(j);
        mqrpc_request_fail(req, MQRPC_INTERNAL, "out of memory");
        return;
    }
    j->req = req;
    j->owner = r;
    mqrpc_call_opts_init(&j->trace);
    snprintf(j->traceparent, sizeof j->traceparent, "%s",
             mqrpc_request_traceparent(req));
    j->trace.traceparent = j->traceparent;
    if (mqrpc_request_tracestate(req)) {
        snprintf(j->tracestate, sizeof j->tracestate, "%s",
                 mqrpc_request_tracestate(req));
        j->trace.tracestate = j->tracestate;
    }
    j->numeros = json_incref(numeros);
    clock_gettime(CLOCK_MONOTONIC, &j->deadline);
    if (left < 0)
        left = RESUMO_DEFAULT_TIMEOUT_MS;
    /* The calls end a little before the caller's deadline, so that a call
     * that fails by timing out still reaches the caller as "unavailable"
     * rather than as its own timeout. */
    left -= left / 10 < 500 ? left / 10 : 500;
    j->deadline.tv_sec += left / 1000;
    j->deadline.tv_nsec += (left % 1000) * 1000000L;
    if (j->deadline.tv_nsec >= 1000000000L) {
        j->deadline.tv_sec++;
        j->deadline.tv_nsec -= 1000000000L;
    }
    /* The handler thread is free again as soon as this returns. */
    pthread_mutex_lock(&r->lock);
    if (r->inbox_tail)
        r->inbox_tail->next = j;
    else
        r->inbox_head = j;
    r->inbox_tail = j;
    pthread_mutex_unlock(&r->lock);
    mqrpc_client_wake(r->client);
}

resumo *resumo_open(const mqrpc_client_opts *opts, size_t max_items,
                    char *err, size_t errlen)
{
    resumo *r = calloc(1, sizeof *r);
    int e;

    if (!r || !(r->client = mqrpc_client_new(opts))) {
        snprintf(err, errlen, "out of memory");
        free(r);
        return NULL;
    }
    if (mqrpc_client_connect(r->client) != MQRPC_OK) {
        snprintf(err, errlen, "calls to service_soma and service_media: %s",
                 mqrpc_client_errmsg(r->client));
        mqrpc_client_free(r->client);
        free(r);
        return NULL;
    }
    r->max_items = max_items;
    pthread_mutex_init(&r->lock, NULL);
    atomic_init(&r->quit, false);
    e = pthread_create(&r->thread, NULL, client_thread, r);
    if (e) {
        snprintf(err, errlen, "cannot start the client thread: %s",
                 strerror(e));
        mqrpc_client_free(r->client);
        pthread_mutex_destroy(&r->lock);
        free(r);
        return NULL;
    }
    return r;
}

void resumo_close(resumo *r)
{
    if (!r)
        return;
    atomic_store(&r->quit, true);
    mqrpc_client_wake(r->client);
    pthread_join(r->thread, NULL);
    mqrpc_client_free(r->client);
    pthread_mutex_destroy(&r->lock);
    free(r);
}
