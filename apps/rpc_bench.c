/*
 * rpc_bench: load against any queue. Each connection (a thread with its own
 * client: rabbitmq-c connections are not thread-safe) either keeps -c calls
 * in flight, every completed call starting the next one (closed loop), or,
 * with --rate, starts calls on a fixed schedule whatever the replies do
 * (open loop). Every reply is checked, latencies go into a fixed-size
 * histogram, so memory stays flat however many calls are made.
 *
 * Open loop: call g (0, 1, 2, ... over all connections) is due at
 * t0 + g / R; connection i makes the calls g = i, i + K, i + 2K, ... (K
 * connections), so together they offer R calls/s evenly spaced. A call's
 * latency runs from the moment it was due, not from when it was sent: a
 * client that falls behind its schedule, or a reply that holds up the next
 * start, shows as latency instead of quietly lowering the load (the
 * coordinated omission wrk2 corrects). Nothing throttles the schedule: -c
 * caps the calls in flight per connection (65536 by default with --rate),
 * and a due call that finds the cap reached is not sent and is counted as
 * an error ("inflight_limit"), so a row never looks better than it was.
 */
#define _GNU_SOURCE /* ppoll */
#include "cli.h"
#include "latency.h"
#include "metrics.h"
#ifdef RPC_BENCH_KNOBS
/* rpc_bench_knobs (bench/CMakeLists.txt): this same program linked with
 * the static library, whose internal mqr_client_without turns guarantees
 * off, to measure what each costs. Not installed. */
#include "internal.h"
#endif

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_QUEUE "service_soma"
#define DEFAULT_BODY "{\"a\":1,\"b\":2}"
#define DEFAULT_EXPECT "3"
#define MAX_INFLIGHT 65536
/* Each connection is a thread and a socket: a few hundred stay well under
 * the usual limit of 1024 open files. */
#define MAX_CONNECTIONS 512
#define MAX_RATES 32
#define MAX_RATE 10000000.0 /* calls/s */
/* errors[] has a slot per status; the library may grow statuses this
 * program does not know, which share the slot "other". The last slots
 * count what is not a status. */
#define ERR_SLOTS 64
#define NOT_SENT (ERR_SLOTS - 4)       /* due, but the connection was gone */
#define INFLIGHT_LIMIT (ERR_SLOTS - 3) /* due, but -c calls were in flight */
#define OTHER_STATUS (ERR_SLOTS - 2)
#define WRONG_RESULT (ERR_SLOTS - 1) /* errors[] slot for a wrong result */

static int err_slot(mqrpc_err e)
{
    return (unsigned)e < NOT_SENT ? (int)e : OTHER_STATUS;
}

static const char *slot_name(int i)
{
    return i == WRONG_RESULT     ? "wrong_result"
           : i == OTHER_STATUS   ? "other"
           : i == INFLIGHT_LIMIT ? "inflight_limit"
           : i == NOT_SENT       ? "not_sent"
                                 : mqrpc_errname((mqrpc_err)i);
}

struct bench;

/* One call slot: a connection keeps `inflight` of them busy (closed
 * loop), or takes a free one for each due call (open loop). */
struct slot {
    struct conn *conn;
    int64_t start_us; /* sent (closed loop) or due (open loop) */
    struct slot *next_free;
};

/* One connection and everything only its thread touches. */
struct conn {
    struct bench *b;
    mqrpc_client *client;
    pthread_t thread;
    struct slot *slots;
    unsigned index;          /* 0 .. nconn-1: its share of the schedule */
    struct slot *free_slots; /* open loop: returned slots */
    unsigned fresh;          /* open loop: slots never used yet start here */
    uint64_t scheduled;      /* open loop: measured calls that came due */
    uint64_t warmup_left;    /* calls still to make before measuring */
    uint64_t quota;          /* measured calls to start (-n mode) */
    uint64_t started;        /* measured calls started */
    bool measuring;
    bool stopping;      /* start no more calls */
    unsigned active;    /* calls in flight */
    atomic_ullong done; /* measured calls completed, for progress */
    int64_t end_us;     /* when the last measured call completed */
    struct latency lat;
    uint64_t errors[WRONG_RESULT + 1];
    char first_error[512]; /* the first error message, to show the user */
    mqrpc_err fatal;       /* connect failure */
};

struct bench {
    const char *queue;
    const char *body;
    size_t body_len;
    json_t *expect; /* NULL: any successful reply will do */
    int timeout_ms;
    unsigned inflight;
    unsigned nconn;
    uint64_t calls;          /* -n: measured calls over all connections */
    double duration_s;       /* -d: measure for this long instead */
    uint64_t warmup;         /* per connection */
    double rates[MAX_RATES]; /* --rate: open loop, one row per rate */
    unsigned nrates;         /* 0: closed loop */
    double rate;             /* the rate being measured */
    bool abort;              /* open loop: a connection failed, no rows */
    mqrpc_client_opts copts;
    unsigned call_flags; /* MQRPC_CALL_IDEMPOTENT with --retries */
    unsigned without; /* MQR_WITHOUT_* (rpc_bench_knobs) */
    pthread_barrier_t warm, go; /* all warmed up; t0 is set */
    pthread_barrier_t row_done; /* open loop: every connection drained */
    atomic_uint finished;       /* connections whose thread is done */
    int64_t t0_us;              /* measurement start, set once all warmed up */
    int64_t deadline_us;
    struct conn *conns;
};

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void on_done(const mqrpc_reply *r, void *arg);

