/*
 * A benchmark (and test) service whose work takes a set time: {"ms": N}
 * sleeps N milliseconds, then answers {"slept": N}; a request without "ms"
 * sleeps --work-ms. Sleeping, not spinning: it stands for handlers that
 * wait on I/O (a database, another service), the case where more instances
 * give more calls/s even on a 2-core machine. Tests use it to hold a
 * request in flight on purpose, and to show progress replies and handlers
 * that stop when their caller gives up.
 */
#include "service_main.h"

#include <stdlib.h>
#include <time.h>

#define MAX_MS 600000
/* Progress is reported at each tenth of the work, and the caller's having
 * given up is noticed within a slice. */
#define SLICES 10
#define SLICE_MAX_MS 100

static void nap_ms(json_int_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* Burns ms of this thread's CPU time: a handler bound by computation. */
static json_t *spin(json_int_t ms)
{
    struct timespec t0, t;
    volatile unsigned long x = 0;
    long long spent;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    do {
        for (int i = 0; i < 1000; i++)
            x += (unsigned long)i * 2654435761u;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
        spent = (long long)(t.tv_sec - t0.tv_sec) * 1000000000LL +
                (t.tv_nsec - t0.tv_nsec);
    } while (spent < ms * 1000000LL);
    (void)x;
    return json_pack("{s:I}", "spun", ms);
}

/* A request function, not a pure one: it reports progress (to callers that
 * ask for it) and stops early when its caller gave up. */
static void work_request(mqrpc_request *r, void *arg)
{
    json_t *ms = json_object_get(mqrpc_request_params(r), "ms");
    json_t *cpu = json_object_get(mqrpc_request_params(r), "cpu_ms");
    json_int_t n = *(const long *)arg, done = 0, step;
    char text[64];

    if (cpu) {
        if (!json_is_integer(cpu) || json_integer_value(cpu) < 0 ||
            json_integer_value(cpu) > 10000)
            mqrpc_request_fail(r, MQRPC_BAD_REQUEST,
                               "field \"cpu_ms\" must be an integer from 0 "
                               "to 10000");
        else
            mqrpc_request_reply(r, spin(json_integer_value(cpu)));
        return;
    }

    if (ms) {
        if (!json_is_integer(ms) || json_integer_value(ms) < 0 ||
            json_integer_value(ms) > MAX_MS) {
            mqrpc_request_fail(r, MQRPC_BAD_REQUEST,
                               "field \"ms\" must be an integer from 0 to "
                               "600000");
            return;
        }
        n = json_integer_value(ms);
    }
    if (n < SLICES * 20) {
        /* Short work (the benchmarks' 5 ms): one sleep, as before. */
        nap_ms(n);
        mqrpc_request_reply(r, json_pack("{s:I}", "slept", n));
        return;
    }
    for (int tenth = 1; tenth <= SLICES; tenth++) {
        json_int_t until = n * tenth / SLICES;
        for (; done < until; done += step) {
            if (mqrpc_request_cancelled(r)) {
                mqrpc_request_fail(r, "cancelled",
                                   "stopped after %lld of %lld ms: the "
                                   "caller gave up",
                                   (long long)done, (long long)n);
                return;
            }
            step = until - done < SLICE_MAX_MS ? until - done : SLICE_MAX_MS;
            nap_ms(step);
        }
        snprintf(text, sizeof text, "slept %lld of %lld ms", (long long)done,
                 (long long)n);
        mqrpc_request_progress(r, 100.0 * tenth / SLICES, text);
    }
    mqrpc_request_reply(r, json_pack("{s:I}", "slept", n));
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
        .summary = "Benchmark and test service: {\"ms\": N} sleeps N ms "
                   "(default --work-ms), then answers {\"slept\": N}; "
                   "{\"cpu_ms\": N} computes for N ms of CPU time, then "
                   "answers {\"spun\": N}. From "
                   "200 ms on it reports progress at each tenth (to callers "
                   "that ask) and stops early when its caller gives up.",
        .request = work_request,
        .extra = extra,
        .open = open_work,
        .close = free,
    };
    return service_main(argc, argv, &p);
}
