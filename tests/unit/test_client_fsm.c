/*
 * The client's state machine driven through a fake connection
 * (fake_conn.c, linked instead of amqp_conn.c): completions, losses and
 * reconnections in the orders a broker can produce them, and callbacks
 * that re-enter the client. ASan turns a use after free, a double free or
 * a free of the caller's memory into a failure.
 */
#include "fake_conn.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#define MAX_CALLS 64

struct rec {
    int calls;               /* callbacks run */
    mqrpc_err status;
    char body[64];           /* the reply body as seen in the callback */
    char message[256];
    /* what the callback does */
    mqrpc_client *c;
    bool reissue;            /* start a new call */
    bool free_client;        /* free the client */
    bool publish_fails;      /* the new call's publish fails */
    bool try_blocking;       /* call mqrpc_call and process */
    mqrpc_err nested_call, nested_process;
    bool body_still_valid;   /* re-read after the nested call */
    char traceparent[64];      /* the reply's, or "(none)" */
    char call_traceparent[64]; /* the call's */
};

static struct rec recs[MAX_CALLS];
static int nrecs;
static int reissued_ok, reissued_cancelled;

static void on_done(const mqrpc_reply *r, void *arg);

static mqrpc_err start(mqrpc_client *c, const char *body, unsigned flags,
                       int timeout_ms, struct rec **out)
{
    struct rec *rec = &recs[nrecs++];
    mqrpc_err e;

    memset(rec, 0, sizeof *rec);
    rec->c = c;
    e = mqrpc_call_async(c, "service_x", body, strlen(body), timeout_ms, flags,
                         on_done, rec);
    if (out)
        *out = rec;
    return e;
}

static void on_done(const mqrpc_reply *r, void *arg)
{
    struct rec *rec = arg;
    size_t n = 0;
    const char *body = mqrpc_reply_body(r, &n);

    rec->calls++;
    rec->status = mqrpc_reply_status(r);
    snprintf(rec->traceparent, sizeof rec->traceparent, "%s",
             mqrpc_reply_traceparent(r) ? mqrpc_reply_traceparent(r)
                                        : "(none)");
    snprintf(rec->call_traceparent, sizeof rec->call_traceparent, "%s",
             mqrpc_reply_call_traceparent(r) ? mqrpc_reply_call_traceparent(r)
                                             : "(none)");
    snprintf(rec->body, sizeof rec->body, "%.*s", (int)n, body ? body : "");
    if (mqrpc_reply_error_message(r))
        snprintf(rec->message, sizeof rec->message, "%s",
                 mqrpc_reply_error_message(r));
    if (rec->try_blocking) {
        rec->nested_call = mqrpc_call(rec->c, "service_x", "{}", 2, 100, 0,
                                      NULL);
        rec->nested_process = mqrpc_client_process(rec->c, 0);
    }
    if (rec->reissue && nrecs < MAX_CALLS) {
        struct rec *next;
        if (rec->publish_fails)
            fake.publish_fails = 1;
        mqrpc_err e = start(rec->c, "{\"again\": 1}", 0, 1000, &next);
        next->reissue = rec->reissue && !rec->publish_fails;
        if (e == MQRPC_OK)
            reissued_ok++;
        else if (e == MQRPC_ECANCELED)
            reissued_cancelled++;
    }
    /* The reply must still be readable after whatever the callback did to
     * the client (ASan checks the read). */
    rec->body_still_valid = !body || memcmp(body, rec->body, n) == 0;
    if (rec->free_client)
        mqrpc_client_free(rec->c);
}

static mqrpc_client *connected_with(int retries, bool durable)
{
    mqrpc_client_opts o;
    mqrpc_client *c;

    fake_reset();
    memset(recs, 0, sizeof recs);
    nrecs = reissued_ok = reissued_cancelled = 0;
    mqrpc_client_opts_init(&o);
    o.retries = retries;
    o.reconnect_min_ms = 1;
    o.reconnect_max_ms = 4;
    o.log = NULL;
    o.durable = durable;
    c = mqrpc_client_new(&o);
    assert_non_null(c);
    assert_int_equal(mqrpc_client_connect(c), MQRPC_OK);
    return c;
}

