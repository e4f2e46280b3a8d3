#include "busca.h"
#include "service_main.h"

#include <stdio.h>
#include <stdlib.h>

static void *open_busca(struct cli_extra *extra, const char *instance,
                        char *err, size_t errlen)
{
    (void)instance;
    return busca_open(extra[0].value, extra[1].value, err, errlen);
}

static void close_busca(void *db)
{
    busca_close(db);
}

int main(int argc, char **argv)
{
    /* The database sits next to the private broker's state, like the rest
     * of what the demo creates; $MQRPC_STATE_DIR moves both. */
    const char *state = getenv("MQRPC_STATE_DIR");
    char db_path[4096];
    struct cli_extra extra[] = {
        {.name = "db",
         .arg = "PATH",
         .help = "SQLite database, created from --data on first start",
         .value = db_path},
        {.name = "data",
         .arg = "PATH",
         .help = "people to load into a new database (JSON)",
         .value = BUSCA_DEFAULT_DATA},
        {.name = NULL},
    };
    const struct service_program p = {
        .prog = "service_busca",
        .queue = "service_busca",
        .label = "BUSCA",
        .summary = "Looks a person up by name, ignoring case and accents: "
                   "{\"nome\": \"joao\"} -> {\"idade\": 22, \"cidade\": \"São "
                   "Paulo\"}.",
        .handler = busca_handle,
        .extra = extra,
        .open = open_busca,
        .close = close_busca,
    };

    snprintf(db_path, sizeof db_path, "%s/busca.db",
             state && *state ? state : MQRPC_STATE_DIR_DEFAULT);
    return service_main(argc, argv, &p);
}
