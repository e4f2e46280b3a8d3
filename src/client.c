/*
 * The RPC client. One asynchronous core: calls are published at once and
 * kept in an id map (by correlation id), in a list ordered by deadline and,
 * until the broker confirms them, in a list in publish order;
 * mqrpc_client_process completes them. The blocking mqrpc_call is that core
 * plus a wait.
 *
 * When the connection is lost, every call learns it at once: it fails with
 * MQRPC_ECLOSED, unless it may be re-sent (idempotent, retries left) or its
 * request is safe in a durable queue with a durable reply queue to come
 * back to (durable, confirmed). The client reconnects with exponential
 * backoff from inside process and call_async, then re-sends.
 */
/* program_invocation_short_name names the default connection. */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define PREFIX_LEN 16 /* hex digits of the random per-client prefix */
#define CORR_MAX 48
/* A durable reply queue outlives its connection by this much idle time, so
 * replies wait for a reconnecting client but not forever for a dead one. */
#define REPLY_QUEUE_EXPIRES_MS (5 * 60 * 1000)

enum call_state {
    CALL_SENT,      /* published, not yet confirmed by the broker */
    CALL_CONFIRMED, /* the broker took it */
    CALL_RESEND     /* to publish again once reconnected */
};

struct call {
    uint64_t seq;
    uint64_t pub_seq; /* confirm sequence number on this connection */
    int64_t deadline_us;
    int64_t deadline_wall_ms; /* the same deadline, for the header */
    int timeout_ms;
    int retries_left;
    enum call_state state;
    bool unconfirmed; /* linked in the publish-order list */
    mqrpc_done_fn done;
    void *arg;
    struct call *hnext;         /* id map chain */
    struct call *prev, *next;   /* deadline order */
    struct call *cprev, *cnext; /* publish order, while unconfirmed */
    char *body;                 /* kept only while it may be re-sent */
    size_t body_len;
    char queue[];
};

struct mqrpc_reply {
    mqrpc_err status;
    json_t *result;
    const char *body;
    size_t body_len;
    const char *error_code;
    const char *error_message;
    const char *app_id;
    const char *queue;
    bool owned; /* strings and body are malloc'd (mqrpc_call's copy) */
};

struct mqrpc_client {
    mqrpc_client_opts opts;
    mqr_conn_cfg cfg;
    mqr_conn *conn;
    char reply_queue[256];
    char prefix[PREFIX_LEN + 1];
    uint64_t next_seq;
    struct call **map; /* open hashing on seq; size is a power of two */
    size_t map_size;
    size_t pending;
    uint64_t completed; /* callbacks run: did process do anything? */
    struct call *head, *tail;   /* earliest deadline first */
    struct call *chead, *ctail; /* unconfirmed, oldest publish first */
    mqrpc_client_stats st;
    bool ever_connected;
    int64_t reconnect_at_us; /* next attempt while disconnected */
    int backoff_ms;
    uint64_t rng;
    char name[256];  /* connection name */
    mqr_logger log;
    char down[400]; /* why the client is disconnected */
    char err[512];
};

static void random_bytes(void *buf, size_t len)
{
    /* Correlation ids must not be guessable by other clients of the broker,
     * who could otherwise inject replies. */
    if (getrandom(buf, len, 0) == (ssize_t)len)
        return;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, buf, len);
        close(fd);
        if (n == (ssize_t)len)
            return;
    }
    /* No entropy source at all: fall back to something unique per call. */
    uint64_t x = (uint64_t)mqr_now_us() ^ ((uint64_t)getpid() << 32);
    memcpy(buf, &x, len < sizeof x ? len : sizeof x);
}

