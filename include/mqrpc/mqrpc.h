/*
 * mqrpc: request/reply RPC over RabbitMQ (AMQP 0-9-1).
 *
 * Two handles: mqrpc_client calls remote services, mqrpc_service runs one.
 * Both are single-threaded: a handle must only be used by one thread at a
 * time, and callbacks run on the thread that calls into the handle. Every
 * *_free accepts NULL.
 *
 * Wire contract (interoperates with the classic pika "RPC tutorial" peers):
 * a request is published on the default exchange with routing key = queue,
 * properties reply_to, correlation_id, content_type=application/json,
 * expiration = the caller's timeout and the header x-mqrpc-deadline (the
 * caller's absolute deadline, Unix time in ms; a service skips a request
 * past it); its body is a JSON object. A success reply is the bare JSON
 * result with the same correlation_id and app_id set to the answering
 * instance; an error reply has type=error and the body
 * {"error": {"code": "...", "message": "..."}}. A service re-publishes a
 * request that comes back after its instance died with the header
 * x-mqrpc-deliveries (deliveries that ended without an answer).
 * Trace context (W3C, as the OpenTelemetry RabbitMQ instrumentations
 * carry it): a request has the string header traceparent
 * ("00-<trace id>-<parent id>-<flags>") and, when the caller has one,
 * tracestate; a service continues that trace (or starts one when the
 * header is missing or invalid) with a span id of its own, and its reply
 * carries traceparent "00-<same trace id>-<its span id>-<same flags>" and
 * the tracestate it got.
 */
#ifndef MQRPC_MQRPC_H
#define MQRPC_MQRPC_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* MQRPC_API marks what the shared library exports; everything else in it
 * is hidden (-fvisibility=hidden). */
#if defined(__GNUC__) || defined(__clang__)
#define MQRPC_API __attribute__((visibility("default")))
#else
#define MQRPC_API
#endif

/*
 * Versions. MQRPC_VERSION_* describe the header a program was compiled
 * with, mqrpc_version() the library it runs with: a program may check at
 * run time that the library is at least as new as its header (README, ABI
 * policy). MQRPC_VERSION_NUMBER is major * 10000 + minor * 100 + patch.
 */
#define MQRPC_VERSION_MAJOR 0
#define MQRPC_VERSION_MINOR 2
#define MQRPC_VERSION_PATCH 0
#define MQRPC_VERSION "0.2.0"
#define MQRPC_VERSION_NUMBER                                        \
    (MQRPC_VERSION_MAJOR * 10000 + MQRPC_VERSION_MINOR * 100 +      \
     MQRPC_VERSION_PATCH)

/* mqrpc_version returns the running library's MQRPC_VERSION_NUMBER. */
MQRPC_API unsigned mqrpc_version(void);

/* mqrpc_version_string returns the running library's MQRPC_VERSION
 * ("0.2.0"); static, never NULL. */
MQRPC_API const char *mqrpc_version_string(void);

/*
 * MQRPC_ERRORS is the one table of status codes: it generates the enum,
 * mqrpc_strerror() and mqrpc_errname(), so they cannot drift apart.
 * Transport failures (CONNECT, CLOSED, TIMEOUT, NO_ROUTE, ...) are statuses;
 * an error the remote handler chose to send is MQRPC_EREMOTE, and its code
 * and message are in the reply. A value never changes meaning; new ones
 * are added at the end, so a program must expect values it does not know
 * (mqrpc_strerror and mqrpc_errname answer for them).
 */
#define MQRPC_ERRORS(X)                                         \
    X(OK, "ok", "success")                                      \
    X(ENOMEM, "nomem", "out of memory")                         \
    X(EINVAL, "invalid", "invalid argument")                    \
    X(EURL, "bad_url", "malformed broker URL")                  \
    X(ECONNECT, "connect", "cannot connect to the broker")      \
    X(ETLS, "tls", "TLS handshake or certificate check failed") \
    X(EAUTH, "auth", "the broker refused the login")            \
    X(EACCESS, "access", "the broker refused access")           \
    X(ECLOSED, "connection_lost", "connection to the broker lost") \
    X(ETIMEOUT, "timeout", "timed out")                         \
    X(ENOROUTE, "no_route", "no service on that queue")         \
    X(EOVERLOAD, "overloaded", "the service's queue is full")   \
    X(EREMOTE, "remote", "the service replied with an error")   \
    X(EBADREPLY, "bad_reply", "malformed reply")                \
    X(ETOOBIG, "too_big", "message too large")                  \
    X(EPROTO, "protocol", "AMQP protocol error")                \
    X(ECANCELED, "canceled", "call canceled")                   \
    X(ESTATE, "state", "operation not valid in this state")      \
    X(EBLOCKED, "blocked", "the broker is blocking publishers")

/* mqrpc_err: the status every fallible call returns. */
typedef enum {
#define MQRPC_ENUM_(name, short_name, text) MQRPC_##name,
    MQRPC_ERRORS(MQRPC_ENUM_)
#undef MQRPC_ENUM_
} mqrpc_err;

/* mqrpc_strerror returns a static English sentence for err, never NULL. */
MQRPC_API const char *mqrpc_strerror(mqrpc_err err);

/* mqrpc_errname returns a static snake_case name for err ("timeout"),
 * never NULL; for logs, metrics and JSON. */
MQRPC_API const char *mqrpc_errname(mqrpc_err err);

/* Remote error codes every service may send. Handlers may use others. */
#define MQRPC_BAD_REQUEST "bad_request"
#define MQRPC_NOT_FOUND "not_found"
#define MQRPC_INTERNAL "internal"
/* The request came back max_deliveries times without an answer (each
 * instance that took it died): it is now in the dead-letter queue
 * "<queue>.dlq" and will not be run again (or, if the message says so, the
 * broker refused it there and it was not kept). */
#define MQRPC_DEAD_LETTER "dead_letter"

/*
 * Metrics. MQRPC_CODES lists the result codes the statistics count apart
 * (mqrpc_service_stats.replies, mqrpc_client_stats.remote), indexed by
 * mqrpc_code; every other code a handler chooses is counted as "other".
 * New codes are added before OTHER only with a new MQRPC_CODE_SLOTS-sized
 * struct field, so an index never changes meaning within one field.
 */
#define MQRPC_CODES(X)                     \
    X(OK, "ok")                            \
    X(BAD_REQUEST, "bad_request")          \
    X(NOT_FOUND, "not_found")              \
    X(INTERNAL, "internal")                \
    X(DEAD_LETTER, "dead_letter")          \
    X(OVERLOADED, "overloaded")            \
    X(OTHER, "other")

typedef enum {
#define MQRPC_CODE_ENUM_(name, text) MQRPC_CODE_##name,
    MQRPC_CODES(MQRPC_CODE_ENUM_)
#undef MQRPC_CODE_ENUM_
    MQRPC_CODE_COUNT
} mqrpc_code;

/* Room for codes in the stats structs: MQRPC_CODE_COUNT of them are used. */
#define MQRPC_CODE_SLOTS 16

