#include "resumo.h"
#include "service_main.h"

#include <stdio.h>

#define STR_(x) #x
#define STR(x) STR_(x)

/* One resumo (a client connection and its thread) per --workers. */
static void *open_resumo(struct cli_extra *extra, const char *instance,
                         char *err, size_t errlen)
{
    mqrpc_client_opts o;
    char name[320];
    long max;

    if (!cli_parse_long(extra[0].value, extra[0].min, extra[0].max, &max)) {
        snprintf(err, errlen, "--max-items: bad value \"%s\"", extra[0].value);
        return NULL;
    }
    mqrpc_client_opts_init(&o);
    /* The calls go out as a caller's: $AMQP_URL, else the private broker's
     * clients account (services may not declare reply queues). */
    snprintf(name, sizeof name, "%s/calls", instance);
    o.name = name;
    o.retries = 1;
    return resumo_open(&o, (size_t)max, err, errlen);
}

static void close_resumo(void *arg)
{
    resumo_close(arg);
}

int main(int argc, char **argv)
{
    struct cli_extra extra[] = {
        {.name = "max-items",
         .arg = "N",
         .help = "longer numeros lists get bad_request",
         .value = STR(RESUMO_DEFAULT_MAX_ITEMS),
         .min = 1,
         .max = 100000000},
        {.name = NULL},
    };
    const struct service_program p = {
        .prog = "service_resumo",
        .queue = "service_resumo",
        .label = "RESUMO",
        .summary =
            "Summarizes a list by calling service_soma and service_media: "
            "{\"numeros\": [1, 2, 3, 4]} -> {\"quantidade\": 4, \"soma\": 10, "
            "\"media\": 2.5}. Its calls use the callers' account ($AMQP_URL, "
            "else the private broker's clients.url); no handler thread "
            "waits for them.",
        .request = resumo_request,
        .extra = extra,
        .open = open_resumo,
        .close = close_resumo,
    };
    return service_main(argc, argv, &p);
}
