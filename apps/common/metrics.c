#include "metrics.h"

#include "cli.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ------------------------------------------------------------- the text */

static const double bounds_s[] = {MQRPC_DURATION_BOUNDS_S};

/* A label value as the exposition format wants it: \, " and newline
 * escaped. Queue names are the only values from outside. */
static void put_label(FILE *f, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            fputc('\\', f), fputc(*v, f);
        else if (*v == '\n')
            fputs("\\n", f);
        else
            fputc(*v, f);
    }
}

static void head(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One sample labelled with the queue. */
static void sample(FILE *f, const char *name, const char *queue,
                   unsigned long long v)
{
    fprintf(f, "%s{queue=\"", name);
    put_label(f, queue);
    fprintf(f, "\"} %llu\n", v);
}

static void one(FILE *f, const char *name, const char *type, const char *help,
                const char *queue, unsigned long long v)
{
    head(f, name, type, help);
    sample(f, name, queue, v);
}

static void build_info(FILE *f, const char *program)
{
    head(f, "mqrpc_build_info", "gauge",
         "Always 1: the mqrpc library version the program runs with.");
    fprintf(f, "mqrpc_build_info{version=\"%s\",program=\"",
            mqrpc_version_string());
    put_label(f, program);
    fputs("\"} 1\n", f);
}

/* A histogram from the library's non-cumulative buckets. */
static void histogram(FILE *f, const char *name, const char *help,
                      const char *queue, const uint64_t *buckets,
                      uint64_t sum_us)
{
    unsigned long long acc = 0;

    head(f, name, "histogram", help);
    for (unsigned i = 0; i <= MQRPC_DURATION_BUCKETS; i++) {
        acc += buckets[i];
        fprintf(f, "%s_bucket{queue=\"", name);
        put_label(f, queue);
        if (i < MQRPC_DURATION_BUCKETS)
            fprintf(f, "\",le=\"%g\"} %llu\n", bounds_s[i], acc);
        else
            fprintf(f, "\",le=\"+Inf\"} %llu\n", acc);
    }
    fprintf(f, "%s_sum{queue=\"", name);
    put_label(f, queue);
    fprintf(f, "\"} %.6f\n", (double)sum_us / 1e6);
    /* _count is the +Inf bucket, so the two always agree. */
    fprintf(f, "%s_count{queue=\"", name);
    put_label(f, queue);
    fprintf(f, "\"} %llu\n", acc);
}

void metrics_write_service(FILE *f, const struct metrics_service_info *info,
                           const mqrpc_service_stats *st)
{
    const char *q = info->queue;

    build_info(f, info->program);
    head(f, "mqrpc_requests_total", "counter",
         "Requests answered, by queue and result code (error replies "
         "included).");
    for (unsigned i = 0; i < MQRPC_CODE_COUNT; i++) {
        fputs("mqrpc_requests_total{queue=\"", f);
        put_label(f, q);
        fprintf(f, "\",code=\"%s\"} %llu\n", mqrpc_code_name(i),
                (unsigned long long)st->replies[i]);
    }
    histogram(f, "mqrpc_request_handling_seconds",
              "Time from a request's arrival in the service to its reply, "
              "of the requests a handler answered.",
              q, st->handling, st->handling_us);
    one(f, "mqrpc_requests_in_progress", "gauge",
        "Requests taken from the queue and not yet answered.", q,
        st->in_progress);
    one(f, "mqrpc_requests_expired_total", "counter",
        "Requests skipped because their caller's deadline had passed.", q,
        st->expired);
    one(f, "mqrpc_requests_redelivered_total", "counter",
        "Requests queued again after the instance that had them died.", q,
        st->redelivered);
    one(f, "mqrpc_requests_dead_lettered_total", "counter",
        "Requests moved to the dead-letter queue after too many failed "
        "deliveries.",
        q, st->dead_lettered);
    one(f, "mqrpc_requests_abandoned_total", "counter",
        "Replies not sent because the caller gave up while the handler ran.", q,
        st->abandoned);
    one(f, "mqrpc_requests_dropped_total", "counter",
        "Requests without reply_to or correlation_id, dropped.", q,
        st->dropped);
    one(f, "mqrpc_requests_handed_back_total", "counter",
        "Unstarted requests given back to the queue at a clean stop.", q,
        st->handed_back);
    one(f, "mqrpc_republish_refused_total", "counter",
        "Re-published or dead-lettered requests the broker refused (a full "
        "queue).",
        q, st->refused);
    one(f, "mqrpc_progress_messages_total", "counter",
        "Progress messages sent to callers.", q, st->progress);
    one(f, "mqrpc_consumer_cancels_total", "counter",
        "Times the broker cancelled the consumer (queue deleted).", q,
        st->cancelled);
    one(f, "mqrpc_connections_lost_total", "counter",
        "Connections to the broker lost.", q, st->lost);
    one(f, "mqrpc_connections_regained_total", "counter",
        "Connections to the broker regained after a loss.", q, st->reconnects);
    one(f, "mqrpc_broker_blocks_total", "counter",
        "Times the broker blocked a connection (resource alarm).", q,
        st->blocked);
    one(f, "mqrpc_connected", "gauge",
        "Connections of this process to the broker that are up and "
        "consuming.",
        q, st->connected);
    one(f, "mqrpc_blocked", "gauge",
        "Connections of this process the broker blocks now.", q,
        st->is_blocked);
    one(f, "mqrpc_workers", "gauge",
        "Consumers (--workers) of this process, each on its own connection.", q,
        info->workers);
    one(f, "mqrpc_max_queue", "gauge",
        "The configured --max-queue of the queue (0: unbounded).", q,
        info->max_queue);
}

void metrics_write_client(FILE *f, const char *program, const char *queue,
                          const mqrpc_client_stats *st)
{
    const unsigned nstatus = sizeof st->calls / sizeof st->calls[0];

    build_info(f, program);
    head(f, "mqrpc_client_calls_total", "counter",
         "Calls ended, by queue and result: ok, the service's error code, "
         "or the transport failure (timeout, overloaded, ...).");
    for (unsigned i = 0; i < nstatus; i++) {
        const char *name = mqrpc_errname((mqrpc_err)i);
        if (i == MQRPC_EREMOTE || strcmp(name, "unknown") == 0)
            continue;
        fputs("mqrpc_client_calls_total{queue=\"", f);
        put_label(f, queue);
        fprintf(f, "\",code=\"%s\"} %llu\n", name,
                (unsigned long long)st->calls[i]);
    }
    /* Remote codes: "ok" is not one, and "overloaded" is also the status
     * of a refused publish, whose line it joins. */
    for (unsigned i = MQRPC_CODE_OK + 1; i < MQRPC_CODE_COUNT; i++) {
        if (i == MQRPC_CODE_OVERLOADED)
            continue;
        fputs("mqrpc_client_calls_total{queue=\"", f);
        put_label(f, queue);
        fprintf(f, "\",code=\"%s\"} %llu\n", mqrpc_code_name(i),
                (unsigned long long)st->remote[i]);
    }
    histogram(f, "mqrpc_client_call_duration_seconds",
              "Time from a call's start to its end, whatever the result.",
              queue, st->duration, st->duration_us);
    one(f, "mqrpc_client_calls_in_flight", "gauge",
        "Calls started and not yet ended.", queue, st->in_flight);
    one(f, "mqrpc_client_calls_retried_total", "counter",
        "Idempotent calls sent again after a lost connection.", queue,
        st->retried);
    one(f, "mqrpc_client_replies_dropped_total", "counter",
        "Replies no call waited for (late, duplicate or foreign).", queue,
        st->dropped);
    one(f, "mqrpc_client_connections_lost_total", "counter",
        "Connections to the broker lost.", queue, st->lost);
    one(f, "mqrpc_client_connections_regained_total", "counter",
        "Connections to the broker regained after a loss.", queue,
        st->reconnects);
    one(f, "mqrpc_client_broker_blocks_total", "counter",
        "Times the broker blocked a connection (resource alarm).", queue,
        st->blocked);
    one(f, "mqrpc_client_connected", "gauge",
        "Client connections to the broker that are up.", queue,
        (unsigned long long)st->connected);
    one(f, "mqrpc_client_blocked", "gauge",
        "Client connections the broker blocks now.", queue,
        (unsigned long long)st->is_blocked);
}

void metrics_sum_service(mqrpc_service_stats *sum,
                         const mqrpc_service_stats *add)
{
    /* Only uint64_t fields (the library's promise): each adds up, gauges
     * included (connections, requests in progress). */
    uint64_t *to = (uint64_t *)sum;
    const uint64_t *from = (const uint64_t *)add;

    for (size_t i = 0; i < sizeof *sum / sizeof(uint64_t); i++)
        to[i] += from[i];
}

void metrics_sum_client(mqrpc_client_stats *sum, const mqrpc_client_stats *add)
{
    sum->dropped += add->dropped;
    sum->retried += add->retried;
    sum->lost += add->lost;
    sum->reconnects += add->reconnects;
    sum->connected += add->connected;
    sum->blocked += add->blocked;
    sum->is_blocked += add->is_blocked;
    for (size_t i = 0; i < sizeof sum->calls / sizeof sum->calls[0]; i++)
        sum->calls[i] += add->calls[i];
    for (size_t i = 0; i < MQRPC_CODE_SLOTS; i++)
        sum->remote[i] += add->remote[i];
    for (size_t i = 0; i <= MQRPC_DURATION_BUCKETS; i++)
        sum->duration[i] += add->duration[i];
    sum->duration_us += add->duration_us;
    sum->in_flight += add->in_flight;
}

/* ----------------------------------------------------------- the server */

/* Scrapes are small and rare: a few at once is plenty, and a slow or
 * stuck peer is cut off instead of holding a thread. */
#define MAX_CONNECTIONS 16
#define CONNECTION_TIMEOUT_S 10

struct metrics_server {
    struct MHD_Daemon *daemon;
    struct metrics_service_info info;
    char *queue, *program;
    pthread_mutex_t lock; /* services, n */
    mqrpc_service **services;
    unsigned n, cap;
};

static struct MHD_Response *text_response(char *text, size_t len)
{
    return MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
}

/* Runs on libmicrohttpd's thread while the services run on theirs: the
 * statistics are read through mqrpc_service_get_stats, which is safe
 * from any thread. */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn,
                                  const char *url, const char *method,
                                  const char *version, const char *upload,
                                  size_t *upload_size, void **state)
{
    struct metrics_server *m = cls;
    mqrpc_service_stats sum, st;
    struct MHD_Response *resp;
    unsigned status = MHD_HTTP_OK;
    char *text = NULL;
    size_t len = 0;
    FILE *f;
    enum MHD_Result ret;

    (void)version;
    (void)upload;
    (void)upload_size;
    (void)state;
    f = open_memstream(&text, &len);
    if (!f)
        return MHD_NO; /* out of memory: the connection is closed */
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        status = MHD_HTTP_METHOD_NOT_ALLOWED;
        fputs("only GET /metrics\n", f);
    } else if (strcmp(url, "/metrics") != 0) {
        status = MHD_HTTP_NOT_FOUND;
        fputs("not found: metrics are at /metrics\n", f);
    } else {
        memset(&sum, 0, sizeof sum);
        pthread_mutex_lock(&m->lock);
        for (unsigned i = 0; i < m->n; i++) {
            mqrpc_service_get_stats(m->services[i], &st, sizeof st);
            metrics_sum_service(&sum, &st);
        }
        pthread_mutex_unlock(&m->lock);
        metrics_write_service(f, &m->info, &sum);
    }
    if (fclose(f) != 0 || !text) {
        free(text);
        return MHD_NO;
    }
    resp = text_response(text, len);
    if (!resp) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                            status == MHD_HTTP_OK
                                ? "text/plain; version=0.0.4; charset=utf-8"
                                : "text/plain; charset=utf-8");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* Splits "HOST:PORT" or "[V6]:PORT" into host and port. */
