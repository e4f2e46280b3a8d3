/*
 * Private interfaces of the library (prefix mqr_). Nothing here is installed;
 * tests link the static library to reach it.
 */
#ifndef MQRPC_INTERNAL_H
#define MQRPC_INTERNAL_H

#include "mqrpc/mqrpc.h"

#include <stdbool.h>
#include <stdint.h>

/* A byte string that is not NUL-terminated (AMQP short strings are not). */
typedef struct mqr_str {
    const char *ptr;
    size_t len;
} mqr_str;

/* mqr_cstr: view of a NUL-terminated string. */
mqr_str mqr_cstr(const char *s);

/* mqr_str_eq: s holds exactly the NUL-terminated lit. */
bool mqr_str_eq(mqr_str s, const char *lit);

/* A wake fd (an eventfd) lets one thread, or a signal handler, make
 * another's mqr_conn_wait or poll return: mqr_wake_open creates it (-1 on
 * failure), mqr_wake_signal makes it readable (async-signal-safe),
 * mqr_wake_drain makes it unreadable again. */
int mqr_wake_open(void);
void mqr_wake_signal(int fd);
void mqr_wake_drain(int fd);

/* mqr_now_us: monotonic clock in microseconds. */
int64_t mqr_now_us(void);
/* len random bytes (getrandom, else /dev/urandom, else a per-process
 * fallback): correlation ids and trace ids must not be guessable. */
void mqr_random_bytes(void *out, size_t len);

/* Reconnection backoff. mqr_jitter draws a delay between half and all of
 * d ms from the xorshift state *rng (nonzero), so that programs that lost
 * the same broker do not all come back in the same millisecond;
 * mqr_backoff_next doubles d up to max. */
int mqr_jitter(uint64_t *rng, int d);
int mqr_backoff_next(int d, int max);

/* mqr_opts_copy copies a caller's options struct (whose first field is its
 * size_t size, set by the *_opts_init of the header the caller was built
 * with) into dst, a zeroed struct of this library's dst_size bytes. A
 * smaller caller struct leaves the newer fields zero (their defaults); a
 * larger one must have zeros past dst_size, or the caller asks for
 * something this library cannot do. false (errno EINVAL) when size is
 * wrong that way or smaller than the size field itself. */
bool mqr_opts_copy(void *dst, size_t dst_size, const void *src);

/* mqr_duration_bucket: the index, in the stats' duration histograms, of
 * a duration of us microseconds (MQRPC_DURATION_BUCKETS: above them all). */
unsigned mqr_duration_bucket(int64_t us);

/* Statistics that another thread may read while their one writer runs
 * (mqrpc_service_get_stats): relaxed atomics, one uint64_t at a time. */
#define MQR_STAT_ADD(field, n) \
    __atomic_fetch_add(&(field), (uint64_t)(n), __ATOMIC_RELAXED)
#define MQR_STAT_SET(field, v) \
    __atomic_store_n(&(field), (uint64_t)(v), __ATOMIC_RELAXED)

/* mqr_struct_out copies src (this library's struct of src_size bytes) into
 * a caller's struct of out_size bytes: the common prefix. */
void mqr_struct_out(void *out, size_t out_size, const void *src,
                    size_t src_size);

/* Where a handle's log lines go: the program's function or stderr, with
 * the name that prefixes them there. */
typedef struct mqr_logger {
    mqrpc_log_fn fn; /* NULL: stderr */
    mqrpc_log_record_fn record_fn; /* when set, used instead of fn */
    void *arg;
    const char *name; /* borrowed from the handle */
} mqr_logger;

/* mqr_log formats one line and hands it to lg. */
void mqr_log(const mqr_logger *lg, mqrpc_log_level level, const char *fmt,
             ...) __attribute__((format(printf, 3, 4)));

/* What a log line about one request says besides its text (the
 * mqrpc_log_record fields; NULL or negative: unknown). */
typedef struct mqr_req_fields {
    const char *queue;
    const char *correlation_id;
    const char *trace_id;
    const char *span_id;
    const char *code;
    double duration_ms;
} mqr_req_fields;

/* mqr_log_req is mqr_log for a line about a request: a record function
 * gets the fields apart, a text line ends with "trace_id=T span_id=S". */
