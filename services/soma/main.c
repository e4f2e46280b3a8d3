#include "service_main.h"
#include "soma.h"

int main(int argc, char **argv)
{
    static const struct service_program p = {
        .prog = "service_soma",
        .queue = "service_soma",
        .label = "SOMA",
        .summary = "Adds two numbers: {\"a\": 10, \"b\": 5} -> 15.",
        .handler = soma_handle,
    };
    return service_main(argc, argv, &p);
}
