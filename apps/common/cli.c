#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    OPT_URL = 1000,
    OPT_TIMEOUT,
    OPT_HEARTBEAT,
    OPT_QUEUE,
    OPT_PREFETCH,
    OPT_WORKERS,
    OPT_THREADS,
    OPT_MAX_BODY,
    OPT_MAX_DEPTH,
    OPT_MAX_STRING,
    OPT_RAW,
    OPT_VERSION,
    OPT_URL_FILE,
    OPT_CACERT,
    OPT_CERT,
    OPT_KEY,
    OPT_INSECURE,
    OPT_DURABLE,
    OPT_RETRIES,
    OPT_MAX_QUEUE,
    OPT_MAX_DELIVERIES,
    OPT_CONNECT_TIMEOUT,
    OPT_METRICS,
    OPT_QUEUE_TYPE,
    OPT_EXTRA /* + index of the extra option */
};

void cli_error(const struct cli *c, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", c->prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

bool cli_parse_long(const char *s, long min, long max, long *out)
{
    char *end;
    long v;

    if (!s || !*s)
        return false;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return false;
    *out = v;
    return true;
}

void cli_on_stop_signals(void (*on_stop)(int))
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* Overwrites the password of one URL (arg, NUL-terminated) with '*';
 * returns whether it had one. */
static bool scrub_one(char *arg)
{
    char shown[2048];
    const char *mask;
    size_t start, end;

    /* Where the password is, by the one rule mqrpc_url_redact applies:
     * its output is arg with the password's bytes replaced by "****". */
    mqrpc_url_redact(arg, shown, sizeof shown);
    mask = strstr(shown, ":****@");
    if (!mask)
        return false;
    start = (size_t)(mask - shown) + 1;
    end = strlen(arg) - strlen(mask + 5);
    if (end <= start)
        return false;
    memset(arg + start, '*', end - start);
    return true;
}

/* The start of the next URL of a list after p (a ','): blanks, then a
 * scheme; the library's rule (mqrpc.h, Broker URLs). */
static bool next_entry(const char *p)
{
    size_t n;

    p += strspn(p, " \t");
    n = strspn(p, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                  "0123456789+-.");
    return n > 0 && strncmp(p + n, "://", 3) == 0;
}

/* A password typed into --url is visible to every local user in ps and
 * /proc/PID/cmdline: say so, and overwrite it in our argv (as mysql does)
 * to shorten the window; every entry of a list. The copy in url_buf_ is
 * the one used. */
static void scrub_password(struct cli *c, char *arg)
{
    bool any = false;
    char *p = arg;

    for (;;) {
        char one[2048], *comma = p;
        size_t n;
        while ((comma = strchr(comma, ',')) && !next_entry(comma + 1))
            comma++;
        n = comma ? (size_t)(comma - p) : strlen(p);
        if (n < sizeof one) {
            /* On a copy: arg is written to only where a password was. */
            memcpy(one, p, n);
            one[n] = '\0';
            if (scrub_one(one)) {
                for (size_t i = 0; i < n; i++)
                    if (one[i] != p[i])
                        p[i] = one[i];
                any = true;
            }
        }
        if (!comma)
            break;
        p = comma + 1;
    }
    if (any)
        cli_error(c, "warning: a password in --url can be seen by other "
                     "users (ps); use AMQP_URL or --url-file");
}

/* After parsing: the URL file, and warnings about the connection's
 * security, which go to stderr before anything connects. */
static int check_url(struct cli *c)
{
    mqrpc_role role =
        c->flags & CLI_SERVICE ? MQRPC_ROLE_SERVICE : MQRPC_ROLE_CLIENT;
    char url[4096], err[640], where[300];
    const char *source = NULL;

    if (c->url_file) {
        if (c->url) {
            cli_error(c, "give --url or --url-file, not both");
            return CLI_EXIT_USAGE;
        }
        if (mqrpc_url_file_read(c->url_file, c->url_buf_, sizeof c->url_buf_,
                                err, sizeof err) != MQRPC_OK) {
            cli_error(c, "%s", err);
            return CLI_EXIT_USAGE;
        }
        c->url = c->url_buf_;
    }
    if (c->tls.insecure)
        cli_error(c, "WARNING: --insecure: the broker's certificate and host "
                     "name are NOT verified; anyone on the path can read and "
                     "change the traffic. For tests only.");
    if (mqrpc_default_url(c->url, role, url, sizeof url, &source) !=
        MQRPC_OK)
        return -1; /* the connection says why, with the reason */
    /* Every entry of a list now, with where it came from: not when its
     * turn comes, maybe hours later. */
    if (mqrpc_url_check(url, &c->tls, err, sizeof err) != MQRPC_OK) {
        if (c->url_file)
            snprintf(where, sizeof where, "URL file %s", c->url_file);
        else if (strcmp(source, "state file") == 0)
            snprintf(where, sizeof where, "the private broker's URL file");
        else
            snprintf(where, sizeof where, "%s", source);
        cli_error(c, "%s: %s", where, err);
        return CLI_EXIT_USAGE;
    }
    if (mqrpc_url_plaintext_remote(url)) {
        char shown[2048];
        mqrpc_url_redact(url, shown, sizeof shown);
        cli_error(c,
                  "warning: %s is not encrypted: the password and every "
                  "message cross the network in clear; use amqps://",
                  shown);
    }
    return -1;
}

int cli_exit_code(mqrpc_err e)
{
    switch (e) {
    case MQRPC_OK: return CLI_EXIT_OK;
    case MQRPC_EREMOTE: return CLI_EXIT_REMOTE;
    case MQRPC_EINVAL:
    case MQRPC_EURL: return CLI_EXIT_USAGE;
    case MQRPC_ECONNECT:
    case MQRPC_ETLS:
    case MQRPC_EAUTH:
    case MQRPC_EACCESS:
    case MQRPC_ECLOSED: return CLI_EXIT_BROKER;
    case MQRPC_ETIMEOUT: return CLI_EXIT_TIMEOUT;
    case MQRPC_ENOROUTE: return CLI_EXIT_NOSERVICE;
    case MQRPC_EOVERLOAD: return CLI_EXIT_OVERLOAD;
    case MQRPC_EBLOCKED: return CLI_EXIT_BLOCKED;
    default: return CLI_EXIT_FAILURE;
    }
}

const char *cli_connect_hint(mqrpc_err e)
{
    if (e == MQRPC_ECONNECT)
        return " (is the broker running? start the private one with "
               "scripts/broker.sh start, or set --url / AMQP_URL)";
    if (e == MQRPC_EACCESS)
        return " (this account may not do that: on the private broker "
               "services log in as \"services\" and use queues named "
               "service_*, callers log in as \"clients\")";
    return "";
}

static void usage(const struct cli *c, FILE *f)
{
    fprintf(f, "Usage: %s %s\n\n%s\n\nOptions:\n", c->prog, c->usage,
            c->summary);
    fprintf(f,
            "  --url URL          broker URL (else $AMQP_URL, else the "
            "private broker's,\n"
            "                     else amqp://guest:guest@localhost:5672/)\n");
    fprintf(f, "                     URL may be a comma-separated list of "
               "URLs (the nodes of a\n"
               "                     cluster): each program takes them in a "
               "random order and\n"
               "                     moves to the next when one fails (also "
               "in --url-file,\n"
               "                     AMQP_URL)\n");
    fprintf(f, "  --url-file FILE    read the URL from FILE's first line; FILE "
               "must be readable\n"
               "                     by its owner only (chmod 600). Keeps the "
               "password out of ps\n"
               "  --cacert FILE      amqps://: CAs to trust (default: the "
               "system's)\n"
               "  --cert FILE        amqps://: client certificate, for mutual "
               "TLS\n"
               "  --key FILE         amqps://: the client certificate's "
               "private key\n"
               "  --insecure         amqps://: do NOT verify the broker (tests "
               "only)\n");
    if (c->flags & (CLI_CALLER | CLI_TIMEOUT))
        fprintf(f,
                "  --timeout MS       wait at most MS for each reply "
                "(default %d)\n",
                MQRPC_DEFAULT_TIMEOUT_MS);
    if (c->flags & CLI_SERVICE) {
        fprintf(f, "  --queue NAME       queue to consume (default %s)\n",
                c->queue);
        fprintf(f, "  --prefetch N       unacknowledged requests at once "
                   "(default: --threads;\n"
                   "                     1 gives fair round-robin)\n");
        fprintf(f, "  --threads N        handlers running at once on one "
                   "connection (default 1)\n");
        fprintf(f, "  --workers N        consumers in this process, each on "
                   "its own connection\n"
                   "                     with its --threads (default 1)\n");
        fprintf(f,
                "  --max-body BYTES   larger requests get bad_request "
                "(default %u)\n",
                MQRPC_DEFAULT_MAX_BODY);
        fprintf(f,
                "  --max-depth N      requests nested deeper get bad_request "
                "(default %d)\n",
                MQRPC_DEFAULT_MAX_DEPTH);
        fprintf(f,
                "  --max-string BYTES requests with a longer string or key "
                "get bad_request\n"
                "                     (default %u)\n",
                MQRPC_DEFAULT_MAX_STRING);
        fprintf(f, "  --durable          durable queue: it and its persistent "
                   "requests survive a\n"
                   "                     broker restart (every instance must "
                   "agree)\n"
                   "  --max-queue N      at most N requests wait; callers get "
                   "\"overloaded\" beyond\n"
                   "                     (default: no limit; every instance "
                   "must agree)\n");
        fprintf(f,
                "  --max-deliveries N a request whose instances died N times "
                "goes to <queue>.dlq\n"
                "                     (default %d)\n",
                MQRPC_DEFAULT_MAX_DELIVERIES);
        fprintf(f, "  --queue-type classic|quorum\n"
                   "                     quorum: a durable queue replicated "
                   "over a cluster's nodes,\n"
                   "                     whose broker counts deliveries "
                   "(x-delivery-limit); default\n"
                   "                     classic, as the seed's services "
                   "declare it (every instance\n"
                   "                     must agree, and on "
                   "--max-deliveries for quorum)\n");
        fprintf(f, "  --connect-timeout MS\n"
                   "                     give up (exit 3) when the broker "
                   "cannot be reached within\n"
                   "                     MS ms at start (default: keep "
                   "trying; 0: one attempt)\n");
        fprintf(f, "  --metrics HOST:PORT serve Prometheus metrics on "
                   "http://HOST:PORT/metrics\n"
                   "                     (default: off; no authentication: "
                   "loopback or a private\n"
                   "                     network only)\n");
    }
    for (const struct cli_extra *x = c->extra; x && x->name; x++) {
        char flag[64];
        bool dflt = x->arg && x->value;
        if (x->short_name)
            snprintf(flag, sizeof flag, "-%c, --%s%s%s", x->short_name, x->name,
                     x->arg ? " " : "", x->arg ? x->arg : "");
        else
            snprintf(flag, sizeof flag, "--%s%s%s", x->name, x->arg ? " " : "",
                     x->arg ? x->arg : "");
        fprintf(f, "  %-18s %s%s%s%s\n", flag, x->help,
                dflt ? " (default " : "", dflt ? x->value : "",
                dflt ? ")" : "");
    }
    fprintf(f,
            "  --heartbeat S      AMQP heartbeat in seconds, 0 to disable "
            "(default %d)\n",
            MQRPC_DEFAULT_HEARTBEAT);
    if (c->flags & CLI_CALLER)
        fprintf(f,
                "  --raw              send the body of 'call' unchecked\n"
                "  --retries N        re-send an idempotent call up to N "
                "times after a lost\n"
                "                     connection (default 0)\n"
                "  --durable          persistent requests and a reply queue "
                "that survives a\n"
                "                     reconnection or broker restart "
                "(services need --durable)\n");
    if (!c->verbose_help || *c->verbose_help)
        fprintf(f, "  -v, --verbose      %s\n",
                c->verbose_help          ? c->verbose_help
                : c->flags & CLI_SERVICE ? "log every request"
                                         : "say which instance answered, and "
                                           "how fast");
    fprintf(f, "  -h, --help         show this help\n"
               "  --version          show the version\n\n"
               "Options may also follow the arguments; -- ends the options "
               "(for an argument\nthat starts with '-'; negative numbers "
               "need none).\n\n");
    fputs(c->exit_codes ? c->exit_codes
                        : "Exit codes: 0 ok, 1 error reply, 2 usage, 3 broker "
                          "unreachable or lost,\n"
                          "            4 timeout, 5 no service on the queue, "
                          "6 other failure,\n"
                          "            7 overloaded (the service's queue is full),\n"
                          "            8 the broker is blocking publishers "
                          "(a resource alarm).\n",
          f);
}

/* An operand that starts with '-' but is a number ("-5", "-1.5", "-.5",
 * "-1e3"): no option is a digit, so it cannot be one. */
static bool negative_number(const char *a)
{
    return a[0] == '-' && (isdigit((unsigned char)a[1]) ||
                           (a[1] == '.' && isdigit((unsigned char)a[2])));
}

/* Whether "--name" (no "=value") takes the next element as its value, by
 * getopt_long's rules: an exact name, else a unique prefix. An unknown or
 * ambiguous name takes nothing; getopt_long reports it. */
static bool long_takes_next(const char *arg, const struct option *opts)
{
    const char *name = arg + 2;
    size_t len = strlen(name);
    const struct option *hit = NULL;
    int hits = 0;

    if (strchr(name, '='))
        return false;
    for (const struct option *o = opts; o->name; o++) {
        if (strncmp(o->name, name, len) != 0)
            continue;
        if (strlen(o->name) == len) {
            hit = o;
            hits = 1;
            break;
        }
        hit = o;
        hits++;
    }
    return hits == 1 && hit->has_arg == required_argument;
}

/* Whether the short options cluster arg ("-v", "-n500", "-vn") takes the
 * next element as its value: its last option needs one and got none. */
static bool short_takes_next(const char *arg, const char *shorts)
{
    shorts += strspn(shorts, "+:");
    for (const char *p = arg + 1; *p; p++) {
        const char *o = *p == ':' ? NULL : strchr(shorts, *p);
        if (!o)
            return false; /* unknown: getopt_long reports it */
        if (o[1] == ':')
            return p[1] == '\0';
    }
    return false;
}

/* Options may follow the operands, as in GNU tools ("call Q JSON --timeout
 * 4000"), but glibc's own permutation takes a negative number for an
 * option, and "soma -5 3" must stay an addition. So argv is permuted here,
 * stably: options (with their values) first, then the "--" if any, then
 * the operands, where "-", "-5" and everything after "--" are operands.
 * Returns how many elements getopt_long should see (argv[0] and the
 * options) and sets *first_operand. */
static int permute(int argc, char **argv, const char *shorts,
                   const struct option *opts, int *first_operand)
{
    char **operands = malloc((size_t)(argc > 0 ? argc : 1) * sizeof *operands);
    char *dashdash = NULL;
    int nopt = 1, nops = 0;

    if (!operands)
        return -1;
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        bool takes_next;

        if (dashdash) {
            operands[nops++] = a;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            dashdash = a;
            continue;
        }
        if (a[0] != '-' || a[1] == '\0' || negative_number(a)) {
            operands[nops++] = a;
            continue;
        }
        takes_next = a[1] == '-' ? long_takes_next(a, opts)
                                 : short_takes_next(a, shorts);
        argv[nopt++] = a;
        if (takes_next && i + 1 < argc)
            argv[nopt++] = argv[++i];
    }
    *first_operand = nopt;
    if (dashdash)
        argv[(*first_operand)++] = dashdash;
    memcpy(argv + *first_operand, operands, (size_t)nops * sizeof *operands);
    free(operands);
    return nopt;
}

