/*
 * rpc_client: the seed's interactive client, plus one-shot subcommands for
 * scripts. A thin program over the library's blocking call.
 */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_STDIN_BODY (64u * 1024 * 1024)

static const char summary[] =
    "Calls the soma, media, busca and info services over RabbitMQ.\n"
    "Without a command it shows the interactive menu (0, q or end of input\n"
    "quits). Commands:\n"
    "  soma A B            add two numbers\n"
    "  media N [N...]      average of a list of numbers\n"
    "  busca NOME          look a person up by name\n"
    "  info                system information of the answering instance\n"
    "  call QUEUE JSON     send a JSON object to any queue ('-' reads stdin)\n"
    "Operating (README, Health and discovery; --timeout defaults to 1000 "
    "here):\n"
    "  ping [QUEUE]        every live instance (of QUEUE) answers: one line "
    "each\n"
    "                      (--json: one JSON object per line)\n"
    "  services [QUEUE...] every queue with live instances (and each QUEUE "
    "named):\n"
    "                      its instances and the consumers the broker counts\n"
    "                      (--json: one JSON object per queue and line)\n"
    "  health QUEUE        exit 0 when an instance of QUEUE answers in time "
    "and\n"
    "                      consumes it; else one line saying why and exit 4 "
    "(no\n"
    "                      instance), 5 (not consuming) or 8 (blocked)";

/* --timeout of ping, services and health when not given: a live instance
 * answers within a few ms, and a probe should not hang around. */
#define CONTROL_TIMEOUT_MS 1000
/* cli.timeout_ms before parsing: tells "not given" from any value. */
#define TIMEOUT_UNSET (-1)

/* --------------------------------------------------------------- values */

/* A number typed by the user: an integer when it is one (so 10 + 5 is 15,
 * not 15.0, as in the seed), else a finite real; NULL if neither. */
static json_t *parse_number(const char *s)
{
    char *end;
    long long i;
    double d;

    while (*s == ' ' || *s == '\t')
        s++;
    if (!*s)
        return NULL;
    errno = 0;
    i = strtoll(s, &end, 10);
    if (end != s && *end == '\0') {
        /* An integer that does not fit in 64 bits is refused rather than
         * silently rounded to a real. */
        return errno ? NULL : json_integer(i);
    }
    errno = 0;
    d = strtod(s, &end);
    if (errno || end == s || *end != '\0' || !isfinite(d))
        return NULL;
    return json_real(d);
}

/* Splits a line like "10 20 30" (commas allowed) into a JSON array. */
static json_t *parse_list(char **words, int n, char *bad, size_t badlen)
{
    json_t *arr = json_array();

    for (int i = 0; i < n; i++) {
        char *save = NULL, *tok;
        for (tok = strtok_r(words[i], " \t,", &save); tok;
             tok = strtok_r(NULL, " \t,", &save)) {
            json_t *v = parse_number(tok);
            if (!v) {
                snprintf(bad, badlen, "%s", tok);
                json_decref(arr);
                return NULL;
            }
            json_array_append_new(arr, v);
        }
    }
    return arr;
}

/* ---------------------------------------------------------------- calls */

struct session {
    struct cli *cli;
    mqrpc_call_opts call; /* --traceparent, --tracestate */
    mqrpc_client *client;
    bool json;      /* --json */
    bool bar_shown; /* a progress bar is on the terminal's last line */
};

/* Progress of a long call, on stderr so stdout stays the result: a bar
 * redrawn in place on a terminal, one line per message otherwise (-v). */
