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
 * and its caller gets a dead_letter error. These re-publishes go on a
 * channel in confirm mode, and the delivery is acknowledged only once the
 * broker confirmed the copy: a refused copy (a full queue) is answered
 * with an explicit error instead of being lost.
 *
 * The broker only knows that a delivery was sent before (its redelivered
 * flag), not whether the handler started on it. With prefetch above 1 the
 * deliveries read but not started would all come back redelivered after
 * the instance goes, and count as failed: innocent requests would reach
 * the dead-letter queue after a few restarts. So a clean stop cancels the
 * consumer first and hands the unstarted deliveries back, re-published
 * unchanged (their count as it was) and confirmed. What remains: after a
 * lost connection or a crash there is no chance to hand back, and every
 * delivery the instance held (at most prefetch) comes back redelivered and
 * counts one failed delivery, started or not. max_deliveries must leave
 * room for that.
 *
 * Publishes never wait on a broker that blocks us (a resource alarm): a
 * blocked broker stops reading the socket, and rabbitmq-c's publish would
 * then wait without a deadline. Replies and re-publishes computed meanwhile
 * are held, in order, and sent when the broker unblocks; their deliveries
 * are acknowledged after them.
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

/* How often held publishes are retried while the socket's send buffer,
 * not the broker, holds them back. */
#define HELD_RETRY_MS 10

/* The longest a batch of replies is held back (see maybe_open_batch). */
#define BATCH_MAX_US 1000

/* The longest a clean stop waits for the broker to confirm the hand-back
 * of unstarted deliveries (and other re-publishes still unconfirmed). */
#define HAND_BACK_MAX_US 5000000

/* The remote error code of a request the queue refused to take back: the
 * name of MQRPC_EOVERLOAD, what a caller gets when the queue refuses it. */
#define OVERLOADED "overloaded"

/* The dead-letter queue's name is the queue's plus this. */
#define DLQ_SUFFIX ".dlq"
#define QUEUE_MAX (255 - (sizeof DLQ_SUFFIX - 1))

/* What a publish that could not go at once, or waits for its confirm, is. */
enum out_kind {
    OUT_REPLY,       /* a reply; its delivery is acked once it is sent */
    OUT_REQUEUE,     /* a redelivered request back to the queue, count+1 */
    OUT_DEAD_LETTER, /* a poison request to the dead-letter queue */
    OUT_HAND_BACK    /* an unstarted delivery back to the queue, unchanged */
};

/* A publish held back (the broker blocks us, or the socket is full) or
 * published on the confirm channel and not yet confirmed. The strings the
 * props point to and the body live in data. */
struct out {
    struct out *next;
    enum out_kind kind;
    uint64_t tag;   /* the delivery acknowledged when this is done */
    uint64_t seq;   /* on the confirm channel, once published */
    bool is_error;  /* OUT_REPLY: an error reply */
    mqr_str rk;     /* routing key: reply_to or a queue */
    mqr_str reply_to; /* re-publishes: whom to tell if it is refused */
    mqr_props props;
    mqr_str body;
    char data[];
};

/* A FIFO of struct out. */
struct out_list {
    struct out *head, *tail;
    unsigned n;
};

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
    bool corked;            /* a reply waits in the corked socket */
    uint64_t batch_tag;     /* last delivery answered in the open batch */
    int64_t batch_start_us; /* when the batch opened */
    int64_t blocked_us;     /* when the broker blocked us; 0: it does not */
    struct out_list held;   /* not yet published, in order */
    struct out_list unconfirmed; /* on the confirm channel, by seq */
    char err[512];
};

bool mqr_redelivery_decide(uint32_t deliveries, unsigned max_deliveries,
                           uint32_t *failed)
{
    *failed = deliveries == UINT32_MAX ? UINT32_MAX : deliveries + 1;
    return *failed >= (max_deliveries ? max_deliveries : 1);
}

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