/* mqrpc_code_name returns the static name of a mqrpc_code ("bad_request"),
 * or NULL past MQRPC_CODE_COUNT. */
MQRPC_API const char *mqrpc_code_name(unsigned code);

/* mqrpc_code_of returns the mqrpc_code counting a reply's code (NULL or
 * "" is MQRPC_CODE_OK; an unknown one MQRPC_CODE_OTHER). */
MQRPC_API mqrpc_code mqrpc_code_of(const char *code);

/* The upper bounds, in seconds, of the duration histograms (a service's
 * handling time, a client's call time): MQRPC_DURATION_BOUNDS_S is an
 * initializer list of MQRPC_DURATION_BUCKETS increasing values. The
 * stats count each duration once, in the first bucket whose bound is at
 * or above it, or in the last slot (index MQRPC_DURATION_BUCKETS) above
 * them all: not cumulative, unlike Prometheus' le buckets. */
#define MQRPC_DURATION_BUCKETS 18
#define MQRPC_DURATION_BOUNDS_S                                          \
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,   \
        0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60

/* Default request body limit of a service, in bytes (1 MiB). */
#define MQRPC_DEFAULT_MAX_BODY (1024u * 1024u)
/* Default nesting limit of a request; the request object is level 1. */
#define MQRPC_DEFAULT_MAX_DEPTH 32
/* Default limit of any string value or object key in a request, in bytes. */
#define MQRPC_DEFAULT_MAX_STRING 65536u
/* Default heartbeat interval, in seconds (RabbitMQ's own default). */
#define MQRPC_DEFAULT_HEARTBEAT 60
/* Default call timeout of the command-line tools, in milliseconds. */
#define MQRPC_DEFAULT_TIMEOUT_MS 5000
/* Default number of deliveries of one request before it is dead-lettered. */
#define MQRPC_DEFAULT_MAX_DELIVERIES 5
/* Default reconnection backoff: the first delay and the cap, in ms. */
#define MQRPC_DEFAULT_RECONNECT_MIN_MS 100
#define MQRPC_DEFAULT_RECONNECT_MAX_MS 5000

/* Log levels, most severe first. */
typedef enum {
    MQRPC_LOG_ERROR,
    MQRPC_LOG_WARN, /* a fault the library handles: lost connection, ... */
    MQRPC_LOG_INFO, /* a fault resolved: connection regained, ... */
    MQRPC_LOG_DEBUG /* one line per request (services' verbose option) */
} mqrpc_log_level;

/*
 * mqrpc_log_fn receives the library's log lines: line is one line of
 * English without a trailing newline, time stamp or instance name (the
 * program knows those; give each handle its own arg to tell them apart),
 * valid only during the call. It runs on the thread that drives the
 * handle, and must not call into that handle. A NULL log function in the
 * options means the default: "<UTC time> <instance> <line>" on stderr.
 */
typedef void (*mqrpc_log_fn)(mqrpc_log_level level, const char *line,
                             void *arg);

/*
 * mqrpc_log_record is one log line with its fields apart, for structured
 * logs (service_main's --log-format json). The library fills it; size is
 * sizeof(mqrpc_log_record) of the library, which only ever adds fields at
 * the end: a program reads the fields its header knows. Strings are valid
 * only during the call; a field that does not apply is NULL (duration_ms:
 * negative).
 */
typedef struct mqrpc_log_record {
    size_t size;
    mqrpc_log_level level;
    /* The line mqrpc_log_fn would get, without the request's trace ids. */
    const char *msg;
    /* About one request (NULL when the line is not): */
    const char *queue;
    const char *correlation_id;
    const char *trace_id; /* 32 hex digits */
    const char *span_id;  /* 16 hex digits: the service's span for it */
    /* Once answered: "ok" or the error reply's code, and the time from
     * its delivery to its answer, in ms. */
    const char *code;
    double duration_ms;
} mqrpc_log_record;

/* mqrpc_log_record_fn receives log records (mqrpc_service_opts.log_record)
 * under mqrpc_log_fn's rules (thread, no call into the handle); arg is the
 * options' log_arg. */
typedef void (*mqrpc_log_record_fn)(const mqrpc_log_record *rec, void *arg);

/* Which account a program connects as. The private broker has one of each
 * (README, Security): services may consume only service queues, clients
 * may only publish requests and read their own reply queues. */
typedef enum { MQRPC_ROLE_CLIENT, MQRPC_ROLE_SERVICE } mqrpc_role;

/*
 * Broker URLs. Wherever a URL is taken (mqrpc_client_opts.url,
 * mqrpc_service_opts.url, their url_file, $AMQP_URL, the private broker's
 * URL files), a comma-separated list of URLs is taken too, as RabbitMQ
 * PerfTest and kombu take it: the nodes of a cluster,
 * "amqp://u:p@10.0.0.1:5672/,amqp://u:p@10.0.0.2:5672/". A ',' followed
 * by (blanks and) a scheme ("amqp://", "amqps://") starts the next URL;
 * any other ',' is part of the URL (write one in a password as %2C to be
 * safe). Every entry
 * is checked before the first connection attempt: one malformed entry, or
 * TLS options with an amqp:// entry, fails the whole list, naming its
 * position ("entry 2 of 3: ..."). Each client and service walks the list
 * in an order of its own, drawn at random when it is created (so the
 * connections of many spread over the nodes): the first connection tries
 * each address in turn until one answers; after a lost connection the
 * next address is tried at once, and the others after it, then the
 * reconnection backoff applies between rounds over the whole list. A
 * refused login, access or TLS handshake is not tried elsewhere. Log
 * lines name the address connected to, redacted.
 */

/*
 * mqrpc_default_url resolves the broker URL the way every program does:
 * explicit (a --url option) if not NULL, else $AMQP_URL, else the URL file
 * the private broker wrote for role in its state directory
 * ($MQRPC_STATE_DIR, else the directory compiled in: clients.url or
 * services.url, read with mqrpc_url_file_read's checks), else
 * amqp://guest:guest@localhost:5672/. Writes a NUL-terminated URL (or
 * list, as found) into buf
 * and, if source is not NULL, a static description of where it came from
 * ("--url", "AMQP_URL", "state file", "default"). Returns MQRPC_EINVAL if
 * buf is too small or the state file exists but cannot be used.
 */
MQRPC_API mqrpc_err mqrpc_default_url(const char *explicit_url, mqrpc_role role,
                            char *buf, size_t len, const char **source);

/*
 * mqrpc_url_file_read reads the first line of path (a file holding a broker
 * URL with its password) into buf. Refuses, like ssh does for keys, a file
 * that group or others may access or that another user owns: on failure
 * returns MQRPC_EINVAL and writes one line into err ("URL file F is
 * accessible by group or others (mode 0644); ...").
 */
MQRPC_API mqrpc_err mqrpc_url_file_read(const char *path, char *buf, size_t len,
                              char *err, size_t errlen);

/*
 * mqrpc_url_redact copies url (a URL or a list) into buf with every
 * password replaced by "****", for log lines and error messages. Always
 * NUL-terminates (truncating).
 */