static void on_progress(void *call_arg, double percent, const char *text,
                        void *arg)
{
    struct session *s = arg;
    char bar[21];
    int filled = (int)(percent / 5);

    (void)call_arg;
    if (!isatty(STDERR_FILENO)) {
        fprintf(stderr, "progress: %.0f%%%s%s\n", percent, *text ? " " : "",
                text);
        return;
    }
    for (int i = 0; i < 20; i++)
        bar[i] = i < filled ? '#' : '.';
    bar[20] = '\0';
    /* \033[K clears what a longer text left on the line. */
    fprintf(stderr, "\r[%s] %3.0f%% %.60s\033[K", bar, percent, text);
    fflush(stderr);
    s->bar_shown = true;
}

/* The library's log lines (reconnections, a blocking broker): the outcome
 * of each call is reported anyway, so they show only with -v. */
static void log_line(mqrpc_log_level level, const char *line, void *arg)
{
    struct session *s = arg;
    (void)level;
    if (s->cli->verbose)
        cli_error(s->cli, "%s", line);
}

static mqrpc_err ensure_connected(struct session *s)
{
    mqrpc_client_opts o;
    mqrpc_err e;

    /* Once connected, the library reconnects by itself. */
    if (s->client)
        return MQRPC_OK;
    mqrpc_client_opts_init(&o);
    o.url = s->cli->url_file ? NULL : s->cli->url;
    o.url_file = s->cli->url_file;
    o.heartbeat_s = s->cli->heartbeat_s;
    o.tls = s->cli->tls;
    o.durable = s->cli->durable;
    o.retries = s->cli->retries;
    o.log = log_line;
    o.log_arg = s;
    o.progress = on_progress;
    o.progress_arg = s;
    s->client = mqrpc_client_new(&o);
    if (!s->client) {
        cli_error(s->cli, "out of memory");
        return MQRPC_ENOMEM;
    }
    e = mqrpc_client_connect(s->client);
    if (e != MQRPC_OK) {
        cli_error(s->cli, "%s%s", mqrpc_client_errmsg(s->client),
                  cli_connect_hint(e));
        mqrpc_client_free(s->client);
        s->client = NULL;
    }
    return e;
}

static void print_failure(struct session *s, const mqrpc_reply *r)
{
    mqrpc_err e = mqrpc_reply_status(r);
    const char *q = mqrpc_reply_queue(r);
    uint32_t consumers = 0, waiting = 0;

    if (e == MQRPC_EREMOTE) {
        cli_error(s->cli, "%s: %s: %s", q, mqrpc_reply_error_code(r),
                  mqrpc_reply_error_message(r));
    } else if (e == MQRPC_ETIMEOUT &&
               mqrpc_client_queue_info(s->client, q, &waiting, &consumers) ==
                   MQRPC_OK) {
        /* Zero consumers and a long timeout call for different fixes than
         * busy ones: say which it is. */
        cli_error(s->cli, "%s (%u instance%s consuming, %u request%s waiting)",
                  mqrpc_reply_error_message(r), consumers,
                  consumers == 1 ? "" : "s", waiting, waiting == 1 ? "" : "s");
    } else {
        cli_error(s->cli, "%s", mqrpc_reply_error_message(r));
    }
}

/* The four services only read: running a request twice does no harm, so
 * --retries may re-send it. A queue this program does not know may do
 * anything: its calls are never re-sent. */
static unsigned call_flags(const char *queue)
{
    static const char *const readers[] = {"service_soma", "service_media",
                                          "service_busca", "service_info"};

    for (size_t i = 0; i < sizeof readers / sizeof *readers; i++)
        if (strcmp(queue, readers[i]) == 0)
            return MQRPC_CALL_IDEMPOTENT;
    return 0;
}

/* Sends body to queue and prints the result (prefix "Resultado: " in the
 * menu). Returns the exit code of the call. */