/* Declares the queue and its dead-letter queue and consumes the queue:
 * after connecting, and again after the broker cancelled the consumer. */
static mqrpc_err declare_and_consume(mqrpc_service *s)
{
    mqr_queue_opts q = {.durable = s->opts.durable,
                        .max_length = s->opts.max_queue};
    /* Dead letters are kept for a person to look at: always durable. */
    mqr_queue_opts dq = {.durable = true};
    mqrpc_err e;

    e = mqr_conn_declare_queue(s->conn, s->queue, &q, NULL);
    if (e == MQRPC_EINVAL) {
        snprintf(s->err, sizeof s->err,
                 "queue %s exists with other settings (%s); every instance "
                 "must use the same --durable and --max-queue (delete the "
                 "queue to change them)",
                 s->queue, mqr_conn_errmsg(s->conn));
        return e;
    }
    if (e == MQRPC_OK)
        e = mqr_conn_declare_queue(s->conn, s->dlq, &dq, NULL);
    if (e == MQRPC_OK)
        e = mqr_conn_consume(s->conn, s->queue, false);
    if (e != MQRPC_OK)
        snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
    return e;
}

/* One attempt: connect, declare, consume. */
static mqrpc_err connect_once(mqrpc_service *s)
{
    mqrpc_err e;

    e = mqr_conn_open(&s->cfg.p, &s->conn, s->err, sizeof s->err);
    if (e != MQRPC_OK)
        return e;
    /* qos before consuming: the broker applies it to later consumers. */
    e = mqr_conn_qos(s->conn, s->opts.prefetch);
    if (e != MQRPC_OK)
        snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
    else
        e = declare_and_consume(s);
    if (e != MQRPC_OK) {
        mqr_conn_free(s->conn);
        s->conn = NULL;
        return e;
    }
    s->err[0] = '\0';
    s->blocked_us = 0;
    return MQRPC_OK;
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

/* ------------------------------------------------- held and unconfirmed */

static void out_push(struct out_list *l, struct out *o)
{
    o->next = NULL;
    if (l->tail)
        l->tail->next = o;
    else
        l->head = o;
    l->tail = o;
    l->n++;
}

static struct out *out_pop(struct out_list *l)
{
    struct out *o = l->head;

    if (o) {
        l->head = o->next;
        if (!l->head)
            l->tail = NULL;
        l->n--;
    }
    return o;
}

static void out_clear(struct out_list *l)
{
    struct out *o;

    while ((o = out_pop(l)))
        free(o);
}

/* A delivery whose acknowledgement waits for a publish: while there is
 * one, a multiple ack (the batch's) could cover it, so acks go one by one. */
static bool acks_waiting(const mqrpc_service *s)
{
    return s->held.n || s->unconfirmed.n;
}

/* Copies s into the entry's data at *at. */
static mqr_str out_copy(char **at, mqr_str s)
{
    mqr_str r = {*at, s.len};

    if (s.len)
        memcpy(*at, s.ptr, s.len);
    *at += s.len;
    return r;
}

/* An entry with copies of what the message in hand lends (valid only until
 * the next mqr_conn_wait). */
static struct out *out_new(enum out_kind kind, uint64_t tag, mqr_str rk,
                           mqr_str reply_to, const mqr_props *p, mqr_str body)
{
    size_t n = rk.len + reply_to.len + p->correlation_id.len +
               p->reply_to.len + p->type.len + p->app_id.len +
               p->expiration.len + body.len;
    struct out *o = calloc(1, sizeof *o + n + 1);
    char *at;

    if (!o)
        return NULL;
    at = o->data;
    o->kind = kind;
    o->tag = tag;
    o->props = *p;
    o->rk = out_copy(&at, rk);
    o->reply_to = out_copy(&at, reply_to);
    o->props.correlation_id = out_copy(&at, p->correlation_id);
    o->props.reply_to = out_copy(&at, p->reply_to);
    o->props.type = out_copy(&at, p->type);
    o->props.app_id = out_copy(&at, p->app_id);
    o->props.expiration = out_copy(&at, p->expiration);
    o->body = out_copy(&at, body);
    return o;
}

/* Acknowledges a delivery that is done with. Inside a batch, and when no
 * other delivery waits for a publish, the acknowledgement waits for
 * flush_batch; otherwise it goes now. */
static mqrpc_err done_with(mqrpc_service *s, uint64_t tag)
{
    if (s->batch_open && !acks_waiting(s)) {
        s->batch_tag = tag;
        return MQRPC_OK;
    }
    return mqr_conn_ack(s->conn, tag, false);
}

static mqr_props reply_props(const mqrpc_service *s, mqr_str correlation_id,
                             bool persistent, bool is_error)
{
    mqr_props props = {0};

    props.correlation_id = correlation_id;
    props.app_id = mqr_cstr(s->instance);
    /* A caller that made its request survive a broker restart wants the
     * reply to survive it too. */
    props.persistent = persistent;
    if (is_error)
        props.type = mqr_cstr("error");
    return props;
}

/* Publishes held entries, in order, as far as the broker and the socket
 * let us: replies on the main channel (then their delivery is acked),
 * re-publishes on the confirm channel (then they wait for the confirm). */
static mqrpc_err send_held(mqrpc_service *s)
{
    mqrpc_err e = MQRPC_OK;

    while (s->held.head &&
           mqr_conn_can_publish(s->conn, s->held.head->body.len)) {
        struct out *o = out_pop(&s->held);

        if (o->kind == OUT_REPLY) {
            e = mqr_conn_publish(s->conn, o->rk, &o->props, o->body.ptr,
                                 o->body.len, false);
            if (e == MQRPC_OK)
                e = mqr_conn_ack(s->conn, o->tag, false);
            free(o);
        } else {
            e = mqr_conn_publish_confirmed(s->conn, o->rk, &o->props,
                                           o->body.ptr, o->body.len, &o->seq);
            if (e == MQRPC_OK)
                out_push(&s->unconfirmed, o);
            else
                free(o);
        }
        if (e != MQRPC_OK)
            return e;
    }
    return e;
}

/* Queues o behind what is held already, then sends what can go. */
static mqrpc_err submit(mqrpc_service *s, struct out *o)
{
    if (!o)
        return MQRPC_ENOMEM;
    out_push(&s->held, o);
    return send_held(s);
}

/* Sends a reply, or holds it (with its delivery's ack) when it cannot go
 * now or something is held before it. */
static mqrpc_err send_reply(mqrpc_service *s, uint64_t tag,
                            mqr_str correlation_id, mqr_str reply_to,
                            bool persistent, const char *body, size_t len,
                            bool is_error)
{
    mqr_props props = reply_props(s, correlation_id, persistent, is_error);
    mqr_str b = {body, len};
    mqrpc_err e;

    if (!s->held.head && mqr_conn_can_publish(s->conn, len)) {
        e = mqr_conn_publish(s->conn, reply_to, &props, body, len, false);
        if (e != MQRPC_OK)
            return e;
        if (s->batch_open)
            s->corked = true;
        return done_with(s, tag);
    }
    return submit(s, out_new(OUT_REPLY, tag, reply_to, mqr_cstr(""), &props,
                             b));
}

/* Sends the caller of a refused or dead-lettered request an error reply,
 * then acknowledges its delivery. */
static mqrpc_err send_fault(mqrpc_service *s, const struct out *o,
                            const mqrpc_fault *fault)
{
    size_t len;
    char *body = mqr_encode_fault(fault, &len);
    mqrpc_err e;

    if (!body)
        return MQRPC_ENOMEM;
    e = send_reply(s, o->tag, o->props.correlation_id, o->reply_to,
                   o->props.persistent, body, len, true);
    free(body);
    return e;
}

/* The broker confirmed (ack) or refused (nack) the re-publish o. */
static mqrpc_err settle(mqrpc_service *s, const struct out *o, bool ack)
{
    mqr_str id = o->props.correlation_id;
    mqrpc_fault fault;

    switch (o->kind) {
    case OUT_REQUEUE:
        if (ack) {
            s->st.redelivered++;
            if (s->opts.verbose)
                mqr_log(&s->log, MQRPC_LOG_DEBUG,
                        "request %.*s redelivered (%u failed deliveries): "
                        "queued again",
                        shown_len(id), id.ptr, (unsigned)o->props.deliveries);
            return mqr_conn_ack(s->conn, o->tag, false);
        }
        s->st.refused++;
        mqr_log(&s->log, MQRPC_LOG_WARN,
                "request %.*s redelivered, but the broker refused to queue "
                "it again (%s full?): answered overloaded",
                shown_len(id), id.ptr, s->queue);
        mqrpc_fault_set(&fault, OVERLOADED,
                        "the request was redelivered after its instance "
                        "died and %s refused to take it back (full)",
                        s->queue);
        return send_fault(s, o, &fault);
    case OUT_DEAD_LETTER:
        if (ack) {
            s->st.dead_lettered++;
            mqr_log(&s->log, MQRPC_LOG_WARN,
                    "request %.*s dead-lettered to %s after %u deliveries",
                    shown_len(id), id.ptr, s->dlq,
                    (unsigned)o->props.deliveries);
            mqrpc_fault_set(&fault, MQRPC_DEAD_LETTER,
                            "the request was delivered %u times and never "
                            "answered (the instances that took it died); it "
                            "is in %s and will not be run again",
                            (unsigned)o->props.deliveries, s->dlq);
        } else {
            s->st.refused++;
            mqr_log(&s->log, MQRPC_LOG_WARN,
                    "request %.*s failed %u deliveries, and the broker "
                    "refused it in %s: dropped, its caller told",
                    shown_len(id), id.ptr, (unsigned)o->props.deliveries,
                    s->dlq);
            mqrpc_fault_set(&fault, MQRPC_DEAD_LETTER,
                            "the request was delivered %u times and never "
                            "answered (the instances that took it died); it "
                            "could not be kept (%s refused it) and will not "
                            "be run again",
                            (unsigned)o->props.deliveries, s->dlq);
        }
        return send_fault(s, o, &fault);
    case OUT_HAND_BACK:
        if (ack) {
            s->st.handed_back++;
            return mqr_conn_ack(s->conn, o->tag, false);
        }
        /* Left unacknowledged: closing the channel puts it back, where it
         * counts one failed delivery. */
        mqr_log(&s->log, MQRPC_LOG_WARN,
                "request %.*s: the broker refused to take it back; it "
                "returns as a redelivery",
                shown_len(id), id.ptr);
        return MQRPC_OK;
    case OUT_REPLY: break;
    }
    return MQRPC_OK;
}

/* A publisher confirm from the confirm channel: settles the re-publishes it
 * covers. Confirms of different queues may come out of order. */
static mqrpc_err on_confirm(mqrpc_service *s, const mqr_msg *m)
{
    struct out **pp = &s->unconfirmed.head, *prev = NULL;
    mqrpc_err e = MQRPC_OK;

    while (*pp && e == MQRPC_OK) {
        struct out *o = *pp;
        if (o->seq == m->delivery_tag ||
            (m->multiple && o->seq < m->delivery_tag)) {
            *pp = o->next;
            if (s->unconfirmed.tail == o)
                s->unconfirmed.tail = prev;
            s->unconfirmed.n--;
            e = settle(s, o, m->kind == MQR_ACK);
            free(o);
        } else {
            prev = o;
            pp = &o->next;
        }
    }
    return e;
}

/* ------------------------------------------------------------- requests */

/* A redelivered request goes back to the tail of the queue with its count
 * of failed deliveries, or into the dead-letter queue once it reached
 * max_deliveries; its delivery is acknowledged once the broker confirmed
 * the copy. Otherwise it is a stop's hand-back of an unstarted delivery:
 * re-published unchanged (a redelivered one counts as it would have). */
static mqrpc_err republish(mqrpc_service *s, const mqr_msg *m)
{
    mqr_props props = {0};
    uint32_t failed = m->deliveries;
    enum out_kind kind = OUT_HAND_BACK;
    char expiration[24];

    if (m->redelivered)
        kind = mqr_redelivery_decide(m->deliveries, s->opts.max_deliveries,
                                     &failed)
                   ? OUT_DEAD_LETTER
                   : OUT_REQUEUE;
    props.correlation_id = m->correlation_id;
    props.reply_to = m->reply_to;
    props.persistent = m->persistent;
    props.deadline_ms = m->deadline_ms;
    props.deliveries = failed;
    if (kind != OUT_DEAD_LETTER && m->deadline_ms) {
        /* The broker's expiration restarts with the copy: give it what is
         * left of the caller's time. */
        int64_t left = m->deadline_ms - mqr_wall_ms();
        snprintf(expiration, sizeof expiration, "%" PRId64,
                 left > 0 ? left : 1);
        props.expiration = mqr_cstr(expiration);
    }
    return submit(s, out_new(kind, m->delivery_tag,
                             mqr_cstr(kind == OUT_DEAD_LETTER ? s->dlq
                                                              : s->queue),
                             m->reply_to, &props, m->body));
}

/* Handles one delivery; run false (a stop) hands back the requests it
 * would have run. */
static mqrpc_err serve_one(mqrpc_service *s, const mqr_msg *m, bool run)
{
    size_t len = 0;
    bool is_error;
    char *body;
    mqrpc_err e;

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
        return done_with(s, m->delivery_tag);
    }
    if (m->deadline_ms && mqr_wall_ms() >= m->deadline_ms) {
        /* Its caller gave up: running it would be wasted work. */
        s->st.expired++;
        if (s->opts.verbose)
            mqr_log(&s->log, MQRPC_LOG_DEBUG,
                    "request %.*s skipped: past its deadline",
                    shown_len(m->correlation_id), m->correlation_id.ptr);
        return done_with(s, m->delivery_tag);
    }
    if (m->redelivered || !run)
        return republish(s, m);
    /* Replies already computed in this batch leave before a handler that
     * may take long; only the multiple ack stays deferred. */
    if (s->corked) {
        mqr_conn_cork(s->conn, false);
        mqr_conn_cork(s->conn, true);
        s->corked = false;
    }
    body = answer(s, m, &len, &is_error);
    if (!body)
        return MQRPC_ENOMEM; /* the delivery stays unacked: redelivered */
    s->st.served++;
    if (s->opts.verbose)
        mqr_log(&s->log, MQRPC_LOG_DEBUG, "answered %.*s",
                shown_len(m->correlation_id), m->correlation_id.ptr);
    e = send_reply(s, m->delivery_tag, m->correlation_id, m->reply_to,
                   m->persistent, body, len, is_error);
    free(body);
    return e;
}

