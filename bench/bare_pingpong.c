/*
 * bare_pingpong: the floor for `make bench`.
 *
 * The fastest sensible hand-written request/reply over plain rabbitmq-c, with
 * no JSON and no libmqrpc, so that rpc_bench can say how much our library
 * costs on top of the AMQP round trip itself. It keeps the same AMQP pattern
 * as a real RPC: the request goes to a named queue with reply_to and
 * correlation_id; the service publishes the reply to reply_to on the default
 * exchange with the same correlation_id, then basic.ack's that one request.
 * Frames are read with amqp_simple_wait_frame_noblock straight from the
 * connection's pool (no envelope copies); nothing is batched.
 *
 *   bare_pingpong serve [--url URL] [--queue Q] [--prefetch N]
 *   bare_pingpong call  [--url URL] [--queue Q] [-c INFLIGHT] [--connections N]
 *                       [-n CALLS | -d SECONDS] [--warmup CALLS]
 *                       [--rate R[,R...]]
 *
 * serve echoes each request body and prints "ready" once consuming; SIGTERM
 * or SIGINT stops it (exit 0). URL: --url, else $AMQP_URL, else
 * amqp://guest:guest@localhost:5672/. Usage error: exit 2; any other failure
 * (including no reply within 10 s): one line on stderr, exit 3.
 *
 * call opens N connections (default 1), each with a thread, an exclusive
 * reply queue and its own consumer; each first makes --warmup unmeasured
 * calls (default 1000), then all measure from the same moment. -n is the
 * measured calls over all connections (default 20000), -d measures for
 * SECONDS instead; with --rate, per rate. Exit 0 without errors, 1 with.
 *   Closed loop (no --rate): each connection keeps INFLIGHT calls
 *   outstanding (default 1), each reply starts the next; latency runs from
 *   publish to reply (CLOCK_MONOTONIC). One JSON line:
 *     {"impl":"bare rabbitmq-c","connections":N,"inflight":C,"calls":K,
 *      "seconds":S,"calls_per_s":X,"p50_us":..,"p90_us":..,"p99_us":..,
 *      "p999_us":..,"max_us":..,"errors":E}
 *   Open loop (--rate R, several rates separated by commas, one phase and
 *   one JSON line each, in the order given): call g (0, 1, 2, ... over all
 *   connections) is due at t0 + g/R and goes on connection g % N, whatever
 *   the replies do; its latency runs from when it was due, not from when it
 *   was sent (no coordinated omission). INFLIGHT caps the calls in flight
 *   per connection (default 65536 with --rate); a due call that finds the
 *   cap reached is not sent and counts as an error "inflight_limit". After
 *   the schedule the phase waits for every reply. One JSON line per rate:
 *     {"impl":"bare rabbitmq-c","connections":N,"inflight":C,"rate":R,
 *      "offered_per_s":O,"scheduled":D,"calls":K,"seconds":S,
 *      "calls_per_s":X,"achieved_per_s":X,"p50_us":..,"p90_us":..,
 *      "p99_us":..,"p999_us":..,"max_us":..,"errors":E,
 *      "errors_by_kind":{"inflight_limit":..,"unknown_reply":..}}
 *   where D = calls that came due, K = successful replies, S = t0 to the
 *   last reply, X = K / S, O = D / the schedule's length (R when every due
 *   call was counted), E = D - K plus replies no call waited for
 *   ("unknown_reply"); errors_by_kind lists only non-zero kinds.
 * rpc_bench --rate prints the same fields (impl "mqrpc", plus its own), and
 * the Go peer in bench/go/ takes the same flags and prints the same fields.
 */
#define _GNU_SOURCE /* ppoll */
/* rabbitmq-c 0.12 moved its headers into rabbitmq-c/ and made the old names
 * #warning; 0.11 (Debian bookworm) has only the old names. */
#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#define BARE_RABBITMQ_C_DIR 1
#endif
#endif
#ifdef BARE_RABBITMQ_C_DIR
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif

