/*
 * The outbox: publishes that cannot go at once (the broker blocks us, or
 * the socket is full) are held in order, and re-publishes (a redelivered
 * request back to its queue, a poison request to "<queue>.dlq", an
 * unstarted request handed back at a stop) go on a channel in confirm mode
 * and wait for the broker's confirm. Each carries the delivery it
 * acknowledges once done, so a request is acknowledged only after what
 * replaces it is safe with the broker; a refused copy (a full queue) gets
 * its caller an explicit error reply instead of being lost.
 */
#include "service.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The remote error code of a request the queue refused to take back: the
 * name of MQRPC_EOVERLOAD, what a caller gets when the queue refuses it. */
#define OVERLOADED "overloaded"


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

void mqr_out_clear(struct out_list *l)
{
    struct out *o;

    while ((o = out_pop(l)))
        free(o);
}

bool mqr_acks_waiting(const mqrpc_service *s)
{
    return s->held.n || s->unconfirmed.n;
}

/* Copies s into the entry's data at *at, NUL-terminated (log lines). */
static mqr_str out_copy(char **at, mqr_str s)
{
    mqr_str r = {*at, s.len};

    if (s.len)
        memcpy(*at, s.ptr, s.len);
    (*at)[s.len] = '\0';
    *at += s.len + 1;
    return r;
}

/* An entry with copies of what the message in hand lends (valid only until
 * the next mqr_conn_wait). */