static int do_call(struct session *s, const char *queue, const char *body,
                   size_t len, const char *prefix)
{
    struct timespec t0, t1;
    mqrpc_reply *r = NULL;
    mqrpc_err e;
    int rc;

    e = ensure_connected(s);
    if (e != MQRPC_OK)
        return cli_exit_code(e);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* Services that report progress send it only when asked: asked when
     * someone watches (a terminal), or with -v; a script's stderr stays
     * the one line of an error. */
    e = mqrpc_call_ex(s->client, queue, body, len, s->cli->timeout_ms,
                      call_flags(queue) |
                          (isatty(STDERR_FILENO) || s->cli->verbose
                               ? MQRPC_CALL_PROGRESS
                               : 0),
                      &s->call, &r);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (s->bar_shown) {
        fputs("\r\033[K", stderr);
        s->bar_shown = false;
    }
    if (!r) {
        cli_error(s->cli, "%s", mqrpc_strerror(e));
        return cli_exit_code(e);
    }
    if (e == MQRPC_OK) {
        char *text = json_dumps(mqrpc_reply_result(r), JSON_ENCODE_ANY);
        printf("%s%s\n", prefix, text ? text : "?");
        fflush(stdout);
        free(text);
    } else {
        print_failure(s, r);
    }
    if (s->cli->verbose && mqrpc_reply_app_id(r))
        fprintf(stderr, "answered by %s in %.1f ms\n", mqrpc_reply_app_id(r),
                (double)(t1.tv_sec - t0.tv_sec) * 1e3 +
                    (double)(t1.tv_nsec - t0.tv_nsec) / 1e6);
    if (s->cli->verbose && mqrpc_reply_call_traceparent(r))
        /* The service's span, when it answered with one: its id is what
         * to look for in the service's log lines. */
        fprintf(stderr, "traceparent %s, reply traceparent %s\n",
                mqrpc_reply_call_traceparent(r),
                mqrpc_reply_traceparent(r) ? mqrpc_reply_traceparent(r)
                                           : "none");
    rc = cli_exit_code(e);
    mqrpc_reply_free(r);
    return rc;
}

static int call_json(struct session *s, const char *queue, json_t *req,
                     const char *prefix)
{
    char *body = json_dumps(req, JSON_COMPACT);
    int rc;

    json_decref(req);
    if (!body) {
        cli_error(s->cli, "out of memory");
        return CLI_EXIT_FAILURE;
    }
    rc = do_call(s, queue, body, strlen(body), prefix);
    free(body);
    return rc;
}

/* ------------------------------------------------------------ operating */

static int strcmp_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static const char *str_field(json_t *o, const char *k)
{
    const char *v = json_string_value(json_object_get(o, k));
    return v ? v : "?";
}

static long long int_field(json_t *o, const char *k)
{
    return (long long)json_integer_value(json_object_get(o, k));
}

/* One instance's answer, as one line of key=value words. */
static void print_instance(json_t *a, const char *indent)
{
    printf("%s%s queue=%s host=%s pid=%lld version=%s uptime=%.1fs "
           "served=%lld in_progress=%lld consuming=%s blocked=%s broker=%s "
           "cluster=%s\n",
           indent, str_field(a, "instance"), str_field(a, "queue"),
           str_field(a, "host"), int_field(a, "pid"), str_field(a, "version"),
           (double)int_field(a, "uptime_ms") / 1e3, int_field(a, "served"),
           int_field(a, "in_progress"),
           json_is_true(json_object_get(a, "consuming")) ? "yes" : "no",
           json_is_true(json_object_get(a, "blocked")) ? "yes" : "no",
           str_field(a, "broker"), str_field(a, "cluster"));
}

static void print_json_line(json_t *j)
{
    char *t = json_dumps(j, JSON_COMPACT);
    printf("%s\n", t ? t : "null");
    free(t);
}

/* Pings (queue NULL: every instance). Returns the answers, or NULL after
 * reporting the failure in *rc. */