#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#define PROG "bare_pingpong"
#define EXIT_USAGE 2
#define EXIT_FAILURE_ 3
#define CHANNEL 1
#define FRAME_MAX 131072
#define REPLY_TIMEOUT_S 10
#define DEFAULT_URL "amqp://guest:guest@localhost:5672/"
#define DEFAULT_QUEUE "service_bare"
#define REQUEST_BODY "{\"a\":1,\"b\":2}"
#define MAX_CONNECTIONS 512
#define MAX_INFLIGHT 65536 /* also the default cap with --rate */
#define MAX_RATES 32
#define MAX_RATE 10000000.0

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

__attribute__((format(printf, 1, 2))) static _Noreturn void die(const char *fmt,
                                                                ...)
{
    va_list ap;
    fputs(PROG ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(EXIT_FAILURE_);
}

__attribute__((format(printf, 1, 2))) static _Noreturn void
usage_error(const char *fmt, ...)
{
    va_list ap;
    fputs(PROG ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nusage: " PROG " serve [--url URL] [--queue Q] [--prefetch N]\n"
          "       " PROG " call [--url URL] [--queue Q] [-c INFLIGHT]"
          " [--connections N]\n"
          "                          [-n CALLS | -d SECONDS] [--warmup CALLS]"
          " [--rate R[,R...]]\n",
          stderr);
    exit(EXIT_USAGE);
}

static void check_status(int status, const char *what)
{
    if (status < 0)
        die("%s: %s", what, amqp_error_string2(status));
}

static void check_reply(amqp_rpc_reply_t r, const char *what)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: return;
    case AMQP_RESPONSE_NONE: die("%s: no reply from the broker", what);
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        die("%s: %s", what, amqp_error_string2(r.library_error));
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            const amqp_connection_close_t *m = r.reply.decoded;
            die("%s: connection closed by the broker: %u %.*s", what,
                (unsigned)m->reply_code, (int)m->reply_text.len,
                (const char *)m->reply_text.bytes);
        }
        if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            const amqp_channel_close_t *m = r.reply.decoded;
            die("%s: channel closed by the broker: %u %.*s", what,
                (unsigned)m->reply_code, (int)m->reply_text.len,
                (const char *)m->reply_text.bytes);
        }
        die("%s: unexpected method %s", what, amqp_method_name(r.reply.id));
    }
    die("%s: unknown reply type %d", what, (int)r.reply_type);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- connection --------------------------------------------------------- */

static amqp_connection_state_t connect_broker(const char *url)
{
    struct amqp_connection_info ci;
    char *buf = strdup(url);
    if (buf == NULL)
        die("out of memory");
    if (amqp_parse_url(buf, &ci) != AMQP_STATUS_OK)
        die("invalid AMQP URL (expected amqp://user:pass@host:port/vhost)");
    if (ci.ssl)
        die("amqps:// is not supported");
    /* "amqp://host/" parses as vhost ""; read it as "/" like pika does. */
    const char *vhost = ci.vhost[0] != '\0' ? ci.vhost : "/";

    amqp_connection_state_t conn = amqp_new_connection();
    if (conn == NULL)
        die("out of memory");
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (sock == NULL)
        die("cannot create a TCP socket");
    int st = amqp_socket_open(sock, ci.host, ci.port);
    if (st != AMQP_STATUS_OK)
        die("cannot connect to %s:%d: %s", ci.host, ci.port,
            amqp_error_string2(st));
    check_reply(amqp_login(conn, vhost, 0, FRAME_MAX, 0, AMQP_SASL_METHOD_PLAIN,
                           ci.user, ci.password),
                "login");
    amqp_channel_open(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "channel.open");
    free(buf);
    return conn;
}

static void disconnect_broker(amqp_connection_state_t conn)
{
    check_reply(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS),
                "channel.close");
    check_reply(amqp_connection_close(conn, AMQP_REPLY_SUCCESS),
                "connection.close");
    check_status(amqp_destroy_connection(conn), "destroying the connection");
}

/* ---- one delivery, read frame by frame ---------------------------------- */

struct delivery {
    uint64_t tag;
    const amqp_basic_properties_t *props;
    amqp_bytes_t body;
};

