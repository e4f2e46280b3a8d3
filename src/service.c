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
 * are acknowledged after them (outbox.c).
 *
 * This file is the connection thread; handlers run on threads of their own
 * (request.c; service.h tells how they meet).
 */
#include "service.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* How often the connection thread looks at the stop flag while idle; a
 * stop also wakes it through the eventfd, this is the safety net. */
#define STOP_CHECK_MS 200

/* How often held publishes are retried while the socket's send buffer,
 * not the broker, holds them back. */
#define HELD_RETRY_MS 10

/* The longest a clean stop waits for the broker to confirm the hand-back
 * of unstarted deliveries (and other re-publishes still unconfirmed). */
#define HAND_BACK_MAX_US 5000000

/* Acknowledgements gathered before they are flushed anyway. */
#define ACKS_MAX 256

/* The dead-letter queue's name is the queue's plus this. */
#define DLQ_SUFFIX ".dlq"
#define QUEUE_MAX (255 - (sizeof DLQ_SUFFIX - 1))

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

static void run_handler(mqrpc_request *r, void *arg);

static mqrpc_service *service_new(const mqrpc_service_opts *opts,
                                  mqrpc_handler_fn handler,
                                  mqrpc_request_fn fn, void *arg)
{
    mqrpc_service *s;
    mqr_conn_params p = {0};

    if (!opts || !opts->queue || !*opts->queue ||
        strlen(opts->queue) > QUEUE_MAX || (!handler && !fn)) {
        errno = EINVAL;
        return NULL;
    }
    s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->wake_fd = -1;
    if (!mqr_opts_copy(&s->opts, sizeof s->opts, opts)) {
        free(s);
        return NULL;
    }
    if (s->opts.queue_type > MQRPC_QUEUE_QUORUM) {
        free(s);
        errno = EINVAL;
        return NULL;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->conn_lock, NULL);
    {
        /* The lone handler thread's stand-by wait is timed: monotonic. */
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&s->work, &ca);
        pthread_condattr_destroy(&ca);
    }
    pthread_cond_init(&s->handback, NULL);
    if (s->opts.instance_id && *s->opts.instance_id)
        snprintf(s->instance, sizeof s->instance, "%s", s->opts.instance_id);
    else
        mqrpc_instance_id(opts->queue, s->instance, sizeof s->instance);
    cut_short_string(s->instance);
    s->started_us = mqr_now_us();
    if (gethostname(s->host, sizeof s->host) != 0)
        snprintf(s->host, sizeof s->host, "unknown");
    s->host[sizeof s->host - 1] = '\0';
    p.url = s->opts.url;
    p.url_file = s->opts.url_file;
    p.name = s->instance;
    p.role = MQRPC_ROLE_SERVICE;
    p.heartbeat_s = s->opts.heartbeat_s;
    p.connect_timeout_ms = s->opts.connect_timeout_ms;
    p.tls = s->opts.tls;
    p.addrs = &s->addrs;
    s->queue = strdup(opts->queue);
    s->wake_fd = mqr_wake_open();
    if (!s->queue || s->wake_fd < 0 || !mqr_conn_cfg_init(&s->cfg, &p)) {
        mqrpc_service_free(s);
        errno = ENOMEM;
        return NULL;
    }
    s->opts.queue = s->queue;
    snprintf(s->dlq, sizeof s->dlq, "%s" DLQ_SUFFIX, s->queue);
    s->opts.url = s->opts.url_file = NULL;
    memset(&s->opts.tls, 0, sizeof s->opts.tls);
    s->opts.instance_id = NULL;
    if (s->opts.threads == 0)
        s->opts.threads = 1;
    if (s->opts.threads > 1024)
        s->opts.threads = 1024;
    if (s->opts.prefetch == 0)
        s->opts.prefetch = s->opts.threads;
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
    /* Its own order of the URL list: instances spread over a cluster. */
    s->addrs.seed = (s->rng * 0x9E3779B97F4A7C15ull) | 1;
    s->log.fn = s->opts.log;
    s->log.record_fn = s->opts.log_record;
    s->log.arg = s->opts.log_arg;
    s->log.name = s->instance;
    s->handler = handler;
    s->fn = handler ? run_handler : fn;
    s->arg = arg;
    atomic_init(&s->stop, 0);
    atomic_init(&s->stopping, false);
    snprintf(s->err, sizeof s->err, "not connected");
    return s;
}

mqrpc_service *mqrpc_service_new(const mqrpc_service_opts *opts,
                                 mqrpc_handler_fn handler, void *arg)
{
    return service_new(opts, handler, NULL, arg);
}

mqrpc_service *mqrpc_service_new_async(const mqrpc_service_opts *opts,
                                       mqrpc_request_fn fn, void *arg)
{
    return service_new(opts, NULL, fn, arg);
}

