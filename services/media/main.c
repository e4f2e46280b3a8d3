#include "media.h"
#include "service_main.h"

#include <stdio.h>

/* The limit is the same for every worker and never written after start,
 * so they share one media_opts. */
static media_opts opts;

#define STR_(x) #x
#define STR(x) STR_(x)

static void *open_media(struct cli_extra *extra, const char *instance,
                        char *err, size_t errlen)
{
    long v;

    (void)instance;
    if (!cli_parse_long(extra[0].value, extra[0].min, extra[0].max, &v)) {
        snprintf(err, errlen, "--max-items: bad value \"%s\"", extra[0].value);
        return NULL;
    }
    opts.max_items = (size_t)v;
    return &opts;
}

int main(int argc, char **argv)
{
    struct cli_extra extra[] = {
        {.name = "max-items",
         .arg = "N",
         .help = "longer numeros lists get bad_request",
         .value = STR(MEDIA_DEFAULT_MAX_ITEMS),
         .min = 1,
         .max = 100000000},
        {.name = NULL},
    };
    const struct service_program p = {
        .prog = "service_media",
        .queue = "service_media",
        .label = "MEDIA",
        .summary = "Averages a list: {\"numeros\": [10, 20, 30, 40]} -> 25.0.",
        .handler = media_handle,
        .extra = extra,
        .open = open_media,
    };
    return service_main(argc, argv, &p);
}