static json_t *ping(struct session *s, const char *queue, int *rc)
{
    json_t *answers = NULL;
    mqrpc_err e = ensure_connected(s);

    if (e != MQRPC_OK) {
        *rc = cli_exit_code(e);
        return NULL;
    }
    e = mqrpc_client_ping(s->client, queue, s->cli->timeout_ms, &answers);
    if (e != MQRPC_OK && json_array_size(answers) == 0) {
        /* The reason of a probe's failure comes first: "blocked: ...". */
        cli_error(s->cli, "%s%s%s%s", queue ? queue : "", queue ? ": " : "",
                  e == MQRPC_EBLOCKED ? "blocked: " : "",
                  mqrpc_client_errmsg(s->client));
        json_decref(answers);
        *rc = cli_exit_code(e);
        return NULL;
    }
    return answers;
}

static int cmd_ping(struct session *s, const char *queue)
{
    int rc = CLI_EXIT_OK;
    json_t *answers = ping(s, queue, &rc), *a;
    size_t i;

    if (!answers)
        return rc;
    json_array_foreach (answers, i, a) {
        if (s->json)
            print_json_line(a);
        else
            print_instance(a, "");
    }
    fflush(stdout);
    if (json_array_size(answers) == 0) {
        cli_error(s->cli, "no instance%s%s answered within %d ms",
                  queue ? " of " : "", queue ? queue : "", s->cli->timeout_ms);
        rc = CLI_EXIT_TIMEOUT;
    }
    json_decref(answers);
    return rc;
}

/* What the broker says of queue: *exists, and its consumers and waiting
 * requests. false after reporting a failure other than "no such queue". */
static bool queue_state(struct session *s, const char *queue, bool *exists,
                        uint32_t *consumers, uint32_t *waiting, int *rc)
{
    mqrpc_err e = mqrpc_client_queue_info(s->client, queue, waiting, consumers);

    *exists = e == MQRPC_OK;
    if (e == MQRPC_OK || e == MQRPC_ENOROUTE)
        return true;
    cli_error(s->cli, "%s: %s", queue, mqrpc_client_errmsg(s->client));
    *rc = cli_exit_code(e);
    return false;
}

static int cmd_services(struct session *s, int nq, char **queues)
{
    int rc = CLI_EXIT_OK;
    json_t *answers = ping(s, NULL, &rc), *byq, *a, *list;
    const char *q;
    size_t i;

    if (!answers)
        return rc;
    /* Queues by name (sorted by the object's keys when dumped, but the
     * iteration order is not: collect, then sort the names). */
    byq = json_object();
    json_array_foreach (answers, i, a) {
        q = str_field(a, "queue");
        if (!json_object_get(byq, q))
            json_object_set_new(byq, q, json_array());
        json_array_append(json_object_get(byq, q), a);
    }
    for (int k = 0; k < nq; k++)
        if (!json_object_get(byq, queues[k]))
            json_object_set_new(byq, queues[k], json_array());
    if (json_object_size(byq) == 0) {
        cli_error(s->cli,
                  "no instance answered within %d ms (a queue without a live "
                  "instance can be looked up by name: services QUEUE)",
                  s->cli->timeout_ms);
        json_decref(byq);
        json_decref(answers);
        return CLI_EXIT_TIMEOUT;
    }
    {
        size_t n = json_object_size(byq), j = 0;
        const char **names = malloc(n * sizeof *names);
        if (!names) {
            cli_error(s->cli, "out of memory");
            json_decref(byq);
            json_decref(answers);
            return CLI_EXIT_FAILURE;
        }
        json_object_foreach (byq, q, list)
            names[j++] = q;
        qsort(names, n, sizeof *names, strcmp_ptr);
        for (j = 0; j < n && rc == CLI_EXIT_OK; j++) {
            uint32_t consumers = 0, waiting = 0;
            bool exists;
            size_t live;
            q = names[j];
            list = json_object_get(byq, q);
            live = json_array_size(list);
            if (!queue_state(s, q, &exists, &consumers, &waiting, &rc))
                break;
            if (s->json) {
                json_t *o = json_pack("{s:s, s:b, s:I, s:I, s:O}", "queue", q,
                                      "exists", exists, "consumers",
                                      (json_int_t)consumers, "waiting",
                                      (json_int_t)waiting, "instances", list);
                print_json_line(o);
                json_decref(o);
                continue;
            }
            if (!exists) {
                printf("%s instances=%zu (no such queue)\n", q, live);
            } else {
                printf("%s instances=%zu consumers=%u waiting=%u", q, live,
                       consumers, waiting);
                /* An mqrpc instance is one consumer (one connection). */
                if (consumers > live)
                    printf(" (%u consumer%s without a live mqrpc instance)",
                           (unsigned)(consumers - live),
                           consumers - live == 1 ? "" : "s");
                putchar('\n');
            }
            json_array_foreach (list, i, a)
                print_instance(a, "  ");
        }
        free(names);
    }
    fflush(stdout);
    json_decref(byq);
    json_decref(answers);
    return rc;
}