/* Body of a delivery split over several frames (never with our small bodies,
 * but the service echoes whatever it gets). One per thread: each caller
 * connection reads on its own. */
static _Thread_local char *big_body;
static _Thread_local size_t big_body_cap;

static void next_frame(amqp_connection_state_t conn, amqp_frame_t *f,
                       uint8_t type)
{
    check_status(amqp_simple_wait_frame(conn, f), "reading a delivery");
    if (f->frame_type != type || f->channel != CHANNEL)
        die("unexpected frame type %u on channel %u", (unsigned)f->frame_type,
            (unsigned)f->channel);
}

/* Waits up to *timeout for the next basic.deliver and reads its header and
 * body. Returns 1 with *d filled (pointing into the connection's buffers,
 * valid until amqp_maybe_release_buffers), 0 on timeout. Anything else
 * (channel or connection closed, consumer cancelled) is fatal. */
static int read_delivery(amqp_connection_state_t conn, struct timeval *timeout,
                         struct delivery *d)
{
    amqp_frame_t f;
    for (;;) {
        int st = amqp_simple_wait_frame_noblock(conn, &f, timeout);
        if (st == AMQP_STATUS_TIMEOUT)
            return 0;
        check_status(st, "waiting for a delivery");
        if (f.frame_type == AMQP_FRAME_HEARTBEAT)
            continue;
        if (f.frame_type != AMQP_FRAME_METHOD)
            die("unexpected frame type %u", (unsigned)f.frame_type);
        if (f.payload.method.id == AMQP_BASIC_DELIVER_METHOD)
            break;
        amqp_rpc_reply_t r = {.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION,
                              .reply = f.payload.method};
        check_reply(r, "consuming");
    }
    const amqp_basic_deliver_t *m = f.payload.method.decoded;
    d->tag = m->delivery_tag;

    next_frame(conn, &f, AMQP_FRAME_HEADER);
    d->props = f.payload.properties.decoded;
    uint64_t size = f.payload.properties.body_size;
    if (size == 0) {
        d->body = amqp_empty_bytes;
        return 1;
    }
    next_frame(conn, &f, AMQP_FRAME_BODY);
    if (f.payload.body_fragment.len == size) {
        d->body = f.payload.body_fragment;
        return 1;
    }
    if (size > SIZE_MAX / 2)
        die("message of %" PRIu64 " bytes is too big", size);
    if (big_body_cap < size) {
        free(big_body);
        big_body = malloc((size_t)size);
        if (big_body == NULL)
            die("out of memory");
        big_body_cap = (size_t)size;
    }
    size_t got = 0;
    for (;;) {
        amqp_bytes_t frag = f.payload.body_fragment;
        if (frag.len > size - got)
            die("message body longer than announced");
        memcpy(big_body + got, frag.bytes, frag.len);
        got += frag.len;
        if (got == size)
            break;
        next_frame(conn, &f, AMQP_FRAME_BODY);
    }
    d->body.bytes = big_body;
    d->body.len = got;
    return 1;
}

/* ---- options ------------------------------------------------------------ */

struct options {
    const char *url;
    const char *queue;
    unsigned long prefetch;
    unsigned long inflight;
    unsigned long calls;
    double seconds; /* > 0: run for this long instead of -n calls */
    unsigned long warmup;
    unsigned connections;
    double rates[MAX_RATES]; /* --rate: open loop, one phase each */
    unsigned nrates;         /* 0: closed loop */
};

/* argv[*i] is NAME VALUE or NAME=VALUE: returns VALUE and advances *i. */
static const char *option_value(int argc, char **argv, int *i, const char *name)
{
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n) != 0)
        return NULL;
    if (argv[*i][n] == '=')
        return argv[*i] + n + 1;
    if (argv[*i][n] != '\0')
        return NULL;
    if (*i + 1 >= argc)
        usage_error("%s needs a value", name);
    return argv[++*i];
}

static unsigned long parse_count(const char *s, const char *name,
                                 unsigned long min, unsigned long max)
{
    char *end;
    if (*s < '0' || *s > '9')
        usage_error("%s: not a number: %s", name, s);
    unsigned long v = strtoul(s, &end, 10);
    if (*end != '\0' || v < min || v > max)
        usage_error("%s must be an integer in %lu..%lu, got %s", name, min, max,
                    s);
    return v;
}