static mqrpc_client *connected(int retries)
{
    return connected_with(retries, false);
}

/* Processes until every started call completed or ms passed. */
static void process_until_done(mqrpc_client *c, int ms)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        bool all = true;
        for (int i = 0; i < nrecs; i++)
            all = all && recs[i].calls > 0;
        if (all && mqrpc_client_pending(c) == 0)
            return;
        mqrpc_client_process(c, 10);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 >
            ms)
            return;
    }
}

static void reply_to(int pub, const char *body)
{
    fake_reply(fake.pub[pub].corr, body);
}

/* A: answered; its callback starts D, whose publish finds the connection
 * dead. B's reply was still to be read and C had none: both fail with
 * connection_lost, each once, and A's reply stays readable throughout. */
static void connection_lost_in_the_middle_of_completions(void **state)
{
    mqrpc_client *c = connected(0);
    struct rec *a, *b, *cc;
    (void)state;

    assert_int_equal(start(c, "{\"n\": 1}", 0, 2000, &a), MQRPC_OK);
    assert_int_equal(start(c, "{\"n\": 2}", 0, 2000, &b), MQRPC_OK);
    assert_int_equal(start(c, "{\"n\": 3}", 0, 2000, &cc), MQRPC_OK);
    assert_int_equal(fake.npub, 3);
    a->reissue = true;
    a->publish_fails = true;
    reply_to(0, "1");
    reply_to(1, "2");
    fake_fail();
    process_until_done(c, 1000);
    assert_int_equal(a->calls, 1);
    assert_int_equal(a->status, MQRPC_OK);
    assert_string_equal(a->body, "1");
    assert_true(a->body_still_valid);
    assert_int_equal(b->calls, 1);
    assert_int_equal(b->status, MQRPC_ECLOSED);
    assert_int_equal(cc->calls, 1);
    assert_int_equal(cc->status, MQRPC_ECLOSED);
    /* D was refused by call_async itself: no callback, no leak. */
    assert_int_equal(recs[3].calls, 0);
    assert_int_equal(reissued_ok, 0);
    assert_int_equal(mqrpc_client_pending(c), 0);
    mqrpc_client_free(c);
    assert_int_equal(fake.live, 0);
}

/* Every completion starts a new call; free must still terminate, with
 * each accepted call completed exactly once. */
static void callbacks_that_reissue_on_every_completion(void **state)
{
    mqrpc_client *c = connected(0);
    int total;
    (void)state;

    for (int i = 0; i < 4; i++) {
        struct rec *r;
        assert_int_equal(start(c, "{}", 0, 5000, &r), MQRPC_OK);
        r->reissue = true;
    }
    /* A few rounds of answers: each answer starts another call. */
    for (int round = 0, done = 0; round < 5; round++) {
        int before = fake.npub;
        for (int i = done; i < before; i++)
            reply_to(i, "{}");
        done = before;
        mqrpc_client_process(c, 10);
    }
    assert_true(reissued_ok > 4);
    mqrpc_client_free(c);
    total = nrecs;
    /* Calls started during free were refused with ECANCELED. */
    assert_true(reissued_cancelled > 0);
    for (int i = 0; i < total; i++) {
        bool accepted = i < 4 || i - 4 < reissued_ok;
        assert_int_equal(recs[i].calls, accepted ? 1 : 0);
    }
    assert_int_equal(fake.live, 0);
}

/* The first completion frees the client: process returns ECANCELED
 * without touching it again, the others are cancelled once each. */