/* Deliveries arrive in order on one channel, and each was answered before
 * the next was read: one multiple ack covers the whole batch (done_with
 * keeps deliveries that wait for a publish out of batches). */
static mqrpc_err flush_batch(mqrpc_service *s)
{
    mqrpc_err e = MQRPC_OK;

    if (s->batch_tag)
        e = mqr_conn_ack(s->conn, s->batch_tag, true);
    mqr_conn_cork(s->conn, false);
    s->batch_tag = 0;
    s->batch_open = false;
    s->corked = false;
    return e;
}

/* With prefetch above 1, requests that are already read behind the current
 * one are answered as a batch: their acknowledgements leave as one multiple
 * ack when nothing more is buffered (so no request waits for data that has
 * not arrived) or after BATCH_MAX_US, and the replies leave together unless
 * a handler is about to run (serve_one uncorks them first). The broker then
 * handles one ack and one read per batch instead of one per request. */
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

/* The broker cancelled our consumer: its queue was deleted (by a person,
 * or a policy). Declare it again and consume on the same connection; if
 * that fails, the connection is given up and reconnect() retries with its
 * backoff (it declares and consumes too). */
static mqrpc_err consume_again(mqrpc_service *s)
{
    int64_t t0 = mqr_now_us();
    mqrpc_err e;

    s->st.cancelled++;
    mqr_log(&s->log, MQRPC_LOG_WARN,
            "the broker cancelled the consumer of %s (queue deleted?); "
            "declaring it again",
            s->queue);
    e = declare_and_consume(s);
    if (e != MQRPC_OK) {
        mqr_conn_abort(s->conn, s->err);
        return MQRPC_ECLOSED;
    }
    mqr_log(&s->log, MQRPC_LOG_INFO, "consuming %s again after %.1f ms",
            s->queue, (double)(mqr_now_us() - t0) / 1e3);
    return MQRPC_OK;
}

