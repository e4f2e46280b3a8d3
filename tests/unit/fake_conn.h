/*
 * A fake of the internal connection interface (mqr_conn_* in
 * src/internal.h), linked instead of src/amqp_conn.c, so the client's state
 * machine can be driven without a broker: the test scripts what the
 * "broker" sends and sees what the client published.
 */
#ifndef FAKE_CONN_H
#define FAKE_CONN_H

#include "internal.h"

#define FAKE_MAX_PUB 256
#define FAKE_MAX_EVENTS 64

struct fake_pub {
    char queue[256];
    char corr[64];
    char body[256];
    char traceparent[128];
    char tracestate[600];
    uint64_t seq; /* confirm sequence number */
    int conn_id;
};

/* What the next mqr_conn_wait returns. */
struct fake_event {
    enum mqr_msg_kind kind; /* 0: the connection fails */
    char corr[64];
    char body[256];
    bool error_type;
    char traceparent[128]; /* MQR_DELIVERY: its header; "": none */
    uint64_t tag; /* MQR_ACK: publish seq; MQR_DELIVERY: delivery tag */
    bool multiple;
    char text[64];
};

struct fake {
    int opens;        /* successful mqr_conn_open calls */
    int open_fails;   /* the next this many opens fail */
    int publish_fails; /* the next this many publishes fail (conn lost) */
    bool full;        /* mqr_conn_can_publish says no */
    int live;         /* connections not yet freed */
    bool consume_no_ack; /* of the last basic.consume */
    int acks;         /* deliveries acknowledged */
    int conn_id;      /* of the current connection */
    bool control_exchange; /* mqrpc.control exists (else ENOROUTE) */
    /* A URL list of addr_count addresses (0: none); an attempt goes to
     * address addrs->next % addr_count (the fake does not shuffle) and
     * fails when its bit is in dead; tried[] records each attempt's. */
    unsigned addr_count;
    unsigned dead;
    unsigned tried[64];
    int ntried;
    struct fake_pub pub[FAKE_MAX_PUB];
    int npub;
    struct fake_event ev[FAKE_MAX_EVENTS];
    int nev, next_ev;
    /* Frees of a message the client might still be reading are caught by
     * ASan: each message's body is a fresh allocation, freed at the next
     * wait or at mqr_conn_free. */
};

extern struct fake fake;

void fake_reset(void);
/* Queues what the broker sends next. */
void fake_reply(const char *corr, const char *body);
/* FAKE_LAST_CORR as fake_reply's corr: the last publish's correlation id
 * (an answer to a ping whose id the test cannot know in advance). */
#define FAKE_LAST_CORR "@last"
void fake_ack(uint64_t tag, bool multiple);
void fake_nack(uint64_t tag); /* the broker refuses that publish */
void fake_fail(void); /* the connection drops */
void fake_blocked(const char *reason);
void fake_unblocked(void);
void fake_wake(void); /* mqrpc_client_wake's eventfd became readable */

#endif