static int cmd_health(struct session *s, const char *queue)
{
    int rc = CLI_EXIT_OK;
    json_t *answers = ping(s, queue, &rc), *a;
    size_t i, n, consuming = 0, blocked = 0;
    uint32_t consumers = 0, waiting = 0;
    bool exists;

    if (!answers)
        return rc;
    n = json_array_size(answers);
    json_array_foreach (answers, i, a) {
        if (!json_is_true(json_object_get(a, "consuming")))
            continue;
        consuming++;
        if (json_is_true(json_object_get(a, "blocked")))
            blocked++;
    }
    json_decref(answers);
    if (n == 0) {
        char why[128] = "";
        if (queue_state(s, queue, &exists, &consumers, &waiting, &rc)) {
            if (!exists)
                snprintf(why, sizeof why, " (no such queue)");
            else
                snprintf(why, sizeof why,
                         " (the broker counts %u consumer%s, %u request%s "
                         "waiting)",
                         consumers, consumers == 1 ? "" : "s", waiting,
                         waiting == 1 ? "" : "s");
        }
        cli_error(s->cli, "%s: no instance answered within %d ms%s", queue,
                  s->cli->timeout_ms, why);
        return CLI_EXIT_TIMEOUT;
    }
    if (consuming == 0) {
        cli_error(s->cli,
                  "%s: not consuming: %zu instance%s answered, none consumes "
                  "the queue",
                  queue, n, n == 1 ? "" : "s");
        return CLI_EXIT_NOSERVICE;
    }
    if (blocked == consuming) {
        cli_error(s->cli,
                  "%s: blocked: the broker blocks the connection of every "
                  "consuming instance (connection.blocked)",
                  queue);
        return CLI_EXIT_BLOCKED;
    }
    printf("%s: healthy: %zu instance%s answered within %d ms, %zu "
           "consuming\n",
           queue, n, n == 1 ? "" : "s", s->cli->timeout_ms,
           consuming - blocked);
    return CLI_EXIT_OK;
}

/* ------------------------------------------------------------- commands */

static int usage_error(struct session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int usage_error(struct session *s, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", s->cli->prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (try --help)\n");
    return CLI_EXIT_USAGE;
}

static char *read_all(FILE *f, size_t *len)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);

    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
        if (n == cap) {
            char *nb = cap >= MAX_STDIN_BODY ? NULL : realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
    }
    *len = n;
    return buf;
}

static int cmd_call(struct session *s, const char *queue, const char *arg)
{
    size_t len;
    char *body = NULL;
    int rc;

    if (strcmp(arg, "-") == 0) {
        body = read_all(stdin, &len);
        if (!body) {
            cli_error(s->cli,
                      "cannot read the body from stdin (over %u bytes?)",
                      MAX_STDIN_BODY);
            return CLI_EXIT_USAGE;
        }
        arg = body;
    } else {
        len = strlen(arg);
    }
    if (!s->cli->raw) {
        json_error_t jerr;
        json_t *v = json_loadb(arg, len, JSON_DECODE_ANY, &jerr);
        if (!v || !json_is_object(v)) {
            if (v)
                cli_error(s->cli, "the body must be a JSON object");
            else
                cli_error(s->cli, "the body is not valid JSON: %s", jerr.text);
            json_decref(v);
            free(body);
            return CLI_EXIT_USAGE;
        }
        json_decref(v);
    }
    rc = do_call(s, queue, arg, len, "");
    free(body);
    return rc;
}