/* Messages other than deliveries, in serve() and when stopping. */
static mqrpc_err on_event(mqrpc_service *s, const mqr_msg *m)
{
    switch (m->kind) {
    case MQR_ACK:
    case MQR_NACK:
        if (m->channel == MQR_CONFIRM_CHANNEL)
            return on_confirm(s, m);
        return MQRPC_OK;
    case MQR_BLOCKED:
        s->st.blocked++;
        s->blocked_us = mqr_now_us();
        mqr_log(&s->log, MQRPC_LOG_WARN,
                "the broker is blocking publishers: %.*s; replies wait "
                "until it stops",
                (int)m->reply_text.len, m->reply_text.ptr);
        return MQRPC_OK;
    case MQR_UNBLOCKED:
        mqr_log(&s->log, MQRPC_LOG_INFO,
                "the broker no longer blocks publishers (after %.1f s); "
                "sending %u held replies",
                s->blocked_us ? (double)(mqr_now_us() - s->blocked_us) / 1e6
                              : 0.0,
                s->held.n);
        s->blocked_us = 0;
        return send_held(s);
    case MQR_CANCEL: return consume_again(s);
    default: return MQRPC_OK;
    }
}

/* How long serve() may sleep in mqr_conn_wait. */
static int wait_ms(const mqrpc_service *s)
{
    if (s->batch_open)
        return 0; /* an open batch is flushed as soon as the input runs dry */
    if (s->held.head && !mqr_conn_blocked(s->conn))
        return HELD_RETRY_MS; /* the socket was full: try again soon */
    return STOP_CHECK_MS;
}

