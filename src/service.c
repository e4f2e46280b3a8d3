/*
 * The service runtime: consume a queue, run the handler on each request,
 * publish the reply, then acknowledge. Replying before acknowledging means
 * a crash in between makes the broker redeliver the request (at-least-once)
 * rather than lose it; the caller drops a second reply by correlation id.
 *
 * A redelivered request (its instance died, or lost its connection, before
 * acknowledging it) is not run at once: it goes back to the queue with its
 * delivery count in a header, because the broker does not count deliveries
 * of classic queues. A request whose count reaches max_deliveries is a
 * poison message that keeps killing instances: it moves to "<queue>.dlq"
 * and its caller gets a dead_letter error.
 */
#include "internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* How often run() looks at the stop flag while idle. rabbitmq-c restarts
 * poll() on EINTR, so a signal alone does not wake it. */
#define STOP_CHECK_MS 200

/* The longest a batch of replies is held back (see maybe_open_batch). */
#define BATCH_MAX_US 1000

/* The dead-letter queue's name is the queue's plus this. */
#define DLQ_SUFFIX ".dlq"
#define QUEUE_MAX (255 - (sizeof DLQ_SUFFIX - 1))

struct mqrpc_service {
    mqrpc_service_opts opts;
    mqr_conn_cfg cfg;
    char *queue;
    char dlq[256];
    char instance[300];
    mqr_logger log;
    mqrpc_handler_fn handler;
    void *arg;
    mqr_conn *conn;
    atomic_int stop;
    mqrpc_service_stats st;
    uint64_t rng; /* backoff jitter */
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

/* app_id and the connection name are AMQP short strings: at most 255
 * bytes, or the broker refuses every reply. Cut at a character boundary. */
static void cut_short_string(char *s)
{
    size_t n = strlen(s);

    if (n <= 255)
        return;
    n = 255;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    s[n] = '\0';
}

mqrpc_service *mqrpc_service_new(const mqrpc_service_opts *opts,
                                 mqrpc_handler_fn handler, void *arg)
{
    mqrpc_service *s;
    mqr_conn_params p = {0};

    if (!opts || !opts->queue || !*opts->queue ||
        strlen(opts->queue) > QUEUE_MAX || !handler) {
        errno = EINVAL;
        return NULL;
    }
    s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (!mqr_opts_copy(&s->opts, sizeof s->opts, opts)) {
        free(s);
        return NULL;
    }
    if (s->opts.instance_id && *s->opts.instance_id)
        snprintf(s->instance, sizeof s->instance, "%s", s->opts.instance_id);
    else
        mqrpc_instance_id(opts->queue, s->instance, sizeof s->instance);
    cut_short_string(s->instance);
    p.url = s->opts.url;
    p.url_file = s->opts.url_file;
    p.name = s->instance;
    p.role = MQRPC_ROLE_SERVICE;
    p.heartbeat_s = s->opts.heartbeat_s;
    p.connect_timeout_ms = s->opts.connect_timeout_ms;
    p.tls = s->opts.tls;
    s->queue = strdup(opts->queue);
    if (!s->queue || !mqr_conn_cfg_init(&s->cfg, &p)) {
        mqrpc_service_free(s);
        errno = ENOMEM;
        return NULL;
    }
    s->opts.queue = s->queue;
    snprintf(s->dlq, sizeof s->dlq, "%s" DLQ_SUFFIX, s->queue);
    s->opts.url = s->opts.url_file = NULL;
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
    if (s->opts.max_deliveries == 0)
        s->opts.max_deliveries = MQRPC_DEFAULT_MAX_DELIVERIES;
    if (s->opts.reconnect_min_ms <= 0)
        s->opts.reconnect_min_ms = MQRPC_DEFAULT_RECONNECT_MIN_MS;
    if (s->opts.reconnect_max_ms == 0)
        s->opts.reconnect_max_ms = MQRPC_DEFAULT_RECONNECT_MAX_MS;
    /* xorshift must not start at 0 */
    s->rng = ((uint64_t)mqr_now_us() ^ ((uint64_t)getpid() << 32) ^
              (uint64_t)(uintptr_t)s) |
             1;
    s->log.fn = s->opts.log;
    s->log.arg = s->opts.log_arg;
    s->log.name = s->instance;
    s->handler = handler;
    s->arg = arg;
    atomic_init(&s->stop, 0);
    snprintf(s->err, sizeof s->err, "not connected");
    return s;
}

/* One attempt: connect, declare, consume. */
static mqrpc_err connect_once(mqrpc_service *s)
{
    mqr_queue_opts q = {.durable = s->opts.durable,
                        .max_length = s->opts.max_queue};
    /* Dead letters are kept for a person to look at: always durable. */
    mqr_queue_opts dq = {.durable = true};
    mqrpc_err e;

    e = mqr_conn_open(&s->cfg.p, &s->conn, s->err, sizeof s->err);
    if (e != MQRPC_OK)
        return e;
    e = mqr_conn_declare_queue(s->conn, s->queue, &q, NULL);
    if (e == MQRPC_EINVAL) {
        snprintf(s->err, sizeof s->err,
                 "queue %s exists with other settings (%s); every instance "
                 "must use the same --durable and --max-queue (delete the "
                 "queue to change them)",
                 s->queue, mqr_conn_errmsg(s->conn));
        goto fail;
    }
    if (e == MQRPC_OK)
        e = mqr_conn_declare_queue(s->conn, s->dlq, &dq, NULL);
    if (e == MQRPC_OK)
        e = mqr_conn_qos(s->conn, s->opts.prefetch);
    if (e == MQRPC_OK)
        e = mqr_conn_consume(s->conn, s->queue, false);
    if (e != MQRPC_OK) {
        snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
        goto fail;
    }
    s->err[0] = '\0';
    return MQRPC_OK;
fail:
    mqr_conn_free(s->conn);
    s->conn = NULL;
    return e;
}

/* Sleeps ms, waking early when stopped. */
static void nap(mqrpc_service *s, int ms)
{
    while (ms > 0 && !atomic_load(&s->stop)) {
        int step = ms < STOP_CHECK_MS ? ms : STOP_CHECK_MS;
        struct timespec ts = {0, step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

/* Failures that waiting can cure: the broker is down, restarting or not
 * reachable yet. A refused login or access, TLS or URL problems need a
 * person. */
static bool transient(mqrpc_err e)
{
    return e == MQRPC_ECONNECT || e == MQRPC_ECLOSED || e == MQRPC_ETIMEOUT ||
           e == MQRPC_EPROTO;
}

mqrpc_err mqrpc_service_connect(mqrpc_service *s)
{
    int64_t t0 = mqr_now_us(), left_us;
    int delay = s->opts.reconnect_min_ms, wait;
    unsigned attempts = 0;
    mqrpc_err e;

    if (s->conn)
        return MQRPC_ESTATE;
    for (;;) {
        attempts++;
        e = connect_once(s);
        if (e == MQRPC_OK) {
            if (attempts > 1)
                mqr_log(&s->log, MQRPC_LOG_INFO,
                        "connected after %.1f s (%u attempts)",
                        (double)(mqr_now_us() - t0) / 1e6, attempts);
            return MQRPC_OK;
        }
        if (!transient(e) || s->opts.connect_retry_ms == 0)
            return e;
        /* Said once: a supervisor's log should not fill up while the
         * broker is down. */
        if (attempts == 1) {
            if (s->opts.connect_retry_ms > 0)
                mqr_log(&s->log, MQRPC_LOG_WARN,
                        "%s; retrying for up to %.1f s", s->err,
                        s->opts.connect_retry_ms / 1e3);
            else
                mqr_log(&s->log, MQRPC_LOG_WARN,
                        "%s; retrying until the broker answers", s->err);
        }
        wait = mqr_jitter(&s->rng, delay);
        if (s->opts.connect_retry_ms > 0) {
            left_us = t0 + (int64_t)s->opts.connect_retry_ms * 1000 -
                      mqr_now_us();
            if (left_us <= 0)
                return e;
            if (wait > left_us / 1000)
                wait = (int)(left_us / 1000) + 1;
        }
        nap(s, wait);
        if (atomic_load(&s->stop))
            return e;
        delay = mqr_backoff_next(delay, s->opts.reconnect_max_ms);
    }
}

static int shown_len(mqr_str s)
{
    return (int)(s.len > 64 ? 64 : s.len);
}

/* A request problem found before decoding the body, or NULL. */
static const char *envelope_problem(const mqr_msg *m, char *buf, size_t len)
{
    static const char json[] = "application/json";

    if (m->bad_headers)
        return "headers " MQR_HDR_DEADLINE " and " MQR_HDR_DELIVERIES
               " must be integers";
    /* pika's seed client sends no content type; "application/json;
     * charset=utf-8" is still JSON. */
    if (m->content_type.len &&
        !(m->content_type.len >= sizeof json - 1 &&
          strncasecmp(m->content_type.ptr, json, sizeof json - 1) == 0 &&
          (m->content_type.len == sizeof json - 1 ||
           m->content_type.ptr[sizeof json - 1] == ';'))) {
        snprintf(buf, len,
                 "content_type must be application/json (got \"%.*s\")",
                 shown_len(m->content_type), m->content_type.ptr);
        return buf;
    }
    return NULL;
}

/* Runs the handler; returns the reply body (malloc'd) and whether it is an
 * error reply. Never fails: an encoding problem becomes an internal error. */
static char *answer(mqrpc_service *s, const mqr_msg *m, size_t *len,
                    bool *is_error)
{
    mqrpc_fault fault = {{0}, {0}};
    mqr_limits lim = {s->opts.max_body, s->opts.max_depth, s->opts.max_string};
    json_t *request = NULL, *result = NULL;
    char *out = NULL, why[160];
    const char *problem = envelope_problem(m, why, sizeof why);

    if (problem)
        mqrpc_fault_set(&fault, MQRPC_BAD_REQUEST, "%s", problem);
    else if (mqr_decode_request(m->body.ptr, m->body.len, &lim, &request,
                                &fault) == MQRPC_OK) {
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
        mqr_log(&s->log, MQRPC_LOG_DEBUG, "error reply %s: %s", fault.code, fault.message);
    return out;
}

static mqrpc_err reply(mqrpc_service *s, const mqr_msg *m, const char *body,
                       size_t len, bool is_error)
{
    mqr_props props = {0};

    props.correlation_id = m->correlation_id;
    props.app_id = mqr_cstr(s->instance);
    /* A caller that made its request survive a broker restart wants the
     * reply to survive it too. */
    props.persistent = m->persistent;
    if (is_error)
        props.type = mqr_cstr("error");
    return mqr_conn_publish(s->conn, m->reply_to, &props, body, len, false);
}

/* Puts a redelivered request back at the tail of the queue with its count
 * of failed deliveries, or into the dead-letter queue once it reached
 * max_deliveries. Either way the delivery in hand is then acknowledged. */
static mqrpc_err requeue_or_dead_letter(mqrpc_service *s, const mqr_msg *m)
{
    mqr_props props = {0};
    uint32_t failed = m->deliveries + 1;
    char expiration[24];
    mqrpc_err e;

    props.correlation_id = m->correlation_id;
    props.reply_to = m->reply_to;
    props.persistent = m->persistent;
    props.deadline_ms = m->deadline_ms;
    props.deliveries = failed;
    if (failed >= s->opts.max_deliveries) {
        mqrpc_fault fault;
        size_t len;
        char *body;

        e = mqr_conn_publish(s->conn, mqr_cstr(s->dlq), &props, m->body.ptr,
                             m->body.len, false);
        if (e != MQRPC_OK)
            return e;
        mqrpc_fault_set(&fault, MQRPC_DEAD_LETTER,
                        "the request was delivered %u times and never "
                        "answered (the instances that took it died); it is "
                        "in %s and will not be run again",
                        (unsigned)failed, s->dlq);
        body = mqr_encode_fault(&fault, &len);
        if (!body)
            return MQRPC_ENOMEM;
        e = reply(s, m, body, len, true);
        free(body);
        if (e != MQRPC_OK)
            return e;
        s->st.dead_lettered++;
        mqr_log(&s->log, MQRPC_LOG_WARN, "request %.*s dead-lettered to %s after %u deliveries",
              shown_len(m->correlation_id), m->correlation_id.ptr,
              s->dlq, (unsigned)failed);
        return MQRPC_OK;
    }
    if (m->deadline_ms) {
        /* The broker's expiration restarts with the copy: give it what is
         * left of the caller's time. */
        int64_t left = m->deadline_ms - mqr_wall_ms();
        snprintf(expiration, sizeof expiration, "%" PRId64,
                 left > 0 ? left : 1);
        props.expiration = mqr_cstr(expiration);
    }
    e = mqr_conn_publish(s->conn, mqr_cstr(s->queue), &props, m->body.ptr,
                         m->body.len, false);
    if (e == MQRPC_OK) {
        s->st.redelivered++;
        if (s->opts.verbose)
            mqr_log(&s->log, MQRPC_LOG_DEBUG, "request %.*s redelivered (%u failed deliveries): "
                  "queued again", shown_len(m->correlation_id),
                  m->correlation_id.ptr, (unsigned)failed);
    }
    return e;
}

/* Handles one delivery. Inside a batch the acknowledgement waits for
 * flush_batch; otherwise it goes right after the reply. */
static mqrpc_err serve_one(mqrpc_service *s, const mqr_msg *m)
{
    size_t len = 0;
    bool is_error;
    char *body;
    mqrpc_err e = MQRPC_OK;

    if (m->reply_to.len == 0 || m->correlation_id.len == 0) {
        /* Nobody could match an answer: acknowledge so it does not come
         * back forever. */
        s->st.dropped++;
        mqr_log(&s->log, MQRPC_LOG_WARN,
              "request without %s (correlation_id \"%.*s\"): "
              "acknowledged and dropped",
              m->reply_to.len == 0 ? "reply_to" : "correlation_id",
              shown_len(m->correlation_id),
              m->correlation_id.ptr ? m->correlation_id.ptr : "");
    } else if (m->deadline_ms && mqr_wall_ms() >= m->deadline_ms) {
        /* Its caller gave up: running it would be wasted work. */
        s->st.expired++;
        if (s->opts.verbose)
            mqr_log(&s->log, MQRPC_LOG_DEBUG, "request %.*s skipped: past its deadline",
                  shown_len(m->correlation_id), m->correlation_id.ptr);
    } else if (m->redelivered) {
        e = requeue_or_dead_letter(s, m);
    } else {
        body = answer(s, m, &len, &is_error);
        if (!body)
            return MQRPC_ENOMEM; /* the delivery stays unacked: redelivered */
        e = reply(s, m, body, len, is_error);
        free(body);
        if (e == MQRPC_OK) {
            s->st.served++;
            if (s->opts.verbose)
                mqr_log(&s->log, MQRPC_LOG_DEBUG, "answered %.*s", shown_len(m->correlation_id),
                      m->correlation_id.ptr);
        }
    }
    if (e != MQRPC_OK)
        return e;
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

/* Serves until stopped (MQRPC_OK) or the connection fails. */
static mqrpc_err serve(mqrpc_service *s)
{
    mqr_msg m;
    mqrpc_err e;

    while (!atomic_load(&s->stop)) {
        /* An open batch must not sleep: flush it as soon as the input
         * runs dry. */
        e = mqr_conn_wait(s->conn, s->batch_open ? 0 : STOP_CHECK_MS, &m);
        if (e == MQRPC_ETIMEOUT) {
            if (!s->batch_open)
                continue;
            e = flush_batch(s);
        } else if (e == MQRPC_OK && m.kind == MQR_CANCEL) {
            mqr_conn_abort(s->conn, "the broker cancelled the consumer "
                                    "(queue deleted?)");
            e = MQRPC_ECLOSED;
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
    return MQRPC_OK;
}


/* Reopens the connection with exponential backoff until it works or the
 * service is stopped; the first attempt is immediate, since a killed
 * connection (not a dead broker) is the common case. */
static mqrpc_err reconnect(mqrpc_service *s)
{
    int64_t t0 = mqr_now_us();
    int delay = s->opts.reconnect_min_ms;
    unsigned attempts = 0;
    mqrpc_err e;

    while (!atomic_load(&s->stop)) {
        attempts++;
        e = connect_once(s);
        if (e == MQRPC_OK) {
            s->st.reconnects++;
            mqr_log(&s->log, MQRPC_LOG_INFO, "connection regained after %.1f s (%u attempt%s); "
                  "consuming %s again",
                  (double)(mqr_now_us() - t0) / 1e6, attempts,
                  attempts == 1 ? "" : "s", s->queue);
            return MQRPC_OK;
        }
        if (e == MQRPC_ENOMEM)
            return e;
        if (s->opts.verbose)
            mqr_log(&s->log, MQRPC_LOG_WARN, "reconnection attempt %u failed: %s", attempts, s->err);
        nap(s, mqr_jitter(&s->rng, delay));
        delay = mqr_backoff_next(delay, s->opts.reconnect_max_ms);
    }
    return MQRPC_OK;
}

mqrpc_err mqrpc_service_run(mqrpc_service *s)
{
    mqrpc_err e;

    if (!s->conn)
        return MQRPC_ESTATE;
    while (!atomic_load(&s->stop)) {
        e = serve(s);
        if (e == MQRPC_OK)
            break;
        mqr_conn_free(s->conn);
        s->conn = NULL;
        s->batch_open = false;
        s->batch_tag = 0;
        if (e == MQRPC_ENOMEM || s->opts.reconnect_max_ms < 0)
            return e;
        s->st.lost++;
        mqr_log(&s->log, MQRPC_LOG_WARN, "connection lost: %s; reconnecting", s->err);
        e = reconnect(s);
        if (e != MQRPC_OK)
            return e;
    }
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

void mqrpc_service_get_stats(const mqrpc_service *s, mqrpc_service_stats *out,
                             size_t size)
{
    mqr_struct_out(out, size, &s->st, sizeof s->st);
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