/* --rate R[,R...]: calls/s, each above 0 and at most MAX_RATE. */
static void parse_rates(const char *arg, struct options *o)
{
    const char *p = arg;
    for (;;) {
        char *end = (char *)p;
        double r = *p >= '0' && *p <= '9' ? strtod(p, &end) : 0;
        if (end == p || (*end && *end != ',') || !(r > 0) || r > MAX_RATE)
            usage_error("--rate takes calls/s above 0 and up to %.0f, "
                        "separated by commas (e.g. 1000,2000,4000), got \"%s\"",
                        MAX_RATE, arg);
        if (o->nrates == MAX_RATES)
            usage_error("--rate takes at most %d rates", MAX_RATES);
        o->rates[o->nrates++] = r;
        if (!*end)
            return;
        p = end + 1;
    }
}

static void parse_options(int argc, char **argv, int serve, struct options *o)
{
    const char *env = getenv("AMQP_URL");
    *o = (struct options){.url = env && *env ? env : DEFAULT_URL,
                          .queue = DEFAULT_QUEUE,
                          .prefetch = 1,
                          .inflight = 1,
                          .calls = 20000,
                          .warmup = 1000,
                          .connections = 1};
    int have_n = 0, have_c = 0;
    for (int i = 2; i < argc; i++) {
        const char *v;
        if ((v = option_value(argc, argv, &i, "--url"))) {
            o->url = v;
        } else if ((v = option_value(argc, argv, &i, "--queue"))) {
            if (*v == '\0' || strlen(v) > 255)
                usage_error("--queue: 1 to 255 bytes");
            o->queue = v;
        } else if (serve && (v = option_value(argc, argv, &i, "--prefetch"))) {
            o->prefetch = parse_count(v, "--prefetch", 0, 65535);
        } else if (!serve && (v = option_value(argc, argv, &i, "-c"))) {
            o->inflight = parse_count(v, "-c", 1, MAX_INFLIGHT);
            have_c = 1;
        } else if (!serve &&
                   (v = option_value(argc, argv, &i, "--connections"))) {
            o->connections =
                (unsigned)parse_count(v, "--connections", 1, MAX_CONNECTIONS);
        } else if (!serve && (v = option_value(argc, argv, &i, "--rate"))) {
            parse_rates(v, o);
        } else if (!serve && (v = option_value(argc, argv, &i, "-n"))) {
            o->calls = parse_count(v, "-n", 1, 1000000000);
            have_n = 1;
        } else if (!serve && (v = option_value(argc, argv, &i, "-d"))) {
            char *end;
            o->seconds = strtod(v, &end);
            if (end == v || *end != '\0' || !(o->seconds > 0) ||
                o->seconds > 1e6)
                usage_error("-d: a positive number of seconds, got %s", v);
        } else if (!serve && (v = option_value(argc, argv, &i, "--warmup"))) {
            o->warmup = parse_count(v, "--warmup", 0, 1000000000);
        } else {
            usage_error("unknown argument: %s", argv[i]);
        }
    }
    if (have_n && o->seconds > 0)
        usage_error("-n and -d are exclusive");
    if (o->nrates && !have_c)
        o->inflight = MAX_INFLIGHT;
    if (o->seconds == 0 && o->calls < o->connections)
        usage_error("-n must be at least the number of connections");
}

/* ---- serve -------------------------------------------------------------- */