static bool split_addr(const char *addr, char *host, size_t hostlen, char *port,
                       size_t portlen)
{
    const char *colon, *h = addr;
    size_t n;
    long v;

    if (*addr == '[') {
        const char *close = strchr(addr, ']');
        if (!close || close[1] != ':')
            return false;
        h = addr + 1;
        n = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon || strchr(addr, ':') != colon)
            return false; /* an IPv6 address needs its brackets */
        n = (size_t)(colon - addr);
    }
    if (n == 0 || n >= hostlen || !cli_parse_long(colon + 1, 1, 65535, &v))
        return false;
    memcpy(host, h, n);
    host[n] = '\0';
    snprintf(port, portlen, "%ld", v);
    return true;
}

/* The listening socket is ours, not libmicrohttpd's: its own bind failure
 * gives no reason, and "address already in use" is the one to tell. */
static int listen_on(const char *addr, const char *host, const char *port,
                     char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *res, *ai;
    int fd = -1, rc, saved = 0;

    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "--metrics %s: cannot resolve %s: %s", addr, host,
                 gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        int one = 1;
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        /* A restarted service can take its port back at once. */
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 16) == 0)
            break;
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        snprintf(err, errlen, "--metrics %s: cannot listen: %s", addr,
                 strerror(saved));
    return fd;
}

