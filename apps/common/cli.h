/*
 * What every program shares: option parsing (--url, --timeout, --help,
 * --version, ...), documented exit codes, and one-line error reporting.
 */
#ifndef MQRPC_CLI_H
#define MQRPC_CLI_H

#include "mqrpc/mqrpc.h"

#include <stdbool.h>
#include <stddef.h>

/* Exit codes, the same for every program (documented in the README). */
enum cli_exit {
    CLI_EXIT_OK = 0,
    CLI_EXIT_REMOTE = 1,    /* the service replied with an error */
    CLI_EXIT_USAGE = 2,     /* bad command line or input */
    CLI_EXIT_BROKER = 3,    /* broker unreachable, login refused, lost */
    CLI_EXIT_TIMEOUT = 4,   /* no reply in time */
    CLI_EXIT_NOSERVICE = 5, /* no service on that queue */
    CLI_EXIT_FAILURE = 6,   /* anything else (bad reply, setup failure) */
    CLI_EXIT_OVERLOAD = 7,  /* the service's queue is full (--max-queue) */
    CLI_EXIT_BLOCKED = 8    /* the broker blocks publishers (resource alarm) */
};

/* Upper bound of --workers: each worker is a thread and a connection. */
#define CLI_MAX_WORKERS 64
/* Upper bound of --threads: handler threads of one connection. */
#define CLI_MAX_THREADS 1024

/* Which of the common options a program takes. */
#define CLI_CALLER 1u  /* --timeout, --raw */
#define CLI_TIMEOUT 4u /* --timeout alone */
/* --queue, --prefetch, --threads, --workers, --max-body, --max-depth,
 * --max-string */
#define CLI_SERVICE 2u

/* A program-specific option: "--db PATH", or a flag when arg is NULL (its
 * value becomes "1" when given). With max > min, the value must be a whole
 * number in [min, max]; cli_parse rejects anything else as a usage error. */
struct cli_extra {
    const char *name;  /* long name without dashes */
    const char *arg;   /* placeholder for --help, e.g. "PATH"; NULL: flag */
    const char *help;  /* one line */
    const char *value; /* default on input, parsed value on output */
    char short_name;   /* optional one-letter alias, e.g. 'n' */
    long min, max;     /* numeric range, when max > min */
};

struct cli {
    /* set by the program */
    const char *prog;
    const char *usage;   /* "[OPTIONS] soma A B | ..." lines after prog */
    const char *summary; /* one paragraph */
    unsigned flags;
    struct cli_extra *extra;  /* array ended by a NULL name, or NULL */
    const char *verbose_help; /* -v in --help; NULL: the default; "": no -v */
    const char *exit_codes;   /* replaces the standard exit code lines */
    /* defaults on input, results on output */
    const char *url; /* from --url or --url-file; NULL: the default */
    const char *url_file;
    mqrpc_tls_opts tls; /* --cacert, --cert, --key, --insecure */
    int timeout_ms;
    int heartbeat_s;
    unsigned prefetch;
    unsigned workers; /* consumers in the process, each on its own connection */
    unsigned threads; /* handler threads of each worker; 0: the library's 1 */
    size_t max_body;  /* 0: the library's default, as for the next two */
    unsigned max_depth;
    size_t max_string;
    const char *queue;
    bool verbose;
    bool raw;
    bool durable;            /* --durable */
    int retries;             /* --retries */
    unsigned max_queue;      /* --max-queue; 0: unbounded */
    unsigned max_deliveries; /* --max-deliveries; 0: the default */
    unsigned queue_type;     /* --queue-type: MQRPC_QUEUE_CLASSIC, ... */
    int connect_retry_ms;    /* --connect-timeout; -1: keep trying */
    const char *metrics;     /* --metrics HOST:PORT; NULL: off */
    int optind;          /* first operand */
    char url_buf_[2048]; /* the URL read from --url or --url-file */
};

/* cli_parse parses argv. Options may come before or after the operands;
 * "--" ends them, and "-", negative numbers ("-5", "-1.5") are operands.
 * It permutes argv (operands last, from c->optind on). Returns -1 to go
 * on, or an exit code to return from main at once (0 after
 * --help/--version, CLI_EXIT_USAGE on errors, already reported on
 * stderr). */
int cli_parse(struct cli *c, int argc, char **argv);

/* cli_exit_code maps a status to the documented exit code. */
int cli_exit_code(mqrpc_err e);

/* cli_error prints "prog: message" on stderr, as one line. */
void cli_error(const struct cli *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* cli_connect_hint returns advice to append to a connection failure or an
 * access refusal, or "". */
const char *cli_connect_hint(mqrpc_err e);

/* cli_on_stop_signals makes SIGINT and SIGTERM call on_stop (without
 * SA_RESTART: the programs poll a flag it sets) and ignores SIGPIPE, so a
 * write to a vanished peer is an error return, not death. */
void cli_on_stop_signals(void (*on_stop)(int));

/* cli_parse_long parses a whole decimal integer within [min, max]. */
bool cli_parse_long(const char *s, long min, long max, long *out);

#endif