/* Starts a call in slot s, if the run wants one more. */
static void start_call(struct slot *s)
{
    struct conn *cn = s->conn;
    struct bench *b = cn->b;
    mqrpc_err e;

    if (cn->stopping || interrupted)
        return;
    if (cn->measuring) {
        if (b->duration_s > 0 ? now_us() >= b->deadline_us
                              : cn->started >= cn->quota)
            return;
        cn->started++;
    } else if (cn->warmup_left == 0) {
        return; /* warm-up done: wait for the rest to come back */
    } else {
        cn->warmup_left--;
    }
    s->start_us = now_us();
    e = mqrpc_call_async(cn->client, b->queue, b->body, b->body_len,
                         b->timeout_ms, b->call_flags, on_done, s);
    if (e != MQRPC_OK) {
        /* The connection is gone (its calls have already failed): stop. */
        if (cn->measuring)
            cn->errors[err_slot(e)]++;
        if (!cn->first_error[0])
            snprintf(cn->first_error, sizeof cn->first_error, "%s",
                     mqrpc_client_errmsg(cn->client));
        cn->stopping = true;
        return;
    }
    cn->active++;
}

static void on_done(const mqrpc_reply *r, void *arg)
{
    struct slot *s = arg;
    struct conn *cn = s->conn;
    struct bench *b = cn->b;
    int64_t t = now_us();
    mqrpc_err st = mqrpc_reply_status(r);
    bool ok = st == MQRPC_OK;

    cn->active--;
    if (ok && b->expect && !json_equal(mqrpc_reply_result(r), b->expect)) {
        ok = false;
        if (!cn->first_error[0]) {
            size_t n = 0;
            const char *body = mqrpc_reply_body(r, &n);
            snprintf(cn->first_error, sizeof cn->first_error,
                     "unexpected result: %.*s", (int)(n > 200 ? 200 : n),
                     body ? body : "");
        }
    } else if (!ok && !cn->first_error[0]) {
        snprintf(cn->first_error, sizeof cn->first_error, "%s: %s",
                 mqrpc_reply_error_code(r), mqrpc_reply_error_message(r));
    }
    if (cn->measuring) {
        if (ok)
            latency_record(&cn->lat, (uint64_t)(t - s->start_us));
        else
            cn->errors[st == MQRPC_OK ? WRONG_RESULT : err_slot(st)]++;
        cn->end_us = t;
        atomic_fetch_add_explicit(&cn->done, 1, memory_order_relaxed);
    }
    /* A lost connection ends this connection's run, unless calls are
     * re-sent (--retries): the client reconnects by itself, through the
     * next address of a list, and the run goes on. */
    if ((st == MQRPC_ECLOSED && !b->call_flags) || st == MQRPC_ECANCELED)
        cn->stopping = true;
    if (b->nrates && cn->measuring) {
        s->next_free = cn->free_slots;
        cn->free_slots = s;
        return;
    }
    start_call(s);
}

/* mqrpc_client_process's result e lets the run go on: something
 * happened or nothing did; with --retries also a lost connection, which the
 * client reopens itself while its re-sent calls wait (by their deadline at
 * the latest). */
static bool goes_on(const struct conn *cn, mqrpc_err e)
{
    return e == MQRPC_OK || e == MQRPC_ETIMEOUT ||
           (e == MQRPC_ECLOSED && cn->b->call_flags);
}

/* Runs the loop until no call is in flight. A lost connection fails every
 * call in flight at once (their callbacks stop the connection's run),
 * unless they are re-sent, so this never waits on a dead socket. */
static void drain(struct conn *cn)
{
    while (cn->active > 0) {
        mqrpc_err e = mqrpc_client_process(cn->client, 200);
        if (!goes_on(cn, e))
            return;
        if (interrupted)
            cn->stopping = true;
    }
}

/* Open loop: takes a slot for the call due at due_us and sends it. */
static void start_due_call(struct conn *cn, int64_t due_us)
{
    struct bench *b = cn->b;
    struct slot *s = cn->free_slots;
    mqrpc_err e;

    cn->scheduled++;
    if (s) {
        cn->free_slots = s->next_free;
    } else if (cn->fresh < b->inflight) {
        s = &cn->slots[cn->fresh++];
    } else {
        cn->errors[INFLIGHT_LIMIT]++;
        if (!cn->first_error[0])
            snprintf(cn->first_error, sizeof cn->first_error,
                     "%u calls in flight on a connection (-c): a due call "
                     "was not sent",
                     b->inflight);
        return;
    }
    s->start_us = due_us;
    e = mqrpc_call_async(cn->client, b->queue, b->body, b->body_len,
                         b->timeout_ms, b->call_flags, on_done, s);
    if (e != MQRPC_OK) {
        cn->errors[err_slot(e)]++;
        if (!cn->first_error[0])
            snprintf(cn->first_error, sizeof cn->first_error, "%s",
                     mqrpc_client_errmsg(cn->client));
        cn->stopping = true;
        s->next_free = cn->free_slots;
        cn->free_slots = s;
        return;
    }
    cn->active++;
}

/* Open loop: sleeps until due_us (INT64_MAX: nothing due), a reply or the
 * library's next timer, whichever comes first, then lets the library
 * process. The socket is polled here rather than in mqrpc_client_process,
 * whose timeout is in milliseconds: at thousands of calls/s the gaps
 * between starts are a fraction of one. Returns false once the client can
 * do no more. */
