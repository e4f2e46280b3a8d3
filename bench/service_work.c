/*
 * A benchmark (and test) service whose work takes a set time: {"ms": N}
 * sleeps N milliseconds, then answers {"slept": N}; a request without "ms"
 * sleeps --work-ms. Sleeping, not spinning: it stands for handlers that
 * wait on I/O (a database, another service), the case where more instances
 * give more calls/s even on a 2-core machine. Tests use it to hold a
 * request in flight on purpose.
 */
#include "service_main.h"

#include <stdlib.h>
#include <time.h>

#define MAX_MS 600000

static json_t *work_handle(json_t *request, mqrpc_fault *fault, void *arg)
{
    json_t *ms = json_object_get(request, "ms");
    struct timespec ts;
    json_int_t n = *(const long *)arg;

    if (ms) {
        if (!json_is_integer(ms) || json_integer_value(ms) < 0 ||
            json_integer_value(ms) > MAX_MS)
            return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                                   "field \"ms\" must be an integer from 0 "
                                   "to 600000");
        n = json_integer_value(ms);
    }
    ts.tv_sec = (time_t)(n / 1000);
    ts.tv_nsec = (long)(n % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
    return json_pack("{s:I}", "slept", n);
}

static void *open_work(struct cli_extra *extra, const char *instance, char *err,
                       size_t errlen)
{
    long *ms = malloc(sizeof *ms);

    (void)instance;
    if (!ms) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    cli_parse_long(extra[0].value, 0, MAX_MS, ms); /* checked by cli_parse */
    return ms;
}

int main(int argc, char **argv)
{
    struct cli_extra extra[] = {
        {.name = "work-ms",
         .arg = "MS",
         .help = "work time of a request without \"ms\"",
         .value = "0",
         .min = 0,
         .max = MAX_MS},
        {.name = NULL},
    };
    const struct service_program p = {
        .prog = "service_work",
        .queue = "service_work",
        .label = "WORK",
        .summary = "Benchmark service: {\"ms\": N} sleeps N ms (default "
                   "--work-ms), then answers {\"slept\": N}.",
        .handler = work_handle,
        .extra = extra,
        .open = open_work,
        .close = free,
    };
    return service_main(argc, argv, &p);
}