static int serve(const struct options *o)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART; /* poll() still returns; we notice in 200 ms */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    amqp_connection_state_t conn = connect_broker(o->url);
    amqp_bytes_t queue = amqp_cstring_bytes(o->queue);
    amqp_queue_declare(conn, CHANNEL, queue, 0, 0, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "queue.declare");
    amqp_basic_qos(conn, CHANNEL, 0, (uint16_t)o->prefetch, 0);
    check_reply(amqp_get_rpc_reply(conn), "basic.qos");
    amqp_basic_consume(conn, CHANNEL, queue, amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "basic.consume");
    amqp_maybe_release_buffers(conn);
    fputs("ready\n", stdout);
    fflush(stdout);

    while (!stop_requested) {
        struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
        struct delivery d;
        if (!read_delivery(conn, &tv, &d))
            continue;
        if (d.props->_flags & AMQP_BASIC_REPLY_TO_FLAG) {
            amqp_basic_properties_t props;
            props._flags = d.props->_flags & AMQP_BASIC_CORRELATION_ID_FLAG;
            props.correlation_id = d.props->correlation_id;
            check_status(amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes,
                                            d.props->reply_to, 0, 0, &props,
                                            d.body),
                         "publishing a reply");
        } /* else: nobody to answer; acknowledged and dropped */
        check_status(amqp_basic_ack(conn, CHANNEL, d.tag, 0), "basic.ack");
        amqp_maybe_release_buffers(conn);
    }
    disconnect_broker(conn);
    free(big_body);
    return 0;
}

/* ---- call --------------------------------------------------------------- */

/* Slot j of a connection's window carries the calls j, j + C, j + 2C, ...
 * (C slots): the correlation id is that number in decimal, and id % C
 * finds the slot. */
struct slot {
    uint64_t id;
    uint64_t uses;
    int64_t started_ns; /* published (closed loop) or due (open loop) */
    int busy;
};

/* One connection and everything only its thread touches. */
struct caller {
    const struct options *o;
    unsigned index; /* 0 .. connections-1: its share of the schedule */
    pthread_t thread;
    amqp_connection_state_t conn;
    amqp_bytes_t queue, reply_to;
    struct slot *slots; /* o->inflight of them */
    size_t *free_idx;   /* open loop: a stack of returned slots */
    size_t nfree;
    size_t fresh; /* open loop: slots from here on were not used yet */
    size_t outstanding;
    int64_t *lat; /* ns, measured calls of this phase */
    size_t nlat, cap;
    size_t unknown;     /* replies with an unknown correlation id */
    uint64_t refused;   /* open loop: due, but -c calls were in flight */
    uint64_t scheduled; /* open loop: calls that came due */
    int64_t t_end;      /* the last measured reply */
};

/* What the main thread sets before each phase; the barriers order it. */
static struct {
    pthread_barrier_t warm, go, done;
    int64_t t0;  /* the phase starts */
    double rate; /* calls/s over all connections; 0: closed loop */
} run;

static void send_call(struct caller *w, size_t j, int64_t started_ns)
{
    struct slot *s = &w->slots[j];
    char corr[24];
    s->id = s->uses++ * w->o->inflight + j;
    int len = snprintf(corr, sizeof corr, "%" PRIu64, s->id);
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_REPLY_TO_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG;
    props.reply_to = w->reply_to;
    props.correlation_id = (amqp_bytes_t){.len = (size_t)len, .bytes = corr};
    s->busy = 1;
    s->started_ns = started_ns ? started_ns : now_ns();
    check_status(amqp_basic_publish(w->conn, CHANNEL, amqp_empty_bytes,
                                    w->queue, 0, 0, &props,
                                    amqp_cstring_bytes(REQUEST_BODY)),
                 "publishing a request");
    w->outstanding++;
}

/* The decimal correlation id of a reply, or UINT64_MAX if it is not one. */
static uint64_t parse_corr(const amqp_basic_properties_t *p)
{
    if (!(p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG))
        return UINT64_MAX;
    const char *b = p->correlation_id.bytes;
    size_t n = p->correlation_id.len;
    if (n == 0 || n > 19)
        return UINT64_MAX;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (b[i] < '0' || b[i] > '9')
            return UINT64_MAX;
        v = v * 10 + (uint64_t)(b[i] - '0');
    }
    return v;
}

/* Waits up to *tv for a reply. Returns 0 on timeout; else 1 with *j the
 * slot it completes (now idle), or SIZE_MAX for a reply no call waits for
 * (counted), and *now the time it came. */