static bool wait_open(struct conn *cn, int64_t due_us)
{
    int lib = mqrpc_client_next_timeout_ms(cn->client);
    int fd = mqrpc_client_fd(cn->client);
    int64_t wait = due_us == INT64_MAX ? 200000 : due_us - now_us();
    mqrpc_err e;

    if (wait > 200000)
        wait = 200000; /* notice an interrupt soon enough */
    if (lib >= 0 && (int64_t)lib * 1000 < wait)
        wait = (int64_t)lib * 1000;
    if (wait > 0 && fd < 0) {
        /* Not connected: the library waits for its next attempt. */
        e = mqrpc_client_process(cn->client, (int)((wait + 999) / 1000));
    } else {
        if (wait > 0) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            struct timespec ts = {(time_t)(wait / 1000000),
                                  (long)(wait % 1000000) * 1000};
            (void)ppoll(&p, 1, &ts, NULL);
        }
        e = mqrpc_client_process(cn->client, 0);
    }
    return goes_on(cn, e);
}

/* Open loop, one row: makes this connection's share of the schedule at
 * b->rate, then waits for the replies of every call it sent. */
static void run_open(struct conn *cn)
{
    struct bench *b = cn->b;
    const uint64_t limit =
        b->duration_s > 0 ? (uint64_t)ceil(b->rate * b->duration_s) : b->calls;
    uint64_t g = cn->index;

    cn->measuring = true;
    cn->end_us = b->t0_us;
    for (;;) {
        int64_t now = now_us(), due = INT64_MAX;

        if (interrupted)
            cn->stopping = true;
        if (cn->stopping && g < limit) {
            /* Due calls that were never sent are failures the row shows. */
            uint64_t left = (limit - g + b->nconn - 1) / b->nconn;
            cn->errors[NOT_SENT] += left;
            cn->scheduled += left;
            g = limit;
        }
        for (; g < limit; g += b->nconn) {
            /* From t0 each time, so rounding never accumulates. */
            due = b->t0_us + (int64_t)((double)g * 1e6 / b->rate);
            if (due > now)
                break;
            start_due_call(cn, due);
        }
        if (g >= limit) {
            due = INT64_MAX;
            if (cn->active == 0)
                break;
        }
        if (!wait_open(cn, due)) {
            cn->stopping = true;
            if (cn->active == 0 || mqrpc_client_fd(cn->client) < 0)
                break; /* the calls in flight fail when the client goes */
        }
    }
}

/* Open loop: one row per rate, in step with the other connections. */
static void run_rows(struct conn *cn)
{
    struct bench *b = cn->b;

    for (unsigned r = 0; r < b->nrates; r++) {
        if (r > 0)
            pthread_barrier_wait(&b->go);
        if (b->abort)
            return;
        if (cn->fatal == MQRPC_OK)
            run_open(cn);
        atomic_fetch_add(&b->finished, 1);
        pthread_barrier_wait(&b->row_done);
    }
}

static void *run_conn(void *arg)
{
    struct conn *cn = arg;
    struct bench *b = cn->b;

    cn->client = mqrpc_client_new(&b->copts);
    if (!cn->client) {
        cn->fatal = MQRPC_ENOMEM;
    } else {
#ifdef RPC_BENCH_KNOBS
        mqr_client_without(cn->client, b->without);
#endif
        cn->fatal = mqrpc_client_connect(cn->client);
        if (cn->fatal != MQRPC_OK)
            snprintf(cn->first_error, sizeof cn->first_error, "%s",
                     mqrpc_client_errmsg(cn->client));
    }
    if (cn->fatal == MQRPC_OK) {
        /* The open loop warms up one call at a time: its -c is a cap,
         * not a window to fill. */
        unsigned window = b->nrates ? 1 : b->inflight;
        cn->warmup_left = b->warmup;
        for (unsigned i = 0; i < window; i++)
            start_call(&cn->slots[i]);
        drain(cn);
    }
    /* Everyone measures from the same moment, once every connection is
     * up and warm. */
    pthread_barrier_wait(&b->warm);
    pthread_barrier_wait(&b->go);
    if (b->nrates) {
        run_rows(cn);
        return NULL;
    }
    if (cn->fatal == MQRPC_OK && !cn->stopping) {
        cn->measuring = true;
        cn->end_us = b->t0_us;
        for (unsigned i = 0; i < b->inflight; i++)
            start_call(&cn->slots[i]);
        drain(cn);
    }
    atomic_fetch_add(&b->finished, 1);
    return NULL;
}

/* Resident memory of this process in KiB, from /proc; 0 if unknown. */
static long rss_kib(void)
{
    char line[256];
    long kib = 0;
    FILE *f = fopen("/proc/self/status", "r");

    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

static uint64_t total_done(const struct bench *b)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < b->nconn; i++)
        n += atomic_load_explicit(&b->conns[i].done, memory_order_relaxed);
    return n;
}