static void free_from_inside_a_callback(void **state)
{
    mqrpc_client *c = connected(0);
    struct rec *a, *b, *d;
    (void)state;

    assert_int_equal(start(c, "{}", 0, 2000, &a), MQRPC_OK);
    assert_int_equal(start(c, "{}", 0, 2000, &b), MQRPC_OK);
    assert_int_equal(start(c, "{}", 0, 2000, &d), MQRPC_OK);
    a->free_client = true;
    b->reissue = true; /* refused: the client is closing */
    reply_to(0, "{\"x\": 1}");
    reply_to(1, "{}");
    assert_int_equal(mqrpc_client_process(c, 100), MQRPC_ECANCELED);
    assert_int_equal(a->calls, 1);
    assert_int_equal(a->status, MQRPC_OK);
    assert_true(a->body_still_valid);
    /* b's reply was read before the free happened, or cancelled: once. */
    assert_int_equal(b->calls, 1);
    assert_int_equal(d->calls, 1);
    assert_int_equal(d->status, MQRPC_ECANCELED);
    assert_int_equal(reissued_ok, 0);
    assert_int_equal(fake.live, 0);
}

/* A reconnection works, then the first re-send finds it dead at once:
 * the idempotent call is re-sent on the next connection and answered,
 * once. */
static void reconnection_that_succeeds_then_fails_at_once(void **state)
{
    mqrpc_client *c = connected(3);
    struct rec *a;
    mqrpc_client_stats st;
    (void)state;

    assert_int_equal(start(c, "{}", MQRPC_CALL_IDEMPOTENT, 3000, &a),
                     MQRPC_OK);
    fake_fail();
    assert_int_equal(mqrpc_client_process(c, 10), MQRPC_ECLOSED);
    assert_int_equal(a->calls, 0);
    fake.publish_fails = 1; /* the re-send on the next connection fails */
    for (int i = 0; i < 50 && fake.opens < 3; i++)
        mqrpc_client_process(c, 10);
    assert_int_equal(fake.opens, 3);
    assert_int_equal(fake.npub, 2); /* the first send and the good re-send */
    assert_int_equal(a->calls, 0);
    reply_to(1, "42");
    process_until_done(c, 1000);
    assert_int_equal(a->calls, 1);
    assert_int_equal(a->status, MQRPC_OK);
    assert_string_equal(a->body, "42");
    mqrpc_client_get_stats(c, &st, sizeof st);
    assert_int_equal(st.lost, 2);
    assert_int_equal(st.reconnects, 2);
    assert_int_equal(st.retried, 2);
    mqrpc_client_free(c);
    assert_int_equal(fake.live, 0);
}

/* A URL list: the first connection tries each address until one answers;
 * a lost connection moves to the next address at once, and past dead ones
 * at once too (the backoff, 1 s here, only after a whole round failed);
 * an idempotent call is re-sent there, a plain one fails at once. */
static void lost_connection_moves_to_the_next_address_at_once(void **state)
{
    mqrpc_client_opts o;
    mqrpc_client *c;
    struct rec *a, *b;
    struct timespec t0, t;
    (void)state;

    fake_reset();
    memset(recs, 0, sizeof recs);
    nrecs = 0;
    fake.addr_count = 3;
    fake.dead = 1u << 0;
    mqrpc_client_opts_init(&o);
    o.retries = 2;
    o.reconnect_min_ms = 1000;
    o.reconnect_max_ms = 1000;
    c = mqrpc_client_new(&o);
    assert_non_null(c);
    assert_int_equal(mqrpc_client_connect(c), MQRPC_OK);
    assert_int_equal(fake.ntried, 2); /* 0 dead, then 1 */
    assert_int_equal(fake.tried[1], 1);
    assert_int_equal(start(c, "{}", MQRPC_CALL_IDEMPOTENT, 5000, &a),
                     MQRPC_OK);
    assert_int_equal(start(c, "{}", 0, 5000, &b), MQRPC_OK);
    /* Address 1 goes; 2 is dead as well: 2, then 0 (dead), then 1. */
    fake.dead = 1u << 2 | 1u << 0;
    fake_fail();
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(mqrpc_client_process(c, 10), MQRPC_ECLOSED);
    mqrpc_client_process(c, 0); /* the callback of the plain call */
    assert_int_equal(b->calls, 1);
    assert_int_equal(b->status, MQRPC_ECLOSED);
    fake.dead = 1u << 2 | 1u << 0;
    for (int i = 0; i < 50 && fake.npub < 3; i++)
        mqrpc_client_process(c, 10);
    clock_gettime(CLOCK_MONOTONIC, &t);
    assert_true((t.tv_sec - t0.tv_sec) * 1000 +
                    (t.tv_nsec - t0.tv_nsec) / 1000000 <
                500);
    assert_int_equal(fake.ntried, 5);
    assert_int_equal(fake.tried[2], 2);
    assert_int_equal(fake.tried[3], 0);
    assert_int_equal(fake.tried[4], 1);
    assert_int_equal(fake.npub, 3); /* a, b, then a again */
    assert_int_equal(a->calls, 0);
    reply_to(2, "5");
    process_until_done(c, 1000);
    assert_int_equal(a->status, MQRPC_OK);
    /* Every address dead: a whole round at once, then the backoff. */
    fake.dead = 7;
    fake_fail();
    for (int i = 0; i < 10; i++)
        mqrpc_client_process(c, 10);
    assert_int_equal(fake.ntried, 8);
    mqrpc_client_free(c);
    assert_int_equal(fake.live, 0);
}