static int run_command(struct session *s, int argc, char **argv)
{
    const char *cmd = argv[0];
    char bad[128];

    if (strcmp(cmd, "ping") == 0 || strcmp(cmd, "services") == 0 ||
        strcmp(cmd, "health") == 0) {
        if (s->cli->timeout_ms == TIMEOUT_UNSET)
            s->cli->timeout_ms = CONTROL_TIMEOUT_MS;
        for (int i = 1; i < argc; i++)
            if (!*argv[i] || strlen(argv[i]) > 255)
                return usage_error(s, "queue name must be 1 to 255 bytes");
        if (cmd[0] == 'p') {
            if (argc > 2)
                return usage_error(s, "ping takes at most one queue: ping "
                                      "[QUEUE]");
            return cmd_ping(s, argc == 2 ? argv[1] : NULL);
        }
        if (cmd[0] == 's')
            return cmd_services(s, argc - 1, argv + 1);
        if (argc != 2)
            return usage_error(s, "health takes one queue: health QUEUE");
        return cmd_health(s, argv[1]);
    }
    if (s->cli->timeout_ms == TIMEOUT_UNSET)
        s->cli->timeout_ms = MQRPC_DEFAULT_TIMEOUT_MS;

    if (strcmp(cmd, "soma") == 0) {
        json_t *a, *b;
        if (argc != 3)
            return usage_error(s, "soma takes two numbers: soma A B");
        a = parse_number(argv[1]);
        b = parse_number(argv[2]);
        if (!a || !b) {
            json_decref(a);
            json_decref(b);
            return usage_error(
                s, "not a number, or an integer beyond 64 bits: \"%s\"",
                !a ? argv[1] : argv[2]);
        }
        return call_json(s, "service_soma",
                         json_pack("{s:o,s:o}", "a", a, "b", b), "");
    }
    if (strcmp(cmd, "media") == 0) {
        json_t *list;
        if (argc < 2)
            return usage_error(s, "media takes at least one number");
        list = parse_list(argv + 1, argc - 1, bad, sizeof bad);
        if (!list)
            return usage_error(
                s, "not a number, or an integer beyond 64 bits: \"%s\"", bad);
        return call_json(s, "service_media",
                         json_pack("{s:o}", "numeros", list), "");
    }
    if (strcmp(cmd, "busca") == 0) {
        json_t *req;
        if (argc != 2)
            return usage_error(s, "busca takes one name: busca NOME");
        req = json_pack("{s:s}", "nome", argv[1]);
        if (!req)
            return usage_error(s, "the name is not valid UTF-8: \"%s\"",
                               argv[1]);
        return call_json(s, "service_busca", req, "");
    }
    if (strcmp(cmd, "info") == 0) {
        if (argc != 1)
            return usage_error(s, "info takes no arguments");
        return call_json(s, "service_info", json_object(), "");
    }
    if (strcmp(cmd, "call") == 0) {
        if (argc != 3)
            return usage_error(s, "call takes a queue and a JSON object: call "
                                  "QUEUE JSON");
        if (!*argv[1] || strlen(argv[1]) > 255)
            return usage_error(s, "queue name must be 1 to 255 bytes");
        return cmd_call(s, argv[1], argv[2]);
    }
    return usage_error(s, "unknown command \"%s\"", cmd);
}

/* ----------------------------------------------------------------- menu */