/* A progress bar on stderr, redrawn in place; only on a terminal. */
static void progress(const struct bench *b, int64_t t)
{
    double frac, el = (double)(t - b->t0_us) / 1e6;
    uint64_t n = total_done(b);
    char bar[41];
    int fill;

    frac = b->duration_s > 0 ? el / b->duration_s
                             : (double)n / (double)(b->calls ? b->calls : 1);
    if (frac > 1)
        frac = 1;
    fill = (int)(frac * 40);
    memset(bar, '#', (size_t)fill);
    memset(bar + fill, '.', (size_t)(40 - fill));
    bar[40] = '\0';
    fprintf(stderr, "\r[%s] %3d%% %llu calls, %.0f calls/s ", bar,
            (int)(frac * 100), (unsigned long long)n,
            el > 0 ? (double)n / el : 0.0);
}

static void print_text(const struct bench *b, const struct latency *lat,
                       const uint64_t *errors, uint64_t nerr, double secs,
                       long rss0, long rss1, const char *first_error)
{
    uint64_t calls = lat->count + nerr;

    printf("rpc_bench: %s, %u connection%s x %u in flight, %llu calls in "
           "%.2f s\n",
           b->queue, b->nconn, b->nconn == 1 ? "" : "s", b->inflight,
           (unsigned long long)calls, secs);
    printf("  calls/s      %.0f\n", secs > 0 ? (double)calls / secs : 0.0);
    printf("  latency us   p50 %llu  p90 %llu  p99 %llu  p99.9 %llu  max "
           "%llu  (mean %.0f)\n",
           (unsigned long long)latency_percentile(lat, 0.50),
           (unsigned long long)latency_percentile(lat, 0.90),
           (unsigned long long)latency_percentile(lat, 0.99),
           (unsigned long long)latency_percentile(lat, 0.999),
           (unsigned long long)lat->max_us, latency_mean(lat));
    printf("  errors       ");
    if (!nerr)
        printf("none");
    for (int i = 0; i <= WRONG_RESULT; i++)
        if (errors[i])
            printf("%s %llu  ", slot_name(i), (unsigned long long)errors[i]);
    printf("\n  memory       %ld KiB resident after warm-up, %ld KiB at the "
           "end\n",
           rss0, rss1);
    if (first_error[0])
        printf("  first error  %s\n", first_error);
}

static void print_json(const struct bench *b, const struct latency *lat,
                       const uint64_t *errors, uint64_t nerr, double secs,
                       long rss0, long rss1)
{
    json_t *kinds = json_object();
    json_t *o;
    char *s;
    uint64_t calls = lat->count + nerr;

    for (int i = 0; i <= WRONG_RESULT; i++)
        if (errors[i])
            json_object_set_new(kinds, slot_name(i),
                                json_integer((json_int_t)errors[i]));
    o = json_pack(
        "{s:s, s:s, s:i, s:i, s:b, s:I, s:f, s:f, s:I, s:I, s:I, s:I, s:I, "
        "s:I, s:f, s:I, s:o, s:i, s:i}",
        "impl", "mqrpc", "queue", b->queue, "connections", (int)b->nconn,
        "inflight", (int)b->inflight, "direct_reply_to",
        b->copts.direct_reply_to, "calls", (json_int_t)calls, "seconds", secs,
        "calls_per_s", secs > 0 ? (double)calls / secs : 0.0, "p50_us",
        (json_int_t)latency_percentile(lat, 0.50), "p90_us",
        (json_int_t)latency_percentile(lat, 0.90), "p99_us",
        (json_int_t)latency_percentile(lat, 0.99), "p999_us",
        (json_int_t)latency_percentile(lat, 0.999), "max_us",
        (json_int_t)lat->max_us, "min_us",
        (json_int_t)(lat->count ? lat->min_us : 0), "mean_us",
        latency_mean(lat), "errors", (json_int_t)nerr, "errors_by_kind", kinds,
        "rss_kib_warm", (int)rss0, "rss_kib_end", (int)rss1);
    s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    if (s)
        printf("%s\n", s);
    free(s);
    json_decref(o);
}

/* One open-loop row, merged over the connections. */
struct row {
    double rate;    /* asked for */
    double offered; /* calls that came due / the schedule's length */
    uint64_t scheduled;
    double secs; /* t0 to the last reply */
    uint64_t errors[WRONG_RESULT + 1];
    uint64_t nerr;
    struct latency *lat; /* successful calls, from their due time */
};

static void print_errors_text(const uint64_t *errors, uint64_t nerr)
{
    if (!nerr)
        printf("none");
    for (int i = 0; i <= WRONG_RESULT; i++)
        if (errors[i])
            printf("%s %llu  ", slot_name(i), (unsigned long long)errors[i]);
}

static void print_rows_header(const struct bench *b)
{
    printf("rpc_bench: %s, open loop, %u connection%s, at most %u in flight "
           "each, ",
           b->queue, b->nconn, b->nconn == 1 ? "" : "s", b->inflight);
    if (b->duration_s > 0)
        printf("%.0f s per rate\n", b->duration_s);
    else
        printf("%llu calls per rate\n", (unsigned long long)b->calls);
    printf("  latency from each call's scheduled start, in us\n");
    printf("  %10s %10s %8s %8s %8s %8s %8s  %s\n", "offered/s", "achieved/s",
           "p50", "p90", "p99", "p99.9", "max", "errors");
}

