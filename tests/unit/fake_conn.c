#include "fake_conn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct fake fake;

struct mqr_conn {
    int id;
    bool open;
    bool blocked;
    uint64_t pub_seq;
    char *msg_body; /* the current message's body */
    char corr[64];
    char text[64];
    char err[128];
};

void fake_reset(void)
{
    memset(&fake, 0, sizeof fake);
}

static struct fake_event *push(enum mqr_msg_kind kind)
{
    struct fake_event *e = &fake.ev[fake.nev++ % FAKE_MAX_EVENTS];
    memset(e, 0, sizeof *e);
    e->kind = kind;
    return e;
}

void fake_reply(const char *corr, const char *body)
{
    static uint64_t tag;
    struct fake_event *e = push(MQR_DELIVERY);
    e->tag = ++tag;
    snprintf(e->corr, sizeof e->corr, "%s", corr);
    snprintf(e->body, sizeof e->body, "%s", body);
}

void fake_ack(uint64_t tag, bool multiple)
{
    struct fake_event *e = push(MQR_ACK);
    e->tag = tag;
    e->multiple = multiple;
}

void fake_nack(uint64_t tag)
{
    push(MQR_NACK)->tag = tag;
}

void fake_fail(void)
{
    push(0);
}

void fake_blocked(const char *reason)
{
    snprintf(push(MQR_BLOCKED)->text, sizeof fake.ev[0].text, "%s", reason);
}

void fake_unblocked(void)
{
    push(MQR_UNBLOCKED);
}

void fake_wake(void)
{
    push(MQR_WAKE);
}

mqrpc_err mqr_conn_open(const mqr_conn_params *p, mqr_conn **out, char *err,
                        size_t errlen)
{
    mqr_conn *c;

    *out = NULL;
    if (p->addrs && fake.addr_count) {
        unsigned a = p->addrs->next % fake.addr_count;
        p->addrs->count = fake.addr_count;
        if (fake.ntried < 64)
            fake.tried[fake.ntried++] = a;
        if (fake.dead & (1u << a)) {
            snprintf(err, errlen, "cannot connect to fake:%u: connection "
                                  "refused", a);
            return MQRPC_ECONNECT;
        }
    }
    if (fake.open_fails > 0) {
        fake.open_fails--;
        snprintf(err, errlen, "cannot connect to fake:1: connection refused");
        return MQRPC_ECONNECT;
    }
    c = calloc(1, sizeof *c);
    if (!c)
        return MQRPC_ENOMEM;
    c->id = ++fake.conn_id;
    c->open = true;
    fake.opens++;
    fake.live++;
    *out = c;
    return MQRPC_OK;
}

void mqr_conn_free(mqr_conn *c)
{
    if (!c)
        return;
    free(c->msg_body);
    fake.live--;
    free(c);
}

const char *mqr_conn_errmsg(const mqr_conn *c)
{
    return c->err;
}

int mqr_conn_fd(const mqr_conn *c)
{
    return c && c->open ? 100 + c->id : -1;
}

bool mqr_conn_buffered(const mqr_conn *c)
{
    return c->open && fake.next_ev < fake.nev;
}

int mqr_conn_heartbeat_s(const mqr_conn *c)
{
    (void)c;
    return 0;
}

bool mqr_conn_blocked(const mqr_conn *c)
{
    return c->blocked;
}

bool mqr_conn_can_publish(mqr_conn *c, size_t len)
{
    (void)len;
    return c->open && !c->blocked && !fake.full;
}

void mqr_conn_abort(mqr_conn *c, const char *why)
{
    snprintf(c->err, sizeof c->err, "%s", why);
    c->open = false;
}

mqrpc_err mqr_conn_declare_queue(mqr_conn *c, const char *queue,
                                 const mqr_queue_opts *o, char *name_out)
{
    (void)queue;
    (void)o;
    if (!c->open)
        return MQRPC_ECLOSED;
    if (name_out)
        snprintf(name_out, 256, "amq.gen-fake%d", c->id);
    return MQRPC_OK;
}

mqrpc_err mqr_conn_delete_queue(mqr_conn *c, const char *queue)
{
    (void)queue;
    return c->open ? MQRPC_OK : MQRPC_ECLOSED;
}

mqrpc_err mqr_conn_confirm_select(mqr_conn *c)
{
    c->pub_seq = 0;
    return c->open ? MQRPC_OK : MQRPC_ECLOSED;
}

uint64_t mqr_conn_publish_seq(const mqr_conn *c)
{
    return c->pub_seq;
}

mqrpc_err mqr_conn_consume(mqr_conn *c, const char *queue, bool no_ack)
{
    (void)queue;
    fake.consume_no_ack = no_ack;
    return c->open ? MQRPC_OK : MQRPC_ECLOSED;
}