MQRPC_API void mqrpc_url_redact(const char *url, char *buf, size_t len);

/* mqrpc_url_plaintext_remote returns 1 if url (a URL or a list) has a
 * plain amqp:// entry to a host that is not loopback, where the password
 * and every message cross the network unencrypted; programs warn about
 * it. 0 otherwise. */
MQRPC_API int mqrpc_url_plaintext_remote(const char *url);

/*
 * TLS settings for amqps:// URLs; zeroed means: verify the broker's
 * certificate against the system CA store and its host name, no client
 * certificate. Unset files fall back to the URL's query parameters
 * cacertfile, certfile and keyfile (RabbitMQ's names), as in
 * amqps://host/?cacertfile=/etc/mqrpc/ca.pem. Giving any of them for an
 * amqp:// URL is an error.
 */
typedef struct mqrpc_tls_opts {
    const char *ca_file;   /* PEM file of the CAs to trust */
    const char *cert_file; /* client certificate (PEM), for mutual TLS */
    const char *key_file;  /* its private key (PEM, unencrypted) */
    /* Nonzero: do not verify the certificate or the host name. Anyone on
     * the path can then read and change the traffic: for tests only. */
    int insecure;
} mqrpc_tls_opts;

/* --------------------------------------------------------- trace context */

/* Length of a version 00 traceparent:
 * "00-" 32 hex trace id "-" 16 hex parent id "-" 2 hex flags. */
#define MQRPC_TRACEPARENT_LEN 55
/* Longest tracestate passed on (the W3C recommendation's limit). */
#define MQRPC_TRACESTATE_MAX 512

/* mqrpc_traceparent_valid returns 1 if traceparent is a W3C traceparent
 * this library takes: version 00 with exactly its four fields, or a later
 * version (not ff) that starts like one; lowercase hex; trace id and
 * parent id not all zeros. 0 otherwise (NULL included). */
MQRPC_API int mqrpc_traceparent_valid(const char *traceparent);
/*
 * mqrpc_url_check checks urls (a URL or a comma-separated list) as a
 * connection attempt would, without connecting: every entry well-formed,
 * and TLS options (tls, may be NULL) given only with amqps:// entries.
 * Returns MQRPC_OK, MQRPC_EURL (malformed; also an empty entry or more
 * than 64) or MQRPC_EINVAL (TLS options with an amqp:// entry), with one
 * line in err that names the entry of a list ("entry 2 of 3: malformed
 * broker URL \"amqp://u:****@h:x/\": port must be a decimal number") and
 * never shows a password. err may be NULL.
 */
MQRPC_API mqrpc_err mqrpc_url_check(const char *urls, const mqrpc_tls_opts *tls,
                                    char *err, size_t errlen);

/* ---------------------------------------------------------------- client */

typedef struct mqrpc_client mqrpc_client;
typedef struct mqrpc_reply mqrpc_reply;

/*
 * mqrpc_progress_fn receives a progress message of a call made with
 * MQRPC_CALL_PROGRESS: call_arg is that call's arg (NULL for mqrpc_call),
 * percent in 0..100, text one line ("" when none; valid during the call),
 * progress_arg is mqrpc_client_opts.progress_arg. It runs where done
 * callbacks run, under the same re-entrancy rules. Progress is advisory: a
 * service sends the latest when it can, and none after the reply.
 */
typedef void (*mqrpc_progress_fn)(void *call_arg, double percent,
                                  const char *text, void *progress_arg);

/*
 * Client options. Fill them with mqrpc_client_opts_init, then set what
 * differs from the defaults: init records the size of the struct this
 * program was compiled with, which lets a newer library, whose struct has
 * more fields, take it (README, ABI policy). Zero means "default" for
 * every field. New fields are only ever added at the end.
 */
typedef struct mqrpc_client_opts {
    size_t size; /* sizeof(mqrpc_client_opts); set by mqrpc_client_opts_init */
    /* broker URL, or a comma-separated list of them (see "Broker URLs");
     * NULL: url_file if set, else mqrpc_default_url(NULL,
     * MQRPC_ROLE_CLIENT) */
    const char *url;
    int heartbeat_s;        /* 0: MQRPC_DEFAULT_HEARTBEAT; <0: disabled */
    int connect_timeout_ms; /* TCP connect and login; 0: 5000 */
    /* Nonzero: replies come through RabbitMQ's direct reply-to
     * (amq.rabbitmq.reply-to) instead of an exclusive reply queue. Saves
     * the queue, not time: measured no faster on RabbitMQ 3.10 (README). */
    int direct_reply_to;
    mqrpc_tls_opts tls; /* for amqps:// URLs */
    /* Nonzero: requests are persistent, and the reply queue is durable and
     * outlives the connection (deleted by the broker after 5 idle minutes),
     * so a call whose request the broker confirmed keeps waiting for its
     * reply across a lost connection and a broker restart. Give services
     * --durable too: a persistent message in a non-durable queue does not
     * survive a broker restart. */
    int durable;
    /* How many times an idempotent call (MQRPC_CALL_IDEMPOTENT) is re-sent
     * after the connection was lost before its reply came, or after the
     * broker refused it (a nack: a full queue, or a quorum queue that
     * cannot take it just after a node loss; re-sent after a pause of
     * 100 ms doubling to 1 s, within its deadline); 0: never. Other calls
     * are never re-sent. */
    int retries;
    /* Reconnection backoff after a lost connection: the first delay and
     * the cap, in ms; the delay doubles after each failed attempt and is
     * drawn at random between half and all of it (jitter), so clients do
     * not reconnect in lockstep. 0: the MQRPC_DEFAULT_RECONNECT_* values.
     * reconnect_max_ms < 0: do not reconnect. */
    int reconnect_min_ms;
    int reconnect_max_ms;
    /* A file holding the broker URL or list (mqrpc_url_file_read's
     * checks; the first line), read
     * again on every connection attempt, so a rotated password is picked
     * up when the client reconnects. Used when url is NULL. */
    const char *url_file;
    /* The connection name the broker shows (management UI,
     * rabbitmqctl list_connections); NULL: "<program>@<host>:<pid>". */
    const char *name;
    mqrpc_log_fn log; /* NULL: stderr */
    void *log_arg;
    /* Receives the progress messages of calls made with
     * MQRPC_CALL_PROGRESS; see mqrpc_progress_fn. */
    mqrpc_progress_fn progress;
    void *progress_arg;
} mqrpc_client_opts;

/* mqrpc_client_opts_init zeroes *o (all defaults) and sets o->size. */
static inline void mqrpc_client_opts_init(mqrpc_client_opts *o)
{
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
}

/* mqrpc_call_async flags. MQRPC_CALL_IDEMPOTENT: running the request twice
 * does no harm, so the call may be re-sent after a lost connection (up to
 * mqrpc_client_opts.retries times). */
#define MQRPC_CALL_IDEMPOTENT 1u
/* MQRPC_CALL_PROGRESS: ask the service for progress messages (a header on
 * the request; services that know nothing of it ignore it). They reach
 * mqrpc_client_opts.progress, before the reply. */