static void print_row_text(const struct row *w)
{
    const struct latency *lat = w->lat;

    printf("  %10.0f %10.0f %8llu %8llu %8llu %8llu %8llu  ", w->offered,
           w->secs > 0 ? (double)lat->count / w->secs : 0.0,
           (unsigned long long)latency_percentile(lat, 0.50),
           (unsigned long long)latency_percentile(lat, 0.90),
           (unsigned long long)latency_percentile(lat, 0.99),
           (unsigned long long)latency_percentile(lat, 0.999),
           (unsigned long long)lat->max_us);
    print_errors_text(w->errors, w->nerr);
    printf("\n");
    fflush(stdout);
}

/* The fields bench/bare_pingpong prints for the same row (and the Go peer);
 * see the README's "Open loop" section. */
static void print_row_json(const struct bench *b, const struct row *w)
{
    const struct latency *lat = w->lat;
    json_t *kinds = json_object();
    json_t *o;
    char *s;
    double achieved = w->secs > 0 ? (double)lat->count / w->secs : 0.0;

    for (int i = 0; i <= WRONG_RESULT; i++)
        if (w->errors[i])
            json_object_set_new(kinds, slot_name(i),
                                json_integer((json_int_t)w->errors[i]));
    o = json_pack(
        "{s:s, s:s, s:i, s:i, s:b, s:f, s:f, s:I, s:I, s:f, s:f, s:f, s:I, "
        "s:I, s:I, s:I, s:I, s:I, s:f, s:I, s:o}",
        "impl", "mqrpc", "queue", b->queue, "connections", (int)b->nconn,
        "inflight", (int)b->inflight, "direct_reply_to",
        b->copts.direct_reply_to, "rate", w->rate, "offered_per_s", w->offered,
        "scheduled", (json_int_t)w->scheduled, "calls", (json_int_t)lat->count,
        "seconds", w->secs, "calls_per_s", achieved, "achieved_per_s", achieved,
        "p50_us", (json_int_t)latency_percentile(lat, 0.50), "p90_us",
        (json_int_t)latency_percentile(lat, 0.90), "p99_us",
        (json_int_t)latency_percentile(lat, 0.99), "p999_us",
        (json_int_t)latency_percentile(lat, 0.999), "max_us",
        (json_int_t)lat->max_us, "min_us",
        (json_int_t)(lat->count ? lat->min_us : 0), "mean_us",
        latency_mean(lat), "errors", (json_int_t)w->nerr, "errors_by_kind",
        kinds);
    s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    if (s)
        printf("%s\n", s);
    fflush(stdout);
    free(s);
    json_decref(o);
}

/* --rate R[,R...]: calls/s, each above 0 and at most MAX_RATE. */
static bool parse_rates(const struct cli *c, const char *arg, struct bench *b)
{
    const char *p = arg;

    for (;;) {
        char *end;
        double r;

        if (b->nrates == MAX_RATES) {
            cli_error(c, "--rate takes at most %d rates", MAX_RATES);
            return false;
        }
        r = *p >= '0' && *p <= '9' ? strtod(p, &end) : 0;
        if (*p < '0' || *p > '9' || end == p || (*end && *end != ',') ||
            !(r > 0) || r > MAX_RATE) {
            cli_error(c,
                      "--rate takes calls/s above 0 and up to %.0f, "
                      "separated by commas (e.g. 1000,2000,4000), got \"%s\"",
                      MAX_RATE, arg);
            return false;
        }
        b->rates[b->nrates++] = r;
        if (!*end)
            return true;
        p = end + 1;
    }
}

/* Open loop: measures every row and prints it as soon as it is done.
 * Returns the number of failed calls over all rows. */
static uint64_t measure_rows(struct bench *b, bool json_out, bool tty,
                             struct latency *lat, char *first_error,
                             size_t first_error_len)
{
    uint64_t total_err = 0;

    if (!json_out)
        print_rows_header(b);
    for (unsigned r = 0; r < b->nrates; r++) {
        struct row w;
        uint64_t limit;
        int64_t end;

        if (interrupted) {
            b->abort = true; /* the threads return from this barrier */
            pthread_barrier_wait(&b->go);
            break;
        }
        memset(&w, 0, sizeof w);
        w.rate = b->rates[r];
        w.lat = lat;
        latency_init(lat);
        b->rate = w.rate;
        atomic_store(&b->finished, 0);
        b->t0_us = now_us();
        b->deadline_us = b->t0_us + (int64_t)(b->duration_s * 1e6);
        pthread_barrier_wait(&b->go);
        if (tty && !json_out) {
            struct timespec ts = {0, 200 * 1000000L};
            while (atomic_load(&b->finished) < b->nconn) {
                progress(b, now_us());
                nanosleep(&ts, NULL);
            }
            fprintf(stderr, "\r%*s\r", 79, "");
        }
        pthread_barrier_wait(&b->row_done);

        limit = b->duration_s > 0 ? (uint64_t)ceil(w.rate * b->duration_s)
                                  : b->calls;
        end = b->t0_us;
        for (unsigned i = 0; i < b->nconn; i++) {
            struct conn *cn = &b->conns[i];
            latency_merge(lat, &cn->lat);
            latency_init(&cn->lat);
            for (int k = 0; k <= WRONG_RESULT; k++) {
                w.errors[k] += cn->errors[k];
                w.nerr += cn->errors[k];
                cn->errors[k] = 0;
            }
            w.scheduled += cn->scheduled;
            cn->scheduled = 0;
            atomic_store(&cn->done, 0);
            if (cn->end_us > end)
                end = cn->end_us;
            if (!first_error[0] && cn->first_error[0])
                snprintf(first_error, first_error_len, "%s", cn->first_error);
        }
        w.secs = (double)(end - b->t0_us) / 1e6;
        w.offered = (double)w.scheduled * w.rate / (double)limit;
        total_err += w.nerr;
        if (json_out)
            print_row_json(b, &w);
        else
            print_row_text(&w);
    }
    if (!json_out && first_error[0])
        printf("  first error  %s\n", first_error);
    return total_err;
}

