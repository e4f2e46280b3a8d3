/*
 * The RPC client's I/O: one asynchronous core over the call table
 * (calls.c). A call is published at once when the broker and the socket
 * can take it without waiting, else queued; mqrpc_client_process reads the
 * broker's messages, finishes calls, runs their callbacks and reconnects.
 * The blocking mqrpc_call is that core plus a wait.
 *
 * Callbacks run only from run_finished, at points where no list is being
 * walked; a connection lost meanwhile is freed only after them, so the
 * reply a callback holds stays valid.
 *
 * When the connection is lost, every call learns it at once: it fails with
 * MQRPC_ECLOSED, unless it may be re-sent (idempotent, retries left), was
 * never sent, or its request is safe in a durable queue with a durable
 * reply queue to come back to (durable, confirmed). The client reconnects
 * with exponential backoff from inside process, then sends what waits.
 */
/* program_invocation_short_name names the default connection. */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define PREFIX_LEN 16 /* hex digits of the random per-client prefix */
#define CORR_MAX 48
/* A durable reply queue outlives its connection by this much idle time, so
 * replies wait for a reconnecting client but not forever for a dead one. */
#define REPLY_QUEUE_EXPIRES_MS (5 * 60 * 1000)
/* How often process looks again at a socket whose send buffer was full,
 * for calls waiting to be sent. */
#define UNSENT_RETRY_MS 10

struct mqrpc_client {
    mqrpc_client_opts opts;
    mqr_conn_cfg cfg;
    mqr_addrs addrs; /* where in the URL list the next attempt goes */
    mqr_conn *conn;
    /* A lost connection whose current message a running callback may
     * still be reading: freed once no callback runs. */
    mqr_conn *zombie;
    char reply_queue[256];
    size_t reply_queue_len; /* strlen(reply_queue), set with it */
    char prefix[PREFIX_LEN + 1];
    uint64_t next_seq;
    mqr_calls calls;
    size_t unsent;       /* calls in state MQR_CALL_UNSENT or RESEND */
    /* When every unsent call is a refused one waiting for its pause to
     * end (see on_confirm): the earliest end, so that the wait is not
     * cut into UNSENT_RETRY_MS slices; 0 otherwise. */
    int64_t unsent_paused_until_us;
    uint64_t completed;  /* callbacks run: did process do anything? */
    int in_callback;     /* > 0 while a callback runs */
    bool closing;        /* mqrpc_client_free began: no new calls */
    bool free_requested; /* by a callback: free once it returns */
    mqrpc_client_stats st;
    bool ever_connected;
    bool blocked; /* the broker blocks our publishes */
    unsigned without; /* MQR_WITHOUT_*: benchmarks only */
    char blocked_reason[128];
    int64_t reconnect_at_us; /* next attempt while disconnected */
    int backoff_ms;
    unsigned failed_attempts; /* since the connection was lost */
    int64_t lost_at_us;
    uint64_t rng;
    char name[256]; /* connection name */
    char app_id[256];   /* of the reply being delivered */
    mqr_logger log;
    int wake_fd; /* eventfd for mqrpc_client_wake */
    char down[400]; /* why the client is disconnected */
    char err[512];
    /* A mqrpc_client_ping in progress: its answers gather here. */
    json_t *ping_answers; /* borrowed from mqrpc_client_ping; NULL: none */
    char ping_corr[CORR_MAX];
    size_t ping_corr_len;
};

/* "<program>@<host>:<pid>", the connection name the broker shows. */
static void default_name(char *buf, size_t len)
{
    char host[256];

    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';
    /* Host names are at most 64 bytes on Linux: the name fits a short
     * string. */
    snprintf(buf, len, "%.100s@%.64s:%ld", program_invocation_short_name, host,
             (long)getpid());
}

mqrpc_client *mqrpc_client_new(const mqrpc_client_opts *opts)
{
    mqrpc_client *c = calloc(1, sizeof *c);
    uint8_t rnd[PREFIX_LEN / 2 + 4];
    mqr_conn_params p = {0};

    if (!c)
        return NULL;
    if (opts && !mqr_opts_copy(&c->opts, sizeof c->opts, opts)) {
        free(c);
        return NULL;
    }
    if (c->opts.name && *c->opts.name)
        snprintf(c->name, sizeof c->name, "%s", c->opts.name);
    else
        default_name(c->name, sizeof c->name);
    p.url = c->opts.url;
    p.url_file = c->opts.url_file;
    p.name = c->name;
    p.role = MQRPC_ROLE_CLIENT;
    p.heartbeat_s = c->opts.heartbeat_s;
    p.connect_timeout_ms = c->opts.connect_timeout_ms;
    p.tls = c->opts.tls;
    p.addrs = &c->addrs;
    if (!mqr_calls_init(&c->calls)) {
        free(c);
        return NULL;
    }
    c->wake_fd = mqr_wake_open();
    if (c->wake_fd < 0 || !mqr_conn_cfg_init(&c->cfg, &p)) {
        if (c->wake_fd >= 0)
            close(c->wake_fd);
        mqr_calls_clear(&c->calls);
        free(c);
        errno = ENOMEM;
        return NULL;
    }
    /* The copies in cfg are the ones used; the caller's may be freed. */
    c->opts.url = c->opts.url_file = c->opts.name = NULL;
    memset(&c->opts.tls, 0, sizeof c->opts.tls);
    c->log.fn = c->opts.log;
    c->log.arg = c->opts.log_arg;
    c->log.name = c->name;
    /* Correlation ids must not be guessable by other clients of the
     * broker, who could otherwise inject replies. */
    mqr_random_bytes(rnd, sizeof rnd);
    for (size_t i = 0; i < PREFIX_LEN / 2; i++)
        snprintf(c->prefix + 2 * i, 3, "%02x", rnd[i]);
    /* Sequence numbers start at a random point too (as nng does), so ids
     * differ between runs even in the unlikely case of a weak prefix. */
    memcpy(&c->next_seq, rnd + PREFIX_LEN / 2, 4);
    memcpy(&c->rng, rnd, sizeof c->rng);
    c->rng |= 1; /* xorshift must not start at 0 */
    /* Its own order of the URL list: clients spread over a cluster. */
    c->addrs.seed = (c->rng * 0x9E3779B97F4A7C15ull) | 1;
    if (c->opts.reconnect_min_ms <= 0)
        c->opts.reconnect_min_ms = MQRPC_DEFAULT_RECONNECT_MIN_MS;
    if (c->opts.reconnect_max_ms == 0)
        c->opts.reconnect_max_ms = MQRPC_DEFAULT_RECONNECT_MAX_MS;
    if (c->opts.retries < 0)
        c->opts.retries = 0;
    snprintf(c->err, sizeof c->err, "not connected");
    return c;
}

/* Attaches the reply queue to a new connection. A durable client comes
 * back to the queue it had, where replies kept arriving while it was away;
 * if that queue is gone (expired, or the broker lost it), calls waiting on
 * it can get no reply and are re-sent or failed. */