/* A pure handler, as a request function that answers before returning. */
static void run_handler(mqrpc_request *r, void *arg)
{
    mqrpc_service *s = r->s;
    mqrpc_fault fault = {{0}, {0}};
    json_t *result;

    (void)arg;
    result = s->handler(mqrpc_request_params(r), &fault, s->arg);
    if (result)
        mqrpc_request_reply(r, result);
    else if (fault.code[0])
        mqrpc_request_fail(r, fault.code, "%s", fault.message);
    else
        mqrpc_request_reply(r, NULL);
}

/* Declares the queue and its dead-letter queue and consumes the queue:
 * after connecting, and again after the broker cancelled the consumer. */
static mqrpc_err declare_and_consume(mqrpc_service *s)
{
    bool quorum = s->opts.queue_type == MQRPC_QUEUE_QUORUM;
    mqr_queue_opts q = {.durable = s->opts.durable,
                        .max_length = s->opts.max_queue,
                        .quorum = quorum,
                        /* The backstop: should the instance that moves a
                         * poison request to the dead-letter queue itself
                         * (mqr_republish) die as well, the broker does it
                         * at the next return. */
                        .delivery_limit = quorum ? s->opts.max_deliveries : 0,
                        .dead_letter_to = quorum ? s->dlq : NULL};
    /* Dead letters are kept for a person to look at: always durable. With
     * a quorum queue a quorum one too: a classic queue lives on one node,
     * and while that node is down no instance could declare it again, so
     * none could consume (broker.cluster: no answers until it was back). */
    mqr_queue_opts dq = {.durable = true, .quorum = quorum};
    mqrpc_err e;

    e = mqr_conn_declare_queue(s->conn, s->queue, &q, NULL);
    if (e == MQRPC_EINVAL) {
        snprintf(s->err, sizeof s->err,
                 "queue %s exists with other settings (%s); every instance "
                 "must use the same --durable, --max-queue and --queue-type "
                 "(and --max-deliveries for a quorum queue; delete the "
                 "queue to change them)",
                 s->queue, mqr_conn_errmsg(s->conn));
        return e;
    }
    /* Before consuming: a quorum queue's broker dead-letters into it. */
    if (e == MQRPC_OK)
        e = mqr_conn_declare_queue(s->conn, s->dlq, &dq, NULL);
    if (e == MQRPC_OK)
        e = mqr_conn_consume(s->conn, s->queue, false);
    if (e != MQRPC_OK)
        snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
    return e;
}

/* Tells the program (mqrpc_service_opts.event). */
static void notify(mqrpc_service *s, mqrpc_service_event ev, const char *detail)
{
    if (s->opts.event)
        s->opts.event(s, ev, detail, s->opts.event_arg);
}

/* How long until a tick is due, at most cap ms. */
static int until_tick_ms(const mqrpc_service *s, int cap)
{
    int64_t left;

    if (s->opts.tick_ms <= 0 || !s->opts.event)
        return cap;
    left = (s->next_tick_us - mqr_now_us() + 999) / 1000;
    return left <= 0 ? 0 : left < cap ? (int)left : cap;
}

/* A tick, when one is due: called from every loop of the connection
 * thread, so that a loop that hangs stops them (a supervisor's watchdog). */
static void tick(mqrpc_service *s)
{
    int64_t now;

    if (s->opts.tick_ms <= 0 || !s->opts.event)
        return;
    now = mqr_now_us();
    if (now < s->next_tick_us)
        return;
    s->next_tick_us = now + (int64_t)s->opts.tick_ms * 1000;
    notify(s, MQRPC_SERVICE_TICK, NULL);
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
    if (e == MQRPC_OK)
        e = mqr_control_start(s);
    if (e != MQRPC_OK) {
        mqr_conn_free(s->conn);
        s->conn = NULL;
        return e;
    }
    mqr_conn_set_wake_fd(s->conn, s->wake_fd);
    mqr_addrs_connected(&s->addrs);
    s->gen++;
    s->err[0] = '\0';
    s->blocked_us = 0;
    MQR_STAT_SET(s->st.is_blocked, 0);
    MQR_STAT_SET(s->st.connected, 1);
    notify(s, MQRPC_SERVICE_CONSUMING, s->queue);
    return MQRPC_OK;
}