/* Serves until stopped (MQRPC_OK) or the connection fails. */
static mqrpc_err serve(mqrpc_service *s)
{
    mqr_msg m;
    mqrpc_err e;

    while (!atomic_load(&s->stop)) {
        e = mqr_conn_wait(s->conn, wait_ms(s), &m);
        if (e == MQRPC_ETIMEOUT) {
            e = s->batch_open ? flush_batch(s) : MQRPC_OK;
        } else if (e == MQRPC_OK && m.kind == MQR_DELIVERY) {
            maybe_open_batch(s);
            e = serve_one(s, &m, true);
            if (e == MQRPC_OK && batch_due(s))
                e = flush_batch(s);
        } else if (e == MQRPC_OK) {
            e = on_event(s, &m);
        }
        if (e == MQRPC_OK && s->held.head)
            e = send_held(s);
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

/* A clean stop: cancel the consumer, hand back what the broker had sent
 * before the cancel-ok (re-published unchanged, so that it does not count
 * as a failed delivery, and acknowledged once confirmed), send what is
 * held, and wait (bounded) for the outstanding confirms. Skipped while the
 * broker blocks us: it does not read, so nothing would be answered. */
static void hand_back(mqrpc_service *s)
{
    int64_t end = mqr_now_us() + HAND_BACK_MAX_US;
    mqr_msg m;
    mqrpc_err e;

    if (!s->conn || mqr_conn_blocked(s->conn) ||
        mqr_conn_cancel(s->conn) != MQRPC_OK)
        return;
    while (mqr_now_us() < end) {
        bool busy = acks_waiting(s);
        e = mqr_conn_wait(s->conn, busy ? HELD_RETRY_MS : 0, &m);
        if (e == MQRPC_ETIMEOUT) {
            if (!busy)
                return;
            e = MQRPC_OK;
        } else if (e == MQRPC_OK && m.kind == MQR_DELIVERY) {
            e = serve_one(s, &m, false);
        } else if (e == MQRPC_OK && m.kind != MQR_CANCEL) {
            e = on_event(s, &m);
        }
        if (e == MQRPC_OK && s->held.head)
            e = send_held(s);
        if (e != MQRPC_OK || mqr_conn_blocked(s->conn))
            return;
    }
    mqr_log(&s->log, MQRPC_LOG_WARN,
            "stopping without the broker's confirm for %u re-published "
            "requests; they return as redeliveries",
            s->unconfirmed.n);
}

/* Reopens the connection with exponential backoff until it works or the
 * service is stopped; the first attempt is immediate, since a killed
 * connection (not a dead broker) is the common case. The first failure is
 * logged, then only a failure for another reason. */
static mqrpc_err reconnect(mqrpc_service *s)
{
    int64_t t0 = mqr_now_us();
    int delay = s->opts.reconnect_min_ms;
    unsigned attempts = 0;
    char said[sizeof s->err] = "";
    mqrpc_err e;

    while (!atomic_load(&s->stop)) {
        attempts++;
        e = connect_once(s);
        if (e == MQRPC_OK) {
            s->st.reconnects++;
            mqr_log(&s->log, MQRPC_LOG_INFO,
                    "connection regained after %.1f s (%u attempt%s); "
                    "consuming %s again",
                    (double)(mqr_now_us() - t0) / 1e6, attempts,
                    attempts == 1 ? "" : "s", s->queue);
            return MQRPC_OK;
        }
        if (e == MQRPC_ENOMEM)
            return e;
        if (strcmp(said, s->err) != 0) {
            mqr_log(&s->log, MQRPC_LOG_WARN,
                    "reconnection attempt %u failed: %s; retrying", attempts,
                    s->err);
            snprintf(said, sizeof said, "%s", s->err);
        } else if (s->opts.verbose) {
            mqr_log(&s->log, MQRPC_LOG_DEBUG,
                    "reconnection attempt %u failed: %s", attempts, s->err);
        }
        nap(s, mqr_jitter(&s->rng, delay));
        delay = mqr_backoff_next(delay, s->opts.reconnect_max_ms);
    }
    return MQRPC_OK;
}

/* Forgets the connection and what waited on it: the deliveries behind
 * held and unconfirmed publishes come back as redeliveries. */
static void drop_conn(mqrpc_service *s)
{
    mqr_conn_free(s->conn);
    s->conn = NULL;
    s->batch_open = false;
    s->corked = false;
    s->batch_tag = 0;
    s->blocked_us = 0;
    out_clear(&s->held);
    out_clear(&s->unconfirmed);
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
        drop_conn(s);
        if (e == MQRPC_ENOMEM || s->opts.reconnect_max_ms < 0)
            return e;
        s->st.lost++;
        mqr_log(&s->log, MQRPC_LOG_WARN, "connection lost: %s; reconnecting",
                s->err);
        e = reconnect(s);
        if (e != MQRPC_OK)
            return e;
    }
    hand_back(s);
    /* Closing the channel returns what is still unacknowledged. */
    drop_conn(s);
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
    drop_conn(s);
    free(s->queue);
    mqr_conn_cfg_clear(&s->cfg);
    free(s);
}