/* mqrpc_call_async never reconnects: a call made while disconnected is
 * queued, and process reconnects and sends it. */
static void call_async_never_waits_for_a_reconnection(void **state)
{
    mqrpc_client *c = connected(0);
    struct rec *a;
    (void)state;

    fake_fail();
    mqrpc_client_process(c, 10);
    fake.open_fails = 1000; /* the broker stays down for now */
    mqrpc_client_process(c, 10);
    assert_int_equal(fake.opens, 1);
    assert_int_equal(start(c, "{}", 0, 2000, &a), MQRPC_OK);
    assert_int_equal(fake.opens, 1);
    assert_int_equal(fake.npub, 0);
    fake.open_fails = 0;
    for (int i = 0; i < 50 && fake.npub == 0; i++)
        mqrpc_client_process(c, 10);
    assert_int_equal(fake.opens, 2);
    assert_int_equal(fake.npub, 1);
    reply_to(0, "7");
    process_until_done(c, 1000);
    assert_int_equal(a->status, MQRPC_OK);
    mqrpc_client_free(c);
}

/* Disconnected past the deadline: the queued call fails with
 * connection_lost at its deadline, not later. */
static void unsent_call_fails_at_its_deadline(void **state)
{
    mqrpc_client *c = connected(0);
    struct rec *a;
    (void)state;

    fake_fail();
    fake.open_fails = 100000;
    mqrpc_client_process(c, 10);
    assert_int_equal(start(c, "{}", 0, 100, &a), MQRPC_OK);
    process_until_done(c, 2000);
    assert_int_equal(a->calls, 1);
    assert_int_equal(a->status, MQRPC_ECLOSED);
    assert_non_null(strstr(a->message, "not connected to the broker within"));
    mqrpc_client_free(c);
}

/* An idempotent call with an empty body must not keep, and later free,
 * the caller's pointer. */
static void idempotent_empty_body_stays_the_callers(void **state)
{
    mqrpc_client *c = connected(2);
    char body[4] = "";
    struct rec *rec = &recs[nrecs++];
    (void)state;

    rec->c = c;
    assert_int_equal(mqrpc_call_async(c, "service_x", body, 0, 1000,
                                      MQRPC_CALL_IDEMPOTENT, on_done, rec),
                     MQRPC_OK);
    fake_fail(); /* so it waits for a re-send, holding its body */
    mqrpc_client_process(c, 10);
    process_until_done(c, 200);
    mqrpc_client_free(c); /* ASan: no free of body */
    assert_int_equal(rec->calls, 1);
}