#define MQRPC_CALL_PROGRESS 2u

/*
 * mqrpc_done_fn is called exactly once per mqrpc_call_async that returned
 * MQRPC_OK: with the reply, an error reply, a timeout, a connection loss, or
 * MQRPC_ECANCELED from mqrpc_client_free. It runs on the thread that called
 * mqrpc_client_process (or mqrpc_call, or mqrpc_client_free). The reply is
 * owned by the library and valid until the callback returns, whatever the
 * callback does.
 *
 * Re-entrancy: inside a callback, mqrpc_call_async may start new calls
 * (they are published at once, or queued if the client is disconnected),
 * and mqrpc_client_free may be called: the client is then closed and freed
 * as soon as the callback returns, and the mqrpc_client_process (or
 * mqrpc_call) that ran the callback returns MQRPC_ECANCELED without
 * touching it again. mqrpc_call, mqrpc_client_process,
 * mqrpc_client_queue_info and mqrpc_client_connect return MQRPC_ESTATE
 * inside a callback: they would wait for the broker, and reading its next
 * message would pull the current reply from under the caller.
 */
typedef void (*mqrpc_done_fn)(const mqrpc_reply *reply, void *arg);

/* mqrpc_client_new copies opts (NULL: all defaults) into a new, unconnected
 * client. Returns NULL with errno ENOMEM when out of memory, or EINVAL when
 * opts->size was not set by mqrpc_client_opts_init or opts sets a field
 * this library does not know (the program was built against a newer
 * header). */
MQRPC_API mqrpc_client *mqrpc_client_new(const mqrpc_client_opts *opts);

/*
 * mqrpc_client_connect opens the connection, a channel in publisher-confirm
 * mode, and a server-named reply queue (exclusive, or durable with
 * opts.durable). Blocks up to connect_timeout_ms per address tried (with a
 * URL list, each address in turn until one answers). On failure,
 * mqrpc_client_errmsg says why in one line ("cannot connect to
 * 127.0.0.1:5682: connection refused"; for a list, what each address
 * said, separated by "; "). After a later loss of the
 * connection the client reconnects by itself (see reconnect_min_ms), from
 * inside mqrpc_client_process only, each attempt bounded by the earliest
 * deadline of the calls waiting for it.
 */
MQRPC_API mqrpc_err mqrpc_client_connect(mqrpc_client *c);

/* mqrpc_client_errmsg describes the last failure of c in one line; the
 * string is owned by c and valid until the next call on c. Never NULL. */
MQRPC_API const char *mqrpc_client_errmsg(const mqrpc_client *c);

/* mqrpc_client_free completes every pending call with MQRPC_ECANCELED
 * (their callbacks may not start new calls: mqrpc_call_async then returns
 * MQRPC_ECANCELED), closes the connection and frees c. Inside a callback,
 * see mqrpc_done_fn. Blocks for at most connect_timeout_ms to close
 * politely, and not at all while the broker blocks the connection.
 * Accepts NULL. */
MQRPC_API void mqrpc_client_free(mqrpc_client *c);

/*
 * mqrpc_call_async publishes body (len bytes, a JSON object) to queue and
 * returns without waiting. The library copies what it needs; body may be
 * freed on return. timeout_ms (> 0) bounds the wait for the reply, retries
 * included, and is sent as the message's expiration and deadline header,
 * so a request nobody took in time is dropped by the broker or skipped by
 * the service. flags: 0 or MQRPC_CALL_IDEMPOTENT. done is called exactly
 * once, later, from mqrpc_client_process, unless this function returns an
 * error, in which case it is never called. Outcomes besides the reply:
 * MQRPC_EOVERLOAD when the broker refused the request (the service's queue
 * is full, services' --max-queue), MQRPC_ECLOSED as soon as the connection
 * is lost (unless the call is re-sent, or opts.durable and the broker had
 * confirmed the request), MQRPC_ENOROUTE when no queue has that name,
 * MQRPC_ETIMEOUT at the deadline, MQRPC_EBLOCKED at the deadline when the
 * broker was blocking publishers (a resource alarm; the message names its
 * reason). It never waits for the broker: while the client is
 * disconnected, or the broker blocks publishers, or the socket cannot take
 * the request, the call is queued and sent by mqrpc_client_process once it
 * can be (reconnecting as needed), or fails at its deadline. Returns
 * MQRPC_ESTATE before mqrpc_client_connect succeeded, MQRPC_ECANCELED
 * while the client is being freed.
 */
MQRPC_API mqrpc_err mqrpc_call_async(mqrpc_client *c, const char *queue, const void *body,
                           size_t len, int timeout_ms, unsigned flags,
                           mqrpc_done_fn done, void *arg);

/*
 * Per-call options, for mqrpc_call_async_ex and mqrpc_call_ex. Fill with
 * mqrpc_call_opts_init (it records the struct's size, as for
 * mqrpc_client_opts); zero means default; new fields go at the end.
 */
typedef struct mqrpc_call_opts {
    size_t size; /* sizeof(mqrpc_call_opts); set by mqrpc_call_opts_init */
    /* The caller's W3C trace context: the request carries it unchanged
     * (its parent id is the caller's span, e.g. a service handler's
     * mqrpc_request_traceparent). NULL: the library starts a new trace,
     * random trace and parent ids from getrandom, flags 01 (sampled).
     * Copied; an invalid one (mqrpc_traceparent_valid) is MQRPC_EINVAL. */
    const char *traceparent;
    /* Its tracestate, sent beside it; NULL: none. Only with traceparent;
     * 1 to MQRPC_TRACESTATE_MAX printable ASCII characters, else
     * MQRPC_EINVAL. */
    const char *tracestate;
} mqrpc_call_opts;

/* mqrpc_call_opts_init zeroes *o (all defaults) and sets o->size. */
static inline void mqrpc_call_opts_init(mqrpc_call_opts *o)
{
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
}

/* mqrpc_call_async_ex is mqrpc_call_async with per-call options (NULL:
 * the defaults, which is what mqrpc_call_async uses). MQRPC_EINVAL, done
 * never called, for options this library does not know or bad values. */
MQRPC_API mqrpc_err mqrpc_call_async_ex(mqrpc_client *c, const char *queue,
                                        const void *body, size_t len,
                                        int timeout_ms, unsigned flags,
                                        const mqrpc_call_opts *opts,
                                        mqrpc_done_fn done, void *arg);

/*
 * mqrpc_client_process reads and dispatches whatever the broker sent,
 * waiting up to timeout_ms (0: do not wait; <0: until something happens)
 * for the first frame, expires calls past their deadline and keeps the
 * heartbeat going, reconnects when a reconnection attempt is due and sends
 * what waits for a connection. Callbacks run inside it. Returns MQRPC_OK
 * when something happened (a callback ran, a reconnection, a wake), MQRPC_ETIMEOUT
 * if nothing did, the connection failure when it was lost (after failing
 * the calls that cannot wait), MQRPC_ECANCELED when a callback freed the
 * client, MQRPC_ESTATE inside a callback or before mqrpc_client_connect.
 */