/* Sleeps ms, waking early when stopped, ticking meanwhile. */
static void nap(mqrpc_service *s, int ms)
{
    while (ms > 0 && !atomic_load(&s->stop)) {
        int step = until_tick_ms(s, ms < STOP_CHECK_MS ? ms : STOP_CHECK_MS);
        struct timespec ts = {0, step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
        tick(s);
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

/* One attempt at every address of the list, in this instance's order,
 * until one connects. On failure s->err says what each address said. */
static mqrpc_err connect_round(mqrpc_service *s, unsigned *attempts)
{
    char all[sizeof s->err] = "";
    mqrpc_err e;

    for (;;) {
        ++*attempts;
        e = connect_once(s);
        if (e == MQRPC_OK || !transient(e))
            return e;
        if (s->addrs.count > 1)
            mqr_append(all, sizeof all, "; ", s->err);
        if (mqr_addrs_failed(&s->addrs))
            break;
    }
    if (all[0])
        snprintf(s->err, sizeof s->err, "%s", all);
    return e;
}

mqrpc_err mqrpc_service_connect(mqrpc_service *s)
{
    int64_t t0 = mqr_now_us(), left_us;
    int delay = s->opts.reconnect_min_ms, wait;
    unsigned attempts = 0, rounds = 0;
    mqrpc_err e;

    if (s->conn)
        return MQRPC_ESTATE;
    for (;;) {
        rounds++;
        e = connect_round(s, &attempts);
        if (e == MQRPC_OK) {
            if (attempts > 1)
                mqr_log(&s->log, MQRPC_LOG_INFO,
                        "connected after %.1f s (%u attempts), to %s",
                        (double)(mqr_now_us() - t0) / 1e6, attempts,
                        s->addrs.current);
            else if (s->addrs.count > 1)
                mqr_log(&s->log, MQRPC_LOG_INFO, "connected to %s",
                        s->addrs.current);
            return MQRPC_OK;
        }
        if (!transient(e) || s->opts.connect_retry_ms == 0)
            return e;
        /* Said once: a supervisor's log should not fill up while the
         * broker is down. */
        if (rounds == 1) {
            notify(s, MQRPC_SERVICE_DISCONNECTED, s->err);
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

int mqr_service_shown_len(mqr_str s)
{
    return (int)(s.len > 64 ? 64 : s.len);
}

/* --------------------------------------------------------- acknowledging */

/* Acknowledges the gathered deliveries: one multiple ack when no earlier
 * delivery is still unacknowledged (none in hand below the highest, none
 * waiting for a publish), else one by one. */
static mqrpc_err flush_acks(mqrpc_service *s)
{
    uint64_t max = 0;
    mqrpc_err e = MQRPC_OK;
    unsigned i;

    if (!s->nacks)
        return MQRPC_OK;
    for (i = 0; i < s->nacks; i++)
        if (s->acks[i] > max)
            max = s->acks[i];
    if (s->nacks == 1)
        e = mqr_conn_ack(s->conn, max, false);
    else if (!mqr_acks_waiting(s) &&
             (!s->in_hand_head || s->in_hand_head->tag > max))
        e = mqr_conn_ack(s->conn, max, true);
    else
        for (i = 0; i < s->nacks && e == MQRPC_OK; i++)
            e = mqr_conn_ack(s->conn, s->acks[i], false);
    s->nacks = 0;
    return e;
}

mqrpc_err mqr_service_done_with(mqrpc_service *s, uint64_t tag)
{
    if (mqr_acks_waiting(s))
        return mqr_conn_ack(s->conn, tag, false);
    if (s->nacks == s->acks_cap) {
        unsigned cap = s->acks_cap ? s->acks_cap * 2 : 64;
        uint64_t *a = realloc(s->acks, cap * sizeof *a);
        if (!a)
            return mqr_conn_ack(s->conn, tag, false);
        s->acks = a;
        s->acks_cap = cap;
    }
    s->acks[s->nacks++] = tag;
    return s->nacks >= ACKS_MAX ? flush_acks(s) : MQRPC_OK;
}

/* ------------------------------------------------------------- requests */

static void in_hand_append(mqrpc_service *s, mqrpc_request *r)
{
    r->inext = NULL;
    r->iprev = s->in_hand_tail;
    if (s->in_hand_tail)
        s->in_hand_tail->inext = r;
    else
        s->in_hand_head = r;
    s->in_hand_tail = r;
    r->in_hand = true;
}

static void in_hand_unlink(mqrpc_service *s, mqrpc_request *r)
{
    if (!r->in_hand)
        return;
    if (r->iprev)
        r->iprev->inext = r->inext;
    else
        s->in_hand_head = r->inext;
    if (r->inext)
        r->inext->iprev = r->iprev;
    else
        s->in_hand_tail = r->iprev;
    r->iprev = r->inext = NULL;
    r->in_hand = false;
}

/* Forgets a request that will not be answered here. */
static void drop_request(mqrpc_service *s, mqrpc_request *r)
{
    in_hand_unlink(s, r);
    s->outstanding--;
    MQR_STAT_SET(s->st.in_progress, s->outstanding);
    mqr_request_free(r);
}

/* The delivery a request came from, to re-publish it. */
static mqr_msg msg_of(const mqrpc_request *r)
{
    mqr_msg m = {0};

    m.kind = MQR_DELIVERY;
    m.delivery_tag = r->tag;
    m.body = r->body;
    m.correlation_id = r->correlation_id;
    m.reply_to = r->reply_to;
    m.persistent = r->persistent;
    m.deadline_ms = r->deadline_ms;
    m.deliveries = r->deliveries;
    m.progress = r->want_progress;
    m.traceparent = r->traceparent;
    m.tracestate = r->tracestate;
    return m;
}

/* Takes back the requests no handler started: on the current connection
 * they are handed back (re-published unchanged); otherwise their
 * deliveries return by themselves. */
static mqrpc_err take_back_unstarted(mqrpc_service *s, bool hand_back)
{
    mqrpc_request *r = mqr_workers_take_unstarted(s), *next;
    mqrpc_err e = MQRPC_OK;

    for (; r; r = next) {
        next = r->next;
        if (hand_back && e == MQRPC_OK && r->gen == s->gen && s->conn) {
            mqr_msg m = msg_of(r);
            e = mqr_republish(s, &m, &r->trace);
        }
        drop_request(s, r);
    }
    return e;
}

static mqrpc_err drain_done(mqrpc_service *s);

/* Runs r's handler on the connection thread, lending the connection to
 * the idle handler thread meanwhile (it takes it only if the handler runs
 * long), then takes it back and sends the answer. */
static mqrpc_err run_inline(mqrpc_service *s, mqrpc_request *r)
{
    mqrpc_err e;

    pthread_mutex_unlock(&s->conn_lock);
    mqr_run_request(s, r);
    pthread_mutex_lock(&s->lock);
    s->inline_since_us = 0;
    if (s->taken_over) {
        /* The stand-in may sleep in mqr_conn_wait: make it look. */
        mqr_wake_signal(s->wake_fd);
        while (s->taken_over)
            pthread_cond_wait(&s->handback, &s->lock);
    }
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_lock(&s->conn_lock);
    e = s->lent_err;
    s->lent_err = MQRPC_OK;
    return e != MQRPC_OK ? e : drain_done(s);
}

static mqrpc_err start_request(mqrpc_service *s, const mqr_msg *m,
                               const mqr_trace *trace);

/* Handles one delivery: skipped, re-published, run inline, or queued for a
 * handler thread. */
static mqrpc_err on_delivery(mqrpc_service *s, const mqr_msg *m)
{
    mqr_trace trace;
    mqr_req_fields f;
    char cid[65];

    if (m->channel == MQR_CONTROL_CHANNEL)
        return mqr_control_on_ping(s, m);
    /* Every delivery is a span of ours, so that each line about it names
     * its trace, even when it is never run here. */
    mqr_trace_start(&trace, m->traceparent);
    snprintf(cid, sizeof cid, "%.*s", mqr_service_shown_len(m->correlation_id),
             m->correlation_id.ptr ? m->correlation_id.ptr : "");
    f = (mqr_req_fields){.queue = s->queue,
                         .correlation_id = cid,
                         .trace_id = trace.trace_id,
                         .span_id = trace.span_id,
                         .duration_ms = -1};
    if (m->reply_to.len == 0 || m->correlation_id.len == 0) {
        /* Nobody could match an answer: acknowledge so it does not come
         * back forever. */
        MQR_STAT_ADD(s->st.dropped, 1);
        mqr_log_req(&s->log, MQRPC_LOG_WARN, &f,
                    "request without %s (correlation_id \"%s\"): "
                    "acknowledged and dropped",
                    m->reply_to.len == 0 ? "reply_to" : "correlation_id",
                    cid);
        return mqr_service_done_with(s, m->delivery_tag);
    }
    if (m->deadline_ms && mqr_wall_ms() >= m->deadline_ms) {
        /* Its caller gave up: running it would be wasted work. */
        MQR_STAT_ADD(s->st.expired, 1);
        if (s->opts.verbose)
            mqr_log_req(&s->log, MQRPC_LOG_DEBUG, &f,
                        "request %s skipped: past its deadline", cid);
        return mqr_service_done_with(s, m->delivery_tag);
    }
    if (s->opts.queue_type == MQRPC_QUEUE_QUORUM) {
        /* The broker counts the deliveries that came back: a redelivered
         * request runs again at once, unless it is a poison one. Its
         * failed deliveries: the broker's count of this copy plus what a
         * hand-back carried over from an earlier copy in our header. */
        mqr_msg q = *m;
        uint64_t failed = (uint64_t)m->deliveries + m->delivery_count;
        q.deliveries = failed > UINT32_MAX ? UINT32_MAX : (uint32_t)failed;
        q.delivery_count = 0;
        if (q.deliveries >= s->opts.max_deliveries ||
            atomic_load(&s->stopping))
            return mqr_republish(s, &q, &trace);
        return start_request(s, &q, &trace);
    }
    if (m->redelivered || atomic_load(&s->stopping))
        return mqr_republish(s, m, &trace);
    return start_request(s, m, &trace);
}

/* Makes m a request and runs it inline or queues it for a handler
 * thread. */
static mqrpc_err start_request(mqrpc_service *s, const mqr_msg *m,
                               const mqr_trace *trace)
{
    mqrpc_request *r;

    r = mqr_request_new(s, m, trace);
    if (!r)
        return MQRPC_ENOMEM; /* the delivery stays unacked: redelivered */
    in_hand_append(s, r);
    s->outstanding++;
    MQR_STAT_SET(s->st.in_progress, s->outstanding);
    if (s->opts.threads == 1 && pthread_equal(pthread_self(), s->conn_thread)) {
        bool idle;
        pthread_mutex_lock(&s->lock);
        idle = !s->jobs_head && !s->busy && !s->taken_over;
        if (idle)
            s->inline_since_us = mqr_now_us();
        pthread_mutex_unlock(&s->lock);
        if (idle)
            return run_inline(s, r);
    }
    mqr_workers_submit(s, r);
    return MQRPC_OK;
}

/* The caller of r gave up: its deadline passed, or a progress message came
 * back unroutable (its reply queue is gone). */
static bool caller_gone(const mqrpc_request *r)
{
    return atomic_load(&r->gone) ||
           (r->deadline_ms && mqr_wall_ms() >= r->deadline_ms);
}

/* A progress message: advisory, so it is dropped rather than held when it
 * cannot go at once. Mandatory, so that the broker returns it when the
 * caller's reply queue is gone. */
static mqrpc_err send_progress(mqrpc_service *s, mqrpc_request *r,
                               double percent, const char *text)
{
    mqr_props props = {0};
    json_t *j;
    char *body;
    mqrpc_err e;

    if (r->gen != s->gen || caller_gone(r) || s->held.head ||
        !mqr_conn_can_publish(s->conn, 512))
        return MQRPC_OK;
    j = *text ? json_pack("{s:f, s:s}", "percent", percent, "text", text)
              : json_pack("{s:f}", "percent", percent);
    body = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!body)
        return MQRPC_OK; /* out of memory: progress is the first to go */
    props.correlation_id = r->correlation_id;
    props.app_id = mqr_cstr(s->instance);
    props.progress = true;
    props.traceparent = mqr_cstr(r->trace.traceparent);
    e = mqr_conn_publish(s->conn, r->reply_to, &props, body, strlen(body),
                         true);
    free(body);
    if (e == MQRPC_OK)
        MQR_STAT_ADD(s->st.progress, 1);
    return e;
}

/* Sends r's answer (unless its caller gave up) and forgets r. A request of
 * an earlier connection is still answered, without an acknowledgement: its
 * delivery came back to the queue, and its caller drops a second answer. */
static mqrpc_err finish_request(mqrpc_service *s, mqrpc_request *r)
{
    bool current = r->gen == s->gen;
    mqrpc_err e = MQRPC_OK;
    mqr_req_fields f;

    if (s->opts.verbose) {
        mqr_request_fields(r, &f);
        f.code = r->code[0] ? r->code : NULL;
        f.duration_ms = (double)(mqr_now_us() - r->start_us) / 1e3;
    }
    if (r->skipped || caller_gone(r)) {
        if (r->skipped)
            MQR_STAT_ADD(s->st.expired, 1);
        else
            MQR_STAT_ADD(s->st.abandoned, 1);
        if (s->opts.verbose)
            mqr_log_req(&s->log, MQRPC_LOG_DEBUG, &f, "request %.*s%s",
                        mqr_service_shown_len(r->correlation_id),
                        r->correlation_id.ptr,
                        r->skipped ? " skipped: past its deadline"
                                   : ": reply not sent, its caller gave up");
        if (current)
            e = mqr_service_done_with(s, r->tag);
    } else {
        MQR_STAT_ADD(s->st.served, 1);
        MQR_STAT_ADD(s->st.replies[r->reply_is_error ? mqrpc_code_of(r->code)
                                                     : MQRPC_CODE_OK],
                     1);
        {
            int64_t us = mqr_now_us() - r->arrived_us;
            MQR_STAT_ADD(s->st.handling[mqr_duration_bucket(us)], 1);
            MQR_STAT_ADD(s->st.handling_us, us);
        }
        if (s->opts.verbose)
            mqr_log_req(&s->log, MQRPC_LOG_DEBUG, &f,
                        "answered %.*s: %s in %.3f ms",
                        mqr_service_shown_len(r->correlation_id),
                        r->correlation_id.ptr, f.code ? f.code : "?",
                        f.duration_ms);
        e = mqr_send_reply(s, current ? r->tag : 0, r->correlation_id,
                           r->reply_to, r->persistent, r->reply_body,
                           r->reply_len, r->reply_is_error, &r->trace,
                           r->tracestate);
    }
    drop_request(s, r);
    return e;
}

/* What handler threads posted: progress to send, requests ended. Their
 * replies leave together (corked) and are acknowledged together. */
static mqrpc_err drain_done(mqrpc_service *s)
{
    mqrpc_request *r = mqr_take_done(s), *next;
    mqrpc_err e = MQRPC_OK;
    bool cork = r && r->next;
    struct mqr_done d;

    if (cork)
        mqr_conn_cork(s->conn, true);
    for (; r; r = next) {
        next = mqr_done_unqueue(s, r, &d);
        if (e != MQRPC_OK) {
            /* The connection failed: an answer is lost with it (its
             * delivery returns to the queue); progress is dropped. */
            if (d.ended)
                finish_request(s, r);
            continue;
        }
        if (d.ended)
            e = finish_request(s, r);
        else if (d.progress)
            e = send_progress(s, r, d.percent, d.text);
    }
    if (e == MQRPC_OK)
        e = flush_acks(s);
    if (cork)
        mqr_conn_cork(s->conn, false);
    return e;
}

/* A basic.return: a progress message its caller's queue no longer takes. */
static void on_return(mqrpc_service *s, const mqr_msg *m)
{
    for (mqrpc_request *r = s->in_hand_head; r; r = r->inext)
        if (mqr_str_eq(m->correlation_id, r->correlation_id.ptr) &&
            r->correlation_id.len == m->correlation_id.len) {
            atomic_store(&r->gone, true);
            if (s->opts.verbose) {
                mqr_req_fields f;
                mqr_request_fields(r, &f);
                mqr_log_req(&s->log, MQRPC_LOG_DEBUG, &f,
                            "request %.*s: its caller's reply queue is gone "
                            "(%d %.*s); the handler sees it cancelled",
                            mqr_service_shown_len(r->correlation_id),
                            r->correlation_id.ptr, m->reply_code,
                            (int)m->reply_text.len, m->reply_text.ptr);
            }
            return;
        }
}

/* The broker cancelled our consumer: its queue was deleted (by a person,
 * or a policy). Declare it again and consume on the same connection; if
 * that fails, the connection is given up and reconnect() retries with its
 * backoff (it declares and consumes too). */
static mqrpc_err consume_again(mqrpc_service *s)
{
    int64_t t0 = mqr_now_us();
    mqrpc_err e;

    MQR_STAT_ADD(s->st.cancelled, 1);
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
    notify(s, MQRPC_SERVICE_CONSUMING, s->queue);
    return MQRPC_OK;
}

/* Messages other than deliveries. */
static mqrpc_err on_event(mqrpc_service *s, const mqr_msg *m)
{
    switch (m->kind) {
    case MQR_WAKE:
        mqr_wake_drain(s->wake_fd);
        return drain_done(s);
    case MQR_ACK:
    case MQR_NACK:
        if (m->channel == MQR_CONFIRM_CHANNEL)
            return mqr_on_confirm(s, m);
        return MQRPC_OK;
    case MQR_RETURN: on_return(s, m); return MQRPC_OK;
    case MQR_BLOCKED:
        MQR_STAT_ADD(s->st.blocked, 1);
        MQR_STAT_SET(s->st.is_blocked, 1);
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
        MQR_STAT_SET(s->st.is_blocked, 0);
        return mqr_send_held(s);
    case MQR_CANCEL:
        if (m->channel == MQR_CONTROL_CHANNEL)
            return mqr_control_on_cancel(s);
        /* While stopping, the cancel is ours. */
        return atomic_load(&s->stopping) ? MQRPC_OK : consume_again(s);
    default: return MQRPC_OK;
    }
}

/* How long the connection thread may sleep in mqr_conn_wait. */
static int wait_ms(const mqrpc_service *s)
{
    if (s->held.head && !mqr_conn_blocked(s->conn))
        return until_tick_ms(s, HELD_RETRY_MS); /* the socket was full */
    return until_tick_ms(s, STOP_CHECK_MS);
}

/* Waits for one message and handles it. */
static mqrpc_err step(mqrpc_service *s)
{
    mqr_msg m;
    mqrpc_err e = mqr_conn_wait(s->conn, wait_ms(s), &m);

    tick(s);
    if (e == MQRPC_ETIMEOUT)
        e = MQRPC_OK;
    else if (e == MQRPC_OK && m.kind == MQR_DELIVERY)
        e = on_delivery(s, &m);
    else if (e == MQRPC_OK)
        e = on_event(s, &m);
    if (e == MQRPC_OK && s->held.head)
        e = mqr_send_held(s);
    /* Acknowledgements wait while more input is buffered (it may end more
     * requests), not longer. */
    if (e == MQRPC_OK && s->nacks && !mqr_conn_buffered(s->conn))
        e = flush_acks(s);
    return e;
}

/* The broker's consumer_timeout closes the channel of a consumer that held
 * a delivery unacknowledged too long; its message alone does not say what
 * to do about it. */
static bool consumer_timeout(const char *err)
{
    return strstr(err, "PRECONDITION_FAILED") &&
           strstr(err, "delivery acknowledgement") && strstr(err, "timed out");
}

void mqr_service_stand_in(mqrpc_service *s)
{
    mqrpc_err e;
    bool lent = true;

    pthread_mutex_lock(&s->conn_lock);
    /* Posts made before the take-over did not wake anyone. */
    e = s->conn ? drain_done(s) : MQRPC_ECLOSED;
    while (e == MQRPC_OK) {
        pthread_mutex_lock(&s->lock);
        lent = s->inline_since_us != 0;
        pthread_mutex_unlock(&s->lock);
        if (!lent)
            break;
        e = step(s);
    }
    if (e != MQRPC_OK && s->conn)
        snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
    /* The connection thread finds a failure here and reconnects. */
    s->lent_err = e;
    pthread_mutex_unlock(&s->conn_lock);
    pthread_mutex_lock(&s->lock);
    s->taken_over = false;
    pthread_cond_broadcast(&s->handback);
    pthread_mutex_unlock(&s->lock);
}

/* Serves until stopped (MQRPC_OK) or the connection fails. */
static mqrpc_err serve(mqrpc_service *s)
{
    mqrpc_err e;

    while (!atomic_load(&s->stop)) {
        e = step(s);
        if (e != MQRPC_OK) {
            /* Acknowledge what was answered, so only the rest comes back. */
            if (s->nacks)
                flush_acks(s);
            snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
            return e;
        }
    }
    return MQRPC_OK;
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
            MQR_STAT_ADD(s->st.reconnects, 1);
            mqr_log(&s->log, MQRPC_LOG_INFO,
                    "connection regained after %.1f s (%u attempt%s), to "
                    "%s; consuming %s again",
                    (double)(mqr_now_us() - t0) / 1e6, attempts,
                    attempts == 1 ? "" : "s", s->addrs.current, s->queue);
            return MQRPC_OK;
        }
        if (e == MQRPC_ENOMEM)
            return e;
        if (strcmp(said, s->err) != 0) {
            notify(s, MQRPC_SERVICE_DISCONNECTED, s->err);
            mqr_log(&s->log, MQRPC_LOG_WARN,
                    "reconnection attempt %u failed: %s; retrying", attempts,
                    s->err);
            snprintf(said, sizeof said, "%s", s->err);
        } else if (s->opts.verbose) {
            mqr_log(&s->log, MQRPC_LOG_DEBUG,
                    "reconnection attempt %u failed: %s", attempts, s->err);
        }
        /* The next address of the list at once; the backoff once they
         * all failed. */
        if (!mqr_addrs_failed(&s->addrs))
            continue;
        nap(s, mqr_jitter(&s->rng, delay));
        delay = mqr_backoff_next(delay, s->opts.reconnect_max_ms);
    }
    return MQRPC_OK;
}

/* Forgets the connection and what waited on it: the deliveries behind
 * held and unconfirmed publishes, and the requests no handler started, come
 * back as redeliveries. Requests being handled go on; their answers go out
 * on the next connection. */
static void drop_conn(mqrpc_service *s)
{
    mqr_conn_free(s->conn);
    s->conn = NULL;
    s->blocked_us = 0;
    MQR_STAT_SET(s->st.is_blocked, 0);
    MQR_STAT_SET(s->st.connected, 0);
    s->nacks = 0;
    mqr_out_clear(&s->held);
    mqr_out_clear(&s->unconfirmed);
    take_back_unstarted(s, false);
    while (s->in_hand_head)
        in_hand_unlink(s, s->in_hand_head);
}

/* A clean stop: cancel the consumer, hand back what no handler started and
 * what the broker sent before the cancel-ok (re-published unchanged, so it
 * does not count as a failed delivery, and acknowledged once confirmed),
 * tell the requests in hand they are cancelled and wait for each to end
 * and be answered, then wait (bounded) for the outstanding confirms. The
 * hand-back is skipped while the broker blocks us: it does not read. */
static void finish(mqrpc_service *s)
{
    int64_t end = 0;

    atomic_store(&s->stopping, true);
    notify(s, MQRPC_SERVICE_STOPPING, NULL);
    if (s->conn && (mqr_conn_blocked(s->conn) ||
                    mqr_conn_cancel(s->conn) != MQRPC_OK))
        drop_conn(s);
    if (take_back_unstarted(s, s->conn != NULL) != MQRPC_OK)
        drop_conn(s);
    if (s->outstanding)
        mqr_log(&s->log, MQRPC_LOG_INFO,
                "stopping: waiting for %u request%s in hand", s->outstanding,
                s->outstanding == 1 ? "" : "s");
    for (;;) {
        if (!s->conn) {
            /* Without a connection the answers have nowhere to go. */
            mqrpc_request *r = mqr_take_done(s), *next;
            struct mqr_done d;
            for (; r; r = next) {
                next = mqr_done_unqueue(s, r, &d);
                if (d.ended)
                    drop_request(s, r);
            }
            if (!s->outstanding)
                return;
            struct timespec ts = {0, 10 * 1000000L};
            nanosleep(&ts, NULL);
            tick(s);
            continue;
        }
        if (!s->outstanding && !mqr_acks_waiting(s) && !s->nacks &&
            !mqr_conn_buffered(s->conn)) {
            /* Deliveries sent before the cancel-ok may still be in the
             * socket: one look without waiting. */
            mqr_msg m;
            mqrpc_err e = mqr_conn_wait(s->conn, 0, &m);
            if (e == MQRPC_ETIMEOUT)
                return;
            if (e == MQRPC_OK)
                e = m.kind == MQR_DELIVERY ? on_delivery(s, &m)
                                           : on_event(s, &m);
            if (e != MQRPC_OK)
                drop_conn(s);
            continue;
        }
        if (!s->outstanding) {
            if (!end)
                end = mqr_now_us() + HAND_BACK_MAX_US;
            if (mqr_now_us() >= end || mqr_conn_blocked(s->conn)) {
                mqr_log(&s->log, MQRPC_LOG_WARN,
                        "stopping without the broker's confirm for %u "
                        "re-published requests; they return as "
                        "redeliveries",
                        s->unconfirmed.n);
                return;
            }
        }
        if (step(s) != MQRPC_OK) {
            mqr_log(&s->log, MQRPC_LOG_WARN,
                    "connection lost while stopping: %s",
                    mqr_conn_errmsg(s->conn));
            drop_conn(s);
        }
    }
}

mqrpc_err mqrpc_service_run(mqrpc_service *s)
{
    mqrpc_err e = MQRPC_OK;

    if (!s->conn)
        return MQRPC_ESTATE;
    s->conn_thread = pthread_self();
    pthread_mutex_lock(&s->conn_lock);
    if (mqr_workers_start(s) != MQRPC_OK) {
        pthread_mutex_unlock(&s->conn_lock);
        return MQRPC_ENOMEM;
    }
    while (!atomic_load(&s->stop)) {
        e = serve(s);
        if (e == MQRPC_OK)
            break;
        drop_conn(s);
        if (e == MQRPC_ENOMEM || s->opts.reconnect_max_ms < 0)
            break;
        MQR_STAT_ADD(s->st.lost, 1);
        mqr_addrs_lost(&s->addrs);
        if (consumer_timeout(s->err))
            mqr_log(&s->log, MQRPC_LOG_WARN,
                    "the broker closed the channel: a request was held "
                    "longer than its consumer_timeout (%s); raise "
                    "consumer_timeout for handlers this long (README, "
                    "Long-running handlers); reconnecting",
                    s->err);
        else
            mqr_log(&s->log, MQRPC_LOG_WARN,
                    "connection lost: %s; reconnecting", s->err);
        notify(s, MQRPC_SERVICE_DISCONNECTED, s->err);
        e = reconnect(s);
        if (e != MQRPC_OK)
            break;
    }
    finish(s);
    /* No handler runs inline any more: the handler threads may end. */
    pthread_mutex_unlock(&s->conn_lock);
    mqr_workers_join(s);
    /* Closing the channel returns what is still unacknowledged. */
    drop_conn(s);
    atomic_store(&s->stopping, false);
    return e;
}

void mqrpc_service_stop(mqrpc_service *s)
{
    atomic_store(&s->stop, 1);
    mqr_wake_signal(s->wake_fd); /* async-signal-safe */
}

const char *mqrpc_service_instance(const mqrpc_service *s)
{
    return s->instance;
}

void mqrpc_service_get_stats(const mqrpc_service *s, mqrpc_service_stats *out,
                             size_t size)
{
    /* The thread running s writes these while a metrics thread reads: a
     * plain copy would be a data race. */
    enum { WORDS = sizeof(mqrpc_service_stats) / sizeof(uint64_t) };
    _Static_assert(sizeof(mqrpc_service_stats) % sizeof(uint64_t) == 0,
                   "mqrpc_service_stats holds only uint64_t fields");
    const uint64_t *from = (const uint64_t *)&s->st;
    uint64_t snap[WORDS];

    for (unsigned i = 0; i < WORDS; i++)
        snap[i] = __atomic_load_n(&from[i], __ATOMIC_RELAXED);
    mqr_struct_out(out, size, snap, sizeof snap);
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
    free(s->acks);
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->conn_lock);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->handback);
    mqr_conn_cfg_clear(&s->cfg);
    free(s);
}