static void blocking_calls_inside_a_callback_are_refused(void **state)
{
    mqrpc_client *c = connected(0);
    struct rec *a;
    (void)state;

    assert_int_equal(start(c, "{}", 0, 1000, &a), MQRPC_OK);
    a->try_blocking = true;
    reply_to(0, "1");
    process_until_done(c, 1000);
    assert_int_equal(a->nested_call, MQRPC_ESTATE);
    assert_int_equal(a->nested_process, MQRPC_ESTATE);
    mqrpc_client_free(c);
}

/* While the broker blocks publishers, nothing more is published (it
 * would not be read), and every call ends at its deadline with the
 * broker's reason. */
static void blocked_broker_fails_calls_at_their_deadline(void **state)
{
    mqrpc_client *c = connected(0);
    struct rec *a, *b;
    mqrpc_client_stats st;
    struct timespec t0, t1;
    (void)state;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(start(c, "{}", 0, 150, &a), MQRPC_OK);
    fake_blocked("low on memory");
    mqrpc_client_process(c, 10);
    assert_int_equal(start(c, "{}", 0, 150, &b), MQRPC_OK);
    assert_int_equal(fake.npub, 1);
    mqrpc_client_get_stats(c, &st, sizeof st);
    assert_int_equal(st.blocked, 1);
    assert_int_equal(st.is_blocked, 1);
    process_until_done(c, 2000);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    assert_true((t1.tv_sec - t0.tv_sec) * 1000 +
                    (t1.tv_nsec - t0.tv_nsec) / 1000000 <
                1000);
    assert_int_equal(a->status, MQRPC_EBLOCKED);
    assert_non_null(strstr(a->message, "blocking publishers: low on memory"));
    assert_int_equal(b->status, MQRPC_EBLOCKED);
    assert_non_null(strstr(b->message, "could not send to service_x"));
    assert_int_equal(fake.npub, 1);
    mqrpc_client_free(c);
}

static void queued_calls_leave_when_unblocked_or_writable(void **state)
{
    mqrpc_client *c = connected(0);
    struct rec *a, *b;
    (void)state;

    fake_blocked("low on disk");
    mqrpc_client_process(c, 10);
    assert_int_equal(start(c, "{\"a\": 1}", 0, 2000, &a), MQRPC_OK);
    assert_int_equal(fake.npub, 0);
    fake_unblocked();
    mqrpc_client_process(c, 10);
    assert_int_equal(fake.npub, 1);
    fake.full = true; /* the socket cannot take more */
    assert_int_equal(start(c, "{\"b\": 2}", 0, 2000, &b), MQRPC_OK);
    assert_int_equal(fake.npub, 1);
    assert_true(mqrpc_client_next_timeout_ms(c) <= 10);
    fake.full = false;
    mqrpc_client_process(c, 10);
    assert_int_equal(fake.npub, 2);
    assert_string_equal(fake.pub[1].body, "{\"b\": 2}");
    reply_to(0, "1");
    reply_to(1, "2");
    process_until_done(c, 1000);
    assert_int_equal(a->status, MQRPC_OK);
    assert_int_equal(b->status, MQRPC_OK);
    mqrpc_client_free(c);
}

/* A durable reply queue outlives the connection, so its replies are taken
 * with acknowledgements: one the broker pushed into a socket that died
 * goes back to the queue for the reconnected client. With no-ack it would
 * count as delivered and be lost with the socket (a call that then waits
 * for it times out: seen in the chaos run). */
static void durable_replies_are_acknowledged(void **state)
{
    mqrpc_client *c = connected_with(0, true);
    struct rec *a;
    (void)state;

    assert_false(fake.consume_no_ack);
    assert_int_equal(start(c, "{}", 0, 1000, &a), MQRPC_OK);
    reply_to(0, "1");
    fake_reply("not-ours-1", "2"); /* dropped, and acknowledged */
    process_until_done(c, 1000);
    mqrpc_client_process(c, 10);
    assert_int_equal(a->status, MQRPC_OK);
    assert_int_equal(fake.acks, 2);
    mqrpc_client_free(c);

    c = connected(0); /* an exclusive queue dies with its connection */
    assert_true(fake.consume_no_ack);
    mqrpc_client_free(c);
}

