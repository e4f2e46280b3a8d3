#include "service_main.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

/* The signal handler needs the service; one service per process. */
static mqrpc_service *running;

static void on_signal(int sig)
{
    (void)sig;
    if (running)
        mqrpc_service_stop(running);
}

int service_main(int argc, char **argv, const struct service_program *p)
{
    struct cli c = {.prog = p->prog,
                    .usage = "[OPTIONS]",
                    .summary = p->summary,
                    .flags = CLI_SERVICE,
                    .extra = p->extra,
                    .queue = p->queue};
    char instance[300], err[512];
    mqrpc_service_opts opts;
    struct sigaction sa;
    mqrpc_service *svc;
    void *arg = NULL;
    mqrpc_err e;
    int rc;

    rc = cli_parse(&c, argc, argv);
    if (rc >= 0)
        return rc;
    if (c.optind < argc) {
        cli_error(&c, "unexpected argument \"%s\" (try --help)",
                  argv[c.optind]);
        return CLI_EXIT_USAGE;
    }
    mqrpc_instance_id(c.queue, instance, sizeof instance);
    if (p->open && !(arg = p->open(p->extra, instance, err, sizeof err))) {
        cli_error(&c, "%s", err);
        return CLI_EXIT_FAILURE;
    }

    memset(&opts, 0, sizeof opts);
    opts.url = c.url;
    opts.queue = c.queue;
    opts.instance_id = instance;
    opts.prefetch = c.prefetch;
    opts.max_body = c.max_body;
    opts.heartbeat_s = c.heartbeat_s;
    opts.verbose = c.verbose;
    svc = mqrpc_service_new(&opts, p->handler, arg);
    if (!svc) {
        cli_error(&c, "out of memory");
        rc = CLI_EXIT_FAILURE;
        goto out;
    }
    e = mqrpc_service_connect(svc);
    if (e != MQRPC_OK) {
        cli_error(&c, "%s%s", mqrpc_service_errmsg(svc), cli_connect_hint(e));
        rc = cli_exit_code(e);
        goto out;
    }

    /* Installed only now: before this point the default action (exit) is
     * the right answer to Ctrl-C. No SA_RESTART needed: the runtime polls
     * the stop flag. */
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    running = svc;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    /* A reply to a vanished peer must not kill the process. */
    signal(SIGPIPE, SIG_IGN);

    printf("[x] Serviço %s pronto...\n", p->label);
    fflush(stdout);
    e = mqrpc_service_run(svc);
    if (e != MQRPC_OK) {
        cli_error(&c, "%s", mqrpc_service_errmsg(svc));
        rc = cli_exit_code(e);
    } else {
        fprintf(stderr, "%s: stopped after answering %llu requests\n", instance,
                (unsigned long long)mqrpc_service_served(svc));
        rc = CLI_EXIT_OK;
    }
out:
    running = NULL;
    mqrpc_service_free(svc);
    if (p->close)
        p->close(arg);
    return rc;
}