static struct out *out_new(enum out_kind kind, uint64_t tag, mqr_str rk,
                           mqr_str reply_to, const mqr_props *p, mqr_str body,
                           const mqr_trace *trace)
{
    size_t n = rk.len + reply_to.len + p->correlation_id.len +
               p->reply_to.len + p->type.len + p->app_id.len +
               p->expiration.len + p->traceparent.len + p->tracestate.len +
               body.len + 10;
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
    o->props.traceparent = out_copy(&at, p->traceparent);
    o->props.tracestate = out_copy(&at, p->tracestate);
    o->body = out_copy(&at, body);
    if (trace)
        o->trace = *trace;
    return o;
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
mqrpc_err mqr_send_held(mqrpc_service *s)
{
    mqrpc_err e = MQRPC_OK;

    while (s->held.head &&
           mqr_conn_can_publish(s->conn, s->held.head->body.len)) {
        struct out *o = out_pop(&s->held);

        if (o->kind == OUT_REPLY) {
            e = mqr_conn_publish(s->conn, o->rk, &o->props, o->body.ptr,
                                 o->body.len, false);
            if (e == MQRPC_OK && o->tag)
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
    return mqr_send_held(s);
}

const mqr_req_fields *mqr_out_fields(const mqrpc_service *s,
                                     const struct out *o, mqr_req_fields *f)
{
    if (!o->trace.trace_id[0])
        return NULL;
    *f = (mqr_req_fields){.queue = s->queue,
                          .correlation_id = o->props.correlation_id.ptr,
                          .trace_id = o->trace.trace_id,
                          .span_id = o->trace.span_id,
                          .duration_ms = -1};
    return f;
}

mqrpc_err mqr_send_reply(mqrpc_service *s, uint64_t tag,
                            mqr_str correlation_id, mqr_str reply_to,
                            bool persistent, const char *body, size_t len,
                            bool is_error, const mqr_trace *trace,
                            mqr_str tracestate)
{
    mqr_props props = reply_props(s, correlation_id, persistent, is_error);
    mqr_str b = {body, len};
    mqrpc_err e;

    /* The caller learns our span: the reply is its child's answer. */
    if (trace && trace->trace_id[0]) {
        props.traceparent = mqr_cstr(trace->traceparent);
        props.tracestate = tracestate;
    }

    if (!s->held.head && mqr_conn_can_publish(s->conn, len)) {
        e = mqr_conn_publish(s->conn, reply_to, &props, body, len, false);
        if (e != MQRPC_OK)
            return e;
        return tag ? mqr_service_done_with(s, tag) : MQRPC_OK;
    }
    return submit(s, out_new(OUT_REPLY, tag, reply_to, mqr_cstr(""), &props,
                             b, trace));
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
    MQR_STAT_ADD(s->st.replies[mqrpc_code_of(fault->code)], 1);
    e = mqr_send_reply(s, o->tag, o->props.correlation_id, o->reply_to,
                       o->props.persistent, body, len, true, &o->trace,
                       o->props.tracestate);
    free(body);
    return e;
}

/* The broker confirmed (ack) or refused (nack) the re-publish o. */
static mqrpc_err settle(mqrpc_service *s, const struct out *o, bool ack)
{
    mqr_str id = o->props.correlation_id;
    mqrpc_fault fault;
    mqr_req_fields fields;
    const mqr_req_fields *f = mqr_out_fields(s, o, &fields);

    switch (o->kind) {
    case OUT_REQUEUE:
        if (ack) {
            MQR_STAT_ADD(s->st.redelivered, 1);
            if (s->opts.verbose)
                mqr_log_req(&s->log, MQRPC_LOG_DEBUG, f,
                        "request %.*s redelivered (%u failed deliveries): "
                        "queued again",
                        mqr_service_shown_len(id), id.ptr, (unsigned)o->props.deliveries);
            return mqr_conn_ack(s->conn, o->tag, false);
        }
        MQR_STAT_ADD(s->st.refused, 1);
        mqr_log_req(&s->log, MQRPC_LOG_WARN, f,
                "request %.*s redelivered, but the broker refused to queue "
                "it again (%s full?): answered overloaded",
                mqr_service_shown_len(id), id.ptr, s->queue);
        mqrpc_fault_set(&fault, OVERLOADED,
                        "the request was redelivered after its instance "
                        "died and %s refused to take it back (full)",
                        s->queue);
        return send_fault(s, o, &fault);
    case OUT_DEAD_LETTER:
        if (ack) {
            MQR_STAT_ADD(s->st.dead_lettered, 1);
            mqr_log_req(&s->log, MQRPC_LOG_WARN, f,
                    "request %.*s dead-lettered to %s after %u deliveries",
                    mqr_service_shown_len(id), id.ptr, s->dlq,
                    (unsigned)o->props.deliveries);
            mqrpc_fault_set(&fault, MQRPC_DEAD_LETTER,
                            "the request was delivered %u times and never "
                            "answered (the instances that took it died); it "
                            "is in %s and will not be run again",
                            (unsigned)o->props.deliveries, s->dlq);
        } else {
            MQR_STAT_ADD(s->st.refused, 1);
            mqr_log_req(&s->log, MQRPC_LOG_WARN, f,
                    "request %.*s failed %u deliveries, and the broker "
                    "refused it in %s: dropped, its caller told",
                    mqr_service_shown_len(id), id.ptr, (unsigned)o->props.deliveries,
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
            MQR_STAT_ADD(s->st.handed_back, 1);
            return mqr_conn_ack(s->conn, o->tag, false);
        }
        /* Left unacknowledged: closing the channel puts it back, where it
         * counts one failed delivery. */
        mqr_log_req(&s->log, MQRPC_LOG_WARN, f,
                "request %.*s: the broker refused to take it back; it "
                "returns as a redelivery",
                mqr_service_shown_len(id), id.ptr);
        return MQRPC_OK;
    case OUT_REPLY: break;
    }
    return MQRPC_OK;
}

/* A publisher confirm from the confirm channel: settles the re-publishes it
 * covers. Confirms of different queues may come out of order. */
mqrpc_err mqr_on_confirm(mqrpc_service *s, const mqr_msg *m)
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
mqrpc_err mqr_republish(mqrpc_service *s, const mqr_msg *m,
                        const mqr_trace *trace)
{
    mqr_props props = {0};
    uint32_t failed = m->deliveries;
    enum out_kind kind = OUT_HAND_BACK;
    char expiration[24];

    if (s->opts.queue_type == MQRPC_QUEUE_QUORUM)
        /* m->deliveries is already the failed count (on_delivery): the
         * broker counted them; nothing goes back with count + 1. */
        kind = failed >= s->opts.max_deliveries ? OUT_DEAD_LETTER
                                                : OUT_HAND_BACK;
    else if (m->redelivered)
        kind = mqr_redelivery_decide(m->deliveries, s->opts.max_deliveries,
                                     &failed)
                   ? OUT_DEAD_LETTER
                   : OUT_REQUEUE;
    props.correlation_id = m->correlation_id;
    props.reply_to = m->reply_to;
    props.persistent = m->persistent;
    props.deadline_ms = m->deadline_ms;
    props.deliveries = failed;
    props.traceparent = m->traceparent;
    props.tracestate = m->tracestate;
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
                             m->reply_to, &props, m->body, trace));
}