MQRPC_API mqrpc_err mqrpc_client_process(mqrpc_client *c, int timeout_ms);

/*
 * mqrpc_client_wake makes the mqrpc_client_process running on another
 * thread (or the next one) return MQRPC_OK at once: a thread that wants
 * calls made hands them to the client's thread (its own queue and lock)
 * and wakes it, as libuv's uv_async_send does. Wakes that come together
 * may return once. The only client function that may be called from any
 * thread, and from a signal handler.
 */
MQRPC_API void mqrpc_client_wake(mqrpc_client *c);

/*
 * mqrpc_client_fd returns the connection's socket, for poll/epoll/libuv:
 * when it is readable, or when mqrpc_client_next_timeout_ms expires, call
 * mqrpc_client_process(c, 0). Returns -1 when not connected; the socket
 * changes after a reconnection, so ask again after each process call.
 */
MQRPC_API int mqrpc_client_fd(const mqrpc_client *c);

/* mqrpc_client_next_timeout_ms returns how long an event loop may sleep
 * before mqrpc_client_process must run again (next call deadline,
 * heartbeat or reconnection attempt), or -1 if nothing is due. 0 means
 * "data already buffered". */
MQRPC_API int mqrpc_client_next_timeout_ms(const mqrpc_client *c);

/* mqrpc_client_pending returns the number of calls in flight. */
MQRPC_API size_t mqrpc_client_pending(const mqrpc_client *c);

/* What a client counted since it was created. New fields are added at the
 * end; mqrpc_client_get_stats fills as many as the caller's struct has. */
typedef struct mqrpc_client_stats {
    /* replies with no call waiting for them (late after a timeout, a
     * second reply to a redelivered request, or foreign): dropped */
    uint64_t dropped;
    uint64_t retried;    /* idempotent calls re-sent (lost connection, nack) */
    uint64_t lost;       /* connections lost */
    uint64_t reconnects; /* connections regained */
    int connected;       /* 1 while connected */
    uint64_t blocked;    /* times the broker blocked the connection */
    int is_blocked;      /* 1 while the broker blocks it */
    /* Calls ended, by status (index mqrpc_err; MQRPC_OK the successes,
     * MQRPC_EREMOTE every error reply, detailed in remote). */
    uint64_t calls[32];
    uint64_t remote[MQRPC_CODE_SLOTS]; /* error replies by mqrpc_code */
    /* Time from mqrpc_call_async to the end of the call, per
     * MQRPC_DURATION_BOUNDS_S bucket, and its sum in us. */
    uint64_t duration[MQRPC_DURATION_BUCKETS + 1];
    uint64_t duration_us;
    uint64_t in_flight; /* gauge: calls not yet ended */
} mqrpc_client_stats;

/* mqrpc_client_get_stats fills *out, of size bytes (sizeof *out); from
 * the thread that uses c, as every client call. */
MQRPC_API void mqrpc_client_get_stats(const mqrpc_client *c,
                                      mqrpc_client_stats *out, size_t size);

/*
 * mqrpc_call is mqrpc_call_async plus a wait: it blocks until the call
 * completes and returns its status. When out is not NULL, *out receives the
 * reply (also on failure, with the detail in mqrpc_reply_error_message),
 * which the caller frees with mqrpc_reply_free. Other calls in flight on c
 * keep being served while it waits. MQRPC_ESTATE inside a callback.
 */
MQRPC_API mqrpc_err mqrpc_call(mqrpc_client *c, const char *queue, const void *body,
                     size_t len, int timeout_ms, unsigned flags,
                     mqrpc_reply **out);

/* mqrpc_call_ex is mqrpc_call with per-call options (NULL: defaults), as
 * mqrpc_call_async_ex. */
MQRPC_API mqrpc_err mqrpc_call_ex(mqrpc_client *c, const char *queue,
                                  const void *body, size_t len, int timeout_ms,
                                  unsigned flags, const mqrpc_call_opts *opts,
                                  mqrpc_reply **out);

/*
 * mqrpc_client_queue_info asks the broker (a passive queue.declare on a
 * side channel, so a missing queue does not disturb calls in flight) how
 * many messages wait in queue and how many consumers it has. Blocks for one
 * broker round trip. MQRPC_ENOROUTE if the queue does not exist.
 */
MQRPC_API mqrpc_err mqrpc_client_queue_info(mqrpc_client *c, const char *queue,
                                  uint32_t *messages, uint32_t *consumers);

/*
 * mqrpc_client_ping asks the live service instances who they are, over
 * the broker's control exchange (README, Health and discovery): every
 * instance of queue, or of every queue when queue is NULL or "". A
 * broadcast has no count of answers to wait for, so it blocks for
 * timeout_ms, serving c's other calls meanwhile. When answers is not
 * NULL, *answers receives a new JSON array (the caller decrefs it) of the
 * answers, one object per instance, sorted by queue then instance, with
 * the fields of the README's wire contract (more may come: ignore unknown
 * ones). Returns MQRPC_OK (also when nobody answered), MQRPC_EBLOCKED
 * when the broker blocks c's publishes and nobody answered,
 * MQRPC_ECLOSED when the connection was lost (*answers holds what came
 * before), MQRPC_EINVAL for timeout_ms <= 0 or a queue over 255 bytes,
 * MQRPC_ESTATE inside a callback or before mqrpc_client_connect;
 * mqrpc_client_errmsg says why.
 */
MQRPC_API mqrpc_err mqrpc_client_ping(mqrpc_client *c, const char *queue,
                                      int timeout_ms, json_t **answers);

/* mqrpc_reply_status: MQRPC_OK (result available), MQRPC_EREMOTE (error
 * reply: see code and message), or the transport failure. */
MQRPC_API mqrpc_err mqrpc_reply_status(const mqrpc_reply *r);

/* mqrpc_reply_result: the parsed result of a successful call (any JSON
 * value), borrowed from r; NULL unless the status is MQRPC_OK. */
MQRPC_API json_t *mqrpc_reply_result(const mqrpc_reply *r);

/* mqrpc_reply_body: the raw reply body (not NUL-terminated), borrowed from
 * r; NULL with *len = 0 when no reply arrived. */
MQRPC_API const char *mqrpc_reply_body(const mqrpc_reply *r, size_t *len);

/* mqrpc_reply_error_code: the remote error code ("bad_request") for
 * MQRPC_EREMOTE, else mqrpc_errname(status). Never NULL for failures;
 * NULL for success. */
MQRPC_API const char *mqrpc_reply_error_code(const mqrpc_reply *r);

/* mqrpc_reply_error_message: one line for the user: the remote message,
 * or the transport failure with its context ("no reply from service_soma
 * within 5000 ms"). NULL for success. */
MQRPC_API const char *mqrpc_reply_error_message(const mqrpc_reply *r);

/* mqrpc_reply_app_id: the answering instance ("service_soma@host:42"), or
 * NULL if none was given (e.g. a pika service) or no reply arrived. */
MQRPC_API const char *mqrpc_reply_app_id(const mqrpc_reply *r);

