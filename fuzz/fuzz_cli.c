/*
 * fuzz_cli: cli_parse, every program's option parsing, on an argv made of
 * the input split at NUL bytes. It runs three times per input, as
 * rpc_client (CLI_CALLER), as a service (CLI_SERVICE with options like
 * busca's and media's) and as rpc_bench (CLI_TIMEOUT, short options, no
 * -v), each on a fresh copy because --url scrubs its argument in place.
 * Checks that it returns a documented code, never exits, and that on
 * success every value is within the range its option promises.
 */
#include "fuzz.h"

#include "cli.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    /* Usage errors and --help are expected, and at fuzzing speed would
     * drown the log. Swapping the stream silences only the program:
     * libFuzzer kept its own handle on the old one, and the sanitizers
     * and FUZZ_CHECK write to fd 2. */
    FILE *null = fopen("/dev/null", "w");

    FUZZ_CHECK(null && freopen("/dev/null", "w", stdout));
    stderr = null;
    /* The URL must not depend on the machine: no $AMQP_URL, no state
     * directory holding URL files. */
    unsetenv("AMQP_URL");
    setenv("MQRPC_STATE_DIR", "/nonexistent/mqrpc-fuzz", 1);
    return 0;
}

/* split_args points argv (argc + 1 slots) at the NUL-separated pieces of
 * buf (size bytes, NUL-terminated), after a program name; an empty input
 * is no arguments at all. */
static char **split_args(char *buf, size_t size, int *argc)
{
    int n = size ? 2 : 1;
    char **argv;

    for (size_t i = 0; i < size; i++)
        n += buf[i] == '\0';
    argv = calloc((size_t)n + 1, sizeof *argv);
    FUZZ_CHECK(argv != NULL);
    argv[0] = "prog";
    *argc = 1;
    for (char *p = buf; *argc < n; p += strlen(p) + 1)
        argv[(*argc)++] = p;
    argv[*argc] = NULL;
    return argv;
}

/* The values cli_parse promises when it lets the program go on. */
static void check_values(const struct cli *c, int argc)
{
    FUZZ_CHECK(c->optind >= 1 && c->optind <= argc);
    FUZZ_CHECK(c->timeout_ms >= 1 && c->timeout_ms <= 86400000);
    FUZZ_CHECK(c->heartbeat_s == -1 ||
               (c->heartbeat_s >= 1 && c->heartbeat_s <= 65535));
    FUZZ_CHECK(c->workers >= 1 && c->workers <= CLI_MAX_WORKERS);
    FUZZ_CHECK(c->prefetch <= 65535);
    FUZZ_CHECK(c->max_depth <= 1024);
    FUZZ_CHECK(c->max_body <= 128u * 1024 * 1024 && c->max_body != 1);
    FUZZ_CHECK(c->max_string <= 128u * 1024 * 1024);
    FUZZ_CHECK(!c->url || strlen(c->url) < sizeof c->url_buf_);
    FUZZ_CHECK(!c->queue || (*c->queue && strlen(c->queue) <= 255));
    for (const struct cli_extra *x = c->extra; x && x->name; x++) {
        long v;
        FUZZ_CHECK(!(x->max > x->min && x->value) ||
                   cli_parse_long(x->value, x->min, x->max, &v));
    }
}

static void parse_as(struct cli *c, const uint8_t *data, size_t size)
{
    char *buf = fuzz_cstr(data, size);
    int argc, rc;
    char **argv = split_args(buf, size, &argc);

    rc = cli_parse(c, argc, argv);
    FUZZ_CHECK(rc == -1 || rc == CLI_EXIT_OK || rc == CLI_EXIT_USAGE);
    if (rc == -1)
        check_values(c, argc);
    free(argv);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cli_extra service_extra[] = {
        {.name = "db", .arg = "PATH", .help = "database", .value = "x.db"},
        {.name = "max-items", .arg = "N", .help = "limit", .value = "100000",
         .min = 1, .max = 100000000},
        {.name = NULL},
    };
    struct cli_extra bench_extra[] = {
        {.name = "calls", .arg = "N", .short_name = 'n', .help = "calls",
         .value = "20000", .min = 1, .max = 1000000000L},
        {.name = "duration", .arg = "S", .short_name = 'd', .help = "secs",
         .min = 1, .max = 86400},
        {.name = "json", .help = "flag"},
        {.name = NULL},
    };
    struct cli caller = {.prog = "rpc_client", .usage = "", .summary = "",
                         .flags = CLI_CALLER};
    struct cli service = {.prog = "service_fuzz", .usage = "", .summary = "",
                          .flags = CLI_SERVICE, .queue = "service_fuzz",
                          .extra = service_extra};
    struct cli bench = {.prog = "rpc_bench", .usage = "", .summary = "",
                        .flags = CLI_TIMEOUT, .verbose_help = "",
                        .extra = bench_extra};

    parse_as(&caller, data, size);
    parse_as(&service, data, size);
    parse_as(&bench, data, size);
    return 0;
}
