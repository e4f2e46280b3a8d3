#include "service_main.h"
#include "notify.h"

#include "metrics.h"
#include "jsonlog.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* One per --workers: its own handler argument and its own service, hence
 * its own connection (rabbitmq-c connections are not thread-safe). */
struct worker {
    mqrpc_service *svc;
    void *arg;
    mqrpc_err status;
    pthread_t thread;
    bool started;
    char instance[300]; /* for JSON log lines */
};

/* --log-format json: every line on stderr is one JSON object. */
static bool log_json;

static void log_record(const mqrpc_log_record *rec, void *arg)
{
    jsonlog_line(((struct worker *)arg)->instance, rec);
}

/* A line of this program's own (not the library's): JSON with
 * --log-format json, else "prog: message". */
static void say(const struct cli *c, const char *instance,
                mqrpc_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void say(const struct cli *c, const char *instance,
                mqrpc_log_level level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (log_json) {
        mqrpc_log_record rec = {.size = sizeof rec,
                                .level = level,
                                .msg = msg,
                                .duration_ms = -1};
        jsonlog_line(instance, &rec);
    } else if (level == MQRPC_LOG_INFO) {
        fprintf(stderr, "%s: %s\n", instance, msg);
    } else {
        cli_error(c, "%s", msg);
    }
}

/* The program's options followed by those every service has here. */
#define MAX_EXTRA 16
static int parse_options(struct cli *c, int argc, char **argv,
                         struct cli_extra *prog)
{
    struct cli_extra all[MAX_EXTRA + 2];
    size_t n = 0;
    int rc;

    for (; prog && prog[n].name && n < MAX_EXTRA; n++)
        all[n] = prog[n];
    all[n] = (struct cli_extra){
        .name = "log-format",
        .arg = "FORMAT",
        .help = "text, or json: one JSON object per line on\n"
                "                     stderr (ts, level, instance, msg; per "
                "request\n"
                "                     also queue, correlation_id, trace_id, "
                "span_id,\n"
                "                     duration_ms, code)",
        .value = "text"};
    all[n + 1] = (struct cli_extra){.name = NULL};
    c->extra = all;
    rc = cli_parse(c, argc, argv);
    c->extra = prog;
    for (size_t i = 0; i < n; i++)
        prog[i].value = all[i].value;
    if (rc >= 0)
        return rc;
    if (strcmp(all[n].value, "json") == 0) {
        log_json = true;
    } else if (strcmp(all[n].value, "text") != 0) {
        cli_error(c, "--log-format takes text or json, got \"%s\"",
                  all[n].value);
        return CLI_EXIT_USAGE;
    }
    return -1;
}

/* The signal handler needs the services; one service program per process. */
static struct worker *workers;
static unsigned nworkers;

static void stop_all(void)
{
    for (unsigned i = 0; i < nworkers; i++)
        if (workers[i].svc)
            mqrpc_service_stop(workers[i].svc); /* async-signal-safe */
}

/* The first SIGINT/SIGTERM stops cleanly: running handlers finish and are
 * answered, however long they take. A second one exits at once, as Celery's
 * second Ctrl-C does; the broker returns the requests in hand to the queue. */
static void on_signal(int sig)
{
    static volatile sig_atomic_t signalled;
    static const char msg[] = "stopping now: the requests in hand return to "
                              "the queue\n";

    if (signalled) {
        if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) {
        }
        _exit(128 + sig);
    }
    signalled = 1;
    stop_all();
}