static int next_reply(struct caller *w, struct timeval *tv, size_t *j,
                      int64_t *now)
{
    struct delivery d;
    if (!read_delivery(w->conn, tv, &d))
        return 0;
    *now = now_ns();
    uint64_t id = parse_corr(d.props);
    amqp_maybe_release_buffers(w->conn);
    size_t k = id == UINT64_MAX ? SIZE_MAX : (size_t)(id % w->o->inflight);
    if (k == SIZE_MAX || !w->slots[k].busy || w->slots[k].id != id) {
        w->unknown++;
        *j = SIZE_MAX;
        return 1;
    }
    w->slots[k].busy = 0;
    w->outstanding--;
    *j = k;
    return 1;
}

static void record_latency(struct caller *w, int64_t ns)
{
    if (w->nlat == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 65536;
        int64_t *bigger = realloc(w->lat, w->cap * sizeof *w->lat);
        if (bigger == NULL)
            die("out of memory");
        w->lat = bigger;
    }
    w->lat[w->nlat++] = ns;
}

/* Waits for a reply, at most REPLY_TIMEOUT_S: the service is gone. */
static size_t await_reply(struct caller *w, int64_t *now)
{
    struct timeval tv = {.tv_sec = REPLY_TIMEOUT_S, .tv_usec = 0};
    size_t j;
    if (!next_reply(w, &tv, &j, now))
        die("no reply within %d s (%zu calls outstanding)", REPLY_TIMEOUT_S,
            w->outstanding);
    return j;
}

/* Unmeasured calls, closed loop; the open loop warms up one at a time (its
 * -c is a cap, not a window to fill). Returns with nothing in flight. */
static void warm_up(struct caller *w)
{
    const struct options *o = w->o;
    size_t window = run.rate > 0 ? 1 : o->inflight;
    uint64_t published = 0;
    int64_t now;
    for (size_t j = 0; j < window && published < o->warmup; j++, published++)
        send_call(w, j, 0);
    while (w->outstanding > 0) {
        size_t j = await_reply(w, &now);
        if (j != SIZE_MAX && published < o->warmup) {
            send_call(w, j, 0);
            published++;
        }
    }
}

/* Closed loop: -c calls in flight, each reply starts the next call. */
static void closed_loop(struct caller *w)
{
    const struct options *o = w->o;
    unsigned n = o->connections;
    const int timed = o->seconds > 0;
    const uint64_t quota =
        timed ? UINT64_MAX : o->calls / n + (w->index < o->calls % n);
    const int64_t run_ns = (int64_t)(o->seconds * 1e9);
    uint64_t published = 0;
    int64_t now;

    for (size_t j = 0; j < o->inflight && published < quota; j++, published++)
        send_call(w, j, 0);
    while (w->outstanding > 0) {
        size_t j = await_reply(w, &now);
        if (j == SIZE_MAX)
            continue;
        record_latency(w, now - w->slots[j].started_ns);
        w->t_end = now;
        if (timed ? now - run.t0 < run_ns : published < quota) {
            send_call(w, j, 0);
            published++;
        }
    }
}

/* Open loop: call g (over all connections) is due at t0 + g / rate; this
 * connection makes g = index, index + n, ... and measures each call from
 * when it was due, so a late start shows as latency. */
