#include "notify.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef MQRPC_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

struct notify_worker {
    bool consuming; /* between CONSUMING and DISCONNECTED */
    bool ticked;    /* ticked since the last WATCHDOG=1 */
};

static struct {
    pthread_mutex_t lock;
    struct notify_worker *w;
    unsigned n;
    bool ready, stopping;
    int64_t ping_us;      /* WATCHDOG=1 every ping_us; 0: no watchdog */
    int64_t last_ping_us; /* monotonic */
} st = {.lock = PTHREAD_MUTEX_INITIALIZER};

#ifdef MQRPC_HAVE_SYSTEMD
static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Whether every worker has the flag at offset off: the process is ready
 * once all consume, and one hung worker's connection thread stops the
 * pings of the whole process, so that systemd restarts it. */
static bool all(size_t off)
{
    for (unsigned i = 0; i < st.n; i++)
        if (!*(const bool *)((const char *)&st.w[i] + off))
            return false;
    return true;
}
#endif

int notify_init(unsigned nworkers)
{
    int tick_ms = 0;

    st.w = calloc(nworkers ? nworkers : 1, sizeof *st.w);
    if (!st.w)
        return -1;
    st.n = nworkers;
#ifdef MQRPC_HAVE_SYSTEMD
    uint64_t usec = 0;
    /* 0: leave $WATCHDOG_USEC set; no child process would misread it. */
    if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
        /* Half the timeout, as sd_watchdog_enabled(3) advises; ticks four
         * times as often, so a ping is at most a quarter late. */
        st.ping_us = (int64_t)(usec / 2);
        tick_ms = (int)(st.ping_us / 4000);
        if (tick_ms < 1)
            tick_ms = 1;
    }
#endif
    return tick_ms;
}

void *notify_arg(unsigned i)
{
    return &st.w[i];
}

void notify_event(mqrpc_service *s, mqrpc_service_event event,
                  const char *detail, void *arg)
{
#ifdef MQRPC_HAVE_SYSTEMD
    struct notify_worker *w = arg;
    char msg[700], conns[40] = "";
    int64_t now;

    (void)s;
    msg[0] = '\0';
    pthread_mutex_lock(&st.lock);
    switch (event) {
    case MQRPC_SERVICE_CONSUMING:
        w->consuming = true;
        if (st.stopping || !all(offsetof(struct notify_worker, consuming)))
            break;
        if (st.n > 1)
            snprintf(conns, sizeof conns, " on %u connections", st.n);
        /* READY=1 at the first time only; STATUS= after every recovery. */
        snprintf(msg, sizeof msg, "%sSTATUS=consuming %s%s",
                 st.ready ? "" : "READY=1\n", detail ? detail : "", conns);
        st.ready = true;
        break;
    case MQRPC_SERVICE_DISCONNECTED:
        w->consuming = false;
        if (st.stopping)
            break;
        snprintf(msg, sizeof msg, "STATUS=%s: %s",
                 st.ready ? "reconnecting" : "waiting for the broker",
                 detail ? detail : "");
        break;
    case MQRPC_SERVICE_TICK:
        w->ticked = true;
        if (!st.ping_us || !all(offsetof(struct notify_worker, ticked)))
            break;
        now = now_us();
        if (st.last_ping_us && now - st.last_ping_us < st.ping_us)
            break;
        st.last_ping_us = now;
        for (unsigned i = 0; i < st.n; i++)
            st.w[i].ticked = false;
        snprintf(msg, sizeof msg, "WATCHDOG=1");
        break;
    case MQRPC_SERVICE_STOPPING:
        if (st.stopping)
            break;
        st.stopping = true;
        snprintf(msg, sizeof msg,
                 "STOPPING=1\nSTATUS=stopping: finishing the requests in hand");
        break;
    default: break;
    }
    /* Under the lock: the messages leave in the order decided. */
    if (msg[0])
        sd_notify(0, msg);
    pthread_mutex_unlock(&st.lock);
#else
    (void)s;
    (void)event;
    (void)detail;
    (void)arg;
#endif
}

void notify_done(void)
{
    free(st.w);
    st.w = NULL;
    st.n = 0;
}