static void quiet(mqrpc_log_level level, const char *line, void *arg)
{
    (void)level;
    (void)line;
    (void)arg;
}

/* --hist FILE: the latency histogram, for plotting (NULL: not asked). */
/* The client library's statistics of every connection, warm-up calls
 * included, as Prometheus text. false (reported) when path cannot be
 * written. */
static bool write_metrics(struct cli *c, const char *path,
                          const struct bench *b)
{
    mqrpc_client_stats sum, st;
    FILE *f;
    bool ok;

    if (!path)
        return true;
    memset(&sum, 0, sizeof sum);
    for (unsigned i = 0; i < b->nconn; i++)
        if (b->conns[i].client) {
            mqrpc_client_get_stats(b->conns[i].client, &st, sizeof st);
            metrics_sum_client(&sum, &st);
        }
    f = strcmp(path, "-") == 0 ? stdout : fopen(path, "w");
    if (!f) {
        cli_error(c, "--metrics-out: cannot write %s: %s", path,
                  strerror(errno));
        return false;
    }
    metrics_write_client(f, "rpc_bench", b->queue, &sum);
    ok = f == stdout ? fflush(f) == 0 : fclose(f) == 0;
    if (!ok)
        cli_error(c, "--metrics-out: cannot write %s: %s", path,
                  strerror(errno));
    return ok;
}

static void write_hist(struct cli *c, const char *path,
                       const struct latency *lat)
{
    FILE *f;

    if (!path)
        return;
    f = fopen(path, "w");
    if (!f) {
        cli_error(c, "cannot write %s", path);
        return;
    }
    latency_write(lat, f);
    fclose(f);
}