static void open_loop(struct caller *w)
{
    const struct options *o = w->o;
    const unsigned n = o->connections;
    const uint64_t limit =
        o->seconds > 0 ? (uint64_t)ceil(run.rate * o->seconds) : o->calls;
    uint64_t g = w->index;
    int64_t now, due = 0;

    /* Every slot is idle between phases. Slots are taken in order before
     * any is reused, so only the pages of the busiest moment are touched. */
    w->nfree = 0;
    w->fresh = 0;
    for (;;) {
        now = now_ns();
        for (; g < limit; g += n) {
            /* From t0 each time, so rounding never accumulates. */
            due = run.t0 + (int64_t)((double)g * 1e9 / run.rate);
            if (due > now)
                break;
            w->scheduled++;
            if (w->nfree > 0)
                send_call(w, w->free_idx[--w->nfree], due);
            else if (w->fresh < o->inflight)
                send_call(w, w->fresh++, due);
            else
                w->refused++; /* shown as an error, never a quiet delay */
        }
        struct timeval tv = {.tv_sec = REPLY_TIMEOUT_S, .tv_usec = 0};
        if (g >= limit) {
            if (w->outstanding == 0)
                break;
        } else {
            /* rabbitmq-c polls with a timeout in whole milliseconds, so a
             * wait shorter than one would spin: sleep on the socket here
             * (unless rabbitmq-c already holds data), then only read. */
            int64_t wait = due - now_ns();
            if (wait > 0 && !amqp_frames_enqueued(w->conn) &&
                !amqp_data_in_buffer(w->conn)) {
                struct pollfd p = {.fd = amqp_get_sockfd(w->conn),
                                   .events = POLLIN};
                struct timespec ts = {(time_t)(wait / 1000000000),
                                      (long)(wait % 1000000000)};
                (void)ppoll(&p, 1, &ts, NULL);
            }
            tv.tv_sec = 0;
            tv.tv_usec = 0;
        }
        size_t j;
        if (!next_reply(w, &tv, &j, &now)) {
            if (g >= limit)
                die("no reply within %d s (%zu calls outstanding)",
                    REPLY_TIMEOUT_S, w->outstanding);
            continue;
        }
        if (j == SIZE_MAX)
            continue;
        record_latency(w, now - w->slots[j].started_ns);
        w->t_end = now;
        w->free_idx[w->nfree++] = j;
    }
}