int cli_parse(struct cli *c, int argc, char **argv)
{
    struct option opts[64];
    /* "+": no permutation of getopt_long's own (see permute). ":": a
     * missing value is reported as ':', not as an unknown option. */
    char shorts[80] = "+:vh";
    size_t n = 0, ns = 4;
    int nargs, first_operand;
    bool verbose = !c->verbose_help || *c->verbose_help;
    long v;
    int ch;

    opts[n++] = (struct option){"url", required_argument, NULL, OPT_URL};
    opts[n++] =
        (struct option){"heartbeat", required_argument, NULL, OPT_HEARTBEAT};
    opts[n++] =
        (struct option){"url-file", required_argument, NULL, OPT_URL_FILE};
    opts[n++] = (struct option){"cacert", required_argument, NULL, OPT_CACERT};
    opts[n++] = (struct option){"cert", required_argument, NULL, OPT_CERT};
    opts[n++] = (struct option){"key", required_argument, NULL, OPT_KEY};
    opts[n++] = (struct option){"insecure", no_argument, NULL, OPT_INSECURE};
    if (verbose) {
        opts[n++] = (struct option){"verbose", no_argument, NULL, 'v'};
    } else {
        snprintf(shorts, sizeof shorts, "+:h");
        ns = 3;
    }
    opts[n++] = (struct option){"help", no_argument, NULL, 'h'};
    opts[n++] = (struct option){"version", no_argument, NULL, OPT_VERSION};
    if (c->flags & (CLI_CALLER | CLI_TIMEOUT))
        opts[n++] =
            (struct option){"timeout", required_argument, NULL, OPT_TIMEOUT};
    if (c->flags & CLI_CALLER) {
        opts[n++] = (struct option){"raw", no_argument, NULL, OPT_RAW};
        opts[n++] =
            (struct option){"retries", required_argument, NULL, OPT_RETRIES};
    }
    if (c->flags & (CLI_CALLER | CLI_SERVICE))
        opts[n++] = (struct option){"durable", no_argument, NULL, OPT_DURABLE};
    if (c->flags & CLI_SERVICE) {
        opts[n++] =
            (struct option){"queue", required_argument, NULL, OPT_QUEUE};
        opts[n++] =
            (struct option){"prefetch", required_argument, NULL, OPT_PREFETCH};
        opts[n++] =
            (struct option){"max-body", required_argument, NULL, OPT_MAX_BODY};
        opts[n++] = (struct option){"max-depth", required_argument, NULL,
                                    OPT_MAX_DEPTH};
        opts[n++] = (struct option){"max-string", required_argument, NULL,
                                    OPT_MAX_STRING};
        opts[n++] =
            (struct option){"workers", required_argument, NULL, OPT_WORKERS};
        opts[n++] =
            (struct option){"threads", required_argument, NULL, OPT_THREADS};
        opts[n++] = (struct option){"max-queue", required_argument, NULL,
                                    OPT_MAX_QUEUE};
        opts[n++] = (struct option){"max-deliveries", required_argument, NULL,
                                    OPT_MAX_DELIVERIES};
        opts[n++] = (struct option){"connect-timeout", required_argument,
                                    NULL, OPT_CONNECT_TIMEOUT};
        opts[n++] =
            (struct option){"metrics", required_argument, NULL, OPT_METRICS};
        opts[n++] = (struct option){"queue-type", required_argument, NULL,
                                    OPT_QUEUE_TYPE};
    }
    for (int i = 0; c->extra && c->extra[i].name && n < 47; i++) {
        const struct cli_extra *x = &c->extra[i];
        opts[n++] =
            (struct option){x->name, x->arg ? required_argument : no_argument,
                            NULL, OPT_EXTRA + i};
        if (x->short_name && ns + 3 < sizeof shorts) {
            shorts[ns++] = x->short_name;
            if (x->arg)
                shorts[ns++] = ':';
            shorts[ns] = '\0';
        }
    }
    /* Room for the terminator: a table that outgrew opts is a bug here. */
    if (n >= sizeof opts / sizeof opts[0]) abort();
    opts[n] = (struct option){NULL, 0, NULL, 0};

    c->connect_retry_ms = -1;
    if (c->timeout_ms == 0)
        c->timeout_ms = MQRPC_DEFAULT_TIMEOUT_MS;
    if (c->heartbeat_s == 0)
        c->heartbeat_s = MQRPC_DEFAULT_HEARTBEAT;
    if (c->workers == 0)
        c->workers = 1;
    nargs = permute(argc, argv, shorts, opts, &first_operand);
    if (nargs < 0) {
        cli_error(c, "out of memory");
        return CLI_EXIT_FAILURE;
    }
    opterr = 0;
    optind = 0; /* glibc: a full reset, so parsing can run more than once */
    while ((ch = getopt_long(nargs, argv, shorts, opts, NULL)) != -1) {
        switch (ch) {
        case OPT_URL:
            if (strlen(optarg) >= sizeof c->url_buf_) {
                cli_error(c, "--url is longer than %zu bytes",
                          sizeof c->url_buf_ - 1);
                return CLI_EXIT_USAGE;
            }
            snprintf(c->url_buf_, sizeof c->url_buf_, "%s", optarg);
            c->url = c->url_buf_;
            scrub_password(c, optarg);
            break;
        case OPT_URL_FILE: c->url_file = optarg; break;
        case OPT_CACERT: c->tls.ca_file = optarg; break;
        case OPT_CERT: c->tls.cert_file = optarg; break;
        case OPT_KEY: c->tls.key_file = optarg; break;
        case OPT_INSECURE: c->tls.insecure = 1; break;
        case OPT_TIMEOUT:
            if (!cli_parse_long(optarg, 1, 24L * 3600 * 1000, &v)) {
                cli_error(c,
                          "--timeout takes milliseconds from 1 to 86400000, "
                          "got \"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->timeout_ms = (int)v;
            break;
        case OPT_HEARTBEAT:
            if (!cli_parse_long(optarg, 0, 65535, &v)) {
                cli_error(c,
                          "--heartbeat takes seconds from 0 to 65535, got "
                          "\"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->heartbeat_s = v == 0 ? -1 : (int)v;
            break;
        case OPT_QUEUE:
            /* 251: the dead-letter queue's name adds ".dlq". */
            if (!*optarg || strlen(optarg) > 251) {
                cli_error(c, "--queue takes a name of 1 to 251 bytes");
                return CLI_EXIT_USAGE;
            }
            c->queue = optarg;
            break;
        case OPT_PREFETCH:
            if (!cli_parse_long(optarg, 1, 65535, &v)) {
                cli_error(c,
                          "--prefetch takes a number from 1 to 65535, got "
                          "\"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->prefetch = (unsigned)v;
            break;
        case OPT_WORKERS:
            if (!cli_parse_long(optarg, 1, CLI_MAX_WORKERS, &v)) {
                cli_error(c,
                          "--workers takes a number from 1 to %d, got \"%s\"",
                          CLI_MAX_WORKERS, optarg);
                return CLI_EXIT_USAGE;
            }
            c->workers = (unsigned)v;
            break;
        case OPT_THREADS:
            if (!cli_parse_long(optarg, 1, CLI_MAX_THREADS, &v)) {
                cli_error(c,
                          "--threads takes a number from 1 to %d, got \"%s\"",
                          CLI_MAX_THREADS, optarg);
                return CLI_EXIT_USAGE;
            }
            c->threads = (unsigned)v;
            break;
        case OPT_MAX_BODY:
            if (!cli_parse_long(optarg, 2, 128L * 1024 * 1024, &v)) {
                cli_error(c,
                          "--max-body takes bytes from 2 to 134217728, got "
                          "\"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->max_body = (size_t)v;
            break;
        case OPT_MAX_DEPTH:
            /* Below jansson's own limit (2048 levels), so a deep request
             * always gets our message, which names the option's value. */
            if (!cli_parse_long(optarg, 1, 1024, &v)) {
                cli_error(c,
                          "--max-depth takes a number from 1 to 1024, got "
                          "\"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->max_depth = (unsigned)v;
            break;
        case OPT_MAX_STRING:
            if (!cli_parse_long(optarg, 1, 128L * 1024 * 1024, &v)) {
                cli_error(c,
                          "--max-string takes bytes from 1 to 134217728, got "
                          "\"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->max_string = (size_t)v;
            break;
        case OPT_RAW: c->raw = true; break;
        case OPT_DURABLE: c->durable = true; break;
        case OPT_RETRIES:
            if (!cli_parse_long(optarg, 0, 100, &v)) {
                cli_error(c, "--retries takes a number from 0 to 100, got "
                             "\"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->retries = (int)v;
            break;
        case OPT_MAX_QUEUE:
            if (!cli_parse_long(optarg, 1, 2147483647L, &v)) {
                cli_error(c,
                          "--max-queue takes a number from 1 to 2147483647, "
                          "got \"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->max_queue = (unsigned)v;
            break;
        case OPT_MAX_DELIVERIES:
            if (!cli_parse_long(optarg, 1, 1000, &v)) {
                cli_error(c,
                          "--max-deliveries takes a number from 1 to 1000, "
                          "got \"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->max_deliveries = (unsigned)v;
            break;
        case OPT_CONNECT_TIMEOUT:
            if (!cli_parse_long(optarg, 0, 2147483647L, &v)) {
                cli_error(c,
                          "--connect-timeout takes milliseconds from 0 to "
                          "2147483647, got \"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            c->connect_retry_ms = (int)v;
            break;
        case OPT_METRICS: c->metrics = optarg; break; /* checked by its user */
        case OPT_QUEUE_TYPE:
            if (strcmp(optarg, "classic") == 0)
                c->queue_type = MQRPC_QUEUE_CLASSIC;
            else if (strcmp(optarg, "quorum") == 0)
                c->queue_type = MQRPC_QUEUE_QUORUM;
            else {
                cli_error(c, "--queue-type takes classic or quorum, got "
                             "\"%s\"",
                          optarg);
                return CLI_EXIT_USAGE;
            }
            break;
        case 'v': c->verbose = true; break;
        case 'h': usage(c, stdout); return CLI_EXIT_OK;
        case OPT_VERSION:
            printf("%s (mqrpc) %s\n", c->prog, MQRPC_VERSION);
            return CLI_EXIT_OK;
        case '?':
        case ':':
        default:
            if (ch >= OPT_EXTRA) {
                c->extra[ch - OPT_EXTRA].value = optarg ? optarg : "1";
                break;
            }
            for (int i = 0; c->extra && c->extra[i].name; i++) {
                if (c->extra[i].short_name && ch == c->extra[i].short_name) {
                    c->extra[i].value = optarg ? optarg : "1";
                    ch = 0;
                    break;
                }
            }
            if (ch == 0)
                break;
            if (ch == ':' && optopt > 0 && optopt < 256) {
                cli_error(c, "option -%c needs a value (try --help)", optopt);
                return CLI_EXIT_USAGE;
            }
            if (optopt > 0 && optopt < 256)
                cli_error(c, "unknown option -%c (try --help)", optopt);
            else {
                char shown[256];
                mqrpc_url_redact(argv[optind - 1], shown, sizeof shown);
                cli_error(c, "unknown option or missing value: %s (try --help)",
                          shown);
            }
            return CLI_EXIT_USAGE;
        }
    }
    for (int i = 0; c->extra && c->extra[i].name; i++) {
        const struct cli_extra *x = &c->extra[i];
        if (x->max > x->min && x->value &&
            !cli_parse_long(x->value, x->min, x->max, &v)) {
            cli_error(c, "--%s takes a number from %ld to %ld, got \"%s\"",
                      x->name, x->min, x->max, x->value);
            return CLI_EXIT_USAGE;
        }
    }
    c->optind = first_operand;
    return check_url(c);
}