struct metrics_server *
metrics_server_start(const char *addr, const struct metrics_service_info *info,
                     enum metrics_fail *why, char *err, size_t errlen)
{
    char host[256], port[8];
    struct metrics_server *m;
    int fd;

    if (!split_addr(addr, host, sizeof host, port, sizeof port)) {
        snprintf(err, errlen,
                 "--metrics takes HOST:PORT with a port from 1 to 65535 "
                 "(e.g. 127.0.0.1:9464 or [::1]:9464), got \"%s\"",
                 addr);
        *why = METRICS_BAD_ADDRESS;
        return NULL;
    }
    *why = METRICS_CANNOT_LISTEN;
    fd = listen_on(addr, host, port, err, errlen);
    if (fd < 0)
        return NULL;
    m = calloc(1, sizeof *m);
    if (!m || !(m->queue = strdup(info->queue)) ||
        !(m->program = strdup(info->program))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    m->info = *info;
    m->info.queue = m->queue;
    m->info.program = m->program;
    pthread_mutex_init(&m->lock, NULL);
    m->daemon = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL, 0, NULL, NULL,
        on_request, m, MHD_OPTION_LISTEN_SOCKET, fd,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)MAX_CONNECTIONS,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)CONNECTION_TIMEOUT_S,
        MHD_OPTION_END);
    if (!m->daemon) {
        snprintf(err, errlen, "--metrics %s: cannot start the HTTP server",
                 addr);
        pthread_mutex_destroy(&m->lock);
        goto fail;
    }
    return m;
fail:
    if (m) {
        free(m->queue);
        free(m->program);
        free(m);
    }
    close(fd);
    return NULL;
}

void metrics_server_add(struct metrics_server *m, mqrpc_service *s)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->lock);
    if (m->n == m->cap) {
        unsigned cap = m->cap ? m->cap * 2 : 8;
        mqrpc_service **a = realloc(m->services, cap * sizeof *a);
        if (!a) {
            /* Out of memory: this worker is left out of the sums. */
            pthread_mutex_unlock(&m->lock);
            return;
        }
        m->services = a;
        m->cap = cap;
    }
    m->services[m->n++] = s;
    pthread_mutex_unlock(&m->lock);
}

void metrics_server_stop(struct metrics_server *m)
{
    if (!m)
        return;
    /* MHD_stop_daemon closes the socket we gave it. */
    MHD_stop_daemon(m->daemon);
    pthread_mutex_destroy(&m->lock);
    free(m->services);
    free(m->queue);
    free(m->program);
    free(m);
}