mqrpc_err mqr_conn_publish(mqr_conn *c, mqr_str routing_key,
                           const mqr_props *props, const void *body, size_t len,
                           bool mandatory)
{
    struct fake_pub *p;

    (void)mandatory;
    if (!c->open)
        return MQRPC_ECLOSED;
    if (fake.publish_fails > 0) {
        fake.publish_fails--;
        snprintf(c->err, sizeof c->err, "publish on fake: a socket error");
        c->open = false;
        return MQRPC_ECLOSED;
    }
    if (fake.npub < FAKE_MAX_PUB) {
        p = &fake.pub[fake.npub++];
        snprintf(p->queue, sizeof p->queue, "%.*s", (int)routing_key.len,
                 routing_key.ptr);
        snprintf(p->corr, sizeof p->corr, "%.*s",
                 (int)props->correlation_id.len, props->correlation_id.ptr);
        snprintf(p->body, sizeof p->body, "%.*s", (int)len,
                 (const char *)body);
        snprintf(p->traceparent, sizeof p->traceparent, "%.*s",
                 (int)props->traceparent.len,
                 props->traceparent.ptr ? props->traceparent.ptr : "");
        snprintf(p->tracestate, sizeof p->tracestate, "%.*s",
                 (int)props->tracestate.len,
                 props->tracestate.ptr ? props->tracestate.ptr : "");
        p->seq = c->pub_seq + 1;
        p->conn_id = c->id;
    }
    c->pub_seq++;
    return MQRPC_OK;
}

void mqr_conn_cork(mqr_conn *c, bool on)
{
    (void)c;
    (void)on;
}

mqrpc_err mqr_conn_wait(mqr_conn *c, int timeout_ms, mqr_msg *m)
{
    struct fake_event *e;

    free(c->msg_body);
    c->msg_body = NULL;
    memset(m, 0, sizeof *m);
    if (!c->open)
        return MQRPC_ECLOSED;
    if (fake.next_ev == fake.nev) {
        /* Nothing scripted: time passes (bounded, so a test that waits
         * forever shows up as a timeout of its deadlines). */
        int ms = timeout_ms < 0 || timeout_ms > 5 ? 5 : timeout_ms;
        struct timespec ts = {0, ms * 1000000L};
        nanosleep(&ts, NULL);
        return MQRPC_ETIMEOUT;
    }
    e = &fake.ev[fake.next_ev++ % FAKE_MAX_EVENTS];
    if (e->kind == 0) {
        snprintf(c->err, sizeof c->err, "connection to fake lost");
        c->open = false;
        return MQRPC_ECLOSED;
    }
    m->kind = e->kind;
    switch (e->kind) {
    case MQR_DELIVERY:
        c->msg_body = strdup(e->body);
        snprintf(c->corr, sizeof c->corr, "%s",
                 strcmp(e->corr, FAKE_LAST_CORR) == 0 && fake.npub
                     ? fake.pub[fake.npub - 1].corr
                     : e->corr);
        m->body = mqr_cstr(c->msg_body);
        m->correlation_id = mqr_cstr(c->corr);
        m->traceparent = mqr_cstr(e->traceparent);
        m->delivery_tag = e->tag;
        break;
    case MQR_ACK:
    case MQR_NACK:
        m->delivery_tag = e->tag;
        m->multiple = e->multiple;
        break;
    case MQR_BLOCKED:
        c->blocked = true;
        snprintf(c->text, sizeof c->text, "%s", e->text);
        m->reply_text = mqr_cstr(c->text);
        break;
    case MQR_UNBLOCKED: c->blocked = false; break;
    default: break;
    }
    return MQRPC_OK;
}

mqrpc_err mqr_conn_ack(mqr_conn *c, uint64_t delivery_tag, bool multiple)
{
    (void)delivery_tag;
    (void)multiple;
    if (!c->open)
        return MQRPC_ECLOSED;
    fake.acks++;
    return MQRPC_OK;
}

mqrpc_err mqr_conn_queue_info(mqr_conn *c, const char *queue,
                              uint32_t *messages, uint32_t *consumers)
{
    (void)queue;
    if (messages)
        *messages = 0;
    if (consumers)
        *consumers = 1;
    return c->open ? MQRPC_OK : MQRPC_ECLOSED;
}

void mqr_conn_set_wake_fd(mqr_conn *c, int fd)
{
    /* The fake's wait never sleeps on a socket: nothing to watch. */
    (void)c;
    (void)fd;
}

mqrpc_err mqr_conn_exchange_exists(mqr_conn *c, const char *exchange)
{
    (void)exchange;
    if (!c->open)
        return MQRPC_ECLOSED;
    return fake.control_exchange ? MQRPC_OK : MQRPC_ENOROUTE;
}

mqrpc_err mqr_conn_publish_to(mqr_conn *c, const char *exchange,
                              mqr_str routing_key, const mqr_props *p,
                              const void *body, size_t len)
{
    (void)exchange;
    return mqr_conn_publish(c, routing_key, p, body, len, false);
}
