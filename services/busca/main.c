#include "busca.h"
#include "service_main.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef BUSCA_DATA_FROM_BINDIR
#define BUSCA_DATA_FROM_BINDIR "../share/mqrpc/pessoas.json"
#endif

/* default_data writes the default --data path into buf: the shipped list,
 * BUSCA_DATA_FROM_BINDIR from the directory of this executable, where both
 * `cmake --install` and the build tree put it. Nothing of the machine that
 * built the program is compiled in, so an installed tree can move. If
 * /proc is not mounted, the path is left relative to the working directory
 * and busca_open names it when it is missing. */
static const char *default_data(char *buf, size_t len)
{
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    char *slash;

    if (n > 0) {
        exe[n] = '\0';
        if ((slash = strrchr(exe, '/')) != NULL) {
            *slash = '\0';
            snprintf(buf, len, "%s/%s", exe, BUSCA_DATA_FROM_BINDIR);
            return buf;
        }
    }
    snprintf(buf, len, "%s", BUSCA_DATA_FROM_BINDIR);
    return buf;
}

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
    char db_path[4096], data_path[4096 + sizeof BUSCA_DATA_FROM_BINDIR];
    struct cli_extra extra[] = {
        {.name = "db",
         .arg = "PATH",
         .help = "SQLite database, created from --data on first start",
         .value = db_path},
        {.name = "data",
         .arg = "PATH",
         .help = "people to load into a new database (JSON)",
         .value = default_data(data_path, sizeof data_path)},
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
