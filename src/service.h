/*
 * The service runtime's private parts, shared by its three files:
 *   service.c  the connection thread: connect, consume, dispatch, reply,
 *              acknowledge, reconnect, stop;
 *   outbox.c   publishes that cannot go at once or wait for the broker's
 *              confirm (held replies, re-publishes, dead letters);
 *   request.c  the handler threads and the mqrpc_request API they use.
 *
 * Threads: one thread (the caller of mqrpc_service_run) owns the
 * connection, since a rabbitmq-c connection is not thread-safe; handlers
 * run on threads that never touch it. A delivery becomes a request (a
 * job), queued for the handler threads; a handler thread ends it with a
 * reply, or posts progress, into the done list and wakes the connection
 * thread through an eventfd that mqr_conn_wait watches beside the socket.
 * So the connection is serviced (heartbeats, acks, cancels, flow control)
 * however long handlers run.
 *
 * With one handler thread, handing every request to it and back costs two
 * thread wake-ups per request, more than a short handler itself. So the
 * connection thread runs the handler itself when the handler thread is
 * idle, releasing conn_lock meanwhile; the idle handler thread stands by
 * and, once the handler has run INLINE_MAX_US, takes conn_lock and
 * services the connection until the handler returns (the leader/followers
 * pattern). Whoever holds conn_lock owns the connection and every field
 * the connection thread uses.
 */
#ifndef MQRPC_SERVICE_H
#define MQRPC_SERVICE_H

#include "internal.h"

#include <pthread.h>
#include <stdatomic.h>

/* How long an inline handler runs before the idle handler thread services
 * the connection in its place: well under any heartbeat interval. */
#define INLINE_MAX_US 100000

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
    uint64_t tag;     /* the delivery acknowledged when this is done; 0:
                         none (its connection is gone) */
    uint64_t seq;     /* on the confirm channel, once published */
    mqr_str rk;       /* routing key: reply_to or a queue */
    mqr_str reply_to; /* re-publishes: whom to tell if it is refused */
    mqr_props props;
    mqr_str body;
    mqr_trace trace;  /* the request's, for log lines; "" ids: none */
    char data[];
};

/* A FIFO of struct out. */
struct out_list {
    struct out *head, *tail;
    unsigned n;
};

/* A request: a copy of its delivery, owned by the connection thread until
 * a handler thread takes it, then shared through s->lock until it ends. */
struct mqrpc_request {
    mqrpc_service *s;
    mqrpc_request *next;          /* the job queue, then the done list */
    mqrpc_request *iprev, *inext; /* in hand on this connection, by tag */
    uint64_t tag;                 /* delivery tag on connection gen */
    uint64_t gen;
    int64_t deadline_ms; /* the caller's, Unix ms; 0: none */
    int64_t arrived_us;  /* mqr_now_us() when its delivery arrived */
    uint32_t deliveries; /* its failed-delivery count, as received */
    bool persistent;
    bool want_progress;
    bool bad_headers;
    bool in_hand;  /* linked in s->in_hand (connection thread only) */
    atomic_bool gone; /* its reply queue is gone: the caller left */
    json_t *params;
    mqr_trace trace;     /* this service's span of the request */
    int64_t start_us;    /* when it was delivered (mqr_now_us) */
    /* Under s->lock: */
    bool queued_done;   /* in the done list */
    bool ended;         /* reply_body is the answer */
    bool skipped;       /* ended unstarted: its deadline passed in the
                           service, waiting for a handler thread */
    bool has_progress;  /* progress to send */
    double percent;
    char progress_text[257];
    char *reply_body;
    size_t reply_len;
    bool reply_is_error;
    char code[32]; /* "ok" or the error reply's code, once ended */
    /* The delivery's strings, pointing into data (NUL-terminated);
     * traceparent as received, tracestate only when passed on. */
    mqr_str correlation_id, reply_to, content_type, body;
    mqr_str traceparent, tracestate;
    char data[];
};

