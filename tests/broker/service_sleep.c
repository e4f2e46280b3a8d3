/* A test-only service: {"ms": N} sleeps N milliseconds, then answers
 * {"slept": N}. Lets tests hold a request in flight on purpose. */
#include "service_main.h"

#include <time.h>

static json_t *sleep_handle(json_t *request, mqrpc_fault *fault, void *arg)
{
    json_t *ms = json_object_get(request, "ms");
    struct timespec ts;
    json_int_t n;

    (void)arg;
    if (!json_is_integer(ms) || json_integer_value(ms) < 0 ||
        json_integer_value(ms) > 600000)
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"ms\" must be an integer from 0 to "
                               "600000");
    n = json_integer_value(ms);
    ts.tv_sec = (time_t)(n / 1000);
    ts.tv_nsec = (long)(n % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
    return json_pack("{s:I}", "slept", n);
}

int main(int argc, char **argv)
{
    static const struct service_program p = {
        .prog = "test_service_sleep",
        .queue = "test_sleep",
        .label = "SLEEP",
        .summary = "Test-only: {\"ms\": N} sleeps N ms, then answers "
                   "{\"slept\": N}.",
        .handler = sleep_handle,
    };
    return service_main(argc, argv, &p);
}