/* mqrpc_reply_queue: the queue the call was sent to. */
MQRPC_API const char *mqrpc_reply_queue(const mqrpc_reply *r);

/* mqrpc_reply_traceparent: the reply's traceparent header (a service of
 * ours: the call's trace id and the service's own span id), or NULL when
 * the reply had none, or an invalid one (e.g. a pika service), or no reply
 * arrived. Borrowed from r. */
MQRPC_API const char *mqrpc_reply_traceparent(const mqrpc_reply *r);

/* mqrpc_reply_call_traceparent: the traceparent the call was sent with
 * (the caller's, or the one the library started), so a program can log
 * the trace id of a call that got no reply. NULL only when the call was
 * never made (mqrpc_call's copy of an argument error). Borrowed from r. */
MQRPC_API const char *mqrpc_reply_call_traceparent(const mqrpc_reply *r);

/* mqrpc_reply_free frees a reply returned by mqrpc_call. Accepts NULL. */
MQRPC_API void mqrpc_reply_free(mqrpc_reply *r);

/* --------------------------------------------------------------- service */

/*
 * mqrpc_fault carries a handler's error: code is one of MQRPC_BAD_REQUEST,
 * MQRPC_NOT_FOUND, MQRPC_INTERNAL (or another snake_case word), message one
 * line for the user.
 */
typedef struct mqrpc_fault {
    char code[32];
    char message[256];
} mqrpc_fault;

/*
 * mqrpc_handler_fn is a service's logic, a pure function: request is the
 * JSON object the caller sent (borrowed; never NULL, always an object).
 * Returns a new reference to the result (any JSON value), or NULL after
 * filling fault (mqrpc_fault_set). Returning NULL with an empty fault is
 * reported to the caller as "internal". It may take minutes: the
 * connection is serviced meanwhile. With opts.threads 1 it runs on the
 * thread that called mqrpc_service_run when the service's handler thread
 * is idle (that thread then services the connection if the handler runs
 * over 100 ms), else on that handler thread; with threads above 1, on
 * several threads at once, with the same arg: it must then be thread-safe.
 * arg is the pointer given to mqrpc_service_new.
 */
typedef json_t *(*mqrpc_handler_fn)(json_t *request, mqrpc_fault *fault,
                                    void *arg);

/* mqrpc_fault_set fills fault with code and a printf-style message and
 * returns NULL, so a handler can `return mqrpc_fault_set(...)`. */
