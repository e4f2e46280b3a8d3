/*
 * Health and discovery over the broker, service side: each instance binds
 * a control queue of its own to the control exchange and answers pings on
 * the connection thread, without a handler thread, so it answers while
 * every handler is busy. An answer therefore proves that the instance's
 * process, its connection and its connection thread are alive, not that
 * its handler would answer a request in time (README, Health and
 * discovery).
 *
 * The control queue is exclusive and auto-delete: the broker deletes it
 * with the instance's connection, so a killed instance leaves nothing that
 * could be mistaken for it. A failure to set it up (an account without the
 * permissions, an exchange declared otherwise) is logged and the instance
 * serves requests without it: discovery is an extra, requests are not.
 */
#include "service.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

/* Pings larger than this are not ours: ignored unread. */
#define PING_MAX_BODY 4096

static void random_hex(char *out, size_t nbytes)
{
    unsigned char b[16];
    static const char hex[] = "0123456789abcdef";

    if (nbytes > sizeof b)
        nbytes = sizeof b;
    if (getrandom(b, nbytes, 0) != (ssize_t)nbytes) {
        /* Unique enough per connection: the name only has to differ from
         * the other instances' live queues. */
        uint64_t x = (uint64_t)mqr_now_us() ^ ((uint64_t)getpid() << 32);
        for (size_t i = 0; i < nbytes; i++)
            b[i] = (unsigned char)(x >> (8 * (i % 8)));
    }
    for (size_t i = 0; i < nbytes; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[2 * nbytes] = '\0';
}

mqrpc_err mqr_control_start(mqrpc_service *s)
{
    /* "" is the broadcast key: no queue can be named "" (that name asks
     * the broker to choose one), so no service queue collides with it. */
    const char *keys[2] = {"", s->queue};
    char name[256], rnd[17];
    mqrpc_err e;

    random_hex(rnd, 8);
    /* The service queue is cut so that the name stays a short string; the
     * random part alone keeps it unique. */
    snprintf(name, sizeof name, MQR_CONTROL_QUEUE_PREFIX "%.200s.%s", s->queue,
             rnd);
    e = mqr_conn_control_open(s->conn, MQR_CONTROL_EXCHANGE, name, keys, 2);
    if (e == MQRPC_OK) {
        snprintf(s->control_queue, sizeof s->control_queue, "%s", name);
        s->control_warned = false;
        return MQRPC_OK;
    }
    if (mqr_conn_fd(s->conn) < 0) {
        /* The connection went with it. */
        snprintf(s->err, sizeof s->err, "%s", mqr_conn_errmsg(s->conn));
        return e;
    }
    s->control_queue[0] = '\0';
    if (!s->control_warned)
        mqr_log(&s->log, MQRPC_LOG_WARN,
                "no health and discovery (ping, services, health cannot see "
                "this instance): %s; serving requests anyway",
                mqr_conn_errmsg(s->conn));
    s->control_warned = true;
    return MQRPC_OK;
}

/* The answer's body (wire contract in the README), malloc'd, or NULL. */
static char *pong_body(mqrpc_service *s)
{
    char cluster[256];
    json_t *j;
    char *body;
    bool consuming = mqr_conn_consuming(s->conn) && !atomic_load(&s->stopping);

    mqr_conn_cluster_name(s->conn, cluster, sizeof cluster);
    j = json_pack(
        "{s:s, s:s, s:s, s:I, s:s, s:I, s:I, s:I, s:b, s:b, s:s, "
        "s:s, s:I, s:s}",
        "instance", s->instance, "queue", s->queue, "host", s->host, "pid",
        (json_int_t)getpid(), "version", MQRPC_VERSION, "uptime_ms",
        (json_int_t)((mqr_now_us() - s->started_us) / 1000), "served",
        (json_int_t)s->st.served, "in_progress", (json_int_t)s->outstanding,
        "consuming", consuming, "blocked", mqr_conn_blocked(s->conn), "broker",
        mqr_conn_where(s->conn), "cluster", cluster, "threads",
        (json_int_t)s->opts.threads, "control_queue", s->control_queue);
    if (!j)
        return NULL;
    body = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return body;
}

mqrpc_err mqr_control_on_ping(mqrpc_service *s, const mqr_msg *m)
{
    mqr_props props = {0};
    char *body;
    mqrpc_err e;

    /* Anyone allowed to publish to the exchange can send anything: what is
     * not a ping is dropped without an answer (there is nobody to tell). */
    if (!mqr_str_eq(m->type, MQR_PING_TYPE) || m->reply_to.len == 0 ||
        m->correlation_id.len == 0 || m->body.len > PING_MAX_BODY)
        return MQRPC_OK;
    /* A ping is answered now or never: held replies go first, and a broker
     * that blocks us does not read (the caller sees that it is blocked). */
    if (s->held.head || !mqr_conn_can_publish(s->conn, 1024))
        return MQRPC_OK;
    body = pong_body(s);
    if (!body)
        return MQRPC_OK;
    props.correlation_id = m->correlation_id;
    props.type = mqr_cstr(MQR_PONG_TYPE);
    props.app_id = mqr_cstr(s->instance);
    e = mqr_conn_publish(s->conn, m->reply_to, &props, body, strlen(body),
                         false);
    free(body);
    return e;
}

mqrpc_err mqr_control_on_cancel(mqrpc_service *s)
{
    mqr_log(&s->log, MQRPC_LOG_WARN,
            "the broker cancelled the control consumer of %s (queue %s "
            "deleted?); declaring a new one",
            s->queue, s->control_queue);
    return mqr_control_start(s);
}