static mqrpc_err open_reply_queue(mqrpc_client *c)
{
    mqr_queue_opts q = {.exclusive = !c->opts.durable,
                        .durable = c->opts.durable,
                        .expires_ms = c->opts.durable ? REPLY_QUEUE_EXPIRES_MS
                                                      : 0};
    mqrpc_err e;

    if (c->opts.direct_reply_to) {
        /* The pseudo-queue needs no declaration; consuming it (no-ack, on
         * the channel that publishes) is what enables it. */
        snprintf(c->reply_queue, sizeof c->reply_queue,
                 "amq.rabbitmq.reply-to");
        return mqr_conn_consume(c->conn, c->reply_queue, true);
    }
    if (c->opts.durable && c->reply_queue[0]) {
        e = mqr_conn_queue_info(c->conn, c->reply_queue, NULL, NULL);
        if (e == MQRPC_OK)
            return mqr_conn_consume(c->conn, c->reply_queue, false);
        if (e != MQRPC_ENOROUTE)
            return e;
        for (mqr_call *k = c->calls.head; k; k = k->next) {
            if (k->state == MQR_CALL_CONFIRMED) {
                k->state = MQR_CALL_RESEND; /* sorted out by flush_unsent */
                k->resend_at_us = 0;
                c->unsent++;
                c->unsent_paused_until_us = 0;
            }
        }
    }
    /* Server-named, as the seed's client does: exclusive, living exactly
     * as long as this connection, unless durable. */
    e = mqr_conn_declare_queue(c->conn, "", &q, c->reply_queue);
    /* A durable reply queue is consumed with acknowledgements: a reply the
     * broker pushed into a socket that then died goes back to the queue
     * for the reconnected client, instead of being lost with the socket
     * (no-ack would count it delivered once written). An exclusive queue
     * dies with its connection anyway. */
    if (e == MQRPC_OK)
        e = mqr_conn_consume(c->conn, c->reply_queue, !c->opts.durable);
    return e;
}

/* Opens the connection, the confirm mode and the reply queue, each
 * handshake bounded by connect_timeout_ms. */
static mqrpc_err open_session(mqrpc_client *c, int connect_timeout_ms)
{
    mqr_conn_params p = c->cfg.p;
    mqrpc_err e;

    p.connect_timeout_ms = connect_timeout_ms;
    e = mqr_conn_open(&p, &c->conn, c->err, sizeof c->err);
    if (e != MQRPC_OK)
        return e;
    /* Confirms tell the caller the broker took each request, and a full
     * queue (x-overflow reject-publish) refuses one only through a nack. */
    e = c->without & MQR_WITHOUT_CONFIRMS ? MQRPC_OK
                                          : mqr_conn_confirm_select(c->conn);
    if (e == MQRPC_OK)
        e = open_reply_queue(c);
    if (e != MQRPC_OK) {
        snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
        mqr_conn_free(c->conn);
        c->conn = NULL;
        return e;
    }
    c->reply_queue_len = strlen(c->reply_queue);
    mqr_conn_set_wake_fd(c->conn, c->wake_fd);
    c->blocked = false;
    c->err[0] = '\0';
    return MQRPC_OK;
}

void mqr_client_without(mqrpc_client *c, unsigned what)
{
    c->without = what;
}

/* Failures another address may not have: the broker is down or not
 * reachable, or went away in the middle. A refused login, access, TLS or
 * URL is the same on every node of a cluster. */
static bool try_next_address(mqrpc_err e)
{
    return e == MQRPC_ECONNECT || e == MQRPC_ECLOSED || e == MQRPC_ETIMEOUT ||
           e == MQRPC_EPROTO;
}

mqrpc_err mqrpc_client_connect(mqrpc_client *c)
{
    char all[sizeof c->err] = "";
    mqrpc_err e;

    if (c->conn || c->ever_connected || c->in_callback || c->closing)
        return MQRPC_ESTATE;
    /* Each address of the list once, in this client's order. */
    for (;;) {
        e = open_session(c, c->cfg.p.connect_timeout_ms);
        if (e == MQRPC_OK) {
            mqr_addrs_connected(&c->addrs);
            c->ever_connected = true;
            return e;
        }
        if (c->addrs.count > 1)
            mqr_append(all, sizeof all, "; ", c->err);
        if (!try_next_address(e) || mqr_addrs_failed(&c->addrs))
            break;
    }
    if (all[0] && try_next_address(e))
        snprintf(c->err, sizeof c->err, "%s", all);
    return e;
}

const char *mqrpc_client_errmsg(const mqrpc_client *c)
{
    return c->err;
}

int mqrpc_client_fd(const mqrpc_client *c)
{
    return mqr_conn_fd(c->conn);
}

size_t mqrpc_client_pending(const mqrpc_client *c)
{
    return c->calls.pending;
}

void mqrpc_client_get_stats(const mqrpc_client *c, mqrpc_client_stats *out,
                            size_t size)
{
    mqrpc_client_stats st = c->st;

    st.connected = c->conn != NULL;
    st.is_blocked = c->conn && c->blocked;
    st.in_flight = c->calls.pending;
    mqr_struct_out(out, size, &st, sizeof st);
}

static bool may_reconnect(const mqrpc_client *c)
{
    return c->ever_connected && c->opts.reconnect_max_ms >= 0 && !c->closing;
}

/* mqrpc_client_next_timeout_ms at monotonic time now (mqr_now_us). */
static int next_timeout_at(const mqrpc_client *c, int64_t now)
{
    int64_t wait = -1;
    int hb;

    if (c->calls.dhead)
        return 0; /* callbacks to run */
    if (c->calls.head) {
        wait = (c->calls.head->deadline_us - now + 999) / 1000;
        if (wait < 0)
            wait = 0;
    }
    if (!c->conn) {
        if (may_reconnect(c)) {
            int64_t r = (c->reconnect_at_us - now + 999) / 1000;
            if (r < 0)
                r = 0;
            if (wait < 0 || r < wait)
                wait = r;
        }
        return (int)wait;
    }
    if (mqr_conn_buffered(c->conn))
        return 0;
    if (c->unsent && !c->blocked) {
        int64_t retry = UNSENT_RETRY_MS;
        if (c->unsent_paused_until_us > now)
            retry = (c->unsent_paused_until_us - now + 999) / 1000;
        if (wait < 0 || wait > retry)
            wait = retry;
    }
    /* rabbitmq-c sends heartbeats only from inside its read calls; half the
     * interval keeps us inside the broker's tolerance. */
    hb = mqr_conn_heartbeat_s(c->conn);
    if (hb > 0 && (wait < 0 || wait > hb * 500))
        wait = hb * 500;
    return (int)wait;
}

int mqrpc_client_next_timeout_ms(const mqrpc_client *c)
{
    return next_timeout_at(c, mqr_now_us());
}

/* Parses one of our correlation ids back into its sequence number. */
static bool parse_corr(const mqrpc_client *c, mqr_str id, uint64_t *seq)
{
    uint64_t v = 0;

    if (id.len <= PREFIX_LEN + 1 || id.len > PREFIX_LEN + 1 + 16 ||
        memcmp(id.ptr, c->prefix, PREFIX_LEN) != 0 || id.ptr[PREFIX_LEN] != '-')
        return false;
    for (size_t i = PREFIX_LEN + 1; i < id.len; i++) {
        char ch = id.ptr[i];
        int d = ch >= '0' && ch <= '9'   ? ch - '0'
                : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
                                         : -1;
        if (d < 0)
            return false;
        v = v << 4 | (uint64_t)d;
    }
    *seq = v;
    return true;
}