int main(int argc, char **argv)
{
    static const char inflight_default[] = "1";
    enum {
        X_CALLS,
        X_DURATION,
        X_INFLIGHT,
        X_CONNS,
        X_WARMUP,
        X_EXPECT,
        X_JSON,
        X_HIST,
        X_DIRECT,
        X_RATE,
        X_DURABLE,
        X_METRICS_OUT,
        X_RETRIES,
#ifdef RPC_BENCH_KNOBS
        X_NO_CONFIRMS,
        X_NO_MANDATORY,
        X_NO_EXPIRATION,
#endif
        X_END
    };
    struct cli_extra extra[] = {
        [X_CALLS] = {.name = "calls",
                     .arg = "N",
                     .short_name = 'n',
                     .help = "measured calls over all connections (per rate "
                             "with --rate)",
                     .value = "20000",
                     .min = 1,
                     .max = 1000000000L},
        [X_DURATION] = {.name = "duration",
                        .arg = "S",
                        .short_name = 'd',
                        .help = "measure for S seconds instead of -n calls "
                                "(per rate with --rate)",
                        .min = 1,
                        .max = 86400},
        [X_INFLIGHT] = {.name = "concurrency",
                        .arg = "N",
                        .short_name = 'c',
                        .help = "calls in flight per connection; --rate: "
                                "the cap, 65536 unless given",
                        .value = inflight_default,
                        .min = 1,
                        .max = MAX_INFLIGHT},
        [X_CONNS] = {.name = "connections",
                     .arg = "K",
                     .help = "connections, one thread each",
                     .value = "1",
                     .min = 1,
                     .max = MAX_CONNECTIONS},
        [X_WARMUP] = {.name = "warmup",
                      .arg = "N",
                      .help = "unmeasured calls per connection first",
                      .value = "1000",
                      .min = 0,
                      .max = 100000000L},
        [X_EXPECT] = {.name = "expect",
                      .arg = "JSON",
                      .help = "result every reply must carry (3 for the "
                              "default call)"},
        [X_JSON] = {.name = "json",
                    .help = "print JSON instead of text (a line per rate)"},
        [X_HIST] = {.name = "hist",
                    .arg = "FILE",
                    .help = "write the latency histogram there, for "
                            "plotting"},
        [X_DIRECT] = {.name = "direct-reply-to",
                      .help = "replies via amq.rabbitmq.reply-to"},
        [X_RATE] = {.name = "rate",
                    .arg = "R[,R...]",
                    .help = "open loop: R calls/s in all on a schedule; "
                            "one row per rate"},
        [X_DURABLE] = {.name = "durable",
                       .help = "persistent requests and a durable reply "
                               "queue (give the service --durable too)"},
        [X_METRICS_OUT] = {.name = "metrics-out",
                           .arg = "FILE|-",
                           .help = "write the client library's counters "
                                   "there (- : stdout) as Prometheus text"},
        [X_RETRIES] = {.name = "retries",
                       .arg = "N",
                       .help = "calls are idempotent: re-send each up to N "
                               "times after a lost connection (and go on "
                               "after one)",
                       .value = "0",
                       .min = 0,
                       .max = 100},
#ifdef RPC_BENCH_KNOBS
        [X_NO_CONFIRMS] = {.name = "no-confirms",
                           .help = "benchmark only: no publisher confirms"},
        [X_NO_MANDATORY] = {.name = "no-mandatory",
                            .help = "benchmark only: requests without the "
                                    "mandatory flag"},
        [X_NO_EXPIRATION] = {.name = "no-expiration",
                             .help = "benchmark only: requests without "
                                     "expiration and deadline header"},
#endif
        [X_END] = {.name = NULL},
    };
    struct cli c = {
        .prog = "rpc_bench",
        .usage = "[OPTIONS] [QUEUE [JSON]]",
        .summary =
            "Closed-loop benchmark: keeps -c calls in flight on each of "
            "--connections connections, checks every reply, and prints "
            "calls/s, latency percentiles (microseconds) and errors by kind. "
            "With --rate, open loop: calls start on a fixed schedule (R "
            "calls/s over all connections) whatever the replies do, latency "
            "counts from each call's scheduled start, and each rate gets a "
            "row: offered and achieved calls/s, percentiles, errors "
            "(\"inflight_limit\": a due call found -c calls in flight and was "
            "not sent). "
            "Default call: service_soma with {\"a\":1,\"b\":2}, expecting 3.",
        .verbose_help = "",
        .exit_codes = "Exit codes: 0 every measured call succeeded, 1 some "
                      "failed or the run was\n"
                      "            interrupted, 2 usage, 3 broker "
                      "unreachable.\n",
        .flags = CLI_TIMEOUT,
        .extra = extra,
    };
    struct bench b;
    struct latency *lat = NULL;
    uint64_t errors[WRONG_RESULT + 1] = {0}, nerr = 0;
    char first_error[512] = "";
    bool tty = isatty(2), json_out;
    long rss0, rss1;
    double secs;
    int rc;

    memset(&b, 0, sizeof b);
    rc = cli_parse(&c, argc, argv);
    if (rc >= 0)
        return rc;
    b.queue = c.optind < argc ? argv[c.optind] : DEFAULT_QUEUE;
    b.body = c.optind + 1 < argc ? argv[c.optind + 1] : DEFAULT_BODY;
    if (c.optind + 2 < argc) {
        cli_error(&c, "unexpected argument \"%s\" (try --help)",
                  argv[c.optind + 2]);
        return CLI_EXIT_USAGE;
    }
    if (!*b.queue || strlen(b.queue) > 255) {
        cli_error(&c, "the queue name must be 1 to 255 bytes long");
        return CLI_EXIT_USAGE;
    }
    b.body_len = strlen(b.body);
    {
        json_error_t je;
        json_t *req = json_loadb(b.body, b.body_len, 0, &je);
        bool obj = json_is_object(req);
        json_decref(req);
        if (!obj) {
            cli_error(&c, "the request must be a JSON object, got \"%s\"",
                      b.body);
            return CLI_EXIT_USAGE;
        }
    }
    /* Ranges were checked by cli_parse. */
    b.calls = (uint64_t)atol(extra[X_CALLS].value);
    if (extra[X_RATE].value && !parse_rates(&c, extra[X_RATE].value, &b))
        return CLI_EXIT_USAGE;
    /* The default's own pointer: -c was not given. */
    if (extra[X_INFLIGHT].value == inflight_default && b.nrates)
        b.inflight = MAX_INFLIGHT;
    else
        b.inflight = (unsigned)atol(extra[X_INFLIGHT].value);
    if (b.nrates > 1 && extra[X_HIST].value) {
        cli_error(&c, "--hist writes one run's histogram: give --rate one "
                      "rate");
        return CLI_EXIT_USAGE;
    }
    b.nconn = (unsigned)atol(extra[X_CONNS].value);
    b.warmup = (uint64_t)atol(extra[X_WARMUP].value);
    if (extra[X_DURATION].value)
        b.duration_s = (double)atol(extra[X_DURATION].value);
    if (b.calls < b.nconn && b.duration_s == 0) {
        cli_error(&c, "-n must be at least the number of connections");
        return CLI_EXIT_USAGE;
    }
    {
        const char *ex = extra[X_EXPECT].value;
        if (!ex && c.optind >= argc)
            ex = DEFAULT_EXPECT; /* the default call has a known answer */
        if (ex) {
            json_error_t je;
            b.expect = json_loads(ex, JSON_DECODE_ANY, &je);
            if (!b.expect) {
                cli_error(&c, "--expect is not JSON: %s", je.text);
                return CLI_EXIT_USAGE;
            }
        }
    }
    json_out = extra[X_JSON].value != NULL;
    b.timeout_ms = c.timeout_ms;
    mqrpc_client_opts_init(&b.copts);
    b.copts.log = quiet; /* failures are counted and reported instead */
    b.copts.url = c.url;
    b.copts.tls = c.tls;
    b.copts.heartbeat_s = c.heartbeat_s;
    b.copts.direct_reply_to = extra[X_DIRECT].value != NULL;
    b.copts.durable = extra[X_DURABLE].value != NULL;
    b.copts.retries = atoi(extra[X_RETRIES].value);
    if (b.copts.retries > 0)
        b.call_flags = MQRPC_CALL_IDEMPOTENT;
#ifdef RPC_BENCH_KNOBS
    b.without = (extra[X_NO_CONFIRMS].value ? MQR_WITHOUT_CONFIRMS : 0) |
                (extra[X_NO_MANDATORY].value ? MQR_WITHOUT_MANDATORY : 0) |
                (extra[X_NO_EXPIRATION].value ? MQR_WITHOUT_EXPIRATION : 0);
#endif

    b.conns = calloc(b.nconn, sizeof *b.conns);
    lat = malloc(sizeof *lat);
    if (!b.conns || !lat) {
        cli_error(&c, "out of memory");
        return CLI_EXIT_FAILURE;
    }
    latency_init(lat);
    pthread_barrier_init(&b.warm, NULL, b.nconn + 1);
    pthread_barrier_init(&b.go, NULL, b.nconn + 1);
    pthread_barrier_init(&b.row_done, NULL, b.nconn + 1);
    atomic_init(&b.finished, 0);
    for (unsigned i = 0; i < b.nconn; i++) {
        struct conn *cn = &b.conns[i];
        cn->b = &b;
        cn->index = i;
        cn->quota = b.calls / b.nconn + (i < b.calls % b.nconn ? 1 : 0);
        latency_init(&cn->lat);
        atomic_init(&cn->done, 0);
        cn->slots = calloc(b.inflight, sizeof *cn->slots);
        if (!cn->slots) {
            cli_error(&c, "out of memory");
            return CLI_EXIT_FAILURE;
        }
        for (unsigned k = 0; k < b.inflight; k++)
            cn->slots[k].conn = cn;
    }

    cli_on_stop_signals(on_signal);

    for (unsigned i = 0; i < b.nconn; i++) {
        if (pthread_create(&b.conns[i].thread, NULL, run_conn, &b.conns[i])) {
            cli_error(&c, "cannot start a thread");
            return CLI_EXIT_FAILURE;
        }
    }
    if (tty && !json_out)
        fprintf(stderr, "connecting and warming up...");
    pthread_barrier_wait(&b.warm);
    if (b.nrates) {
        uint64_t nerr_rows = 0;
        if (tty && !json_out)
            fprintf(stderr, "\r%*s\r", 79, "");
        for (unsigned i = 0; i < b.nconn; i++)
            if (b.conns[i].fatal != MQRPC_OK) {
                rc = cli_exit_code(b.conns[i].fatal);
                if (!first_error[0])
                    snprintf(first_error, sizeof first_error, "%s",
                             b.conns[i].first_error);
            }
        if (rc >= 0) {
            b.abort = true;
            pthread_barrier_wait(&b.go);
        } else {
            nerr_rows = measure_rows(&b, json_out, tty, lat, first_error,
                                     sizeof first_error);
        }
        for (unsigned i = 0; i < b.nconn; i++)
            pthread_join(b.conns[i].thread, NULL);
        if (rc >= 0) {
            cli_error(&c, "%s%s", first_error,
                      cli_connect_hint(b.conns[0].fatal));
        } else {
            write_hist(&c, extra[X_HIST].value, lat);
            rc = nerr_rows || interrupted ? CLI_EXIT_REMOTE : CLI_EXIT_OK;
        }
        goto out;
    }
    b.t0_us = now_us();
    b.deadline_us = b.t0_us + (int64_t)(b.duration_s * 1e6);
    pthread_barrier_wait(&b.go);
    rss0 = rss_kib();
    if (tty && !json_out) {
        struct timespec ts = {0, 200 * 1000000L};
        while (atomic_load(&b.finished) < b.nconn) {
            progress(&b, now_us());
            nanosleep(&ts, NULL);
        }
        fprintf(stderr, "\r%*s\r", 79, "");
    }
    for (unsigned i = 0; i < b.nconn; i++)
        pthread_join(b.conns[i].thread, NULL);
    rss1 = rss_kib();

    {
        int64_t end = b.t0_us;
        for (unsigned i = 0; i < b.nconn; i++) {
            struct conn *cn = &b.conns[i];
            latency_merge(lat, &cn->lat);
            for (int k = 0; k <= WRONG_RESULT; k++) {
                errors[k] += cn->errors[k];
                nerr += cn->errors[k];
            }
            if (cn->end_us > end)
                end = cn->end_us;
            if (!first_error[0] && cn->first_error[0])
                snprintf(first_error, sizeof first_error, "%s",
                         cn->first_error);
            if (cn->fatal != MQRPC_OK && rc < 0)
                rc = cli_exit_code(cn->fatal);
        }
        secs = (double)(end - b.t0_us) / 1e6;
    }
    if (rc >= 0) {
        cli_error(&c, "%s%s", first_error, cli_connect_hint(b.conns[0].fatal));
    } else {
        if (json_out)
            print_json(&b, lat, errors, nerr, secs, rss0, rss1);
        else
            print_text(&b, lat, errors, nerr, secs, rss0, rss1, first_error);
        write_hist(&c, extra[X_HIST].value, lat);
        rc = nerr || interrupted ? CLI_EXIT_REMOTE : CLI_EXIT_OK;
    }

out:
    /* The threads are joined: their clients may be read here. */
    if (!write_metrics(&c, extra[X_METRICS_OUT].value, &b) && rc == CLI_EXIT_OK)
        rc = CLI_EXIT_FAILURE;
    for (unsigned i = 0; i < b.nconn; i++) {
        mqrpc_client_free(b.conns[i].client);
        free(b.conns[i].slots);
    }
    pthread_barrier_destroy(&b.row_done);
    pthread_barrier_destroy(&b.warm);
    pthread_barrier_destroy(&b.go);
    free(b.conns);
    free(lat);
    json_decref(b.expect);
    return rc;
}
