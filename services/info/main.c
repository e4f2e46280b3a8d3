#include "info.h"
#include "service_main.h"

#include <stdlib.h>
#include <string.h>

/* The handler reports the instance id it answers as. */
static void *open_info(struct cli_extra *extra, const char *instance, char *err,
                       size_t errlen)
{
    (void)extra;
    (void)err;
    (void)errlen;
    return strdup(instance);
}

int main(int argc, char **argv)
{
    static const struct service_program p = {
        .prog = "service_info",
        .queue = "service_info",
        .label = "INFO",
        .summary = "Reports the answering machine and instance: {} -> "
                   "{\"so\": ..., \"versao\": ..., \"hostname\": ..., \"pid\": "
                   "..., \"instancia\": ...}.",
        .handler = info_handle,
        .open = open_info,
        .close = free,
    };
    return service_main(argc, argv, &p);
}