/* Reads lines from fd without stdio buffering, so that poll() on fd tells
 * the truth, and keeps the AMQP heartbeat going while the user thinks. */
struct line_reader {
    int fd;
    char buf[8192];
    size_t len;
    bool eof;
};

/* Returns a NUL-terminated line without its newline (valid until the next
 * call), or NULL at end of input. */
static char *read_line(struct line_reader *lr, struct session *s)
{
    static char line[8192];

    for (;;) {
        char *nl = memchr(lr->buf, '\n', lr->len);
        if (nl || (lr->eof && lr->len)) {
            size_t n = nl ? (size_t)(nl - lr->buf) : lr->len;
            memcpy(line, lr->buf, n);
            line[n] = '\0';
            if (n && line[n - 1] == '\r')
                line[n - 1] = '\0';
            lr->len -= nl ? n + 1 : n;
            memmove(lr->buf, lr->buf + (nl ? n + 1 : n), lr->len);
            return line;
        }
        if (lr->eof)
            return NULL;
        if (lr->len == sizeof lr->buf) {
            lr->len = 0; /* an absurdly long line: drop it */
            continue;
        }
        struct pollfd p[2] = {{lr->fd, POLLIN, 0}, {-1, POLLIN, 0}};
        int timeout = -1;
        if (s->client && mqrpc_client_fd(s->client) >= 0) {
            p[1].fd = mqrpc_client_fd(s->client);
            timeout = mqrpc_client_next_timeout_ms(s->client);
        }
        if (poll(p, 2, timeout) < 0 && errno != EINTR)
            return NULL;
        if (p[1].fd >= 0 && (p[1].revents || timeout >= 0)) {
            /* Heartbeats, or the broker going away (closed, or silent for
             * two heartbeat intervals): a lost connection is reopened at
             * the next call. */
            mqrpc_client_process(s->client, 0);
            if (mqrpc_client_fd(s->client) < 0)
                cli_error(s->cli,
                          "%s; reconnecting at the next call",
                          mqrpc_client_errmsg(s->client));
        }
        if (p[0].revents) {
            ssize_t got =
                read(lr->fd, lr->buf + lr->len, sizeof lr->buf - lr->len);
            if (got < 0 && errno == EINTR)
                continue;
            if (got <= 0)
                lr->eof = true;
            else
                lr->len += (size_t)got;
        }
    }
}

static char *prompt(struct line_reader *lr, struct session *s, const char *text)
{
    fputs(text, stdout);
    fflush(stdout);
    return read_line(lr, s);
}

static int menu(struct session *s)
{
    struct line_reader lr = {.fd = STDIN_FILENO};
    char *line, bad[128];

    if (s->cli->timeout_ms == TIMEOUT_UNSET)
        s->cli->timeout_ms = MQRPC_DEFAULT_TIMEOUT_MS;
    /* Connect up front so that a dead broker is reported before any typing,
     * then stay connected across calls. */
    if (ensure_connected(s) != MQRPC_OK)
        return CLI_EXIT_BROKER;
    for (;;) {
        fputs("\n=== Cliente RPC ===\n1 - Soma\n2 - Média\n3 - Busca\n"
              "4 - Info do Servidor\n\n",
              stdout);
        line = prompt(&lr, s, "Escolha o serviço: ");
        if (!line)
            break;
        line += strspn(line, " \t");
        if (strcmp(line, "0") == 0 || strcmp(line, "q") == 0)
            break;
        if (strcmp(line, "1") == 0) {
            json_t *a, *b;
            char *t;
            if (!(t = prompt(&lr, s, "A: ")))
                break;
            a = parse_number(t);
            if (!a) {
                printf("invalid number \"%s\"\n", t);
                continue;
            }
            if (!(t = prompt(&lr, s, "B: "))) {
                json_decref(a);
                break;
            }
            b = parse_number(t);
            if (!b) {
                printf("invalid number \"%s\"\n", t);
                json_decref(a);
                continue;
            }
            call_json(s, "service_soma", json_pack("{s:o,s:o}", "a", a, "b", b),
                      "Resultado: ");
        } else if (strcmp(line, "2") == 0) {
            char *t = prompt(&lr, s, "Lista (ex: 1 2 3): ");
            json_t *list;
            if (!t)
                break;
            list = parse_list(&t, 1, bad, sizeof bad);
            if (!list) {
                printf("invalid number \"%s\"\n", bad);
                continue;
            }
            call_json(s, "service_media", json_pack("{s:o}", "numeros", list),
                      "Resultado: ");
        } else if (strcmp(line, "3") == 0) {
            char *t = prompt(&lr, s, "Nome para buscar: ");
            json_t *req;
            if (!t)
                break;
            req = json_pack("{s:s}", "nome", t);
            if (!req) {
                printf("the name is not valid UTF-8\n");
                continue;
            }
            call_json(s, "service_busca", req, "Resultado: ");
        } else if (strcmp(line, "4") == 0) {
            call_json(s, "service_info", json_object(), "Resultado: ");
        } else {
            printf("invalid choice \"%s\": type 1 to 4, or 0 or q to quit\n",
                   line);
        }
        fflush(stdout);
    }
    fputc('\n', stdout);
    return CLI_EXIT_OK;
}

