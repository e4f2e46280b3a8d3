/*
 * The RPC client. One asynchronous core: calls are published at once and
 * kept in an id map (by correlation id) and in a list ordered by deadline;
 * mqrpc_client_process completes them. The blocking mqrpc_call is that core
 * plus a wait.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#define PREFIX_LEN 16 /* hex digits of the random per-client prefix */
#define CORR_MAX 48

struct call {
    uint64_t seq;
    int64_t deadline_us;
    int timeout_ms;
    mqrpc_done_fn done;
    void *arg;
    struct call *hnext;       /* id map chain */
    struct call *prev, *next; /* deadline order */
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
    struct call *head, *tail; /* earliest deadline first */
    uint64_t dropped;
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

mqrpc_client *mqrpc_client_new(const mqrpc_client_opts *opts)
{
    mqrpc_client *c = calloc(1, sizeof *c);
    uint8_t rnd[PREFIX_LEN / 2 + 4];

    if (!c)
        return NULL;
    if (opts)
        c->opts = *opts;
    c->map_size = 64;
    c->map = calloc(c->map_size, sizeof *c->map);
    if (!c->map ||
        !mqr_conn_cfg_init(&c->cfg, c->opts.url, MQRPC_ROLE_CLIENT,
                           c->opts.heartbeat_s, c->opts.connect_timeout_ms,
                           &c->opts.tls)) {
        free(c->map);
        free(c);
        return NULL;
    }
    /* The copies in cfg are the ones used; the caller's may be freed. */
    c->opts.url = NULL;
    memset(&c->opts.tls, 0, sizeof c->opts.tls);
    random_bytes(rnd, sizeof rnd);
    for (size_t i = 0; i < PREFIX_LEN / 2; i++)
        snprintf(c->prefix + 2 * i, 3, "%02x", rnd[i]);
    /* Sequence numbers start at a random point too (as nng does), so ids
     * differ between runs even in the unlikely case of a weak prefix. */
    memcpy(&c->next_seq, rnd + PREFIX_LEN / 2, 4);
    snprintf(c->err, sizeof c->err, "not connected");
    return c;
}

mqrpc_err mqrpc_client_connect(mqrpc_client *c)
{
    mqrpc_err e;

    if (c->conn)
        return MQRPC_ESTATE;
    e = mqr_conn_open(&c->cfg.p, &c->conn, c->err, sizeof c->err);
    if (e != MQRPC_OK)
        return e;
    if (c->opts.direct_reply_to) {
        /* The pseudo-queue needs no declaration; consuming it (no-ack, on
         * the channel that publishes) is what enables it. */
        snprintf(c->reply_queue, sizeof c->reply_queue,
                 "amq.rabbitmq.reply-to");
        e = MQRPC_OK;
    } else {
        /* A server-named exclusive queue, as the seed's client uses: it
         * lives exactly as long as this connection. */
        e = mqr_conn_declare_queue(c->conn, "", true, c->reply_queue);
    }
    if (e == MQRPC_OK)
        e = mqr_conn_consume(c->conn, c->reply_queue, true);
    if (e != MQRPC_OK) {
        snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
        mqr_conn_free(c->conn);
        c->conn = NULL;
        return e;
    }
    c->err[0] = '\0';
    return MQRPC_OK;
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

uint64_t mqrpc_client_dropped(const mqrpc_client *c)
{
    return c->dropped;
}

int mqrpc_client_next_timeout_ms(const mqrpc_client *c)
{
    int64_t wait = -1;
    int hb;

    if (!c->conn)
        return -1;
    if (mqr_conn_buffered(c->conn))
        return 0;
    if (c->head) {
        wait = (c->head->deadline_us - mqr_now_us() + 999) / 1000;
        if (wait < 0)
            wait = 0;
    }
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

/* Removes k from every structure, runs its callback once, frees it. */
static void complete(mqrpc_client *c, struct call *k, mqrpc_reply *r)
{
    list_unlink(c, k);
    c->pending--;
    r->queue = k->queue;
    if (r->status != MQRPC_OK && !r->error_code)
        r->error_code = mqrpc_errname(r->status);
    k->done(r, k->arg);
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
    char msg[512];

    while (c->head && c->head->deadline_us <= now) {
        struct call *k = c->head;
        map_take(c, k->seq);
        snprintf(msg, sizeof msg, "no reply from %s within %d ms", k->queue,
                 k->timeout_ms);
        fail_call(c, k, MQRPC_ETIMEOUT, msg);
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
        c->dropped++;
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
        c->dropped++;
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

/* The connection is gone: every call in flight learns it now. */
static mqrpc_err lost(mqrpc_client *c, mqrpc_err e)
{
    snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
    fail_all(c, e, c->err);
    return e;
}

mqrpc_err mqrpc_client_process(mqrpc_client *c, int timeout_ms)
{
    mqr_msg m;
    mqrpc_err e;
    bool any = false, corked = false;
    int wait;

    if (!c->conn)
        return MQRPC_ESTATE;
    expire_due(c);
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
        if (e != MQRPC_OK)
            return lost(c, e);
        any = true;
        /* More replies are already here: calls that their callbacks start
         * leave together, in one packet, once they are all handled. */
        if (!corked && mqr_conn_buffered(c->conn)) {
            mqr_conn_cork(c->conn, true);
            corked = true;
        }
        if (m.kind == MQR_DELIVERY)
            on_reply(c, &m);
        else
            on_return(c, &m);
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

mqrpc_err mqrpc_call_async(mqrpc_client *c, const char *queue, const void *body,
                           size_t len, int timeout_ms, mqrpc_done_fn done,
                           void *arg)
{
    char corr[CORR_MAX], expiration[16];
    size_t qlen;
    struct call *k, *at;
    mqr_props props = {0};
    mqrpc_err e;

    if (!queue || !done || timeout_ms <= 0 || (!body && len)) {
        snprintf(c->err, sizeof c->err, "invalid argument to mqrpc_call_async");
        return MQRPC_EINVAL;
    }
    qlen = strlen(queue);
    if (qlen == 0 || qlen > 255) {
        snprintf(c->err, sizeof c->err,
                 "queue name must be 1 to 255 bytes long");
        return MQRPC_EINVAL;
    }
    if (!c->conn) {
        snprintf(c->err, sizeof c->err, "not connected");
        return MQRPC_ESTATE;
    }
    k = malloc(sizeof *k + qlen + 1);
    if (!k)
        return MQRPC_ENOMEM;
    k->seq = c->next_seq++;
    k->timeout_ms = timeout_ms;
    k->deadline_us = mqr_now_us() + (int64_t)timeout_ms * 1000;
    k->done = done;
    k->arg = arg;
    memcpy(k->queue, queue, qlen + 1);

    snprintf(corr, sizeof corr, "%s-%" PRIx64, c->prefix, k->seq);
    snprintf(expiration, sizeof expiration, "%d", timeout_ms);
    props.correlation_id = mqr_cstr(corr);
    props.reply_to = mqr_cstr(c->reply_queue);
    props.expiration = mqr_cstr(expiration);
    /* mandatory: a queue nobody declared makes the broker return the
     * request (basic.return) instead of dropping it silently. */
    e = mqr_conn_publish(c->conn, mqr_cstr(queue), &props, body, len, true);
    if (e != MQRPC_OK) {
        free(k);
        return lost(c, e);
    }

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
                     size_t len, int timeout_ms, mqrpc_reply **out)
{
    struct sync_call s = {.want_copy = out != NULL};
    mqrpc_err e;

    if (out)
        *out = NULL;
    e = mqrpc_call_async(c, queue, body, len, timeout_ms, sync_done, &s);
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
    while (!s.done) {
        /* A connection failure completes every call, ours included. */
        e = mqrpc_client_process(c, -1);
        if (e != MQRPC_OK && e != MQRPC_ETIMEOUT && !s.done)
            return e; /* unreachable: lost() failed all calls */
    }
    if (out)
        *out = s.copy;
    return s.status;
}

mqrpc_err mqrpc_client_queue_info(mqrpc_client *c, const char *queue,
                                  uint32_t *messages, uint32_t *consumers)
{
    mqrpc_err e;

    if (!c->conn)
        return MQRPC_ESTATE;
    e = mqr_conn_queue_info(c->conn, queue, messages, consumers);
    if (e != MQRPC_OK)
        snprintf(c->err, sizeof c->err, "%s", mqr_conn_errmsg(c->conn));
    if (e == MQRPC_ECLOSED)
        fail_all(c, e, c->err);
    return e;
}

void mqrpc_client_free(mqrpc_client *c)
{
    if (!c)
        return;
    fail_all(c, MQRPC_ECANCELED, "the client was closed");
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