/* A confirm alone completes nothing, so process waits on within its
 * timeout for what follows (the reply, with one call at a time); a wake
 * still ends that wait at once, before the reply is read. */
static void lone_confirm_waits_on_but_a_wake_ends_the_wait(void **state)
{
    mqrpc_client *c = connected(0);
    struct rec *a, *b;
    (void)state;

    assert_int_equal(start(c, "{}", 0, 5000, &a), MQRPC_OK);
    fake_ack(1, false);
    reply_to(0, "1");
    assert_int_equal(mqrpc_client_process(c, 5000), MQRPC_OK);
    assert_int_equal(a->calls, 1); /* one process call: confirm and reply */

    assert_int_equal(start(c, "{}", 0, 5000, &b), MQRPC_OK);
    fake_ack(2, false);
    fake_wake();
    reply_to(1, "2");
    assert_int_equal(mqrpc_client_process(c, 5000), MQRPC_OK);
    assert_int_equal(b->calls, 0); /* returned at the wake */
    assert_int_equal(fake.next_ev, fake.nev - 1);
    assert_int_equal(mqrpc_client_process(c, 5000), MQRPC_OK);
    assert_int_equal(b->calls, 1);
    assert_string_equal(b->body, "2");
    mqrpc_client_free(c);
}

/* Each call carries a traceparent: the caller's, unchanged (a later
 * version's as the 00 it starts with), or a new trace; the reply's is
 * shown only when valid; bad options are refused before anything goes. */