int main(int argc, char **argv)
{
    struct cli_extra extra[] = {
        {.name = "traceparent",
         .arg = "VALUE",
         .help = "continue this W3C trace: 00-<32 hex trace id>-<16 hex\n"
                 "                     parent id>-<2 hex flags> (default: "
                 "each call starts one)"},
        {.name = "tracestate",
         .arg = "VALUE",
         .help = "W3C tracestate sent with --traceparent"},
        {.name = "json", .help = "ping, services: JSON lines instead of text"},
        {.name = NULL},
    };
    struct cli c = {.prog = "rpc_client",
                    .usage = "[OPTIONS] [soma A B | media N... | busca NOME | "
                             "info | call QUEUE JSON |\n"
                             "                  ping [QUEUE] | services "
                             "[QUEUE...] | health QUEUE]",
                    .summary = summary,
                    .flags = CLI_CALLER,
                    .extra = extra,
                    .verbose_help = "say which instance answered, how fast, "
                                    "and the call's trace\n"
                                    "                     (traceparent sent "
                                    "and the reply's)",
                    .timeout_ms = TIMEOUT_UNSET};
    struct session s = {.cli = &c};
    int rc;

    rc = cli_parse(&c, argc, argv);
    if (rc >= 0)
        return rc;
    mqrpc_call_opts_init(&s.call);
    s.call.traceparent = extra[0].value;
    s.call.tracestate = extra[1].value;
    if (s.call.traceparent && !mqrpc_traceparent_valid(s.call.traceparent)) {
        cli_error(&c,
                  "--traceparent: not a W3C traceparent "
                  "(00-<32 hex>-<16 hex>-<2 hex>, lowercase, ids not all "
                  "zero): \"%.80s\"",
                  s.call.traceparent);
        return CLI_EXIT_USAGE;
    }
    if (s.call.tracestate &&
        (!s.call.traceparent || !*s.call.tracestate ||
         strlen(s.call.tracestate) > MQRPC_TRACESTATE_MAX ||
         strspn(s.call.tracestate,
                " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                "[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~") !=
             strlen(s.call.tracestate))) {
        cli_error(&c, "--tracestate needs --traceparent and 1 to %d "
                      "printable ASCII characters",
                  MQRPC_TRACESTATE_MAX);
        return CLI_EXIT_USAGE;
    }
    s.json = extra[2].value != NULL;
    if (c.optind < argc)
        rc = run_command(&s, argc - c.optind, argv + c.optind);
    else
        rc = menu(&s);
    mqrpc_client_free(s.client);
    return rc;
}
