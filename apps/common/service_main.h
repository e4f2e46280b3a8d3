/*
 * The whole main() of a service program: options, connect, the ready line
 * the seed prints, SIGINT/SIGTERM for a clean stop, exit codes. A service
 * program only describes itself.
 */
#ifndef MQRPC_SERVICE_MAIN_H
#define MQRPC_SERVICE_MAIN_H

#include "cli.h"

struct service_program {
    const char *prog;    /* "service_soma" */
    const char *queue;   /* default queue, "service_soma" */
    const char *label;   /* for "[x] Serviço SOMA pronto..." */
    const char *summary; /* --help paragraph */
    /* The logic: a pure handler, or a request function (progress,
     * deadline, deferred replies); exactly one is set. */
    mqrpc_handler_fn handler;
    mqrpc_request_fn request;
    struct cli_extra *extra; /* program options, or NULL */
    /* Optional: builds the handler's argument once options are known,
     * once per --workers; the --threads of a worker share it (the handler
     * must then be thread-safe);
     * returns NULL with a one-line reason in err on failure. */
    void *(*open)(struct cli_extra *extra, const char *instance, char *err,
                  size_t errlen);
    void (*close)(void *arg);
};

int service_main(int argc, char **argv, const struct service_program *p);

#endif