struct mqrpc_service {
    mqrpc_service_opts opts;
    mqr_conn_cfg cfg;
    mqr_addrs addrs; /* where in the URL list the next attempt goes */
    char *queue;
    char dlq[256];
    char instance[300];
    mqr_logger log;
    mqrpc_handler_fn handler; /* NULL: fn is the user's */
    mqrpc_request_fn fn;
    void *arg;
    mqr_conn *conn;
    uint64_t gen;  /* connections opened so far: tags belong to one */
    atomic_int stop;
    int wake_fd;   /* eventfd: the done list or a stop needs the
                      connection thread */
    mqrpc_service_stats st;
    uint64_t rng; /* backoff jitter */
    int64_t blocked_us;          /* when the broker blocked us; 0: not */
    struct out_list held;        /* not yet published, in order */
    struct out_list unconfirmed; /* on the confirm channel, by seq */
    /* Requests of this connection not yet answered, in tag order. */
    mqrpc_request *in_hand_head, *in_hand_tail;
    unsigned outstanding; /* requests alive, of any connection */
    /* Deliveries answered since the last flush of acknowledgements. */
    uint64_t *acks;
    unsigned nacks, acks_cap;
    /* Handler threads. */
    pthread_t *threads;
    unsigned nthreads;
    pthread_mutex_t lock;
    pthread_cond_t work;
    mqrpc_request *jobs_head, *jobs_tail; /* not started */
    mqrpc_request *done_head, *done_tail; /* ended, or with progress */
    bool quit;     /* the handler threads are to exit */
    atomic_bool stopping; /* no new request starts */
    /* The inline fast path (one handler thread, see above). */
    pthread_mutex_t conn_lock;
    pthread_t conn_thread;   /* the caller of mqrpc_service_run */
    pthread_cond_t handback; /* the stand-in gave the connection back */
    int64_t inline_since_us; /* under lock: an inline handler's start */
    bool taken_over;         /* under lock: the stand-in has the connection */
    unsigned busy;           /* under lock: handler threads in a request */
    mqrpc_err lent_err;      /* how the stand-in's servicing ended */
    int64_t next_tick_us;    /* MQRPC_SERVICE_TICK due (opts.tick_ms) */
    char err[512];
    /* Health and discovery (control.c). */
    int64_t started_us;      /* mqr_now_us() at creation: the uptime */
    char host[256];          /* gethostname() */
    char control_queue[256]; /* this connection's; "" without one */
    bool control_warned;     /* its failure was logged */
};

/* service.c */
int mqr_service_shown_len(mqr_str s);
/* Acknowledges a delivery that is done with, now or with the next flush
 * (see flush_acks). */
mqrpc_err mqr_service_done_with(mqrpc_service *s, uint64_t tag);

/* outbox.c */
void mqr_out_clear(struct out_list *l);
/* A delivery whose acknowledgement waits for a publish: while there is
 * one, a multiple ack could cover it, so acks go one by one. */
bool mqr_acks_waiting(const mqrpc_service *s);
mqrpc_err mqr_send_held(mqrpc_service *s);
/* Sends a reply, or holds it (with its delivery's ack; tag 0: none) when
 * it cannot go now or something is held before it. */
mqrpc_err mqr_send_reply(mqrpc_service *s, uint64_t tag,
                         mqr_str correlation_id, mqr_str reply_to,
                         bool persistent, const char *body, size_t len,
                         bool is_error, const mqr_trace *trace,
                         mqr_str tracestate);
/* A redelivered request goes back to the queue with its count (or to the
 * dead-letter queue); otherwise m is an unstarted delivery handed back.
 * Its trace headers go with it unchanged; trace names it in log lines. */
mqrpc_err mqr_republish(mqrpc_service *s, const mqr_msg *m,
                        const mqr_trace *trace);
/* The log fields of a request the out entry o re-publishes, or NULL
 * when it has no trace ids. */
const mqr_req_fields *mqr_out_fields(const mqrpc_service *s,
                                     const struct out *o, mqr_req_fields *f);
/* A publisher confirm from the confirm channel. */
mqrpc_err mqr_on_confirm(mqrpc_service *s, const mqr_msg *m);

/* request.c */
/* A request from a delivery (copies what it lends) in the span trace,
 * or NULL. */
mqrpc_request *mqr_request_new(mqrpc_service *s, const mqr_msg *m,
                               const mqr_trace *trace);
/* The log fields of r (no outcome). */
void mqr_request_fields(const mqrpc_request *r, mqr_req_fields *f);
void mqr_request_free(mqrpc_request *r);
/* Starts and stops the handler threads. */
mqrpc_err mqr_workers_start(mqrpc_service *s);
void mqr_workers_join(mqrpc_service *s);
/* Queues r for a handler thread. */
void mqr_workers_submit(mqrpc_service *s, mqrpc_request *r);
/* Takes back the requests no handler thread started, in order. */
mqrpc_request *mqr_workers_take_unstarted(mqrpc_service *s);
/* Takes the done list, in order. */
mqrpc_request *mqr_take_done(mqrpc_service *s);
/* What a request of the taken done list brought, read under s->lock as r
 * leaves the list (after which a handler may post r again). */
struct mqr_done {
    bool ended;    /* r ended: its answer is in r */
    bool progress; /* progress to send (not when it ended) */
    double percent;
    char text[257];
};
/* Reads d of r and returns the next request of the taken list. */
mqrpc_request *mqr_done_unqueue(mqrpc_service *s, mqrpc_request *r,
                                struct mqr_done *d);
/* Checks and decodes r, then runs the user's function on it. */
void mqr_run_request(mqrpc_service *s, mqrpc_request *r);

/* control.c */
/* Sets up the control queue on a new connection. Never fails but with
 * the connection (a refusal is logged and the instance goes on). */
mqrpc_err mqr_control_start(mqrpc_service *s);
/* Answers a delivery of the control queue, inline. */
mqrpc_err mqr_control_on_ping(mqrpc_service *s, const mqr_msg *m);
/* The broker cancelled the control consumer: a new control queue. */
mqrpc_err mqr_control_on_cancel(mqrpc_service *s);

/* service.c: the idle handler thread services the connection while an
 * inline handler runs long (called without s->lock). */
void mqr_service_stand_in(mqrpc_service *s);

#endif