static void *caller_main(void *arg)
{
    struct caller *w = arg;
    const struct options *o = w->o;
    unsigned phases = o->nrates ? o->nrates : 1;

    w->conn = connect_broker(o->url);
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(
        w->conn, CHANNEL, amqp_empty_bytes, 0, 0, 1, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(w->conn), "queue.declare (reply queue)");
    w->reply_to = amqp_bytes_malloc_dup(ok->queue);
    if (w->reply_to.bytes == NULL)
        die("out of memory");
    amqp_basic_consume(w->conn, CHANNEL, w->reply_to, amqp_empty_bytes, 0, 1, 0,
                       amqp_empty_table);
    check_reply(amqp_get_rpc_reply(w->conn), "basic.consume (reply queue)");
    amqp_maybe_release_buffers(w->conn);
    w->queue = amqp_cstring_bytes(o->queue);

    warm_up(w);
    pthread_barrier_wait(&run.warm);
    for (unsigned p = 0; p < phases; p++) {
        pthread_barrier_wait(&run.go);
        w->t_end = run.t0;
        if (run.rate > 0)
            open_loop(w);
        else
            closed_loop(w);
        pthread_barrier_wait(&run.done);
    }
    disconnect_broker(w->conn);
    amqp_bytes_free(w->reply_to);
    free(big_body);
    return NULL;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile (per mille) of a sorted array, in microseconds. */
static double percentile_us(const int64_t *v, size_t n, size_t per_mille)
{
    if (n == 0)
        return 0;
    size_t rank = (n * per_mille + 999) / 1000;
    return (double)v[rank == 0 ? 0 : rank - 1] / 1e3;
}

/* Merges the phase's figures of every connection into one JSON line (the
 * fields are listed at the top of this file) and clears them. Returns the
 * phase's error count. */
static size_t report_phase(const struct options *o, struct caller *ws)
{
    size_t nlat = 0, unknown = 0;
    uint64_t refused = 0, scheduled = 0;
    int64_t t_end = run.t0;
    for (unsigned i = 0; i < o->connections; i++) {
        nlat += ws[i].nlat;
        unknown += ws[i].unknown;
        refused += ws[i].refused;
        scheduled += ws[i].scheduled;
        if (ws[i].t_end > t_end)
            t_end = ws[i].t_end;
    }
    int64_t *lat = malloc((nlat ? nlat : 1) * sizeof *lat);
    if (lat == NULL)
        die("out of memory");
    size_t k = 0;
    for (unsigned i = 0; i < o->connections; i++) {
        memcpy(lat + k, ws[i].lat, ws[i].nlat * sizeof *lat);
        k += ws[i].nlat;
        ws[i].nlat = ws[i].unknown = 0;
        ws[i].refused = ws[i].scheduled = 0;
    }
    qsort(lat, nlat, sizeof *lat, cmp_i64);
    double secs = nlat > 0 ? (double)(t_end - run.t0) / 1e9 : 0;
    double per_s = secs > 0 ? (double)nlat / secs : 0.0;
    size_t errors = unknown + refused;

    printf("{\"impl\":\"bare rabbitmq-c\",\"connections\":%u,\"inflight\":%lu,",
           o->connections, o->inflight);
    if (run.rate > 0) {
        uint64_t limit =
            o->seconds > 0 ? (uint64_t)ceil(run.rate * o->seconds) : o->calls;
        printf(
            "\"rate\":%.1f,\"offered_per_s\":%.1f,\"scheduled\":%" PRIu64 ",",
            run.rate, (double)scheduled * run.rate / (double)limit, scheduled);
    }
    printf("\"calls\":%zu,\"seconds\":%.3f,\"calls_per_s\":%.1f,", nlat, secs,
           per_s);
    if (run.rate > 0)
        printf("\"achieved_per_s\":%.1f,", per_s);
    printf("\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,"
           "\"p999_us\":%.1f,\"max_us\":%.1f,\"errors\":%zu",
           percentile_us(lat, nlat, 500), percentile_us(lat, nlat, 900),
           percentile_us(lat, nlat, 990), percentile_us(lat, nlat, 999),
           percentile_us(lat, nlat, 1000), errors);
    if (run.rate > 0) {
        printf(",\"errors_by_kind\":{");
        const char *sep = "";
        if (refused) {
            printf("\"inflight_limit\":%" PRIu64, refused);
            sep = ",";
        }
        if (unknown)
            printf("%s\"unknown_reply\":%zu", sep, unknown);
        printf("}");
    }
    printf("}\n");
    fflush(stdout);
    free(lat);
    return errors;
}

static int call(const struct options *o)
{
    unsigned n = o->connections, phases = o->nrates ? o->nrates : 1;
    struct caller *ws = calloc(n, sizeof *ws);
    size_t errors = 0;
    if (ws == NULL)
        die("out of memory");
    pthread_barrier_init(&run.warm, NULL, n + 1);
    pthread_barrier_init(&run.go, NULL, n + 1);
    pthread_barrier_init(&run.done, NULL, n + 1);
    run.rate = o->nrates ? o->rates[0] : 0;
    for (unsigned i = 0; i < n; i++) {
        ws[i].o = o;
        ws[i].index = i;
        ws[i].slots = calloc(o->inflight, sizeof *ws[i].slots);
        ws[i].free_idx = malloc(o->inflight * sizeof *ws[i].free_idx);
        if (ws[i].slots == NULL || ws[i].free_idx == NULL)
            die("out of memory");
        if (pthread_create(&ws[i].thread, NULL, caller_main, &ws[i]) != 0)
            die("cannot start a thread");
    }
    /* Every connection measures from the same moment, once all are up and
     * warm; a phase ends when every connection has its replies. */
    pthread_barrier_wait(&run.warm);
    for (unsigned p = 0; p < phases; p++) {
        run.rate = o->nrates ? o->rates[p] : 0;
        run.t0 = now_ns();
        pthread_barrier_wait(&run.go);
        pthread_barrier_wait(&run.done);
        errors += report_phase(o, ws);
    }
    for (unsigned i = 0; i < n; i++) {
        pthread_join(ws[i].thread, NULL);
        free(ws[i].slots);
        free(ws[i].free_idx);
        free(ws[i].lat);
    }
    free(ws);
    return errors == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    struct options o;
    if (argc < 2)
        usage_error("missing command (serve or call)");
    if (strcmp(argv[1], "serve") == 0) {
        parse_options(argc, argv, 1, &o);
        return serve(&o);
    }
    if (strcmp(argv[1], "call") == 0) {
        parse_options(argc, argv, 0, &o);
        return call(&o);
    }
    usage_error("unknown command: %s", argv[1]);
}