static void *run_worker(void *p)
{
    struct worker *w = p;

    w->status = mqrpc_service_run(w->svc);
    /* A worker that lost its connection takes the process down with it, so
     * a supervisor sees the failure instead of a silently smaller pool. */
    if (w->status != MQRPC_OK)
        stop_all();
    return NULL;
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
    sigset_t stop_signals;
    mqrpc_service_stats sum = {0};
    struct metrics_server *metrics = NULL;
    mqrpc_err e;
    int rc, tick_ms;

    rc = parse_options(&c, argc, argv, p->extra);
    if (rc >= 0)
        return rc;
    if (c.optind < argc) {
        cli_error(&c, "unexpected argument \"%s\" (try --help)",
                  argv[c.optind]);
        return CLI_EXIT_USAGE;
    }
    if (c.metrics) {
        /* Before connecting: a taken port fails at once, not after. */
        struct metrics_service_info mi = {p->prog, c.queue, c.workers,
                                          c.max_queue};
        enum metrics_fail why;
        metrics = metrics_server_start(c.metrics, &mi, &why, err, sizeof err);
        if (!metrics) {
            cli_error(&c, "%s", err);
            return why == METRICS_BAD_ADDRESS ? CLI_EXIT_USAGE
                                              : CLI_EXIT_FAILURE;
        }
    }
    workers = calloc(c.workers, sizeof *workers);
    if (!workers) {
        metrics_server_stop(metrics);
        cli_error(&c, "out of memory");
        return CLI_EXIT_FAILURE;
    }
    nworkers = c.workers;
    rc = CLI_EXIT_OK;
    tick_ms = notify_init(nworkers);
    if (tick_ms < 0) {
        cli_error(&c, "out of memory");
        free(workers);
        workers = NULL;
        nworkers = 0;
        return CLI_EXIT_FAILURE;
    }

    /* Sequentially, in this thread: a handler's open (busca creating its
     * database on first start) never races with another worker's. */
    for (unsigned i = 0; i < nworkers && rc == CLI_EXIT_OK; i++) {
        struct worker *w = &workers[i];
        mqrpc_instance_id(c.queue, instance, sizeof instance);
        if (nworkers > 1) {
            size_t n = strlen(instance);
            snprintf(instance + n, sizeof instance - n, "/%u", i + 1);
        }
        snprintf(w->instance, sizeof w->instance, "%s", instance);
        if (p->open &&
            !(w->arg = p->open(p->extra, instance, err, sizeof err))) {
            cli_error(&c, "%s", err);
            rc = CLI_EXIT_FAILURE;
            break;
        }
        mqrpc_service_opts_init(&opts);
        /* Given by file, the URL is read again on each reconnection, so a
         * rotated password is picked up. */
        opts.url = c.url_file ? NULL : c.url;
        opts.url_file = c.url_file;
        opts.connect_retry_ms = c.connect_retry_ms;
        opts.tls = c.tls;
        opts.queue = c.queue;
        opts.instance_id = instance;
        opts.prefetch = c.prefetch;
        opts.threads = c.threads;
        opts.max_body = c.max_body;
        opts.max_depth = c.max_depth;
        opts.max_string = c.max_string;
        opts.heartbeat_s = c.heartbeat_s;
        opts.verbose = c.verbose;
        opts.durable = c.durable;
        opts.max_queue = c.max_queue;
        opts.max_deliveries = c.max_deliveries;
        /* systemd: READY=1 once every worker consumes, WATCHDOG=1 from
         * their connection threads' ticks, STOPPING=1 (notify.c). */
        opts.event = notify_event;
        opts.event_arg = notify_arg(i);
        opts.tick_ms = tick_ms;
        if (log_json) {
            opts.log_record = log_record;
            opts.log_arg = w;
        }
        opts.queue_type = c.queue_type;
        w->svc = p->request
                     ? mqrpc_service_new_async(&opts, p->request, w->arg)
                     : mqrpc_service_new(&opts, p->handler, w->arg);
        if (!w->svc) {
            cli_error(&c, "out of memory");
            rc = CLI_EXIT_FAILURE;
            break;
        }
        metrics_server_add(metrics, w->svc);
        e = mqrpc_service_connect(w->svc);
        if (e != MQRPC_OK) {
            say(&c, instance, MQRPC_LOG_ERROR, "%s%s",
                mqrpc_service_errmsg(w->svc), cli_connect_hint(e));
            rc = cli_exit_code(e);
        }
    }
    if (rc != CLI_EXIT_OK)
        goto out;

    /* Installed only now: before this point the default action (exit) is
     * the right answer to Ctrl-C. */
    cli_on_stop_signals(on_signal);

    printf("[x] Serviço %s pronto...\n", p->label);
    fflush(stdout);
    for (unsigned i = 1; i < nworkers; i++) {
        int err_no =
            pthread_create(&workers[i].thread, NULL, run_worker, &workers[i]);
        if (err_no != 0) {
            cli_error(&c, "cannot start worker %u: %s", i + 1,
                      strerror(err_no));
            rc = CLI_EXIT_FAILURE;
            stop_all();
            break;
        }
        workers[i].started = true;
    }
    run_worker(&workers[0]);
    for (unsigned i = 1; i < nworkers; i++)
        if (workers[i].started)
            pthread_join(workers[i].thread, NULL);

    for (unsigned i = 0; i < nworkers; i++) {
        struct worker *w = &workers[i];
        mqrpc_service_stats st;
        mqrpc_service_get_stats(w->svc, &st, sizeof st);
        sum.served += st.served;
        sum.expired += st.expired;
        sum.redelivered += st.redelivered;
        sum.dead_lettered += st.dead_lettered;
        sum.lost += st.lost;
        sum.reconnects += st.reconnects;
        sum.blocked += st.blocked;
        sum.cancelled += st.cancelled;
        sum.handed_back += st.handed_back;
        sum.refused += st.refused;
        sum.abandoned += st.abandoned;
        if ((i > 0 && !w->started) || w->status == MQRPC_OK)
            continue;
        say(&c, w->instance, MQRPC_LOG_ERROR, "%s",
            mqrpc_service_errmsg(w->svc));
        if (rc == CLI_EXIT_OK)
            rc = cli_exit_code(w->status);
    }
    if (rc == CLI_EXIT_OK) {
        mqrpc_instance_id(c.queue, instance, sizeof instance);
        say(&c, instance, MQRPC_LOG_INFO,
                "stopped after answering %llu requests (%llu skipped "
                "past their deadline, %llu requeued after a redelivery, %llu "
                "dead-lettered, %llu refused by the broker, %llu handed back "
                "unstarted, %llu not sent as their callers had given up; "
                "connection lost %llu times, regained %llu; "
                "consumer cancelled %llu times; blocked by the broker %llu "
                "times)",
                (unsigned long long)sum.served,
                (unsigned long long)sum.expired,
                (unsigned long long)sum.redelivered,
                (unsigned long long)sum.dead_lettered,
                (unsigned long long)sum.refused,
                (unsigned long long)sum.handed_back,
                (unsigned long long)sum.abandoned,
                (unsigned long long)sum.lost,
                (unsigned long long)sum.reconnects,
                (unsigned long long)sum.cancelled,
                (unsigned long long)sum.blocked);
    }
out:
    /* The signal handler reads the workers that are about to be freed. */
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    /* The server reads the services: it goes first. */
    metrics_server_stop(metrics);
    for (unsigned i = 0; i < nworkers; i++) {
        mqrpc_service_free(workers[i].svc);
        workers[i].svc = NULL;
        if (p->close && workers[i].arg)
            p->close(workers[i].arg);
    }
    free(workers);
    workers = NULL;
    nworkers = 0;
    notify_done();
    return rc;
}