void mqr_log_req(const mqr_logger *lg, mqrpc_log_level level,
                 const mqr_req_fields *f, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* mqr_wall_ms: Unix time in milliseconds, the clock of deadline headers
 * (they cross machines, so they cannot be monotonic). */
int64_t mqr_wall_ms(void);

/* mqr_redelivery_decide: what a service does with a request redelivered
 * after deliveries failed deliveries (its x-mqrpc-deliveries header, 0 when
 * absent): writes the new count into *failed (deliveries + 1, saturating at
 * UINT32_MAX so that it never wraps to 0) and returns true when the request
 * is a poison message to dead-letter (*failed >= max_deliveries; a
 * max_deliveries of 0 counts as 1), false when it goes back to the queue
 * with *failed in its header. Pure, unit-tested. */
bool mqr_redelivery_decide(uint32_t deliveries, unsigned max_deliveries,
                           uint32_t *failed);

/* ---------------------------------------------------------------- trace */
/* W3C Trace Context (trace.c). */

#define MQR_HDR_TRACEPARENT "traceparent"
#define MQR_HDR_TRACESTATE "tracestate"

/* The fields of a traceparent, NUL-terminated. */
typedef struct mqr_trace_ids {
    char trace_id[33];
    char span_id[17]; /* its parent-id: the sender's span */
    char flags[3];
} mqr_trace_ids;

/* mqr_traceparent_parse: s (len bytes, not NUL-terminated) is a valid
 * traceparent: version 00 exactly, or a later version (not ff) whose first
 * 55 characters read as 00's; lowercase hex; trace and parent ids not all
 * zero. Fills out (when not NULL) on success. */
bool mqr_traceparent_parse(const char *s, size_t len, mqr_trace_ids *out);

/* mqr_tracestate_ok: s is a tracestate we pass on: 1 to
 * MQRPC_TRACESTATE_MAX printable ASCII characters. */
bool mqr_tracestate_ok(const char *s, size_t len);

/* mqr_traceparent_format writes "00-<trace_id>-<span_id>-<flags>". */
void mqr_traceparent_format(char out[MQRPC_TRACEPARENT_LEN + 1],
                            const char *trace_id, const char *span_id,
                            const char *flags);

/* mqr_trace_random_hex writes nbytes (at most 16) random bytes from
 * getrandom, never all zero, as 2 * nbytes lowercase hex digits and a
 * NUL. */
void mqr_trace_random_hex(char *out, size_t nbytes);

/* A span of ours within a trace. */
typedef struct mqr_trace {
    char trace_id[33];
    char span_id[17];   /* ours, new */
    char parent_id[17]; /* the sender's span; "" when the trace began here */
    char flags[3];
    char traceparent[MQRPC_TRACEPARENT_LEN + 1]; /* 00-trace-span-flags */
} mqr_trace;

/* mqr_trace_start begins a span of ours: in the trace of incoming (a
 * received traceparent header, maybe empty) when it is valid, else in a
 * new trace (flags 01). */
void mqr_trace_start(mqr_trace *t, mqr_str incoming);

/* ------------------------------------------------------------------ url */

/* A parsed broker URL; strings point into an internal copy. */
typedef struct mqr_url {
    char *host;
    int port;
    char *user;
    char *password;
    char *vhost;
    bool tls;
    /* amqps:// query parameters (RabbitMQ's names); NULL when absent */
    char *ca_file;   /* cacertfile */
    char *cert_file; /* certfile */
    char *key_file;  /* keyfile */
    char *buf_;      /* owned copy the fields point into */
} mqr_url;

/* mqr_url_parse parses an amqp:// or amqps:// URL by the RabbitMQ AMQP URI
 * spec (defaults guest/guest, localhost, 5672 or 5671; an empty path is
 * vhost "/") with optional query parameters cacertfile, certfile, keyfile.
 * It takes every URL rabbitmq-c's amqp_parse_url takes, but for odd ports
 * ("+1", "0", "h:1:2"), %00, '%' without two hex digits, "[]" and '@' in
 * []; it also takes %80 to %FF (mqr_url_parse in url.c says why). On failure
 * returns MQRPC_EURL and writes one line into err that never shows the
 * password. Free with mqr_url_clear. */
mqrpc_err mqr_url_parse(const char *url, mqr_url *out, char *err,
                        size_t errlen);
void mqr_url_clear(mqr_url *u);

/* mqr_url_parse_query fills out's TLS file fields from "k=v&k=v" (decoded
 * in place; the fields point into query). Unknown names are errors; err
 * quotes none of the query before its last '@' (a password's tail). */
mqrpc_err mqr_url_parse_query(char *query, mqr_url *out, char *err,
                              size_t errlen);

/* Broker URL lists: "URL,URL,..." (RabbitMQ PerfTest's and kombu's form).
 * A ',' followed by blanks and a scheme ("amqp://") starts the next entry;
 * any other ',' is data (a password typed raw), as before lists. */
#define MQR_URL_MAX_ENTRIES 64

/* mqr_url_entries writes views of the first max entries of list into out
 * (blanks around each trimmed) and returns how many there are, which may
 * exceed max; 0 for NULL. */
unsigned mqr_url_entries(const char *list, mqr_str *out, unsigned max);

/* mqr_url_list_check checks every entry as mqr_url_parse does, and that
 * TLS options (tls, may be NULL) come with amqps:// entries only. On
 * failure err is one line naming the entry when there are several
 * ("entry 2 of 3: malformed broker URL ..."); MQRPC_EURL or MQRPC_EINVAL
 * (TLS options with amqp://). */
mqrpc_err mqr_url_list_check(const char *list, const mqrpc_tls_opts *tls,
                             char *err, size_t errlen);

/* mqr_url_order writes a permutation of 0..n-1 drawn from seed into order:
 * the same for the same seed and n; seed 0: the identity. */
void mqr_url_order(uint64_t seed, unsigned *order, unsigned n);

/* mqr_url_pick copies entry order[next % n] of list (order from seed) into
 * out, NUL-terminated, and writes n into *count. MQRPC_EURL for an empty or
 * too long list, MQRPC_EINVAL when out is too small. */
mqrpc_err mqr_url_pick(const char *list, uint64_t seed, unsigned next,
                       char *out, size_t outlen, unsigned *count);

/* mqr_resolve_url is mqrpc_default_url with the reason for a failure in
 * err (an unreadable or too open URL file in the state directory). */
mqrpc_err mqr_resolve_url(const char *explicit_url, mqrpc_role role, char *buf,
                          size_t len, const char **source, char *err,
                          size_t errlen);

/* ------------------------------------------------------------------ tls */
/* TLS with OpenSSL alone: amqp_conn.c makes the socket and passes its
 * SSL_CTX (OpenSSL's SSL_CTX, named by its struct tag so that this header
 * needs no OpenSSL header). */

struct ssl_ctx_st;

/* mqr_tls_setup prepares ctx for a client: at least TLS 1.2; trusting the
 * CAs in ca_file, or the system store when NULL; presenting cert_file with
 * its key_file (both or neither); recording the first certificate problem
 * of each handshake for mqr_tls_open_error. Verifying the peer and its
 * host name is the socket's business. Returns MQRPC_EINVAL with one line
 * in err when a file cannot be loaded. */
mqrpc_err mqr_tls_setup(struct ssl_ctx_st *ctx, const char *ca_file,
                        const char *cert_file, const char *key_file, char *err,
                        size_t errlen);

/* mqr_tls_begin: call before a handshake. Forgets the calling thread's
 * last certificate problem and OpenSSL errors. */
void mqr_tls_begin(void);

/* mqr_tls_reason writes OpenSSL's reason for the calling thread's last
 * failure ("certificate verify failed"), or "", and clears its errors. */
void mqr_tls_reason(char *buf, size_t len);

/* How a TLS connect failed, as the socket reported it. */
enum mqr_tls_failure {
    MQR_TLS_PEER_UNVERIFIED = 1, /* the broker's certificate chain */
    MQR_TLS_HOST_MISMATCH,       /* the certificate is for another name */
    MQR_TLS_OTHER                /* the handshake */
};

/* mqr_tls_open_error explains a failed TLS connect to host in words the
 * user can act on, into why (one line, "TLS: ..."); fallback is said when
 * OpenSSL gives no reason; ca is the CA file used, or NULL. */
void mqr_tls_open_error(enum mqr_tls_failure kind, const char *fallback,
                        const char *host, const char *ca, char *why,
                        size_t len);

/* ---------------------------------------------------------------- codec */
/* The message codec is pure: bytes in, JSON out, no AMQP. */

/* Input limits of a request; 0 means the MQRPC_DEFAULT_MAX_* default. */
typedef struct mqr_limits {
    size_t max_body;   /* bytes of the whole body */
    size_t max_depth;  /* nesting levels; the request object is level 1 */
    size_t max_string; /* bytes of any string value or object key, decoded */
} mqr_limits;

/* mqr_decode_request parses a request body: within the limits lim (NULL:
 * all defaults), valid UTF-8 JSON, an object. On success *out is a new
 * reference. Otherwise fills fault (bad_request, one line that never quotes
 * more than a few bytes of the input) and returns MQRPC_EINVAL. */
mqrpc_err mqr_decode_request(const char *body, size_t len,
                             const mqr_limits *lim, json_t **out,
                             mqrpc_fault *fault);

/* mqr_encode_result returns the wire form of a result (malloc'd, caller
 * frees) or NULL if it cannot be encoded. */
char *mqr_encode_result(const json_t *result, size_t *len);

/* mqr_encode_fault returns the body of an error reply, malloc'd. */
char *mqr_encode_fault(const mqrpc_fault *fault, size_t *len);

/* mqr_decode_reply interprets a reply: is_error when the AMQP type property
 * was "error". Returns MQRPC_OK with *result (new reference), MQRPC_EREMOTE
 * with fault filled from the body, or MQRPC_EBADREPLY with fault->message
 * saying what was wrong. */
mqrpc_err mqr_decode_reply(bool is_error, const char *body, size_t len,
                           json_t **result, mqrpc_fault *fault);

/* ---------------------------------------------------------------- calls */
/* The client's table of calls in flight (calls.c): no I/O, no callbacks.
 * A call is in the id map and the deadline list from mqr_calls_add until
 * mqr_calls_finish moves it to the list of finished calls, whose callbacks
 * the client runs later, one by one, at a point where no list is being
 * walked (hiredis and libuv do the same: callbacks are a re-entrancy
 * boundary). */

enum mqr_call_state {
    MQR_CALL_UNSENT,    /* never published: waits for a connection, for the
                           broker to unblock, or for room in the socket */
    MQR_CALL_SENT,      /* published, not yet confirmed by the broker */
    MQR_CALL_CONFIRMED, /* the broker took it */
    MQR_CALL_RESEND     /* published on a lost connection; to publish again */
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
    const char *traceparent;      /* the reply's header, or NULL */
    const char *call_traceparent; /* what the call was sent with */
    bool owned; /* strings and body are malloc'd (mqrpc_call's copy) */
};

typedef struct mqr_call mqr_call;
struct mqr_call {
    uint64_t seq;
    uint64_t pub_seq; /* confirm sequence number on the current connection */
    int64_t deadline_us;
    int64_t deadline_wall_ms; /* the same deadline, for the header */
    int timeout_ms;
    int retries_left;
    unsigned refusals;    /* nacks of this call so far (on_confirm) */
    int64_t resend_at_us; /* a refused call's resend: not before this */
    enum mqr_call_state state;
    bool unconfirmed; /* linked in the publish-order list */
    bool progress;    /* MQRPC_CALL_PROGRESS */
    bool finished;    /* in the finished list */
    mqrpc_done_fn done;
    void *arg;
    mqr_call *hnext;         /* id map chain */
    mqr_call *prev, *next;   /* deadline order; then the finished list */
    mqr_call *cprev, *cnext; /* publish order, while unconfirmed */
    char *body;              /* owned when own_body; else the caller's */
    size_t body_len;
    bool own_body;
    mqrpc_reply reply; /* the outcome, once finished (points into the
                          call; for a reply, into the current message) */
    char *text;         /* owned message the outcome points to */
    char *tracestate;   /* owned; NULL: none */
    char traceparent[MQRPC_TRACEPARENT_LEN + 1]; /* sent with the request */
    char reply_traceparent[MQRPC_TRACEPARENT_LEN + 1]; /* "": none */
    size_t queue_cap;   /* bytes allocated for queue */
    char queue[];
};

typedef struct mqr_calls {
    mqr_call **map; /* open hashing on seq; size is a power of two */
    size_t map_size;
    size_t pending;            /* in the map */
    mqr_call *head, *tail;     /* earliest deadline first */
    mqr_call *chead, *ctail;   /* unconfirmed, oldest publish first */
    mqr_call *dhead, *dtail;   /* finished, callbacks not yet run */
    mqr_call *spare;           /* freed calls kept for reuse (hnext) */
    size_t nspare;
} mqr_calls;

bool mqr_calls_init(mqr_calls *t);
/* Frees the map and any call still in a list (without callbacks). */
void mqr_calls_clear(mqr_calls *t);
/* mqr_call_new allocates a call for queue with its reply slot. */
mqr_call *mqr_call_new(const char *queue);
/* mqr_call_free frees k, its owned body and outcome. */
void mqr_call_free(mqr_call *k);
/* mqr_calls_new_call is mqr_call_new, reusing a call that
 * mqr_calls_release kept when one fits. */
mqr_call *mqr_calls_new_call(mqr_calls *t, const char *queue);
/* mqr_calls_release frees k's owned body and outcome and keeps k for
 * reuse (a few dozen at most), else frees it. k is in no list. */
void mqr_calls_release(mqr_calls *t, mqr_call *k);
/* Puts k into the id map and the deadline list. */
void mqr_calls_add(mqr_calls *t, mqr_call *k);
/* The live call with this seq, or NULL. */
mqr_call *mqr_calls_find(const mqr_calls *t, uint64_t seq);
void mqr_calls_unconfirmed_append(mqr_calls *t, mqr_call *k);
void mqr_calls_unconfirmed_unlink(mqr_calls *t, mqr_call *k);
/* Takes k out of the map and the live lists and appends it to the
 * finished list; its reply must be filled. */
void mqr_calls_finish(mqr_calls *t, mqr_call *k);
/* The oldest finished call, unlinked, or NULL. */
mqr_call *mqr_calls_pop_finished(mqr_calls *t);

/* ---------------------------------------------------------- bench knobs */
/* Guarantees a client can be told to drop, for the benchmark that measures
 * what each one costs (bench/CMakeLists.txt builds rpc_bench_knobs with
 * them): nothing else may use them, and the public API has no way to. */
#define MQR_WITHOUT_CONFIRMS 1u   /* no confirm.select: a full queue's
                                     refusal is never heard of */
#define MQR_WITHOUT_MANDATORY 2u  /* a request to a queue nobody declared
                                     waits for its timeout */
#define MQR_WITHOUT_EXPIRATION 4u /* no expiration property nor deadline
                                     header: stale requests get served */

/* mqr_client_without drops the guarantees in what (MQR_WITHOUT_* bits)
 * from the next connection on; call it before mqrpc_client_connect. */
void mqr_client_without(mqrpc_client *c, unsigned what);

/* ----------------------------------------------------------------- conn */
/* The AMQP connection: the only code that speaks rabbitmq-c. One channel
 * (1) carries all traffic; channel 2 is a side channel for passive queue
 * queries, which the broker closes when the queue does not exist; channel
 * 3 (MQR_CONFIRM_CHANNEL), opened by the first mqr_conn_publish_confirmed,
 * carries publishes that must be confirmed while channel 1 is not in
 * confirm mode (a service's re-publishes). */
#define MQR_CONFIRM_CHANNEL 3
/* Channel 4 carries a service's control consumer (control.c): a failure
 * there closes that channel alone. */
#define MQR_CONTROL_CHANNEL 4

typedef struct mqr_conn mqr_conn;

/* What mqr_conn_wait returns: a delivery, a basic.return of a mandatory
 * publish, a publisher confirm (ack or nack), the broker blocking or
 * unblocking our publishes (a resource alarm; reply_text is its reason),
 * or the broker cancelling our consumer (its queue was deleted). */
enum mqr_msg_kind {
    MQR_DELIVERY = 1,
    MQR_RETURN,
    MQR_ACK,
    MQR_NACK,
    MQR_BLOCKED,
    MQR_UNBLOCKED,
    MQR_CANCEL,
    MQR_WAKE /* the wake fd (mqr_conn_set_wake_fd) became readable */
};

/* Headers of ours, on the wire as AMQP table entries. */
#define MQR_HDR_DEADLINE "x-mqrpc-deadline"     /* Unix ms, integer */
#define MQR_HDR_DELIVERIES "x-mqrpc-deliveries" /* integer */
/* On a request: 1, the caller wants progress messages. On a message to a
 * reply queue: 1, this is progress, not the reply. */
#define MQR_HDR_PROGRESS "x-mqrpc-progress"

/* A message received: borrowed from the connection, valid until the next
 * mqr_conn_wait or mqr_conn_free. */
typedef struct mqr_msg {
    enum mqr_msg_kind kind;
    int channel;           /* the channel it came on (MQR_ACK/NACK: 1 or
                              MQR_CONFIRM_CHANNEL, whose seqs are apart) */
    uint64_t delivery_tag; /* MQR_DELIVERY; MQR_ACK/NACK: publish seq */
    bool multiple;         /* MQR_ACK/NACK: every seq up to delivery_tag */
    bool redelivered;      /* MQR_DELIVERY: the broker delivered it before */
    int reply_code;        /* MQR_RETURN: 312 NO_ROUTE, ... */
    mqr_str reply_text;    /* MQR_RETURN; MQR_BLOCKED: the reason */
    mqr_str body;
    mqr_str correlation_id;
    mqr_str reply_to;
    mqr_str type;
    mqr_str app_id;
    mqr_str content_type;
    bool persistent;     /* delivery_mode 2 */
    int64_t deadline_ms; /* MQR_HDR_DEADLINE; 0: none */
    uint32_t deliveries; /* MQR_HDR_DELIVERIES; 0: none */
    /* x-delivery-count, a quorum queue's count of earlier deliveries that
     * came back (0: none, the first delivery) */
    uint32_t delivery_count;
    bool progress;       /* MQR_HDR_PROGRESS is nonzero */
    bool bad_headers;    /* one of our headers had the wrong type */
    mqr_str traceparent; /* MQR_HDR_TRACEPARENT, as received; empty: none */
    mqr_str tracestate;  /* MQR_HDR_TRACESTATE, as received; empty: none */
} mqr_msg;

/* Properties of a message to publish; empty fields are not sent. */
typedef struct mqr_props {
    mqr_str correlation_id;
    mqr_str reply_to;
    mqr_str type;
    mqr_str app_id;
    mqr_str expiration; /* milliseconds, as decimal text */
    bool persistent;    /* delivery_mode 2 */
    int64_t deadline_ms; /* sent as MQR_HDR_DEADLINE when nonzero */
    uint32_t deliveries; /* sent as MQR_HDR_DELIVERIES when nonzero */
    bool progress;       /* sent as MQR_HDR_PROGRESS = 1 when true */
    mqr_str traceparent; /* sent as MQR_HDR_TRACEPARENT when not empty */
    mqr_str tracestate;  /* sent as MQR_HDR_TRACESTATE when not empty */
} mqr_props;

/* How to declare a queue. */
typedef struct mqr_queue_opts {
    bool exclusive;      /* with an empty name: server-named, auto-delete */
    bool durable;
    unsigned max_length; /* x-max-length with x-overflow reject-publish */
    unsigned expires_ms; /* x-expires: deleted after this long unused */
    bool quorum;         /* x-queue-type quorum (durable is implied) */
    /* Quorum: x-delivery-limit (0: none) and dead-lettering through the
     * default exchange to this queue (NULL: none). */
    unsigned delivery_limit;
    const char *dead_letter_to;
} mqr_queue_opts;

/* Where a handle's connection attempts go in its list of broker
 * addresses. Each handle walks the list in an order of its own (shuffled,
 * so that the clients and services of a cluster spread over its nodes):
 * an attempt goes to one address; a failed one moves on to the next, at
 * once until every address of the round failed, then with the backoff; a
 * lost connection moves on to the next address, at once. */
typedef struct mqr_addrs {
    uint64_t seed;      /* the order (mqr_url_order); set once per handle */
    unsigned next;      /* position in that order of the next attempt */
    unsigned count;     /* addresses in the list at the last attempt */
    unsigned misses;    /* attempts failed in a row in this round */
    char current[512];  /* the address of the last attempt, redacted */
} mqr_addrs;

/* mqr_addrs_failed: the last attempt failed; the next goes to the next
 * address. Returns true when the whole round failed (back off now), false
 * when the next address may be tried at once. */
bool mqr_addrs_failed(mqr_addrs *a);

/* mqr_addrs_lost: the connection was lost (or given up): the next attempt
 * goes to the next address, and starts a new round. */
void mqr_addrs_lost(mqr_addrs *a);

/* mqr_addrs_connected: the last attempt succeeded. */
void mqr_addrs_connected(mqr_addrs *a);

/* mqr_append appends s to the NUL-terminated buf of size bytes, after sep
 * when buf is not empty, cutting what does not fit. */
void mqr_append(char *buf, size_t size, const char *sep, const char *s);

/* What a connection needs; the strings are borrowed for mqr_conn_open. */
typedef struct mqr_conn_params {
    const char *url;      /* NULL: url_file, else mqrpc_default_url(NULL, role) */
    const char *url_file; /* read on every mqr_conn_open */
    const char *name;     /* connection_name shown by the broker */
    mqrpc_role role;
    int heartbeat_s;
    int connect_timeout_ms;
    mqrpc_tls_opts tls; /* unset fields fall back to the URL's parameters */
    /* Which entry of a URL list to use; updated by mqr_conn_open (count,
     * current). NULL: the first. */
    mqr_addrs *addrs;
} mqr_conn_params;

/* An owned copy of connection settings, as the handles keep them. */
typedef struct mqr_conn_cfg {
    mqr_conn_params p; /* strings point into owned_ */
    char *owned_[6];
} mqr_conn_cfg;

/* mqr_conn_cfg_init copies p and its strings (any may be NULL); false when
 * out of memory. mqr_conn_cfg_clear frees the copies. */
bool mqr_conn_cfg_init(mqr_conn_cfg *cfg, const mqr_conn_params *p);
void mqr_conn_cfg_clear(mqr_conn_cfg *cfg);

/* mqr_conn_open resolves the broker URL (a list: every entry is checked,
 * the one p->addrs points at is used), connects (over TLS for amqps://,
 * verifying the broker's certificate and host name unless tls.insecure),
 * logs in, then opens channel 1. Blocks up to connect_timeout_ms for the
 * TCP connect and for each handshake. On failure *out is NULL and err
 * holds one line ("cannot connect to H:P: ..."). */
mqrpc_err mqr_conn_open(const mqr_conn_params *p, mqr_conn **out, char *err,
                        size_t errlen);

/* mqr_conn_free closes politely if still open, then frees. Accepts NULL. */
void mqr_conn_free(mqr_conn *c);

/* mqr_conn_errmsg: the last failure, one line, owned by c. */
const char *mqr_conn_errmsg(const mqr_conn *c);

/* mqr_conn_fd: the socket, or -1 when closed. */
int mqr_conn_fd(const mqr_conn *c);

/* mqr_conn_buffered: frames or bytes already read and not yet returned, so
 * an event loop must not sleep on the fd. */
bool mqr_conn_buffered(const mqr_conn *c);

/* mqr_conn_blocked: the broker said it blocks our publishes (and stopped
 * reading the socket once we publish), until it says otherwise. */
bool mqr_conn_blocked(const mqr_conn *c);

/* mqr_conn_can_publish: a publish of a len-byte body would return at once:
 * the broker does not block us and the socket's send buffer has room for
 * it. rabbitmq-c waits, without a deadline, for a full buffer to drain. */
bool mqr_conn_can_publish(mqr_conn *c, size_t len);

/* mqr_conn_abort gives the connection up (it is then closed; later calls
 * fail with MQRPC_ECLOSED) with why as its error message. */
void mqr_conn_abort(mqr_conn *c, const char *why);

/* mqr_conn_heartbeat_s: the negotiated heartbeat interval (0: none). */
int mqr_conn_heartbeat_s(const mqr_conn *c);

/* mqr_conn_declare_queue declares queue on channel 1 (an empty name asks
 * the broker for a server-named one, whose name is written into name_out,
 * 256 bytes). A queue that exists with other arguments fails with
 * MQRPC_EINVAL (406 PRECONDITION_FAILED) and closes the connection. */
mqrpc_err mqr_conn_declare_queue(mqr_conn *c, const char *queue,
                                 const mqr_queue_opts *o, char *name_out);

/* mqr_conn_delete_queue deletes queue (on the side channel, so a queue
 * already gone costs nothing but that channel). */
mqrpc_err mqr_conn_delete_queue(mqr_conn *c, const char *queue);

/* mqr_conn_confirm_select puts channel 1 in publisher-confirm mode: from
 * then on the n-th publish has sequence number n (mqr_conn_publish_seq),
 * and mqr_conn_wait returns the broker's MQR_ACK/MQR_NACK for them. */
mqrpc_err mqr_conn_confirm_select(mqr_conn *c);

/* mqr_conn_publish_seq: the sequence number of the last publish. */
uint64_t mqr_conn_publish_seq(const mqr_conn *c);

/* mqr_conn_qos sets basic.qos prefetch_count on channel 1. */
mqrpc_err mqr_conn_qos(mqr_conn *c, unsigned prefetch);

/* mqr_conn_consume starts a consumer on channel 1. */
mqrpc_err mqr_conn_consume(mqr_conn *c, const char *queue, bool no_ack);

/* mqr_conn_cancel cancels the consumer of the last mqr_conn_consume
 * (basic.cancel) and waits for the broker's cancel-ok. Deliveries the
 * broker sent before it are kept and returned by the next mqr_conn_wait
 * calls; none come after. */
mqrpc_err mqr_conn_cancel(mqr_conn *c);

/* mqr_conn_publish_confirmed publishes as mqr_conn_publish (not mandatory)
 * on MQR_CONFIRM_CHANNEL, opening it in confirm mode the first time, and
 * writes the publish's sequence number on that channel into *seq: the
 * broker's MQR_ACK/MQR_NACK with channel MQR_CONFIRM_CHANNEL refer to it. */
mqrpc_err mqr_conn_publish_confirmed(mqr_conn *c, mqr_str routing_key,
                                     const mqr_props *props, const void *body,
                                     size_t len, uint64_t *seq);

/* mqr_conn_publish publishes on the default exchange with routing key
 * routing_key, content_type application/json. Does not wait. */
mqrpc_err mqr_conn_publish(mqr_conn *c, mqr_str routing_key,
                           const mqr_props *props, const void *body, size_t len,
                           bool mandatory);

/* mqr_conn_ack acknowledges delivery_tag on channel 1, and with multiple
 * every earlier unacknowledged delivery too. */
mqrpc_err mqr_conn_ack(mqr_conn *c, uint64_t delivery_tag, bool multiple);

/* mqr_conn_cork holds outgoing frames in the kernel (TCP_CORK) until it is
 * called again with on false, so a batch of frames leaves in as few packets
 * as possible and the broker reads it at once. */
void mqr_conn_cork(mqr_conn *c, bool on);

/* mqr_conn_wait returns the next delivery or basic.return, waiting up to
 * timeout_ms (<0: forever) while keeping heartbeats going. MQRPC_ETIMEOUT
 * if none came in time; any other failure means the connection is gone
 * (mqr_conn_errmsg says why) and every later call fails with MQRPC_ECLOSED. */
mqrpc_err mqr_conn_wait(mqr_conn *c, int timeout_ms, mqr_msg *msg);

/* mqr_conn_set_wake_fd makes mqr_conn_wait also return (MQRPC_OK, kind
 * MQR_WAKE) when fd is readable, so another thread can wake the one that
 * owns the connection; the owner drains fd. -1: none. Heartbeats are kept
 * going meanwhile. */
void mqr_conn_set_wake_fd(mqr_conn *c, int fd);

/* mqr_conn_queue_info: passive declare on the side channel.
 * MQRPC_ENOROUTE if the queue does not exist. */
mqrpc_err mqr_conn_queue_info(mqr_conn *c, const char *queue,
                              uint32_t *messages, uint32_t *consumers);

/* mqr_conn_consuming: the consumer of the last mqr_conn_consume is on
 * (not cancelled by us nor by the broker). */
bool mqr_conn_consuming(const mqr_conn *c);

/* mqr_conn_where: "host:port" of the broker, no credentials. */
const char *mqr_conn_where(const mqr_conn *c);

/* mqr_conn_cluster_name writes the broker's cluster_name server property
 * (RabbitMQ's default is its first node's name), or "". */
void mqr_conn_cluster_name(const mqr_conn *c, char *buf, size_t len);

/* mqr_conn_control_open, on MQR_CONTROL_CHANNEL (opened if needed):
 * declares exchange (durable, direct), the exclusive auto-delete queue,
 * binds it with each of keys and consumes it without acknowledgements.
 * Its deliveries come from mqr_conn_wait with that channel. A refusal
 * closes that channel only (the connection stays usable). */
mqrpc_err mqr_conn_control_open(mqr_conn *c, const char *exchange,
                                const char *queue, const char *const *keys,
                                size_t nkeys);

/* mqr_conn_control_on: the control consumer is on. */
bool mqr_conn_control_on(const mqr_conn *c);

/* mqr_conn_publish_to is mqr_conn_publish (not mandatory) to exchange. */
mqrpc_err mqr_conn_publish_to(mqr_conn *c, const char *exchange,
                              mqr_str routing_key, const mqr_props *p,
                              const void *body, size_t len);

/* mqr_conn_exchange_exists: passive exchange.declare on the side channel;
 * MQRPC_ENOROUTE when it does not exist. */
mqrpc_err mqr_conn_exchange_exists(mqr_conn *c, const char *exchange);

/* -------------------------------------------------------------- control */
/* Health and discovery (control.c): every service instance answers pings
 * on the control exchange; the README's wire contract describes them. */
#define MQR_CONTROL_EXCHANGE "mqrpc.control"
/* Names of control queues: this prefix, the service queue, a dot and
 * random hex. Named (not server-named amq.gen-*) so that the services
 * account may declare them without being able to declare reply queues. */
#define MQR_CONTROL_QUEUE_PREFIX "mqrpc.control."
#define MQR_PING_TYPE "mqrpc.ping"
#define MQR_PONG_TYPE "mqrpc.pong"

#endif /* MQRPC_INTERNAL_H */