/* "<program>@<host>:<pid>", the connection name the broker shows. */
static void default_name(char *buf, size_t len)
{
    char host[256];

    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';
    snprintf(buf, len, "%s@%s:%ld", program_invocation_short_name, host,
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
    c->map_size = 64;
    c->map = calloc(c->map_size, sizeof *c->map);
    if (!c->map || !mqr_conn_cfg_init(&c->cfg, &p)) {
        free(c->map);
        free(c);
        return NULL;
    }
    /* The copies in cfg are the ones used; the caller's may be freed. */
    c->opts.url = c->opts.url_file = c->opts.name = NULL;
    memset(&c->opts.tls, 0, sizeof c->opts.tls);
    c->log.fn = c->opts.log;
    c->log.arg = c->opts.log_arg;
    c->log.name = c->name;
    random_bytes(rnd, sizeof rnd);
    for (size_t i = 0; i < PREFIX_LEN / 2; i++)
        snprintf(c->prefix + 2 * i, 3, "%02x", rnd[i]);
    /* Sequence numbers start at a random point too (as nng does), so ids
     * differ between runs even in the unlikely case of a weak prefix. */
    memcpy(&c->next_seq, rnd + PREFIX_LEN / 2, 4);
    memcpy(&c->rng, rnd, sizeof c->rng);
    c->rng |= 1; /* xorshift must not start at 0 */
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
            return mqr_conn_consume(c->conn, c->reply_queue, true);
        if (e != MQRPC_ENOROUTE)
            return e;
        for (struct call *k = c->head; k; k = k->next)
            if (k->state == CALL_CONFIRMED)
                k->state = CALL_RESEND; /* sorted out by the caller */
    }
    /* Server-named, as the seed's client does: exclusive, living exactly
     * as long as this connection, unless durable. */
    e = mqr_conn_declare_queue(c->conn, "", &q, c->reply_queue);
    if (e == MQRPC_OK)
        e = mqr_conn_consume(c->conn, c->reply_queue, true);
    return e;
}

/* Opens the connection, the confirm mode and the reply queue. */
static mqrpc_err open_session(mqrpc_client *c)
{
    mqrpc_err e = mqr_conn_open(&c->cfg.p, &c->conn, c->err, sizeof c->err);

    if (e != MQRPC_OK)
        return e;
    /* Confirms tell the caller the broker took each request, and a full
     * queue (x-overflow reject-publish) refuses one only through a nack. */
    e = mqr_conn_confirm_select(c->conn);
    if (e == MQRPC_OK)
        e = open_reply_queue(c);
    if (e != MQRPC_OK) {
        snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
        mqr_conn_free(c->conn);
        c->conn = NULL;
        return e;
    }
    c->err[0] = '\0';
    return MQRPC_OK;
}

mqrpc_err mqrpc_client_connect(mqrpc_client *c)
{
    mqrpc_err e;

    if (c->conn || c->ever_connected)
        return MQRPC_ESTATE;
    e = open_session(c);
    if (e == MQRPC_OK)
        c->ever_connected = true;
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
    return c->pending;
}

void mqrpc_client_get_stats(const mqrpc_client *c, mqrpc_client_stats *out,
                            size_t size)
{
    mqrpc_client_stats st = c->st;

    st.connected = c->conn != NULL;
    mqr_struct_out(out, size, &st, sizeof st);
}

static bool may_reconnect(const mqrpc_client *c)
{
    return c->ever_connected && c->opts.reconnect_max_ms >= 0;
}

int mqrpc_client_next_timeout_ms(const mqrpc_client *c)
{
    int64_t wait = -1, now = mqr_now_us();
    int hb;

    if (c->head) {
        wait = (c->head->deadline_us - now + 999) / 1000;
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
    /* rabbitmq-c sends heartbeats only from inside its read calls; half the
     * interval keeps us inside the broker's tolerance. */
    hb = mqr_conn_heartbeat_s(c->conn);
    if (hb > 0 && (wait < 0 || wait > hb * 500))
        wait = hb * 500;
    return (int)wait;
}

/* ------------------------------------------------------------ id map */

static struct call **map_slot(mqrpc_client *c, uint64_t seq)
{
    return &c->map[seq & (c->map_size - 1)];
}

static void map_grow(mqrpc_client *c)
{
    size_t n = c->map_size * 2;
    struct call **m = calloc(n, sizeof *m);

    if (!m)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < c->map_size; i++) {
        struct call *k = c->map[i], *next;
        for (; k; k = next) {
            next = k->hnext;
            k->hnext = m[k->seq & (n - 1)];
            m[k->seq & (n - 1)] = k;
        }
    }
    free(c->map);
    c->map = m;
    c->map_size = n;
}

