/*
 * The service runtime: consume a queue, run the handler on each request,
 * publish the reply, then acknowledge. Replying before acknowledging means
 * a crash in between makes the broker redeliver the request (at-least-once)
 * rather than lose it.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* How often run() looks at the stop flag while idle. rabbitmq-c restarts
 * poll() on EINTR, so a signal alone does not wake it. */
#define STOP_CHECK_MS 200

/* The longest a batch of replies is held back (see maybe_open_batch). */
#define BATCH_MAX_US 1000

struct mqrpc_service {
    mqrpc_service_opts opts;
    mqr_conn_cfg cfg;
    char *queue;
    char instance[300];
    mqrpc_handler_fn handler;
    void *arg;
    mqr_conn *conn;
    atomic_int stop;
    uint64_t served;
    bool batch_open;        /* replies corked, acks deferred */
    uint64_t batch_tag;     /* last delivery answered in the open batch */
    int64_t batch_start_us; /* when the batch opened */
    char err[512];
};

void mqrpc_instance_id(const char *queue, char *buf, size_t len)
{
    char host[256];

    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';
    snprintf(buf, len, "%s@%s:%ld", queue, host, (long)getpid());
}

static void logf_(const mqrpc_service *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* One line per event on stderr, prefixed with UTC time and the instance, so
 * interleaved logs of several instances stay readable. */
static void logf_(const mqrpc_service *s, const char *fmt, ...)
{
    char line[1024], stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    va_list ap;

    gmtime_r(&now, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s %s %s\n", stamp, s->instance, line);
}

mqrpc_service *mqrpc_service_new(const mqrpc_service_opts *opts,
                                 mqrpc_handler_fn handler, void *arg)
{
    mqrpc_service *s;

    if (!opts || !opts->queue || !*opts->queue || strlen(opts->queue) > 255 ||
        !handler)
        return NULL;
    s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->opts = *opts;
    s->queue = strdup(opts->queue);
    if (!s->queue || !mqr_conn_cfg_init(&s->cfg, opts->url, MQRPC_ROLE_SERVICE,
                                        opts->heartbeat_s,
                                        opts->connect_timeout_ms, &opts->tls)) {
        mqrpc_service_free(s);
        return NULL;
    }
    s->opts.queue = s->queue;
    s->opts.url = NULL;
    memset(&s->opts.tls, 0, sizeof s->opts.tls);
    s->opts.instance_id = NULL;
    if (s->opts.prefetch == 0)
        s->opts.prefetch = 1;
    if (s->opts.prefetch > 65535)
        s->opts.prefetch = 65535;
    if (s->opts.max_body == 0)
        s->opts.max_body = MQRPC_DEFAULT_MAX_BODY;
    if (s->opts.max_depth == 0)
        s->opts.max_depth = MQRPC_DEFAULT_MAX_DEPTH;
    if (s->opts.max_string == 0)
        s->opts.max_string = MQRPC_DEFAULT_MAX_STRING;
    if (opts->instance_id && *opts->instance_id)
        snprintf(s->instance, sizeof s->instance, "%s", opts->instance_id);
    else
        mqrpc_instance_id(s->queue, s->instance, sizeof s->instance);
    s->handler = handler;
    s->arg = arg;
    atomic_init(&s->stop, 0);
    snprintf(s->err, sizeof s->err, "not connected");
    return s;
}

mqrpc_err mqrpc_service_connect(mqrpc_service *s)
{
    mqrpc_err e;

    if (s->conn)
        return MQRPC_ESTATE;
    e = mqr_conn_open(&s->cfg.p, &s->conn, s->err, sizeof s->err);
    if (e != MQRPC_OK)
        return e;
    e = mqr_conn_declare_queue(s->conn, s->queue, false, NULL);
    if (e == MQRPC_OK)
        e = mqr_conn_qos(s->conn, s->opts.prefetch);
    if (e == MQRPC_OK)
        e = mqr_conn_consume(s->conn, s->queue, false);
    if (e != MQRPC_OK) {
        snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
        mqr_conn_free(s->conn);
        s->conn = NULL;
        return e;
    }
    s->err[0] = '\0';
    return MQRPC_OK;
}

/* Runs the handler; returns the reply body (malloc'd) and whether it is an
 * error reply. Never fails: an encoding problem becomes an internal error. */
static char *answer(mqrpc_service *s, const mqr_msg *m, size_t *len,
                    bool *is_error)
{
    mqrpc_fault fault = {{0}, {0}};
    mqr_limits lim = {s->opts.max_body, s->opts.max_depth, s->opts.max_string};
    json_t *request = NULL, *result = NULL;
    char *out = NULL;

    if (mqr_decode_request(m->body.ptr, m->body.len, &lim, &request, &fault) ==
        MQRPC_OK) {
        result = s->handler(request, &fault, s->arg);
        json_decref(request);
        if (result) {
            out = mqr_encode_result(result, len);
            json_decref(result);
            if (!out)
                mqrpc_fault_set(&fault, MQRPC_INTERNAL,
                                "the result could not be encoded as JSON");
        } else if (!fault.code[0]) {
            mqrpc_fault_set(&fault, MQRPC_INTERNAL,
                            "the handler failed without saying why");
        }
    }
    *is_error = out == NULL;
    if (!out)
        out = mqr_encode_fault(&fault, len);
    if (*is_error && s->opts.verbose)
        logf_(s, "error reply %s: %s", fault.code, fault.message);
    return out;
}

/* Answers one request. Inside a batch the acknowledgement waits for
 * flush_batch; otherwise it goes right after the reply. */
static mqrpc_err serve_one(mqrpc_service *s, const mqr_msg *m)
{
    mqr_props props = {0};
    size_t len = 0;
    bool is_error;
    char *body;
    mqrpc_err e;

    if (m->reply_to.len == 0) {
        /* Nobody to answer: acknowledge so it does not come back forever. */
        logf_(s,
              "request without reply_to (correlation_id \"%.*s\"): "
              "acknowledged and dropped",
              (int)(m->correlation_id.len > 64 ? 64 : m->correlation_id.len),
              m->correlation_id.ptr ? m->correlation_id.ptr : "");
    } else {
        body = answer(s, m, &len, &is_error);
        if (!body)
            return MQRPC_ENOMEM; /* the delivery stays unacked: redelivered */
        props.correlation_id = m->correlation_id;
        props.app_id = mqr_cstr(s->instance);
        if (is_error)
            props.type = mqr_cstr("error");
        e = mqr_conn_publish(s->conn, m->reply_to, &props, body, len, false);
        free(body);
        if (e != MQRPC_OK)
            return e;
        s->served++;
        if (s->opts.verbose)
            logf_(s, "answered %.*s", (int)m->correlation_id.len,
                  m->correlation_id.ptr ? m->correlation_id.ptr : "");
    }
    if (s->batch_open) {
        s->batch_tag = m->delivery_tag;
        return MQRPC_OK;
    }
    return mqr_conn_ack(s->conn, m->delivery_tag, false);
}

/* Deliveries arrive in order on one channel, and each was answered before
 * the next was read: one multiple ack covers the whole batch. */
static mqrpc_err flush_batch(mqrpc_service *s)
{
    mqrpc_err e = MQRPC_OK;

    if (s->batch_tag)
        e = mqr_conn_ack(s->conn, s->batch_tag, true);
    mqr_conn_cork(s->conn, false);
    s->batch_tag = 0;
    s->batch_open = false;
    return e;
}

/* With prefetch above 1, requests that are already read behind the current
 * one are answered as a batch: replies and one multiple ack leave together
 * when nothing more is buffered (so no request waits for data that has not
 * arrived) or after BATCH_MAX_US (so a slow handler does not hold earlier
 * replies back). The broker then handles one ack and one read per batch
 * instead of one per request. */
static void maybe_open_batch(mqrpc_service *s)
{
    if (s->batch_open || s->opts.prefetch < 2 || !mqr_conn_buffered(s->conn))
        return;
    s->batch_open = true;
    s->batch_start_us = mqr_now_us();
    mqr_conn_cork(s->conn, true);
}

static bool batch_due(const mqrpc_service *s)
{
    return s->batch_open && (!mqr_conn_buffered(s->conn) ||
                             mqr_now_us() - s->batch_start_us > BATCH_MAX_US);
}

mqrpc_err mqrpc_service_run(mqrpc_service *s)
{
    mqr_msg m;
    mqrpc_err e;

    if (!s->conn)
        return MQRPC_ESTATE;
    while (!atomic_load(&s->stop)) {
        /* An open batch must not sleep: flush it as soon as the input
         * runs dry. */
        e = mqr_conn_wait(s->conn, s->batch_open ? 0 : STOP_CHECK_MS, &m);
        if (e == MQRPC_ETIMEOUT) {
            if (!s->batch_open)
                continue;
            e = flush_batch(s);
        } else if (e == MQRPC_OK && m.kind == MQR_DELIVERY) {
            maybe_open_batch(s);
            e = serve_one(s, &m);
            if (e == MQRPC_OK && batch_due(s))
                e = flush_batch(s);
        }
        if (e != MQRPC_OK) {
            /* Acknowledge what was answered, so only the rest comes back. */
            if (s->batch_open)
                flush_batch(s);
            snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
            return e;
        }
    }
    if (s->batch_open)
        flush_batch(s);
    /* Closing the channel now hands back deliveries prefetched but not
     * started, so other instances take them without waiting for us. */
    mqr_conn_free(s->conn);
    s->conn = NULL;
    return MQRPC_OK;
}

void mqrpc_service_stop(mqrpc_service *s)
{
    atomic_store(&s->stop, 1);
}

const char *mqrpc_service_instance(const mqrpc_service *s)
{
    return s->instance;
}

uint64_t mqrpc_service_served(const mqrpc_service *s)
{
    return s->served;
}

const char *mqrpc_service_errmsg(const mqrpc_service *s)
{
    return s->err;
}

void mqrpc_service_free(mqrpc_service *s)
{
    if (!s)
        return;
    mqr_conn_free(s->conn);
    free(s->queue);
    mqr_conn_cfg_clear(&s->cfg);
    free(s);
}
