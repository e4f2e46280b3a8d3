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
    "  call QUEUE JSON     send a JSON object to any queue ('-' reads stdin)";

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
        {.name = NULL},
    };
    struct cli c = {.prog = "rpc_client",
                    .usage = "[OPTIONS] [soma A B | media N... | busca NOME | "
                             "info | call QUEUE JSON]",
                    .summary = summary,
                    .flags = CLI_CALLER,
                    .extra = extra,
                    .verbose_help = "say which instance answered, how fast, "
                                    "and the call's trace\n"
                                    "                     (traceparent sent "
                                    "and the reply's)"};
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
    if (c.optind < argc)
        rc = run_command(&s, argc - c.optind, argv + c.optind);
    else
        rc = menu(&s);
    mqrpc_client_free(s.client);
    return rc;
}