/* Removes and returns the call with this seq, or NULL. */
static struct call *map_take(mqrpc_client *c, uint64_t seq)
{
    for (struct call **p = map_slot(c, seq); *p; p = &(*p)->hnext) {
        if ((*p)->seq == seq) {
            struct call *k = *p;
            *p = k->hnext;
            return k;
        }
    }
    return NULL;
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

static void list_unlink(mqrpc_client *c, struct call *k)
{
    if (k->prev)
        k->prev->next = k->next;
    else
        c->head = k->next;
    if (k->next)
        k->next->prev = k->prev;
    else
        c->tail = k->prev;
}

static void unconfirmed_unlink(mqrpc_client *c, struct call *k)
{
    if (!k->unconfirmed)
        return;
    if (k->cprev)
        k->cprev->cnext = k->cnext;
    else
        c->chead = k->cnext;
    if (k->cnext)
        k->cnext->cprev = k->cprev;
    else
        c->ctail = k->cprev;
    k->cprev = k->cnext = NULL;
    k->unconfirmed = false;
}

static void unconfirmed_append(mqrpc_client *c, struct call *k)
{
    k->cnext = NULL;
    k->cprev = c->ctail;
    if (c->ctail)
        c->ctail->cnext = k;
    else
        c->chead = k;
    c->ctail = k;
    k->unconfirmed = true;
}

/* Removes k from every structure but the id map (the caller took it out
 * of there), runs its callback once, frees it. */
static void complete(mqrpc_client *c, struct call *k, mqrpc_reply *r)
{
    list_unlink(c, k);
    unconfirmed_unlink(c, k);
    c->pending--;
    c->completed++;
    r->queue = k->queue;
    if (r->status != MQRPC_OK && !r->error_code)
        r->error_code = mqrpc_errname(r->status);
    k->done(r, k->arg);
    free(k->body);
    free(k);
}

static void fail_call(mqrpc_client *c, struct call *k, mqrpc_err status,
                      const char *message)
{
    mqrpc_reply r = {.status = status, .error_message = message};
    complete(c, k, &r);
}

static void fail_all(mqrpc_client *c, mqrpc_err status, const char *message)
{
    while (c->head) {
        struct call *k = c->head;
        map_take(c, k->seq);
        fail_call(c, k, status, message);
    }
}

static void expire_due(mqrpc_client *c)
{
    int64_t now = mqr_now_us();
    char msg[768];

    while (c->head && c->head->deadline_us <= now) {
        struct call *k = c->head;
        map_take(c, k->seq);
        if (k->state == CALL_RESEND) {
            /* Waiting to be re-sent: the connection is what failed. */
            snprintf(msg, sizeof msg,
                     "connection to the broker lost and not regained "
                     "within %d ms (%s)",
                     k->timeout_ms, c->down);
            fail_call(c, k, MQRPC_ECLOSED, msg);
        } else {
            snprintf(msg, sizeof msg, "no reply from %s within %d ms",
                     k->queue, k->timeout_ms);
            fail_call(c, k, MQRPC_ETIMEOUT, msg);
        }
    }
}

static void on_reply(mqrpc_client *c, const mqr_msg *m)
{
    struct call *k;
    uint64_t seq;
    mqrpc_fault fault;
    mqrpc_reply r = {0};
    char app_id[256];

    if (!parse_corr(c, m->correlation_id, &seq) || !(k = map_take(c, seq))) {
        /* Late (after a timeout), duplicated, or not ours: never fatal. */
        c->st.dropped++;
        return;
    }
    r.body = m->body.ptr;
    r.body_len = m->body.len;
    if (m->app_id.len) {
        snprintf(app_id, sizeof app_id, "%.*s", (int)m->app_id.len,
                 m->app_id.ptr);
        r.app_id = app_id;
    }
    r.status = mqr_decode_reply(mqr_str_eq(m->type, "error"), m->body.ptr,
                                m->body.len, &r.result, &fault);
    if (r.status != MQRPC_OK) {
        r.error_code = fault.code;
        r.error_message = fault.message;
    }
    complete(c, k, &r);
    json_decref(r.result);
}

static void on_return(mqrpc_client *c, const mqr_msg *m)
{
    struct call *k;
    uint64_t seq;
    char msg[512];

    if (!parse_corr(c, m->correlation_id, &seq) || !(k = map_take(c, seq))) {
        c->st.dropped++;
        return;
    }
    /* 312 NO_ROUTE: nothing declared the queue, so no service will ever
     * see the request; say so now instead of after the timeout. */
    if (m->reply_code == 312)
        snprintf(msg, sizeof msg, "no service on queue %s", k->queue);
    else
        snprintf(msg, sizeof msg, "the broker returned the request to %s: %.*s",
                 k->queue, (int)m->reply_text.len, m->reply_text.ptr);
    fail_call(c, k, MQRPC_ENOROUTE, msg);
}

/* A publisher confirm: an ack means the broker took the request (for a
 * persistent one, wrote it to disk); a nack means it refused it, which
 * for our queues means x-max-length was reached. The broker confirms in
 * publish order, so the calls concerned are at the front of the list. */
static void on_confirm(mqrpc_client *c, const mqr_msg *m)
{
    struct call *k = c->chead, *next;
    char msg[512];

    for (; k && k->pub_seq <= m->delivery_tag; k = next) {
        next = k->cnext;
        if (!m->multiple && k->pub_seq != m->delivery_tag)
            continue;
        unconfirmed_unlink(c, k);
        if (m->kind == MQR_ACK) {
            k->state = CALL_CONFIRMED;
            continue;
        }
        map_take(c, k->seq);
        snprintf(msg, sizeof msg,
                 "%s is overloaded: the broker refused the request (the "
                 "queue is full)",
                 k->queue);
        fail_call(c, k, MQRPC_EOVERLOAD, msg);
    }
}

/* The connection is gone: every call in flight learns it now. A call
 * that may be re-sent waits for the reconnection; a durable call the
 * broker confirmed waits for its reply, which goes to a queue that
 * outlives the connection; every other call fails. */
static mqrpc_err lost(mqrpc_client *c)
{
    char msg[600];
    struct call *k, *next;

    snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
    snprintf(c->down, sizeof c->down, "%.399s", c->err);
    mqr_conn_free(c->conn);
    c->conn = NULL;
    c->st.lost++;
    /* The first attempt is immediate: a killed connection to a live
     * broker is the common case. */
    c->backoff_ms = c->opts.reconnect_min_ms;
    c->reconnect_at_us = mqr_now_us();
    snprintf(msg, sizeof msg, "connection lost: %s", c->err);
    for (k = c->head; k; k = next) {
        next = k->next;
        unconfirmed_unlink(c, k);
        if (c->opts.durable && k->state == CALL_CONFIRMED &&
            may_reconnect(c))
            continue;
        if (k->retries_left > 0 && may_reconnect(c)) {
            k->state = CALL_RESEND;
            continue;
        }
        map_take(c, k->seq);
        fail_call(c, k, MQRPC_ECLOSED, msg);
    }
    return MQRPC_ECLOSED;
}

static mqrpc_err send_call(mqrpc_client *c, struct call *k)
{
    char corr[CORR_MAX], expiration[24];
    int64_t left = (k->deadline_us - mqr_now_us()) / 1000;
    mqr_props props = {0};
    mqrpc_err e;

    snprintf(corr, sizeof corr, "%s-%" PRIx64, c->prefix, k->seq);
    snprintf(expiration, sizeof expiration, "%" PRId64, left > 0 ? left : 1);
    props.correlation_id = mqr_cstr(corr);
    props.reply_to = mqr_cstr(c->reply_queue);
    props.expiration = mqr_cstr(expiration);
    props.deadline_ms = k->deadline_wall_ms;
    props.persistent = c->opts.durable;
    /* mandatory: a queue nobody declared makes the broker return the
     * request (basic.return) instead of dropping it silently. */
    e = mqr_conn_publish(c->conn, mqr_cstr(k->queue), &props, k->body,
                         k->body_len, true);
    if (e != MQRPC_OK)
        return e;
    k->state = CALL_SENT;
    k->pub_seq = mqr_conn_publish_seq(c->conn);
    unconfirmed_append(c, k);
    return MQRPC_OK;
}

/* Reconnects if disconnected and the backoff allows it now, then re-sends
 * what waits for it. Returns MQRPC_OK when connected. */
static mqrpc_err try_reconnect(mqrpc_client *c)
{
    struct call *k, *next;

    if (c->conn)
        return MQRPC_OK;
    if (!may_reconnect(c) || mqr_now_us() < c->reconnect_at_us)
        return MQRPC_ECLOSED;
    if (open_session(c) != MQRPC_OK) {
        snprintf(c->down, sizeof c->down, "%.399s", c->err);
        c->reconnect_at_us =
            mqr_now_us() + (int64_t)mqr_jitter(&c->rng, c->backoff_ms) * 1000;
        c->backoff_ms = mqr_backoff_next(c->backoff_ms, c->opts.reconnect_max_ms);
        return MQRPC_ECLOSED;
    }
    c->st.reconnects++;
    for (k = c->head; k; k = next) {
        next = k->next;
        if (k->state != CALL_RESEND)
            continue;
        if (k->retries_left <= 0) {
            /* A durable call whose reply queue vanished meanwhile. */
            map_take(c, k->seq);
            fail_call(c, k, MQRPC_ECLOSED,
                      "connection lost, and the reply queue with it");
            continue;
        }
        k->retries_left--;
        c->st.retried++;
        if (send_call(c, k) != MQRPC_OK)
            return lost(c);
    }
    return MQRPC_OK;
}

/* Disconnected: reconnect when due, else sleep until the next thing that
 * can happen (a deadline, a reconnection attempt, timeout_ms). */
static mqrpc_err process_offline(mqrpc_client *c, int timeout_ms)
{
    uint64_t before = c->completed;
    int wait;

    if (try_reconnect(c) == MQRPC_OK)
        return MQRPC_OK;
    expire_due(c);
    if (c->completed != before)
        return MQRPC_OK;
    wait = mqrpc_client_next_timeout_ms(c);
    if (timeout_ms >= 0 && (wait < 0 || wait > timeout_ms))
        wait = timeout_ms;
    if (wait < 0)
        return MQRPC_ECLOSED; /* nothing will ever happen */
    if (wait > 0) {
        struct timespec ts = {wait / 1000, (long)(wait % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (try_reconnect(c) == MQRPC_OK)
        return MQRPC_OK;
    expire_due(c);
    return c->completed != before ? MQRPC_OK : MQRPC_ETIMEOUT;
}

mqrpc_err mqrpc_client_process(mqrpc_client *c, int timeout_ms)
{
    mqr_msg m;
    mqrpc_err e;
    bool any = false, corked = false;
    uint64_t before;
    int wait;

    if (!c->conn) {
        if (!c->ever_connected)
            return MQRPC_ESTATE;
        return process_offline(c, timeout_ms);
    }
    /* A call that expired since the last visit has had its callback now:
     * that is news, and waiting for a frame as well could mean waiting
     * forever (mqrpc_call waits with -1 for that very call). */
    before = c->completed;
    expire_due(c);
    if (c->completed != before)
        return MQRPC_OK;
    wait = timeout_ms;
    if (c->head) {
        int64_t left = (c->head->deadline_us - mqr_now_us() + 999) / 1000;
        if (left < 0)
            left = 0;
        if (wait < 0 || wait > left)
            wait = (int)left;
    }
    for (;;) {
        e = mqr_conn_wait(c->conn, wait, &m);
        if (e == MQRPC_ETIMEOUT)
            break;
        if (e != MQRPC_OK) {
            if (corked)
                mqr_conn_cork(c->conn, false);
            return lost(c);
        }
        any = true;
        /* More replies are already here: calls that their callbacks start
         * leave together, in one packet, once they are all handled. */
        if (!corked && mqr_conn_buffered(c->conn)) {
            mqr_conn_cork(c->conn, true);
            corked = true;
        }
        if (m.kind == MQR_DELIVERY)
            on_reply(c, &m);
        else if (m.kind == MQR_RETURN)
            on_return(c, &m);
        else if (m.kind == MQR_ACK || m.kind == MQR_NACK)
            on_confirm(c, &m);
        else if (m.kind == MQR_CANCEL) {
            mqr_conn_abort(c->conn, "the broker cancelled the reply "
                                    "consumer (reply queue deleted?)");
            if (corked)
                mqr_conn_cork(c->conn, false);
            return lost(c);
        }
        /* A callback's new call may have found the connection dead. */
        if (!c->conn)
            return MQRPC_ECLOSED;
        /* Drain what is already buffered, but do not block again. */
        if (!mqr_conn_buffered(c->conn))
            break;
        wait = 0;
    }
    if (corked)
        mqr_conn_cork(c->conn, false);
    expire_due(c);
    return any ? MQRPC_OK : MQRPC_ETIMEOUT;
}

/* Puts k into the id map and the deadline list. */
static void track(mqrpc_client *c, struct call *k)
{
    struct call *at;

    if (c->pending >= c->map_size)
        map_grow(c);
    k->hnext = *map_slot(c, k->seq);
    *map_slot(c, k->seq) = k;
    /* Deadlines mostly arrive in order: walk back from the tail. */
    for (at = c->tail; at && at->deadline_us > k->deadline_us; at = at->prev)
        ;
    k->prev = at;
    k->next = at ? at->next : c->head;
    if (k->next)
        k->next->prev = k;
    else
        c->tail = k;
    if (at)
        at->next = k;
    else
        c->head = k;
    c->pending++;
}

mqrpc_err mqrpc_call_async(mqrpc_client *c, const char *queue, const void *body,
                           size_t len, int timeout_ms, unsigned flags,
                           mqrpc_done_fn done, void *arg)
{
    size_t qlen;
    struct call *k;
    bool resendable;
    mqrpc_err e;

    if (!queue || !done || timeout_ms <= 0 || (!body && len) ||
        (flags & ~MQRPC_CALL_IDEMPOTENT)) {
        snprintf(c->err, sizeof c->err, "invalid argument to mqrpc_call_async");
        return MQRPC_EINVAL;
    }
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
    if (try_reconnect(c) != MQRPC_OK) {
        snprintf(c->err, sizeof c->err, "not connected to the broker (%s)%s",
                 c->down, may_reconnect(c) ? "; reconnecting" : "");
        return MQRPC_ECLOSED;
    }
    resendable = (flags & MQRPC_CALL_IDEMPOTENT) && c->opts.retries > 0;
    k = calloc(1, sizeof *k + qlen + 1);
    if (!k)
        return MQRPC_ENOMEM;
    k->seq = c->next_seq++;
    k->timeout_ms = timeout_ms;
    k->deadline_us = mqr_now_us() + (int64_t)timeout_ms * 1000;
    k->deadline_wall_ms = mqr_wall_ms() + timeout_ms;
    k->retries_left = resendable ? c->opts.retries : 0;
    k->done = done;
    k->arg = arg;
    memcpy(k->queue, queue, qlen + 1);
    /* send_call reads the body from the call; only a call that may be
     * re-sent keeps its own copy after this function returns. */
    k->body = (char *)body;
    k->body_len = len;
    if (resendable && len) {
        k->body = malloc(len);
        if (!k->body) {
            free(k);
            return MQRPC_ENOMEM;
        }
        memcpy(k->body, body, len);
    }
    e = send_call(c, k);
    if (!resendable)
        k->body = NULL;
    if (e != MQRPC_OK && !resendable) {
        /* Not sent and not to be re-sent: the caller hears it from us,
         * and done is never called. */
        free(k);
        lost(c);
        return MQRPC_ECLOSED;
    }
    track(c, k);
    if (e != MQRPC_OK)
        lost(c); /* k waits for the reconnection */
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
    struct sync_call s = {.want_copy = out != NULL};
    mqrpc_err e;

    if (out)
        *out = NULL;
    e = mqrpc_call_async(c, queue, body, len, timeout_ms, flags, sync_done,
                         &s);
    if (e != MQRPC_OK) {
        if (out) {
            mqrpc_reply r = {.status = e,
                             .error_message = c->err,
                             .error_code = mqrpc_errname(e),
                             .queue = queue};
            *out = reply_copy(&r);
        }
        return e;
    }
    /* Every call completes by its deadline at the latest, whatever
     * happens to the connection meanwhile. */
    while (!s.done)
        mqrpc_client_process(c, -1);
    if (out)
        *out = s.copy;
    return s.status;
}

mqrpc_err mqrpc_client_queue_info(mqrpc_client *c, const char *queue,
                                  uint32_t *messages, uint32_t *consumers)
{
    mqrpc_err e;

    if (!c->ever_connected)
        return MQRPC_ESTATE;
    if (try_reconnect(c) != MQRPC_OK)
        return MQRPC_ECLOSED;
    e = mqr_conn_queue_info(c->conn, queue, messages, consumers);
    if (e != MQRPC_OK)
        snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
    if (mqr_conn_fd(c->conn) < 0)
        lost(c);
    return e;
}

void mqrpc_client_free(mqrpc_client *c)
{
    if (!c)
        return;
    fail_all(c, MQRPC_ECANCELED, "the client was closed");
    /* Nobody will come back for a durable reply queue's replies. */
    if (c->conn && c->opts.durable && c->reply_queue[0])
        mqr_conn_delete_queue(c->conn, c->reply_queue);
    mqr_conn_free(c->conn);
    free(c->map);
    mqr_conn_cfg_clear(&c->cfg);
    free(c);
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
    }
    json_decref(r->result);
    free(r);
}