static void calls_carry_trace_context(void **state)
{
    static const char tp[] =
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    mqrpc_client *c = connected(0);
    mqrpc_call_opts o;
    mqrpc_reply *r = NULL;
    struct fake_event *ev;
    mqrpc_err e;

    (void)state;
    mqrpc_call_opts_init(&o);
    o.traceparent = tp;
    o.tracestate = "congo=t61rcWkgMzE";
    assert_int_equal(mqrpc_call_async_ex(c, "service_x", "{}", 2, 1000, 0, &o,
                                         on_done, &recs[nrecs++]),
                     MQRPC_OK);
    assert_string_equal(fake.pub[0].traceparent, tp);
    assert_string_equal(fake.pub[0].tracestate, "congo=t61rcWkgMzE");
    ev = &fake.ev[fake.nev % FAKE_MAX_EVENTS];
    fake_reply(fake.pub[0].corr, "3");
    snprintf(ev->traceparent, sizeof ev->traceparent,
             "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01");
    process_until_done(c, 1000);
    assert_int_equal(recs[0].status, MQRPC_OK);
    assert_string_equal(recs[0].traceparent,
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01");
    assert_string_equal(recs[0].call_traceparent, tp);

    /* No traceparent: a new trace, valid, different each call; a reply
     * with an invalid one shows none. */
    assert_int_equal(mqrpc_call_async(c, "service_x", "{}", 2, 1000, 0,
                                      on_done, &recs[nrecs++]),
                     MQRPC_OK);
    assert_int_equal(mqrpc_call_async(c, "service_x", "{}", 2, 1000, 0,
                                      on_done, &recs[nrecs++]),
                     MQRPC_OK);
    assert_true(mqrpc_traceparent_valid(fake.pub[1].traceparent));
    assert_true(mqrpc_traceparent_valid(fake.pub[2].traceparent));
    assert_memory_not_equal(fake.pub[1].traceparent + 3,
                            fake.pub[2].traceparent + 3, 32);
    assert_string_equal(fake.pub[1].tracestate, "");
    ev = &fake.ev[fake.nev % FAKE_MAX_EVENTS];
    fake_reply(fake.pub[1].corr, "1");
    snprintf(ev->traceparent, sizeof ev->traceparent, "00-garbage");
    fake_reply(fake.pub[2].corr, "2");
    process_until_done(c, 1000);
    assert_string_equal(recs[1].traceparent, "(none)");
    assert_string_equal(recs[1].call_traceparent, fake.pub[1].traceparent);

    /* A later version is passed on as version 00. */
    o.traceparent = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-"
                    "what-comes-next";
    o.tracestate = NULL;
    assert_int_equal(mqrpc_call_async_ex(c, "service_x", "{}", 2, 1000, 0, &o,
                                         on_done, &recs[nrecs++]),
                     MQRPC_OK);
    assert_string_equal(fake.pub[3].traceparent, tp);
    fake_reply(fake.pub[3].corr, "4");
    process_until_done(c, 1000);

    /* Refused before anything is published, with the reason. */
    int before = fake.npub;
    o.traceparent = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    e = mqrpc_call_ex(c, "service_x", "{}", 2, 1000, 0, &o, &r);
    assert_int_equal(e, MQRPC_EINVAL);
    assert_non_null(strstr(mqrpc_reply_error_message(r), "traceparent"));
    assert_null(mqrpc_reply_call_traceparent(r));
    mqrpc_reply_free(r);
    o.traceparent = NULL;
    o.tracestate = "a=b";
    assert_int_equal(mqrpc_call_ex(c, "service_x", "{}", 2, 1000, 0, &o, NULL),
                     MQRPC_EINVAL);
    o.traceparent = tp;
    o.tracestate = "a=\n";
    assert_int_equal(mqrpc_call_ex(c, "service_x", "{}", 2, 1000, 0, &o, NULL),
                     MQRPC_EINVAL);
    o.size = 3;
    assert_int_equal(mqrpc_call_ex(c, "service_x", "{}", 2, 1000, 0, &o, NULL),
                     MQRPC_EINVAL);
    assert_int_equal(fake.npub, before);
    mqrpc_client_free(c);
}

/* mqrpc_client_ping: no exchange, no ping; answers gathered until the
 * timeout, sorted, non-objects dropped; a blocked broker is said. */
static void ping_gathers_answers_until_its_timeout(void **state)
{
    mqrpc_client *c = connected(0);
    mqrpc_client_stats st;
    json_t *ans;
    struct timespec t0, t1;
    long ms;
    (void)state;

    assert_int_equal(mqrpc_client_ping(c, NULL, 0, &ans), MQRPC_EINVAL);
    assert_null(ans);
    assert_int_equal(mqrpc_client_ping(c, NULL, 50, &ans), MQRPC_OK);
    assert_int_equal(json_array_size(ans), 0);
    assert_int_equal(fake.npub, 0); /* no exchange: nothing published */
    json_decref(ans);

    fake.control_exchange = true;
    fake_reply(FAKE_LAST_CORR, "{\"queue\": \"q\", \"instance\": \"b\"}");
    fake_reply(FAKE_LAST_CORR, "[1]");
    fake_reply(FAKE_LAST_CORR, "{\"queue\": \"q\", \"instance\": \"a\"}");
    fake_reply("someone-else", "{}");
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(mqrpc_client_ping(c, "q", 200, &ans), MQRPC_OK);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    assert_true(ms >= 195 && ms < 1000);
    assert_int_equal(fake.npub, 1);
    assert_string_equal(fake.pub[0].queue, "q"); /* the routing key */
    assert_non_null(strstr(fake.pub[0].corr, "-ping-"));
    assert_int_equal(json_array_size(ans), 2);
    assert_string_equal(
        json_string_value(json_object_get(json_array_get(ans, 0), "instance")),
        "a");
    assert_string_equal(
        json_string_value(json_object_get(json_array_get(ans, 1), "instance")),
        "b");
    json_decref(ans);
    mqrpc_client_get_stats(c, &st, sizeof st);
    assert_int_equal(st.dropped, 2); /* "[1]" and the stranger's */

    /* An answer after the timeout is a stranger's too. */
    fake_reply(FAKE_LAST_CORR, "{\"queue\": \"q\", \"instance\": \"late\"}");
    mqrpc_client_process(c, 10);
    mqrpc_client_get_stats(c, &st, sizeof st);
    assert_int_equal(st.dropped, 3);

    fake_blocked("low on memory");
    mqrpc_client_process(c, 10);
    assert_int_equal(mqrpc_client_ping(c, NULL, 50, &ans), MQRPC_EBLOCKED);
    assert_int_equal(json_array_size(ans), 0);
    assert_non_null(strstr(mqrpc_client_errmsg(c),
                           "blocking publishers: low on memory"));
    assert_int_equal(fake.npub, 1); /* not sent to a broker that won't read */
    json_decref(ans);
    mqrpc_client_free(c);
}

/* A refused (nacked) call: an idempotent one is sent again after a pause
 * of 100 ms, then 200 ms, while it has retries left; any other fails at
 * once with overloaded, as does the idempotent one when its retries are
 * spent. (A quorum queue refuses publishes for seconds after a node loss:
 * broker.cluster.) */
static long elapsed_ms(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

static void refused_calls_are_resent_only_when_idempotent(void **state)
{
    mqrpc_client *c = connected(2);
    mqrpc_client_stats st;
    struct timespec t0;
    struct rec *a, *b;
    (void)state;

    assert_int_equal(start(c, "{}", 0, 5000, &a), MQRPC_OK);
    assert_int_equal(fake.npub, 1);
    fake_nack(fake.pub[0].seq);
    process_until_done(c, 1000);
    assert_int_equal(a->calls, 1);
    assert_int_equal(a->status, MQRPC_EOVERLOAD);

    assert_int_equal(start(c, "{}", MQRPC_CALL_IDEMPOTENT, 5000, &b), MQRPC_OK);
    assert_int_equal(fake.npub, 2);
    for (int round = 0; round < 2; round++) {
        int before = fake.npub;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        fake_nack(fake.pub[before - 1].seq);
        while (fake.npub == before && elapsed_ms(&t0) < 3000)
            mqrpc_client_process(c, 50);
        assert_int_equal(fake.npub, before + 1); /* the same call again */
        assert_string_equal(fake.pub[before].corr, fake.pub[before - 1].corr);
        assert_true(elapsed_ms(&t0) >= (round ? 200 : 100) - 5);
        assert_int_equal(b->calls, 0);
    }
    fake_nack(fake.pub[fake.npub - 1].seq); /* no retries left */
    process_until_done(c, 1000);
    assert_int_equal(b->calls, 1);
    assert_int_equal(b->status, MQRPC_EOVERLOAD);
    assert_int_equal(fake.npub, 4);
    mqrpc_client_get_stats(c, &st, sizeof st);
    assert_int_equal(st.retried, 2);
    mqrpc_client_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(connection_lost_in_the_middle_of_completions),
        cmocka_unit_test(callbacks_that_reissue_on_every_completion),
        cmocka_unit_test(free_from_inside_a_callback),
        cmocka_unit_test(reconnection_that_succeeds_then_fails_at_once),
        cmocka_unit_test(call_async_never_waits_for_a_reconnection),
        cmocka_unit_test(lost_connection_moves_to_the_next_address_at_once),
        cmocka_unit_test(unsent_call_fails_at_its_deadline),
        cmocka_unit_test(idempotent_empty_body_stays_the_callers),
        cmocka_unit_test(blocking_calls_inside_a_callback_are_refused),
        cmocka_unit_test(blocked_broker_fails_calls_at_their_deadline),
        cmocka_unit_test(queued_calls_leave_when_unblocked_or_writable),
        cmocka_unit_test(durable_replies_are_acknowledged),
        cmocka_unit_test(lone_confirm_waits_on_but_a_wake_ends_the_wait),
        cmocka_unit_test(calls_carry_trace_context),
        cmocka_unit_test(ping_gathers_answers_until_its_timeout),
        cmocka_unit_test(refused_calls_are_resent_only_when_idempotent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