/* ---------------------------------------------------------- completion */

/* Finishes k with a transport failure; its callback runs later, from
 * run_finished. */
static void fail_call(mqrpc_client *c, mqr_call *k, mqrpc_err status,
                      const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void fail_call(mqrpc_client *c, mqr_call *k, mqrpc_err status,
                      const char *fmt, ...)
{
    char msg[768];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (k->state == MQR_CALL_UNSENT || k->state == MQR_CALL_RESEND)
        c->unsent--;
    free(k->text);
    k->text = strdup(msg);
    k->reply.status = status;
    k->reply.error_message = k->text ? k->text : mqrpc_strerror(status);
    mqr_calls_finish(&c->calls, k);
}

/* The statistics of a call that ended. */
static void count_call(mqrpc_client *c, const mqr_call *k)
{
    unsigned status = (unsigned)k->reply.status;
    int64_t us = mqr_now_us() -
                 (k->deadline_us - (int64_t)k->timeout_ms * 1000);
    const size_t nstatus = sizeof c->st.calls / sizeof c->st.calls[0];

    c->st.calls[status < nstatus ? status : nstatus - 1]++;
    if (k->reply.status == MQRPC_EREMOTE)
        c->st.remote[mqrpc_code_of(k->reply.error_code)]++;
    c->st.duration[mqr_duration_bucket(us)]++;
    c->st.duration_us += (uint64_t)(us > 0 ? us : 0);
}

/* Runs the callbacks of finished calls, oldest first. A callback may
 * start calls (whose failures join the list and run in this same loop)
 * or ask for the client to be freed (done by the caller of this function
 * once it returns). */
static void run_finished(mqrpc_client *c)
{
    mqr_call *k;

    while ((k = mqr_calls_pop_finished(&c->calls))) {
        mqrpc_reply *r = &k->reply;
        r->queue = k->queue;
        r->call_traceparent = k->traceparent;
        if (r->status != MQRPC_OK && !r->error_code)
            r->error_code = mqrpc_errname(r->status);
        count_call(c, k);
        c->completed++;
        c->in_callback++;
        k->done(r, k->arg);
        c->in_callback--;
        mqr_calls_release(&c->calls, k);
    }
}

static void destroy(mqrpc_client *c);

/* After callbacks ran: a free they asked for happens now. Returns true
 * when c is gone. */
static bool settle(mqrpc_client *c)
{
    run_finished(c);
    if (c->free_requested) {
        destroy(c);
        return true;
    }
    if (c->zombie && !c->in_callback) {
        mqr_conn_free(c->zombie);
        c->zombie = NULL;
    }
    return false;
}

/* Fails the calls whose deadline is at or before now (mqr_now_us). */
static void expire_due_at(mqrpc_client *c, int64_t now)
{
    mqr_call *k;

    while ((k = c->calls.head) && k->deadline_us <= now) {
        if (k->state == MQR_CALL_RESEND || (k->state == MQR_CALL_UNSENT &&
                                            !c->conn)) {
            /* Waiting for a connection: that is what failed. */
            fail_call(c, k, MQRPC_ECLOSED,
                      "not connected to the broker within %d ms (%s)",
                      k->timeout_ms, c->down);
        } else if (c->conn && c->blocked) {
            fail_call(c, k, MQRPC_EBLOCKED,
                      "the broker is blocking publishers: %s (%s %s within "
                      "%d ms)",
                      c->blocked_reason,
                      k->state == MQR_CALL_UNSENT ? "could not send to"
                                                  : "no reply from",
                      k->queue, k->timeout_ms);
        } else if (k->state == MQR_CALL_UNSENT) {
            fail_call(c, k, MQRPC_ETIMEOUT,
                      "the request to %s could not be sent within %d ms "
                      "(the broker does not read)",
                      k->queue, k->timeout_ms);
        } else {
            fail_call(c, k, MQRPC_ETIMEOUT, "no reply from %s within %d ms",
                      k->queue, k->timeout_ms);
        }
    }
}

static void expire_due(mqrpc_client *c)
{
    expire_due_at(c, mqr_now_us());
}

static void sync_done(const mqrpc_reply *r, void *arg);

/* A progress message of a call that asked for it: to opts.progress, at
 * once (no list is being walked here, and the call cannot end meanwhile).
 * One of a call that is over, or malformed, is dropped: it is advisory. */
static void on_progress(mqrpc_client *c, const mqr_msg *m)
{
    mqr_call *k;
    uint64_t seq;
    json_t *j, *pct, *text;

    if (!c->opts.progress || !parse_corr(c, m->correlation_id, &seq) ||
        !(k = mqr_calls_find(&c->calls, seq)) || !k->progress)
        return;
    j = json_loadb(m->body.ptr, m->body.len, JSON_REJECT_DUPLICATES, NULL);
    pct = json_object_get(j, "percent");
    text = json_object_get(j, "text");
    if (json_is_number(pct)) {
        double v = json_number_value(pct);
        c->in_callback++;
        c->opts.progress(k->done == sync_done ? NULL : k->arg,
                         v < 0 ? 0 : v > 100 ? 100 : v,
                         json_is_string(text) ? json_string_value(text) : "",
                         c->opts.progress_arg);
        c->in_callback--;
    }
    json_decref(j);
}

/* An answer to the ping in progress: kept if it is a JSON object. */
static bool on_pong(mqrpc_client *c, const mqr_msg *m)
{
    json_t *j;

    if (!c->ping_answers || m->correlation_id.len != c->ping_corr_len ||
        memcmp(m->correlation_id.ptr, c->ping_corr, c->ping_corr_len) != 0)
        return false;
    j = json_loadb(m->body.ptr, m->body.len, 0, NULL);
    if (json_is_object(j))
        json_array_append(c->ping_answers, j);
    else
        c->st.dropped++;
    json_decref(j);
    return true;
}

static void on_reply(mqrpc_client *c, const mqr_msg *m)
{
    mqr_call *k;
    uint64_t seq;
    mqrpc_fault fault;
    mqrpc_reply *r;

    if (on_pong(c, m))
        return;
    if (m->progress) {
        on_progress(c, m);
        return;
    }
    if (!parse_corr(c, m->correlation_id, &seq) ||
        !(k = mqr_calls_find(&c->calls, seq)) ||
        k->state == MQR_CALL_UNSENT) {
        /* Late (after a timeout), duplicated, or not ours: never fatal. */
        c->st.dropped++;
        return;
    }
    if (k->state == MQR_CALL_RESEND)
        c->unsent--; /* the first attempt was answered after all */
    r = &k->reply;
    /* Borrowed from the connection's current message: the callback runs
     * before the next read, and a lost connection is freed only after. */
    r->body = m->body.ptr;
    r->body_len = m->body.len;
    if (m->app_id.len) {
        /* An AMQP short string: at most 255 bytes, room for the NUL. */
        size_t n = m->app_id.len < sizeof c->app_id ? m->app_id.len
                                                    : sizeof c->app_id - 1;
        memcpy(c->app_id, m->app_id.ptr, n);
        c->app_id[n] = '\0';
        r->app_id = c->app_id;
    }
    if (mqr_traceparent_parse(m->traceparent.ptr, m->traceparent.len, NULL) &&
        m->traceparent.len < sizeof k->reply_traceparent) {
        memcpy(k->reply_traceparent, m->traceparent.ptr, m->traceparent.len);
        k->reply_traceparent[m->traceparent.len] = '\0';
        r->traceparent = k->reply_traceparent;
    }
    r->status = mqr_decode_reply(mqr_str_eq(m->type, "error"), m->body.ptr,
                                 m->body.len, &r->result, &fault);
    if (r->status != MQRPC_OK) {
        size_t cl = strlen(fault.code), ml = strlen(fault.message);
        k->text = malloc(cl + ml + 2);
        if (k->text) {
            memcpy(k->text, fault.code, cl + 1);
            memcpy(k->text + cl + 1, fault.message, ml + 1);
            r->error_code = k->text;
            r->error_message = k->text + cl + 1;
        } else {
            r->error_message = mqrpc_strerror(r->status);
        }
    }
    mqr_calls_finish(&c->calls, k);
}

static void on_return(mqrpc_client *c, const mqr_msg *m)
{
    mqr_call *k;
    uint64_t seq;

    if (!parse_corr(c, m->correlation_id, &seq) ||
        !(k = mqr_calls_find(&c->calls, seq))) {
        c->st.dropped++;
        return;
    }
    /* 312 NO_ROUTE: nothing declared the queue, so no service will ever
     * see the request; say so now instead of after the timeout. */
    if (m->reply_code == 312)
        fail_call(c, k, MQRPC_ENOROUTE, "no service on queue %s", k->queue);
    else
        fail_call(c, k, MQRPC_ENOROUTE,
                  "the broker returned the request to %s: %.*s", k->queue,
                  (int)m->reply_text.len, m->reply_text.ptr);
}

/* The pause before a refused call is sent again: 100 ms, doubling with
 * each refusal, at most 1 s. */
static int64_t refusal_pause_us(unsigned refusals)
{
    return refusals >= 4 ? 1000000 : 100000 << (refusals ? refusals - 1 : 0);
}

/* A publisher confirm: an ack means the broker took the request (for a
 * persistent one, wrote it to disk); a nack means it refused it: for our
 * queues x-max-length was reached, or a quorum queue could not take it
 * just then (RabbitMQ 3.10 refuses a new channel's publishes to a quorum
 * queue whose leader's node has just died, for seconds, until the
 * cluster has settled: broker.cluster shows it). An idempotent call with
 * retries left is sent again after a pause, within its deadline; any
 * other fails. The broker confirms in publish order, so the calls
 * concerned are at the front of the list. */
static void on_confirm(mqrpc_client *c, const mqr_msg *m)
{
    mqr_call *k = c->calls.chead, *next;
    int64_t now = m->kind == MQR_ACK ? 0 : mqr_now_us();

    for (; k && k->pub_seq <= m->delivery_tag; k = next) {
        next = k->cnext;
        if (!m->multiple && k->pub_seq != m->delivery_tag)
            continue;
        mqr_calls_unconfirmed_unlink(&c->calls, k);
        if (m->kind == MQR_ACK) {
            k->state = MQR_CALL_CONFIRMED;
            continue;
        }
        if (k->retries_left > 0 &&
            now + refusal_pause_us(k->refusals + 1) < k->deadline_us) {
            k->refusals++;
            k->state = MQR_CALL_RESEND;
            k->resend_at_us = now + refusal_pause_us(k->refusals);
            c->unsent++;
            continue;
        }
        fail_call(c, k, MQRPC_EOVERLOAD,
                  "%s is overloaded: the broker refused the request (the "
                  "queue is full)",
                  k->queue);
    }
}

/* The connection is gone: every call in flight learns it now. A call
 * that may be re-sent waits for the reconnection, as does one never sent;
 * a durable call the broker confirmed waits for its reply, which goes to
 * a queue that outlives the connection; every other call fails. The
 * connection itself is kept until no callback can be reading its current
 * message. */
static mqrpc_err lost(mqrpc_client *c)
{
    mqr_call *k, *next;
    bool again = may_reconnect(c);

    snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
    snprintf(c->down, sizeof c->down, "%.399s", c->err);
    if (c->zombie)
        mqr_conn_free(c->zombie); /* from an earlier loss: nobody reads it */
    c->zombie = c->conn;
    c->conn = NULL;
    c->blocked = false;
    c->st.lost++;
    c->failed_attempts = 0;
    mqr_addrs_lost(&c->addrs);
    c->lost_at_us = mqr_now_us();
    /* The first attempt is immediate: a killed connection to a live
     * broker is the common case. */
    c->backoff_ms = c->opts.reconnect_min_ms;
    c->reconnect_at_us = mqr_now_us();
    if (again)
        mqr_log(&c->log, MQRPC_LOG_WARN, "connection lost: %s; reconnecting",
                c->err);
    for (k = c->calls.head; k; k = next) {
        next = k->next;
        mqr_calls_unconfirmed_unlink(&c->calls, k);
        if (again && (k->state == MQR_CALL_UNSENT ||
                      k->state == MQR_CALL_RESEND))
            continue;
        if (again && c->opts.durable && k->state == MQR_CALL_CONFIRMED)
            continue;
        if (again && k->retries_left > 0) {
            k->state = MQR_CALL_RESEND;
            k->resend_at_us = 0; /* through the next connection, at once */
            c->unsent++;
            c->unsent_paused_until_us = 0;
            continue;
        }
        fail_call(c, k, MQRPC_ECLOSED, "connection lost: %s", c->err);
    }
    return MQRPC_ECLOSED;
}

/* Writes v at out in lowercase hex (base 16) or decimal, without leading
 * zeros, as printf's "%" PRIx64 and "%" PRIu64 would; returns the length.
 * Every call formats two numbers, and two snprintf calls were a sixth of
 * the client's instructions per call (callgrind). out has room for 20. */
static size_t put_uint(char *out, uint64_t v, unsigned base)
{
    char tmp[20];
    size_t n = 0, i;

    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    for (i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* Publishes k; now is mqr_now_us() of the caller, who had it at hand. */
static mqrpc_err send_call(mqrpc_client *c, mqr_call *k, int64_t now)
{
    char corr[CORR_MAX], expiration[24];
    int64_t left = (k->deadline_us - now) / 1000;
    mqr_props props = {0};
    mqrpc_err e;
    size_t n;

    /* "<prefix>-<seq in hex>", what parse_corr reads back */
    memcpy(corr, c->prefix, PREFIX_LEN);
    corr[PREFIX_LEN] = '-';
    n = PREFIX_LEN + 1 + put_uint(corr + PREFIX_LEN + 1, k->seq, 16);
    props.correlation_id.ptr = corr;
    props.correlation_id.len = n;
    if (!(c->without & MQR_WITHOUT_EXPIRATION)) {
        props.expiration.ptr = expiration;
        props.expiration.len =
            put_uint(expiration, left > 0 ? (uint64_t)left : 1, 10);
        props.deadline_ms = k->deadline_wall_ms;
    }
    props.reply_to.ptr = c->reply_queue;
    props.reply_to.len = c->reply_queue_len;
    props.persistent = c->opts.durable;
    props.progress = k->progress;
    props.traceparent = mqr_cstr(k->traceparent);
    if (k->tracestate)
        props.tracestate = mqr_cstr(k->tracestate);
    /* mandatory: a queue nobody declared makes the broker return the
     * request (basic.return) instead of dropping it silently. */
    e = mqr_conn_publish(c->conn, mqr_cstr(k->queue), &props, k->body,
                         k->body_len, !(c->without & MQR_WITHOUT_MANDATORY));
    if (e != MQRPC_OK)
        return e;
    k->state = MQR_CALL_SENT;
    if (c->without & MQR_WITHOUT_CONFIRMS)
        return MQRPC_OK; /* no ack will come: stays SENT */
    k->pub_seq = mqr_conn_publish_seq(c->conn);
    mqr_calls_unconfirmed_append(&c->calls, k);
    return MQRPC_OK;
}

/* Publishes the calls that wait for it, earliest deadline first, while the
 * broker and the socket take them. */
static void flush_unsent(mqrpc_client *c)
{
    mqr_call *k, *next;
    int64_t now = mqr_now_us(), paused_until = 0;
    size_t paused = 0;

    for (k = c->calls.head; k && c->unsent && c->conn; k = next) {
        next = k->next;
        if (k->state != MQR_CALL_UNSENT && k->state != MQR_CALL_RESEND)
            continue;
        if (k->state == MQR_CALL_RESEND && k->resend_at_us > now) {
            if (!paused_until || k->resend_at_us < paused_until)
                paused_until = k->resend_at_us;
            paused++;
            continue; /* refused: its pause is not over */
        }
        if (k->state == MQR_CALL_RESEND && k->retries_left <= 0) {
            /* A durable call whose reply queue vanished meanwhile. */
            fail_call(c, k, MQRPC_ECLOSED,
                      "connection lost, and the reply queue with it");
            continue;
        }
        if (!mqr_conn_can_publish(c->conn, k->body_len)) {
            c->unsent_paused_until_us = 0;
            return;
        }
        c->unsent--;
        if (k->state == MQR_CALL_RESEND) {
            k->retries_left--;
            c->st.retried++;
        }
        k->state = MQR_CALL_UNSENT; /* until send_call says otherwise */
        if (send_call(c, k, mqr_now_us()) != MQRPC_OK) {
            c->unsent++;
            k->state = k->retries_left > 0 ? MQR_CALL_RESEND : MQR_CALL_UNSENT;
            c->unsent_paused_until_us = 0;
            lost(c);
            return;
        }
    }
    c->unsent_paused_until_us =
        c->conn && c->unsent && c->unsent == paused ? paused_until : 0;
}

/* Reconnects if disconnected and the backoff allows it now; each
 * handshake is bounded by the earliest deadline of the calls, so a
 * reconnection never makes a call late. Returns MQRPC_OK when connected. */
static mqrpc_err try_reconnect(mqrpc_client *c)
{
    int timeout = c->cfg.p.connect_timeout_ms > 0 ? c->cfg.p.connect_timeout_ms
                                                  : 5000;
    int64_t now = mqr_now_us();

    if (c->conn)
        return MQRPC_OK;
    if (!may_reconnect(c) || now < c->reconnect_at_us)
        return MQRPC_ECLOSED;
    if (c->calls.head) {
        int64_t left = (c->calls.head->deadline_us - now) / 1000;
        if (left <= 0)
            return MQRPC_ECLOSED; /* expire it first */
        if (left < timeout)
            timeout = (int)left;
    }
    if (c->zombie) {
        mqr_conn_free(c->zombie);
        c->zombie = NULL;
    }
    if (open_session(c, timeout) != MQRPC_OK) {
        /* Said once per outage, and again when the reason changes. */
        if (c->failed_attempts++ == 0 || strcmp(c->down, c->err) != 0)
            mqr_log(&c->log, MQRPC_LOG_WARN, "reconnection failed: %s",
                    c->err);
        snprintf(c->down, sizeof c->down, "%.399s", c->err);
        /* The next address of the list at once; the backoff only once
         * they all failed. */
        if (!mqr_addrs_failed(&c->addrs)) {
            c->reconnect_at_us = mqr_now_us();
            return MQRPC_ECLOSED;
        }
        c->reconnect_at_us =
            mqr_now_us() + (int64_t)mqr_jitter(&c->rng, c->backoff_ms) * 1000;
        c->backoff_ms = mqr_backoff_next(c->backoff_ms, c->opts.reconnect_max_ms);
        return MQRPC_ECLOSED;
    }
    mqr_addrs_connected(&c->addrs);
    c->st.reconnects++;
    mqr_log(&c->log, MQRPC_LOG_INFO,
            "connection regained after %.1f s (%u failed attempts), to %s",
            (double)(mqr_now_us() - c->lost_at_us) / 1e6, c->failed_attempts,
            c->addrs.current);
    flush_unsent(c);
    return c->conn ? MQRPC_OK : MQRPC_ECLOSED;
}

static void on_blocked(mqrpc_client *c, const mqr_msg *m)
{
    if (m->kind == MQR_BLOCKED) {
        snprintf(c->blocked_reason, sizeof c->blocked_reason, "%.*s",
                 (int)m->reply_text.len, m->reply_text.ptr);
        if (!c->blocked) {
            c->blocked = true;
            c->st.blocked++;
            mqr_log(&c->log, MQRPC_LOG_WARN,
                    "the broker is blocking publishers: %s",
                    c->blocked_reason);
        }
        return;
    }
    if (c->blocked) {
        c->blocked = false;
        mqr_log(&c->log, MQRPC_LOG_INFO, "the broker unblocked publishers");
    }
    flush_unsent(c);
}

void mqrpc_client_wake(mqrpc_client *c)
{
    mqr_wake_signal(c->wake_fd);
}

/* Disconnected: sleep until the next thing that can happen (a deadline, a
 * reconnection attempt, timeout_ms) or a wake, then do it. Returns true
 * when woken. */
static bool wait_offline(mqrpc_client *c, int timeout_ms)
{
    int wait = mqrpc_client_next_timeout_ms(c);
    struct pollfd p = {.fd = c->wake_fd, .events = POLLIN};

    if (timeout_ms >= 0 && (wait < 0 || wait > timeout_ms))
        wait = timeout_ms;
    if (wait != 0 && poll(&p, 1, wait) > 0) {
        mqr_wake_drain(c->wake_fd);
        return true;
    }
    if (try_reconnect(c) != MQRPC_OK)
        expire_due(c);
    return false;
}

/* Reads what the connection has, for up to wait ms for the first frame,
 * dispatching each message and running its callbacks before the next
 * read (a reply's body lives in the connection's current message). Returns
 * MQRPC_OK if anything came, MQRPC_ETIMEOUT if not, MQRPC_ECANCELED when
 * a callback freed the client, MQRPC_ECLOSED when the connection was
 * lost. now: mqr_now_us() when the wait began. */
static mqrpc_err read_messages(mqrpc_client *c, int wait, int64_t now)
{
    mqr_msg m;
    mqrpc_err e;
    bool any = false, corked = false, woken = false;
    mqr_conn *conn = c->conn;
    uint64_t before = c->completed;
    int64_t until = now + (int64_t)wait * 1000; /* when wait > 0 */

    for (;;) {
        e = mqr_conn_wait(conn, wait, &m);
        if (e == MQRPC_ETIMEOUT)
            break;
        if (e != MQRPC_OK) {
            lost(c);
            break;
        }
        any = true;
        /* More replies are already here: calls that their callbacks start
         * leave together, in one packet, once they are all handled. */
        if (!corked && mqr_conn_buffered(conn)) {
            mqr_conn_cork(conn, true);
            corked = true;
        }
        switch (m.kind) {
        case MQR_DELIVERY:
            on_reply(c, &m);
            /* Durable reply queue (see open_reply_queue): acknowledged
             * once matched, dropped replies too. */
            if (c->opts.durable && !c->opts.direct_reply_to &&
                mqr_conn_ack(conn, m.delivery_tag, false) != MQRPC_OK)
                lost(c);
            break;
        case MQR_RETURN: on_return(c, &m); break;
        case MQR_ACK:
        case MQR_NACK: on_confirm(c, &m); break;
        case MQR_BLOCKED:
        case MQR_UNBLOCKED: on_blocked(c, &m); break;
        case MQR_CANCEL:
            mqr_conn_abort(conn, "the broker cancelled the reply consumer "
                                 "(reply queue deleted?)");
            lost(c);
            break;
        case MQR_WAKE:
            mqr_wake_drain(c->wake_fd);
            woken = true;
            break;
        }
        if (settle(c))
            return MQRPC_ECANCELED;
        /* A callback's new call may have found the connection dead. */
        if (c->conn != conn || woken)
            break;
        /* Drain what is already buffered, but do not block again. */
        if (mqr_conn_buffered(conn)) {
            wait = 0;
            continue;
        }
        /* A confirm alone finishes nothing, and one call at a time gets
         * its confirm just before its reply: wait on for the reply here,
         * within the same timeout, instead of returning to the caller who
         * would only come back (a process call costs about 300
         * instructions, callgrind). Not with calls waiting to be sent:
         * process sends those. */
        if (m.kind != MQR_ACK || wait == 0 || c->completed != before ||
            c->unsent)
            break;
        if (wait > 0) {
            int64_t left = until - mqr_now_us();
            if (left < 1000)
                break;
            wait = (int)(left / 1000);
        }
    }
    if (corked && c->conn == conn)
        mqr_conn_cork(conn, false);
    if (c->conn != conn)
        return MQRPC_ECLOSED;
    return any ? MQRPC_OK : MQRPC_ETIMEOUT;
}

mqrpc_err mqrpc_client_process(mqrpc_client *c, int timeout_ms)
{
    uint64_t before = c->completed, reconnects = c->st.reconnects;
    int64_t now;
    mqrpc_err e;
    int wait;

    if (c->in_callback || !c->ever_connected || c->closing)
        return MQRPC_ESTATE;
    /* Calls that expired or failed since the last visit have their
     * callbacks now: that is news, and waiting for a frame as well could
     * mean waiting forever (mqrpc_call waits with -1 for that very call).
     * One clock reading serves this and the wait below: whatever runs in
     * between and takes time (callbacks, a reconnection) returns first. */
    now = mqr_now_us();
    expire_due_at(c, now);
    if (!c->conn)
        try_reconnect(c);
    else if (c->unsent)
        flush_unsent(c);
    if (settle(c))
        return MQRPC_ECANCELED;
    if (c->completed != before || c->st.reconnects != reconnects)
        return MQRPC_OK;
    if (!c->conn) {
        if (!may_reconnect(c) && !c->calls.head)
            return MQRPC_ECLOSED; /* nothing will ever happen */
        bool woken = wait_offline(c, timeout_ms);
        if (settle(c))
            return MQRPC_ECANCELED;
        if (woken || c->completed != before ||
            c->st.reconnects != reconnects)
            return MQRPC_OK;
        return c->conn ? MQRPC_ETIMEOUT : MQRPC_ECLOSED;
    }
    wait = next_timeout_at(c, now);
    if (timeout_ms >= 0 && (wait < 0 || wait > timeout_ms))
        wait = timeout_ms;
    e = read_messages(c, wait, now);
    if (e == MQRPC_ECANCELED)
        return e;
    expire_due(c);
    if (settle(c))
        return MQRPC_ECANCELED;
    if (e == MQRPC_ETIMEOUT && c->completed != before)
        e = MQRPC_OK;
    return e;
}

mqrpc_err mqrpc_call_async(mqrpc_client *c, const char *queue, const void *body,
                           size_t len, int timeout_ms, unsigned flags,
                           mqrpc_done_fn done, void *arg)
{
    return mqrpc_call_async_ex(c, queue, body, len, timeout_ms, flags, NULL,
                               done, arg);
}

/* Checks a caller's per-call options into *o (zeroed: the defaults). */
static bool call_opts_ok(mqrpc_client *c, const mqrpc_call_opts *given,
                         mqrpc_call_opts *o)
{
    memset(o, 0, sizeof *o);
    if (!given)
        return true;
    if (!mqr_opts_copy(o, sizeof *o, given)) {
        snprintf(c->err, sizeof c->err,
                 "mqrpc_call_opts: size not set by mqrpc_call_opts_init, or "
                 "an option this library does not know");
        return false;
    }
    if (o->traceparent && !mqrpc_traceparent_valid(o->traceparent)) {
        snprintf(c->err, sizeof c->err,
                 "traceparent is not a W3C traceparent "
                 "(00-<32 hex>-<16 hex>-<2 hex>, ids not all zero)");
        return false;
    }
    if (o->tracestate && (!o->traceparent ||
                          !mqr_tracestate_ok(o->tracestate,
                                             strlen(o->tracestate)))) {
        snprintf(c->err, sizeof c->err,
                 o->traceparent ? "tracestate must be 1 to %d printable "
                                  "ASCII characters"
                                : "tracestate without a traceparent",
                 MQRPC_TRACESTATE_MAX);
        return false;
    }
    return true;
}

mqrpc_err mqrpc_call_async_ex(mqrpc_client *c, const char *queue,
                              const void *body, size_t len, int timeout_ms,
                              unsigned flags, const mqrpc_call_opts *opts,
                              mqrpc_done_fn done, void *arg)
{
    mqrpc_call_opts o;
    size_t qlen;
    mqr_call *k;
    bool resendable, now;
    int64_t now_us;
    mqrpc_err e;

    if (c->closing)
        return MQRPC_ECANCELED;
    if (!queue || !done || timeout_ms <= 0 || (!body && len) ||
        (flags & ~(MQRPC_CALL_IDEMPOTENT | MQRPC_CALL_PROGRESS))) {
        snprintf(c->err, sizeof c->err, "invalid argument to mqrpc_call_async");
        return MQRPC_EINVAL;
    }
    if (!call_opts_ok(c, opts, &o))
        return MQRPC_EINVAL;
    qlen = strlen(queue);
    if (qlen == 0 || qlen > 255) {
        snprintf(c->err, sizeof c->err,
                 "queue name must be 1 to 255 bytes long");
        return MQRPC_EINVAL;
    }
    if (!c->ever_connected) {
        snprintf(c->err, sizeof c->err, "not connected");
        return MQRPC_ESTATE;
    }
    if (!c->conn && !may_reconnect(c)) {
        snprintf(c->err, sizeof c->err, "not connected to the broker (%s)",
                 c->down);
        return MQRPC_ECLOSED;
    }
    resendable = (flags & MQRPC_CALL_IDEMPOTENT) && c->opts.retries > 0;
    /* Sent now only if that cannot wait on the broker, and behind nothing
     * that waits already; otherwise queued for process. */
    now = c->conn && !c->unsent && mqr_conn_can_publish(c->conn, len);
    k = mqr_calls_new_call(&c->calls, queue);
    if (!k)
        return MQRPC_ENOMEM;
    k->seq = c->next_seq++;
    k->timeout_ms = timeout_ms;
    now_us = mqr_now_us();
    k->deadline_us = now_us + (int64_t)timeout_ms * 1000;
    k->deadline_wall_ms = mqr_wall_ms() + timeout_ms;
    k->retries_left = resendable ? c->opts.retries : 0;
    k->done = done;
    k->arg = arg;
    k->progress = (flags & MQRPC_CALL_PROGRESS) != 0;
    if (o.traceparent) {
        /* A later version's is passed on as the 00 it starts with. */
        mqr_trace_ids ids;
        mqr_traceparent_parse(o.traceparent, strlen(o.traceparent), &ids);
        mqr_traceparent_format(k->traceparent, ids.trace_id, ids.span_id,
                               ids.flags);
        if (o.tracestate && !(k->tracestate = strdup(o.tracestate))) {
            mqr_call_free(k);
            return MQRPC_ENOMEM;
        }
    } else {
        char trace_id[33], span_id[17];
        mqr_trace_random_hex(trace_id, 16);
        mqr_trace_random_hex(span_id, 8);
        mqr_traceparent_format(k->traceparent, trace_id, span_id, "01");
    }
    k->body_len = len;
    /* A call that may be published later keeps its own copy of the body;
     * one sent now reads the caller's, which is valid until we return. */
    if (len && (resendable || !now)) {
        k->body = malloc(len);
        if (!k->body) {
            mqr_call_free(k);
            return MQRPC_ENOMEM;
        }
        memcpy(k->body, body, len);
        k->own_body = true;
    } else if (len) {
        k->body = (char *)body;
    }
    if (!now) {
        k->state = MQR_CALL_UNSENT;
        c->unsent++;
        c->unsent_paused_until_us = 0;
        mqr_calls_add(&c->calls, k);
        return MQRPC_OK;
    }
    e = send_call(c, k, now_us);
    if (!k->own_body) {
        k->body = NULL;
        k->body_len = 0;
    }
    if (e != MQRPC_OK && !resendable) {
        /* Not sent and not to be re-sent: the caller hears it from us,
         * and done is never called. */
        mqr_call_free(k);
        lost(c);
        snprintf(c->err, sizeof c->err, "connection lost: %s", c->down);
        return MQRPC_ECLOSED;
    }
    mqr_calls_add(&c->calls, k);
    if (e != MQRPC_OK) {
        k->state = MQR_CALL_RESEND; /* waits for the reconnection */
        c->unsent++;
        c->unsent_paused_until_us = 0;
        lost(c);
    }
    return MQRPC_OK;
}

/* ------------------------------------------------------- blocking call */

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static mqrpc_reply *reply_copy(const mqrpc_reply *r)
{
    mqrpc_reply *o = calloc(1, sizeof *o);
    char *body = NULL;

    if (!o)
        return NULL;
    *o = *r;
    o->owned = true;
    if (r->body_len) {
        body = malloc(r->body_len);
        if (body)
            memcpy(body, r->body, r->body_len);
    }
    o->body = body;
    o->body_len = body ? r->body_len : 0;
    o->error_code = dup_or_null(r->error_code);
    o->error_message = dup_or_null(r->error_message);
    o->app_id = dup_or_null(r->app_id);
    o->queue = dup_or_null(r->queue);
    o->traceparent = dup_or_null(r->traceparent);
    o->call_traceparent = dup_or_null(r->call_traceparent);
    if (r->result)
        json_incref(r->result);
    return o;
}

struct sync_call {
    bool done;
    mqrpc_err status;
    mqrpc_reply *copy;
    bool want_copy;
};

static void sync_done(const mqrpc_reply *r, void *arg)
{
    struct sync_call *s = arg;
    s->done = true;
    s->status = r->status;
    if (s->want_copy)
        s->copy = reply_copy(r);
}

mqrpc_err mqrpc_call(mqrpc_client *c, const char *queue, const void *body,
                     size_t len, int timeout_ms, unsigned flags,
                     mqrpc_reply **out)
{
    return mqrpc_call_ex(c, queue, body, len, timeout_ms, flags, NULL, out);
}

mqrpc_err mqrpc_call_ex(mqrpc_client *c, const char *queue, const void *body,
                        size_t len, int timeout_ms, unsigned flags,
                        const mqrpc_call_opts *opts, mqrpc_reply **out)
{
    struct sync_call s = {.want_copy = out != NULL};
    mqrpc_err e;

    if (out)
        *out = NULL;
    e = c->in_callback ? MQRPC_ESTATE
                       : mqrpc_call_async_ex(c, queue, body, len, timeout_ms,
                                             flags, opts, sync_done, &s);
    if (e != MQRPC_OK) {
        if (out) {
            mqrpc_reply r = {.status = e,
                             .error_message = e == MQRPC_ESTATE &&
                                                      c->in_callback
                                                  ? "mqrpc_call inside a "
                                                    "callback"
                                                  : c->err,
                             .error_code = mqrpc_errname(e),
                             .queue = queue};
            *out = reply_copy(&r);
        }
        return e;
    }
    /* Every call completes by its deadline at the latest, whatever
     * happens to the connection meanwhile. When a callback frees the
     * client, our call is among those cancelled, and c is gone. */
    while (!s.done)
        if (mqrpc_client_process(c, -1) == MQRPC_ECANCELED)
            break;
    if (out)
        *out = s.copy;
    return s.status;
}

mqrpc_err mqrpc_client_queue_info(mqrpc_client *c, const char *queue,
                                  uint32_t *messages, uint32_t *consumers)
{
    mqrpc_err e;

    if (!c->ever_connected || c->in_callback || c->closing)
        return MQRPC_ESTATE;
    if (try_reconnect(c) != MQRPC_OK)
        return MQRPC_ECLOSED;
    e = mqr_conn_queue_info(c->conn, queue, messages, consumers);
    if (e != MQRPC_OK)
        snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
    if (mqr_conn_fd(c->conn) < 0)
        lost(c); /* its calls' callbacks run in the next process */
    return e;
}

/* Orders answers by queue, then instance. */
static int pong_cmp(const void *a, const void *b)
{
    json_t *x = *(json_t *const *)a, *y = *(json_t *const *)b;
    const char *qx = json_string_value(json_object_get(x, "queue"));
    const char *qy = json_string_value(json_object_get(y, "queue"));
    const char *ix = json_string_value(json_object_get(x, "instance"));
    const char *iy = json_string_value(json_object_get(y, "instance"));
    int d = strcmp(qx ? qx : "", qy ? qy : "");

    return d ? d : strcmp(ix ? ix : "", iy ? iy : "");
}

static json_t *sorted(json_t *arr)
{
    size_t n = json_array_size(arr), i;
    json_t **v = n ? malloc(n * sizeof *v) : NULL, *out;

    if (!v)
        return arr; /* empty, or no memory to sort: as they came */
    for (i = 0; i < n; i++)
        v[i] = json_array_get(arr, i);
    qsort(v, n, sizeof *v, pong_cmp);
    out = json_array();
    for (i = 0; out && i < n; i++)
        json_array_append(out, v[i]);
    free(v);
    if (!out)
        return arr;
    json_decref(arr);
    return out;
}

mqrpc_err mqrpc_client_ping(mqrpc_client *c, const char *queue, int timeout_ms,
                            json_t **answers)
{
    static const char body[] = "{}";
    mqr_props props = {0};
    char expiration[16];
    json_t *got;
    int64_t end;
    mqrpc_err e;

    if (answers)
        *answers = NULL;
    if (!c->ever_connected || c->in_callback || c->closing || c->ping_answers)
        return MQRPC_ESTATE;
    if (timeout_ms <= 0 || (queue && strlen(queue) > 255)) {
        snprintf(c->err, sizeof c->err, "%s", mqrpc_strerror(MQRPC_EINVAL));
        return MQRPC_EINVAL;
    }
    got = json_array();
    if (!got)
        return MQRPC_ENOMEM;
    if (try_reconnect(c) != MQRPC_OK) {
        e = MQRPC_ECLOSED;
        goto out;
    }
    /* Before any instance ever ran, the exchange does not exist: a publish
     * to it would cost the main channel, and nobody can answer anyway. */
    e = mqr_conn_exchange_exists(c->conn, MQR_CONTROL_EXCHANGE);
    if (e == MQRPC_ENOROUTE) {
        e = MQRPC_OK;
        goto out;
    }
    if (e != MQRPC_OK) {
        snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
        if (mqr_conn_fd(c->conn) < 0)
            lost(c);
        goto out;
    }
    if (c->blocked) {
        /* It would not read our ping. */
        e = MQRPC_EBLOCKED;
        goto out;
    }
    c->ping_corr_len =
        (size_t)snprintf(c->ping_corr, sizeof c->ping_corr, "%s-ping-%" PRIx64,
                         c->prefix, ++c->next_seq);
    props.correlation_id = mqr_cstr(c->ping_corr);
    props.reply_to = mqr_cstr(c->reply_queue);
    props.type = mqr_cstr(MQR_PING_TYPE);
    /* A control queue holds a ping only while its instance is too slow to
     * take it: after the timeout nobody listens for the answer. */
    snprintf(expiration, sizeof expiration, "%d", timeout_ms);
    props.expiration = mqr_cstr(expiration);
    e = mqr_conn_publish_to(c->conn, MQR_CONTROL_EXCHANGE,
                            mqr_cstr(queue ? queue : ""), &props, body,
                            sizeof body - 1);
    if (e != MQRPC_OK) {
        snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
        lost(c);
        goto out;
    }
    c->ping_answers = got;
    end = mqr_now_us() + (int64_t)timeout_ms * 1000;
    for (;;) {
        int64_t left = end - mqr_now_us();
        if (left <= 0)
            break;
        e = mqrpc_client_process(c, (int)((left + 999) / 1000));
        if (e == MQRPC_ECANCELED) {
            /* A callback of another call freed c. */
            json_decref(got);
            return e;
        }
        if (e == MQRPC_ECLOSED || !c->conn) {
            e = MQRPC_ECLOSED;
            snprintf(c->err, sizeof c->err, "%s", c->down);
            break;
        }
        e = MQRPC_OK;
    }
    c->ping_answers = NULL;
    c->ping_corr_len = 0;
    if (e == MQRPC_OK && c->blocked && json_array_size(got) == 0)
        e = MQRPC_EBLOCKED;
out:
    if (e == MQRPC_EBLOCKED)
        snprintf(c->err, sizeof c->err, "the broker is blocking publishers: %s",
                 c->blocked_reason[0] ? c->blocked_reason : "(no reason)");
    if (answers)
        *answers = sorted(got);
    else
        json_decref(got);
    return e;
}

/* Cancels what is pending, runs every callback, closes and frees. */
static void destroy(mqrpc_client *c)
{
    mqr_call *k;

    c->closing = true;
    c->free_requested = false;
    while ((k = c->calls.head))
        fail_call(c, k, MQRPC_ECANCELED, "the client was closed");
    run_finished(c);
    /* Nobody will come back for a durable reply queue's replies. */
    if (c->conn && c->opts.durable && c->reply_queue[0] &&
        !mqr_conn_blocked(c->conn))
        mqr_conn_delete_queue(c->conn, c->reply_queue);
    mqr_conn_free(c->conn);
    mqr_conn_free(c->zombie);
    mqr_calls_clear(&c->calls);
    mqr_conn_cfg_clear(&c->cfg);
    close(c->wake_fd);
    free(c);
}

void mqrpc_client_free(mqrpc_client *c)
{
    if (!c || c->closing)
        return;
    c->closing = true;
    if (c->in_callback) {
        /* hiredis's rule: the real free waits for the callback to
         * return (settle), so nothing runs on freed memory. */
        c->free_requested = true;
        return;
    }
    destroy(c);
}

/* -------------------------------------------------------------- replies */

mqrpc_err mqrpc_reply_status(const mqrpc_reply *r)
{
    return r->status;
}

json_t *mqrpc_reply_result(const mqrpc_reply *r)
{
    return r->result;
}

const char *mqrpc_reply_body(const mqrpc_reply *r, size_t *len)
{
    if (len)
        *len = r->body_len;
    return r->body_len ? r->body : NULL;
}

const char *mqrpc_reply_error_code(const mqrpc_reply *r)
{
    return r->status == MQRPC_OK ? NULL : r->error_code;
}

const char *mqrpc_reply_error_message(const mqrpc_reply *r)
{
    return r->status == MQRPC_OK ? NULL : r->error_message;
}

const char *mqrpc_reply_app_id(const mqrpc_reply *r)
{
    return r->app_id;
}

const char *mqrpc_reply_queue(const mqrpc_reply *r)
{
    return r->queue;
}

const char *mqrpc_reply_traceparent(const mqrpc_reply *r)
{
    return r->traceparent;
}

const char *mqrpc_reply_call_traceparent(const mqrpc_reply *r)
{
    return r->call_traceparent;
}

void mqrpc_reply_free(mqrpc_reply *r)
{
    if (!r)
        return;
    if (r->owned) {
        free((char *)r->body);
        free((char *)r->error_code);
        free((char *)r->error_message);
        free((char *)r->app_id);
        free((char *)r->queue);
        free((char *)r->traceparent);
        free((char *)r->call_traceparent);
    }
    json_decref(r->result);
    free(r);
}
