#include "media.h"
#include "service_main.h"

int main(int argc, char **argv)
{
    static const struct service_program p = {
        .prog = "service_media",
        .queue = "service_media",
        .label = "MEDIA",
        .summary = "Averages a list: {\"numeros\": [10, 20, 30, 40]} -> 25.0.",
        .handler = media_handle,
    };
    return service_main(argc, argv, &p);
}
