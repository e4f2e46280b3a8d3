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
 *   bare_pingpong call  [--url URL] [--queue Q] [-c INFLIGHT]
 *                       [-n CALLS | -d SECONDS] [--warmup CALLS]
 *
 * serve echoes each request body and prints "ready" once consuming; SIGTERM
 * or SIGINT stops it (exit 0). call keeps INFLIGHT calls outstanding (closed
 * loop), skips the first --warmup replies, measures the rest (publish to
 * reply, CLOCK_MONOTONIC) and prints one JSON line; exit 0 without errors
 * (replies with an unknown correlation id), 1 with. URL: --url, else
 * $AMQP_URL, else amqp://guest:guest@localhost:5672/. Usage error: exit 2;
 * any other failure: one line on stderr, exit 3.
 */
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
          " [-n CALLS | -d SECONDS] [--warmup CALLS]\n",
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
 * but the service echoes whatever it gets). */
static char *big_body;
static size_t big_body_cap;

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

static void parse_options(int argc, char **argv, int serve, struct options *o)
{
    const char *env = getenv("AMQP_URL");
    *o = (struct options){.url = env && *env ? env : DEFAULT_URL,
                          .queue = DEFAULT_QUEUE,
                          .prefetch = 1,
                          .inflight = 1,
                          .calls = 20000,
                          .warmup = 1000};
    int have_n = 0;
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
            o->inflight = parse_count(v, "-c", 1, 1000000);
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

/* Slot s of the in-flight window carries the calls s, s + C, s + 2C, ...:
 * the correlation id is that number in decimal, and id % C finds the slot. */
struct slot {
    uint64_t id;
    int64_t started_ns;
    int busy;
};

static void publish_call(amqp_connection_state_t conn, amqp_bytes_t queue,
                         amqp_bytes_t reply_to, struct slot *s)
{
    char corr[24];
    int len = snprintf(corr, sizeof corr, "%" PRIu64, s->id);
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_REPLY_TO_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG;
    props.reply_to = reply_to;
    props.correlation_id = (amqp_bytes_t){.len = (size_t)len, .bytes = corr};
    s->busy = 1;
    s->started_ns = now_ns();
    check_status(amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, queue, 0,
                                    0, &props,
                                    amqp_cstring_bytes(REQUEST_BODY)),
                 "publishing a request");
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

static int call(const struct options *o)
{
    amqp_connection_state_t conn = connect_broker(o->url);
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(
        conn, CHANNEL, amqp_empty_bytes, 0, 0, 1, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "queue.declare (reply queue)");
    amqp_bytes_t reply_to = amqp_bytes_malloc_dup(ok->queue);
    if (reply_to.bytes == NULL)
        die("out of memory");
    amqp_basic_consume(conn, CHANNEL, reply_to, amqp_empty_bytes, 0, 1, 0,
                       amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "basic.consume (reply queue)");
    amqp_maybe_release_buffers(conn);

    const int timed = o->seconds > 0;
    const uint64_t total = timed ? UINT64_MAX : o->warmup + o->calls;
    const int64_t run_ns = (int64_t)(o->seconds * 1e9);
    size_t cap = timed ? 65536 : o->calls, nlat = 0;
    int64_t *lat = malloc(cap * sizeof *lat);
    struct slot *slots = calloc(o->inflight, sizeof *slots);
    if (lat == NULL || slots == NULL)
        die("out of memory");

    amqp_bytes_t queue = amqp_cstring_bytes(o->queue);
    uint64_t published = 0, completed = 0;
    size_t outstanding = 0, errors = 0;
    int64_t t_start = now_ns(), t_end = t_start;
    for (size_t i = 0; i < o->inflight && published < total; i++) {
        slots[i].id = i;
        publish_call(conn, queue, reply_to, &slots[i]);
        published++;
        outstanding++;
    }
    while (outstanding > 0) {
        struct timeval tv = {.tv_sec = REPLY_TIMEOUT_S, .tv_usec = 0};
        struct delivery d;
        if (!read_delivery(conn, &tv, &d))
            die("no reply within %d s (%zu calls outstanding)", REPLY_TIMEOUT_S,
                outstanding);
        int64_t now = now_ns();
        uint64_t id = parse_corr(d.props);
        struct slot *s = id == UINT64_MAX ? NULL : &slots[id % o->inflight];
        amqp_maybe_release_buffers(conn);
        if (s == NULL || !s->busy || s->id != id) {
            errors++;
            continue;
        }
        s->busy = 0;
        outstanding--;
        completed++;
        if (completed <= o->warmup) {
            if (completed == o->warmup)
                t_start = now;
        } else {
            if (nlat == cap) {
                cap *= 2;
                int64_t *bigger = realloc(lat, cap * sizeof *lat);
                if (bigger == NULL)
                    die("out of memory");
                lat = bigger;
            }
            lat[nlat++] = now - s->started_ns;
            t_end = now;
        }
        int more = timed ? completed < o->warmup || now - t_start < run_ns
                         : published < total;
        if (more) {
            s->id += o->inflight;
            publish_call(conn, queue, reply_to, s);
            published++;
            outstanding++;
        }
    }
    disconnect_broker(conn);

    qsort(lat, nlat, sizeof *lat, cmp_i64);
    double secs = nlat > 0 ? (double)(t_end - t_start) / 1e9 : 0;
    printf("{\"impl\":\"bare rabbitmq-c\",\"inflight\":%lu,\"calls\":%zu,"
           "\"seconds\":%.3f,\"calls_per_s\":%.1f,\"p50_us\":%.1f,"
           "\"p90_us\":%.1f,\"p99_us\":%.1f,\"max_us\":%.1f,\"errors\":%zu}\n",
           o->inflight, nlat, secs, secs > 0 ? (double)nlat / secs : 0.0,
           percentile_us(lat, nlat, 500), percentile_us(lat, nlat, 900),
           percentile_us(lat, nlat, 990), percentile_us(lat, nlat, 1000),
           errors);
    fflush(stdout);
    free(lat);
    free(slots);
    amqp_bytes_free(reply_to);
    free(big_body);
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