MQRPC_API json_t *mqrpc_fault_set(mqrpc_fault *fault, const char *code, const char *fmt,
                        ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* mqrpc_json_typename names v's JSON type for messages to users
 * ("integer", "boolean", ...); static, never NULL. */
MQRPC_API const char *mqrpc_json_typename(const json_t *v);

typedef struct mqrpc_service mqrpc_service;

/*
 * What a running service tells its program, for a supervisor (systemd's
 * READY=1, STATUS= and WATCHDOG=1, service_main's notify.c) or a health
 * check. New kinds may be added at the end: ignore the ones you do not know.
 */
typedef enum {
    /* Consuming: mqrpc_service_connect is about to return MQRPC_OK (the
     * broker confirmed the consumer), or consuming again after a lost
     * connection or a consumer the broker cancelled. detail: the queue. */
    MQRPC_SERVICE_CONSUMING,
    /* Not consuming, retrying: the broker could not be reached at start
     * (the first failed attempt of mqrpc_service_connect that will be
     * retried), or mqrpc_service_run lost the connection and is about to
     * reconnect (and again when an attempt fails for a new reason).
     * detail: the reason, one line, password masked. */
    MQRPC_SERVICE_DISCONNECTED,
    /* The connection loop is alive: at least every tick_ms ms (see
     * mqrpc_service_opts) while mqrpc_service_connect retries and
     * mqrpc_service_run runs (reconnecting and stopping included), except
     * during a connection attempt (up to connect_timeout_ms). A hung loop
     * stops them; a long handler does not (the connection is serviced
     * meanwhile, see mqrpc_service_run). detail: NULL. */
    MQRPC_SERVICE_TICK,
    /* mqrpc_service_run is ending (mqrpc_service_stop, or a failure it
     * does not recover from): no new request starts; those in hand are
     * finished and answered first. detail: NULL. */
    MQRPC_SERVICE_STOPPING
} mqrpc_service_event;

/*
 * mqrpc_service_event_fn receives a service's events (above). It runs on
 * the thread that services the connection: the caller of
 * mqrpc_service_connect or mqrpc_service_run, or, while a handler runs
 * inline for long, the handler thread standing in for it; never on two
 * threads at once for one service. detail is valid only during the call.
 * It must return quickly and call no function of s but
 * mqrpc_service_instance and mqrpc_service_stop. arg is
 * mqrpc_service_opts.event_arg.
 */
typedef void (*mqrpc_service_event_fn)(mqrpc_service *s,
                                       mqrpc_service_event event,
                                       const char *detail, void *arg);
/* Queue types, for mqrpc_service_opts.queue_type. A classic queue (the
 * default, as the seed's pika peers declare it) lives on one node of a
 * cluster. A quorum queue is replicated over the cluster's nodes (Raft)
 * and survives the loss of a minority of them; it is always durable. */
#define MQRPC_QUEUE_CLASSIC 0u
#define MQRPC_QUEUE_QUORUM 1u

/* Service options: fill with mqrpc_service_opts_init (as for
 * mqrpc_client_opts); zero means default except for queue. */
typedef struct mqrpc_service_opts {
    size_t size; /* sizeof(mqrpc_service_opts); set by the init function */
    /* broker URL, or a comma-separated list of them (see "Broker URLs");
     * NULL: url_file if set, else mqrpc_default_url(NULL,
     * MQRPC_ROLE_SERVICE) */
    const char *url;
    const char *queue;       /* required: the queue this service consumes */
    /* Sent as app_id with every reply and used as the connection name;
     * NULL: "<queue>@<hostname>:<pid>". Cut to 255 bytes (an AMQP short
     * string), at a UTF-8 character boundary. */
    const char *instance_id;
    /* Unacknowledged requests at once; 0: threads. Above threads, the
     * rest wait in the service for a free handler thread (a stop hands
     * them back unstarted). Replies that are ready together leave
     * together, and their deliveries are acknowledged with one multiple
     * ack when no earlier delivery is still in hand. */
    unsigned prefetch;
    /* Input limits, checked before the handler runs: a request over one
     * gets bad_request. 0 means the MQRPC_DEFAULT_MAX_* value. max_depth
     * counts the request object as level 1 (jansson refuses about 2048
     * levels whatever it says); max_string applies to every string value
     * and object key, decoded, in UTF-8 bytes. */
    size_t max_body;        /* bytes; 0: 1 MiB */
    unsigned max_depth;     /* levels; 0: 32 */
    size_t max_string;      /* bytes; 0: 65536 */
    int heartbeat_s;        /* 0: MQRPC_DEFAULT_HEARTBEAT; <0: disabled */
    int connect_timeout_ms; /* 0: 5000 */
    int verbose;            /* nonzero: one log line per request */
    mqrpc_tls_opts tls;     /* for amqps:// URLs */
    /* Nonzero: declare the queue (and its dead-letter queue) durable, so
     * it and its persistent requests survive a broker restart. Replies to
     * persistent requests are persistent. All instances of a queue must
     * agree, and a seed (pika) service declares it non-durable. */
    int durable;
    /* Nonzero: the queue holds at most max_queue requests; the broker
     * refuses more (x-max-length, x-overflow reject-publish) and callers
     * get MQRPC_EOVERLOAD at once. All instances must agree. */
    unsigned max_queue;
    /* Deliveries of one request that end without an answer (its instance
     * died) before it goes to "<queue>.dlq" with a dead_letter error reply
     * to the caller; 0: MQRPC_DEFAULT_MAX_DELIVERIES. */
    unsigned max_deliveries;
    /* Reconnection backoff, as in mqrpc_client_opts. */
    int reconnect_min_ms;
    int reconnect_max_ms;
    /* Read again on every connection attempt; see mqrpc_client_opts. */
    const char *url_file;
    mqrpc_log_fn log; /* NULL: stderr */
    void *log_arg;
    /* How long mqrpc_service_connect keeps trying when the broker cannot
     * be reached (refused, unreachable, timed out), with the reconnection
     * backoff, logging the first failure once: 0: one attempt; > 0: up to
     * this many ms; < 0: until mqrpc_service_stop. A refused login, a
     * refused access, a TLS or URL problem fails at once. */
    int connect_retry_ms;
    /* Handler threads: requests handled at once on the one connection;
     * 0: 1. prefetch defaults to this. */
    unsigned threads;
    /* Events for the program (mqrpc_service_event); NULL: none. */
    mqrpc_service_event_fn event;
    void *event_arg;
    /* MQRPC_SERVICE_TICK at least every tick_ms ms; 0: no ticks. */
    int tick_ms;
    /* When set, receives every log line as a record (with the request's
     * queue, correlation id, trace and span ids, outcome and duration
     * apart) instead of log; its arg is log_arg. */
    mqrpc_log_record_fn log_record;
    /* MQRPC_QUEUE_CLASSIC (0) or MQRPC_QUEUE_QUORUM. A quorum queue is
     * declared durable (x-queue-type quorum) with the broker's own
     * delivery count: x-delivery-limit max_deliveries and dead-lettering
     * to "<queue>.dlq". A request the broker delivers again after
     * max_deliveries failed deliveries (its x-delivery-count) is not run:
     * the instance moves it to "<queue>.dlq" itself and sends its caller a
     * dead_letter error reply, as for a classic queue; should that
     * instance die too, the broker dead-letters it at its next return
     * (without a reply to the caller). Expiration and max_queue work as on
     * a classic queue, except that a request that expires in the queue is
     * dead-lettered to "<queue>.dlq" as well (x-first-death-reason
     * "expired"), since the broker dead-letters every reason alike. All
     * instances must agree on the type, and on max_deliveries too. */
    unsigned queue_type;
} mqrpc_service_opts;

/* mqrpc_service_opts_init zeroes *o and sets o->size. */
static inline void mqrpc_service_opts_init(mqrpc_service_opts *o)
{
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
}

/*
 * A request in the hands of a service, for handlers that need more than a
 * pure function: to report progress, to know their deadline, or to answer
 * later (a deferred reply, e.g. from a client callback once the services
 * they call have answered). mqrpc_request_fn receives it on a handler
 * thread and must end it exactly once, with mqrpc_request_reply or
 * mqrpc_request_fail, before or after returning, from any thread; the
 * handle is invalid after that. Returning without ending it frees the
 * handler thread for the next request: the request keeps its place among
 * the prefetch unacknowledged deliveries until it ends. The functions
 * below may be called from any thread, one thread at a time per request.
 */
typedef struct mqrpc_request mqrpc_request;
typedef void (*mqrpc_request_fn)(mqrpc_request *req, void *arg);

/* mqrpc_request_params: the JSON object the caller sent (borrowed; valid
 * until the request ends). */
MQRPC_API json_t *mqrpc_request_params(const mqrpc_request *r);

/* mqrpc_request_correlation_id: the caller's correlation id (for logs). */
MQRPC_API const char *mqrpc_request_correlation_id(const mqrpc_request *r);

/* mqrpc_request_traceparent: the request's W3C trace context as this
 * service continues it: "00-<trace id>-<span id>-<flags>", the caller's
 * trace id and flags (a new trace when the request had no valid
 * traceparent) and a span id of this service's own, which its reply
 * carries and its log lines name. Give it to the calls the handler makes
 * for this request (mqrpc_call_opts.traceparent), so that one trace spans
 * them. Valid until the request ends; never NULL. */
MQRPC_API const char *mqrpc_request_traceparent(const mqrpc_request *r);

/* mqrpc_request_tracestate: the request's tracestate header, to pass on
 * with mqrpc_request_traceparent, or NULL when it had none (or one over
 * MQRPC_TRACESTATE_MAX characters or not printable ASCII). Valid until
 * the request ends. */
MQRPC_API const char *mqrpc_request_tracestate(const mqrpc_request *r);

/* mqrpc_request_time_left_ms: how long the caller will still wait, in ms
 * (0: it gave up), or -1 when it set no deadline (e.g. the seed's pika
 * client). Its deadline is its clock: hosts need synchronized clocks. */
MQRPC_API int64_t mqrpc_request_time_left_ms(const mqrpc_request *r);

/* mqrpc_request_cancelled: nonzero when the answer is no longer wanted:
 * the caller's deadline passed, or its reply queue is gone (seen when a
 * progress message came back unroutable). A long handler checks it and
 * stops early; it still ends the request (e.g. mqrpc_request_fail with
 * "cancelled"), whose reply is not sent (counted in stats.abandoned). */
MQRPC_API int mqrpc_request_cancelled(const mqrpc_request *r);

/* mqrpc_request_progress sends the caller a progress message (percent in
 * 0..100, clamped; text one line or NULL, cut to 256 bytes) if it asked
 * for progress (MQRPC_CALL_PROGRESS); otherwise does nothing. Progress is
 * advisory: a newer one replaces one not yet sent, and none is sent while
 * the broker blocks publishers. Returns MQRPC_EINVAL for a NaN percent,
 * MQRPC_ENOMEM, else MQRPC_OK. */
MQRPC_API mqrpc_err mqrpc_request_progress(mqrpc_request *r, double percent,
                                           const char *text);

/* mqrpc_request_reply ends the request with result (a new reference, which
 * it takes; NULL is answered as an internal error). */
MQRPC_API void mqrpc_request_reply(mqrpc_request *r, json_t *result);

/* mqrpc_request_fail ends the request with an error reply: code (as in
 * mqrpc_fault) and a printf-style one-line message. */
MQRPC_API void mqrpc_request_fail(mqrpc_request *r, const char *code,
                                  const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* mqrpc_service_new copies opts; handler and arg are kept. Returns NULL
 * with errno ENOMEM when out of memory, or EINVAL when opts->queue is NULL,
 * empty or too long (over 251 bytes, room for ".dlq"), handler is NULL,
 * opts->queue_type is unknown, or opts->size is wrong (see
 * mqrpc_client_new). */
MQRPC_API mqrpc_service *mqrpc_service_new(const mqrpc_service_opts *opts,
                                 mqrpc_handler_fn handler, void *arg);

/* mqrpc_service_new_async is mqrpc_service_new for a mqrpc_request_fn:
 * fn receives each request whose body passed the checks. */
MQRPC_API mqrpc_service *mqrpc_service_new_async(const mqrpc_service_opts *opts,
                                                 mqrpc_request_fn fn,
                                                 void *arg);

/*
 * mqrpc_service_connect connects, declares the queue (non-durable, as the
 * seed does, unless opts.durable) and its dead-letter queue "<queue>.dlq",
 * sets basic.qos prefetch and starts consuming with manual
 * acknowledgements. Once it returns MQRPC_OK the service is consuming and
 * requests wait in its socket until mqrpc_service_run. A queue that exists
 * with other arguments (durable, max_queue, queue_type, for a quorum queue
 * max_deliveries) fails with MQRPC_EINVAL and a message naming the
 * difference.
 */
MQRPC_API mqrpc_err mqrpc_service_connect(mqrpc_service *s);

/*
 * mqrpc_service_run services the connection on the calling thread and runs
 * the handler on opts.threads threads of its own (or, with one, on the
 * calling thread while the other stands in), until mqrpc_service_stop.
 * It then cancels its consumer, hands back the deliveries no handler had
 * started (re-published unchanged so that they do not count as failed
 * deliveries, waiting up to 5 s for the broker's confirms), waits for the
 * requests in hand to end and be answered (without a limit: a program that
 * must stop sooner exits, and the broker returns those requests to the
 * queue), joins its threads and returns MQRPC_OK. Heartbeats, acknowledgements, consumer
 * cancels and flow control are handled while handlers work, however long
 * they take (mind the broker's consumer_timeout, README). A lost connection is
 * logged and reopened with backoff (one line when lost, one for the first
 * failed attempt and for each new reason, one when regained), and
 * consuming resumes; a consumer the broker cancels (its queue deleted) is
 * logged, the queues declared again and consumed on the same connection.
 * While the broker blocks publishers (connection.blocked, a resource
 * alarm; logged when it starts and ends) nothing is published: replies
 * wait, in order, and their deliveries are acknowledged after them. run
 * returns a failure only when reconnecting is off (reconnect_max_ms < 0)
 * or out of memory. For each delivery: a request
 * past its deadline header is acknowledged and skipped (its caller gave
 * up); one redelivered after its instance died (or lost its connection:
 * the broker cannot tell a started delivery from a prefetched one then) is
 * re-published with its delivery count, or dead-lettered past
 * max_deliveries, and acknowledged once the broker confirmed the copy (a
 * refused copy gets its caller an overloaded or dead_letter error reply);
 * the body is checked
 * (the limits in mqrpc_service_opts, a JSON object, content type
 * application/json or none), the handler runs, the reply is published to
 * reply_to, then the delivery is acknowledged (see
 * mqrpc_service_opts.prefetch). A reply whose caller gave up meanwhile
 * (mqrpc_request_cancelled) is not sent; the delivery is acknowledged. A
 * reply that ends after its connection was lost is still sent, on the new
 * connection (the delivery itself came back to the queue: the caller drops
 * the second answer). A delivery with no reply_to or correlation_id is
 * logged and acknowledged. Log lines go to opts.log (stderr by default).
 * Apart from mqrpc_service_stop and the mqrpc_request functions, a service
 * handle is used from one thread; for several connections, give each its
 * own mqrpc_service, as service_main's --workers does.
 */
MQRPC_API mqrpc_err mqrpc_service_run(mqrpc_service *s);

/* mqrpc_service_stop asks mqrpc_service_run to return. Async-signal-safe:
 * call it from a SIGTERM handler or another thread. */
MQRPC_API void mqrpc_service_stop(mqrpc_service *s);

/* mqrpc_service_instance returns the instance id sent as app_id. */
MQRPC_API const char *mqrpc_service_instance(const mqrpc_service *s);

/* What a service counted since it was created; grows at the end, as
 * mqrpc_client_stats. */
typedef struct mqrpc_service_stats {
    uint64_t served;        /* requests answered (error replies included) */
    uint64_t expired;       /* skipped: past the caller's deadline */
    uint64_t dead_lettered; /* moved to <queue>.dlq */
    uint64_t redelivered;   /* re-published after an instance died */
    uint64_t dropped;       /* no reply_to or correlation_id: logged, acked */
    uint64_t lost;          /* connections lost */
    uint64_t reconnects;    /* connections regained */
    uint64_t blocked;       /* times the broker blocked the connection */
    uint64_t cancelled;     /* consumer cancelled by the broker (queue
                               deleted), then consuming again */
    uint64_t handed_back;   /* unstarted deliveries re-published unchanged
                               at a stop (not counted as failed) */
    uint64_t refused;       /* re-publishes or dead letters the broker
                               refused (a full queue): caller got an error */
    uint64_t abandoned;     /* replies not sent: the caller gave up while
                               the handler ran */
    uint64_t progress;      /* progress messages sent */
    /* Replies sent by code (index mqrpc_code; error replies the service
     * itself sends, overloaded and dead_letter, included). */
    uint64_t replies[MQRPC_CODE_SLOTS];
    /* Handling time of the requests a handler answered (the served
     * ones: from the delivery's arrival in the service to its reply's
     * publish, waiting for a handler thread included), per
     * MQRPC_DURATION_BOUNDS_S bucket, and its sum in us. */
    uint64_t handling[MQRPC_DURATION_BUCKETS + 1];
    uint64_t handling_us;
    /* Gauges, values now: */
    uint64_t in_progress; /* requests taken from the queue, not yet done */
    uint64_t connected;   /* 1 while connected and consuming */
    uint64_t is_blocked;  /* 1 while the broker blocks the connection */
} mqrpc_service_stats;

/* mqrpc_service_get_stats fills *out, of size bytes (sizeof *out). May be
 * called from any thread while another runs s (a metrics server): each
 * field is read atomically, but fields may be a few microseconds apart
 * (only uint64_t fields, all written by the thread that runs s). */
MQRPC_API void mqrpc_service_get_stats(const mqrpc_service *s,
                                       mqrpc_service_stats *out, size_t size);

/* mqrpc_service_errmsg: last failure in one line, owned by s. */
MQRPC_API const char *mqrpc_service_errmsg(const mqrpc_service *s);

/* mqrpc_service_free closes the connection (returning unacknowledged
 * deliveries to the queue, as redeliveries) and frees s. Accepts NULL. */
MQRPC_API void mqrpc_service_free(mqrpc_service *s);

/* mqrpc_instance_id writes "<queue>@<hostname>:<pid>" into buf. */
MQRPC_API void mqrpc_instance_id(const char *queue, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* MQRPC_MQRPC_H */
