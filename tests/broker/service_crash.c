/*
 * A test-only service whose handler dies on a given input, to play a
 * poison message: {"crash": true} aborts the process in the middle of the
 * request; anything else is answered with {"pid": <its pid>}. Never built
 * into anything but the tests.
 */
#include "service_main.h"

#include <stdlib.h>
#include <unistd.h>

static json_t *crash_handle(json_t *request, mqrpc_fault *fault, void *arg)
{
    (void)fault;
    (void)arg;
    if (json_is_true(json_object_get(request, "crash")))
        abort();
    return json_pack("{s:I}", "pid", (json_int_t)getpid());
}

int main(int argc, char **argv)
{
    const struct service_program p = {
        .prog = "service_crash",
        .queue = "service_crash",
        .label = "CRASH",
        .summary = "Test service: {\"crash\": true} aborts the process; "
                   "anything else gets {\"pid\": N}.",
        .handler = crash_handle,
    };
    return service_main(argc, argv, &p);
}
