/*
 * The AMQP connection: the only file that includes rabbitmq-c. It turns
 * rabbitmq-c's two error channels (int status codes and amqp_rpc_reply_t)
 * into mqrpc_err plus one line of text, in check_status and check_reply.
 */
/* TCP_CORK is Linux's, outside POSIX. */
#define _DEFAULT_SOURCE
#include "internal.h"

/* rabbitmq-c 0.12 moved its headers into rabbitmq-c/ and made the old names
 * #warning; 0.11 (Debian bookworm) has only the old names. */
#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#define MQR_RABBITMQ_C_DIR 1
#endif
#endif
#ifdef MQR_RABBITMQ_C_DIR
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/ssl_socket.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#endif

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define CH_MAIN 1
#define CH_SIDE 2
#define CH_CONFIRM MQR_CONFIRM_CHANNEL
#define CH_CONTROL MQR_CONTROL_CHANNEL
#define FRAME_MAX 131072
/* Bytes a publish adds to its body at most: method, header with our
 * properties, frame ends. */
#define PUBLISH_OVERHEAD 4096

struct mqr_conn {
    amqp_connection_state_t state;
    bool open;      /* the socket is usable */
    bool side_open; /* CH_SIDE is open */
    bool have_msg;  /* msg must be destroyed before the next read */
    bool blocked;   /* connection.blocked until connection.unblocked */
    size_t room;    /* known free bytes in the socket's send buffer */
    bool confirm_open; /* CH_CONFIRM is open, in confirm mode */
    amqp_message_t msg;
    uint64_t pub_seq; /* publishes on CH_MAIN since confirm.select */
    uint64_t confirm_seq; /* publishes on CH_CONFIRM */
    char consumer_tag[256]; /* of the last basic.consume; "" when none */
    bool control_ch;        /* CH_CONTROL is open */
    bool control_consuming; /* and its consumer is on */
    int heartbeat;
    int wake_fd; /* -1: none */
    char where[300]; /* "host:port", for messages */
    char err[512];
};

static void set_err(mqr_conn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void set_err(mqr_conn *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
}

static amqp_bytes_t bytes_of(mqr_str s)
{
    amqp_bytes_t b = {s.len, (void *)s.ptr};
    return b;
}

static mqr_str str_of(amqp_bytes_t b)
{
    mqr_str s = {b.bytes, b.len};
    return s;
}

static struct timeval tv_of_ms(int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    return tv;
}

static mqrpc_err from_status(int status)
{
    switch (status) {
    case AMQP_STATUS_OK: return MQRPC_OK;
    case AMQP_STATUS_NO_MEMORY: return MQRPC_ENOMEM;
    case AMQP_STATUS_TIMEOUT: return MQRPC_ETIMEOUT;
    case AMQP_STATUS_INVALID_PARAMETER: return MQRPC_EINVAL;
    case AMQP_STATUS_CONNECTION_CLOSED:
    case AMQP_STATUS_SOCKET_ERROR:
    case AMQP_STATUS_SOCKET_CLOSED:
    case AMQP_STATUS_HEARTBEAT_TIMEOUT: return MQRPC_ECLOSED;
    default: return MQRPC_EPROTO;
    }
}

/* A failed socket operation leaves rabbitmq-c's connection unusable. */
static mqrpc_err check_status(mqr_conn *c, int status, const char *what)
{
    mqrpc_err e = from_status(status);

    if (e == MQRPC_OK)
        return e;
    set_err(c, "%s on %s: %s", what, c->where, amqp_error_string2(status));
    if (e != MQRPC_EINVAL && e != MQRPC_ENOMEM)
        c->open = false;
    return e == MQRPC_ETIMEOUT ? MQRPC_ECLOSED : e;
}

/* The broker closed a channel or the connection: acknowledge it as the
 * protocol requires and describe why. */
static mqrpc_err server_close(mqr_conn *c, amqp_channel_t ch,
                              const amqp_method_t *m, const char *what)
{
    if (m->id == AMQP_CONNECTION_CLOSE_METHOD) {
        const amqp_connection_close_t *cc = m->decoded;
        amqp_connection_close_ok_t ok;
        amqp_send_method(c->state, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        set_err(c, "%s: the broker closed the connection: %u %.*s", what,
                cc->reply_code, (int)cc->reply_text.len,
                (const char *)cc->reply_text.bytes);
        c->open = false;
        return cc->reply_code == 403 ? MQRPC_EACCESS : MQRPC_ECLOSED;
    }
    if (m->id == AMQP_CHANNEL_CLOSE_METHOD) {
        const amqp_channel_close_t *cc = m->decoded;
        amqp_channel_close_ok_t ok;
        mqrpc_err e;
        amqp_send_method(c->state, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        set_err(c, "%s: %u %.*s", what, cc->reply_code, (int)cc->reply_text.len,
                (const char *)cc->reply_text.bytes);
        switch (cc->reply_code) {
        case 404: e = MQRPC_ENOROUTE; break;
        case 403: e = MQRPC_EACCESS; break;
        case 406: e = MQRPC_EINVAL; break;
        default: e = MQRPC_EPROTO; break;
        }
        if (ch == CH_SIDE) {
            c->side_open = false;
        } else if (ch == CH_CONTROL) {
            /* Health and discovery are extras: requests go on without. */
            c->control_ch = c->control_consuming = false;
        } else {
            /* Everything we do runs on the main channel: without it the
             * connection is of no use, so give it up entirely. */
            amqp_connection_close(c->state, AMQP_REPLY_SUCCESS);
            c->open = false;
        }
        return e;
    }
    set_err(c, "%s: unexpected method 0x%08x from the broker", what,
            (unsigned)m->id);
    return MQRPC_EPROTO;
}

static mqrpc_err check_reply(mqr_conn *c, amqp_channel_t ch, amqp_rpc_reply_t r,
                             const char *what)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: return MQRPC_OK;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        return check_status(c, r.library_error, what);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        return server_close(c, ch, &r.reply, what);
    case AMQP_RESPONSE_NONE:
    default:
        set_err(c, "%s: no reply from the broker", what);
        return MQRPC_EPROTO;
    }
}

/* rabbitmq-c reports every failed connect as AMQP_STATUS_SOCKET_ERROR and
 * loses errno on the way; connect once more ourselves to learn why
 * ("connection refused"), since that is what the user must act on. */
static int connect_errno(const char *host, int port, int timeout_ms)
{
    struct addrinfo hints, *res = NULL, *ai;
    char portstr[16];
    int last = 0;

    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof portstr, "%d", port);
    if (getaddrinfo(host, portstr, &hints, &res) != 0)
        return 0;
    for (ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        struct pollfd pfd;
        if (fd < 0) {
            last = errno;
            continue;
        }
        fcntl(fd, F_SETFL, O_NONBLOCK);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            close(fd);
            last = 0;
            break;
        }
        if (errno != EINPROGRESS) {
            last = errno;
            close(fd);
            continue;
        }
        pfd.fd = fd;
        pfd.events = POLLOUT;
        if (poll(&pfd, 1, timeout_ms) <= 0) {
            last = ETIMEDOUT;
        } else {
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
            last = soerr;
        }
        close(fd);
        if (last == 0)
            break;
    }
    freeaddrinfo(res);
    return last;
}

static void lower_first(char *s)
{
    if (s[0] && isupper((unsigned char)s[0]) && !isupper((unsigned char)s[1]))
        s[0] = (char)tolower((unsigned char)s[0]);
}

/* What tls.c needs to know of a failed TLS connect. */
static enum mqr_tls_failure tls_failure(int status)
{
    switch (status) {
    case AMQP_STATUS_SSL_PEER_VERIFY_FAILED: return MQR_TLS_PEER_UNVERIFIED;
    case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED: return MQR_TLS_HOST_MISMATCH;
    default: return MQR_TLS_OTHER;
    }
}

static amqp_table_entry_t bool_entry(const char *key, bool v)
{
    amqp_table_entry_t t;
    t.key = amqp_cstring_bytes(key);
    t.value.kind = AMQP_FIELD_KIND_BOOLEAN;
    t.value.value.boolean = v;
    return t;
}

/* Logs in telling the broker who we are and what we understand.
 * rabbitmq-c's own login advertises neither connection.blocked (without
 * it a resource alarm silently stops the broker reading our socket) nor
 * consumer_cancel_notify (without it a deleted queue silently ends our
 * consumer); rabbitmq-c merges these capabilities into its defaults. */
static amqp_rpc_reply_t login(amqp_connection_state_t state, const char *name,
                              const char *vhost, int heartbeat_s,
                              const char *user, const char *password)
{
    amqp_table_entry_t caps[2], props[2];
    amqp_table_t caps_table = {2, caps}, props_table = {0, props};

    caps[0] = bool_entry("connection.blocked", true);
    caps[1] = bool_entry("consumer_cancel_notify", true);
    props[props_table.num_entries].key = amqp_cstring_bytes("capabilities");
    props[props_table.num_entries].value.kind = AMQP_FIELD_KIND_TABLE;
    props[props_table.num_entries++].value.value.table = caps_table;
    if (name && *name) {
        props[props_table.num_entries].key =
            amqp_cstring_bytes("connection_name");
        props[props_table.num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
        props[props_table.num_entries++].value.value.bytes =
            amqp_cstring_bytes(name);
    }
    return amqp_login_with_properties(state, vhost, 0, FRAME_MAX, heartbeat_s,
                                      &props_table, AMQP_SASL_METHOD_PLAIN,
                                      user, password);
}

mqrpc_err mqr_conn_open(const mqr_conn_params *p, mqr_conn **out, char *err,
                        size_t errlen)
{
    char list[4096], url[2048];
    unsigned count;
    mqr_url u;
    mqr_conn *c = NULL;
    amqp_socket_t *sock;
    struct timeval tv;
    amqp_rpc_reply_t r;
    mqrpc_err e;
    int st, connect_timeout_ms = p->connect_timeout_ms;
    int heartbeat_s = p->heartbeat_s;
    const char *ca = NULL;

    *out = NULL;
    /* A URL file is read on every attempt: a reconnection after
     * `broker.sh rotate` must use the new password. */
    if (!p->url && p->url_file)
        e = mqrpc_url_file_read(p->url_file, list, sizeof list, err, errlen);
    else
        e = mqr_resolve_url(p->url, p->role, list, sizeof list, NULL, err,
                            errlen);
    if (e != MQRPC_OK)
        return e;
    /* Every entry, each time: a list with one bad entry is refused as a
     * whole, not when its turn comes. */
    e = mqr_url_list_check(list, &p->tls, err, errlen);
    if (e != MQRPC_OK)
        return e;
    e = mqr_url_pick(list, p->addrs ? p->addrs->seed : 0,
                     p->addrs ? p->addrs->next : 0, url, sizeof url, &count);
    if (e != MQRPC_OK) {
        snprintf(err, errlen, "broker URL longer than %zu bytes",
                 sizeof url - 1);
        return e;
    }
    if (p->addrs) {
        p->addrs->count = count;
        mqrpc_url_redact(url, p->addrs->current, sizeof p->addrs->current);
    }
    e = mqr_url_parse(url, &u, err, errlen);
    if (e != MQRPC_OK)
        return e;
    if (connect_timeout_ms <= 0)
        connect_timeout_ms = 5000;
    tv = tv_of_ms(connect_timeout_ms);
    if (heartbeat_s == 0)
        heartbeat_s = MQRPC_DEFAULT_HEARTBEAT;
    else if (heartbeat_s < 0)
        heartbeat_s = 0;

    c = calloc(1, sizeof *c);
    if (!c) {
        e = MQRPC_ENOMEM;
        goto fail;
    }
    c->wake_fd = -1;
    snprintf(c->where, sizeof c->where,
             strchr(u.host, ':') ? "[%s]:%d" : "%s:%d", u.host, u.port);
    c->state = amqp_new_connection();
    if (!c->state) {
        e = MQRPC_ENOMEM;
        goto fail;
    }
    if (u.tls) {
        ca = p->tls.ca_file ? p->tls.ca_file : u.ca_file;
        sock = amqp_ssl_socket_new(c->state);
        if (!sock) {
            snprintf(err, errlen, "cannot set up TLS (OpenSSL)");
            e = MQRPC_ENOMEM;
            goto fail;
        }
        e = mqr_tls_setup(amqp_ssl_socket_get_context(sock), ca,
                          p->tls.cert_file ? p->tls.cert_file : u.cert_file,
                          p->tls.key_file ? p->tls.key_file : u.key_file, err,
                          errlen);
        if (e != MQRPC_OK)
            goto fail;
        amqp_ssl_socket_set_verify_peer(sock, !p->tls.insecure);
        amqp_ssl_socket_set_verify_hostname(sock, !p->tls.insecure);
    } else {
        sock = amqp_tcp_socket_new(c->state);
        if (!sock) {
            e = MQRPC_ENOMEM;
            goto fail;
        }
    }
    mqr_tls_begin();
    st = amqp_socket_open_noblock(sock, u.host, u.port, &tv);
    if (st != AMQP_STATUS_OK) {
        char why[400];
        if (st == AMQP_STATUS_HOSTNAME_RESOLUTION_FAILED) {
            snprintf(why, sizeof why, "cannot resolve host name");
        } else if (st == AMQP_STATUS_TIMEOUT) {
            snprintf(why, sizeof why, "no answer within %d ms",
                     connect_timeout_ms);
        } else if (u.tls && st <= AMQP_STATUS_SSL_ERROR &&
                   st > _AMQP_STATUS_SSL_NEXT_VALUE) {
            mqr_tls_open_error(tls_failure(st), amqp_error_string2(st), u.host,
                               ca, why, sizeof why);
            e = MQRPC_ETLS;
        } else {
            int en = connect_errno(u.host, u.port, connect_timeout_ms);
            snprintf(why, sizeof why, "%s",
                     en ? strerror(en) : amqp_error_string2(st));
            lower_first(why);
        }
        snprintf(err, errlen, "cannot connect to %s: %s", c->where, why);
        if (e != MQRPC_ETLS)
            e = MQRPC_ECONNECT;
        goto fail;
    }
    c->open = true;
    amqp_set_handshake_timeout(c->state, &tv);
    amqp_set_rpc_timeout(c->state, &tv);

    r = login(c->state, p->name, u.vhost, heartbeat_s, u.user, u.password);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        unsigned code =
            r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
                    r.reply.id == AMQP_CONNECTION_CLOSE_METHOD
                ? ((amqp_connection_close_t *)r.reply.decoded)->reply_code
                : 0;
        char reason[160] = "";
        bool tls_refused = u.tls &&
                           r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
                           (r.library_error == AMQP_STATUS_SSL_ERROR ||
                            r.library_error == AMQP_STATUS_CONNECTION_CLOSED ||
                            r.library_error == AMQP_STATUS_SOCKET_ERROR);
        if (tls_refused)
            mqr_tls_reason(reason, sizeof reason);
        check_reply(c, 0, r, "login");
        if (tls_refused) {
            /* With TLS 1.3 the broker judges the client's certificate
             * after the client's handshake is done: a refusal shows up on
             * the first read, and OpenSSL only sometimes has the alert. */
            snprintf(err, errlen,
                     "cannot connect to %s: TLS: the broker refused the "
                     "connection%s%s (does it want a client certificate its "
                     "CA signed? --cert and --key, or the certfile and "
                     "keyfile URL parameters)",
                     c->where, reason[0] ? ": " : "", reason);
            e = MQRPC_ETLS;
        } else if (code == 403) {
            snprintf(err, errlen,
                     "login refused by %s for user \"%s\" (check the user "
                     "and password in the URL)",
                     c->where, u.user);
            e = MQRPC_EAUTH;
        } else {
            snprintf(err, errlen, "cannot log in to %s (vhost \"%s\"): %s",
                     c->where, u.vhost, c->err);
            e = code ? MQRPC_EACCESS : MQRPC_ECONNECT;
        }
        goto fail;
    }
    amqp_channel_open(c->state, CH_MAIN);
    e = check_reply(c, CH_MAIN, amqp_get_rpc_reply(c->state), "channel.open");
    if (e != MQRPC_OK) {
        snprintf(err, errlen, "%s", c->err);
        goto fail;
    }
    c->heartbeat = amqp_get_heartbeat(c->state);
    mqr_url_clear(&u);
    *out = c;
    return MQRPC_OK;

fail:
    mqr_url_clear(&u);
    mqr_conn_free(c);
    return e;
}

void mqr_conn_free(mqr_conn *c)
{
    if (!c)
        return;
    if (c->have_msg)
        amqp_destroy_message(&c->msg);
    if (c->state) {
        /* A blocked broker does not read: a polite close would wait for
         * an answer that cannot come. */
        if (c->open && !c->blocked) {
            /* Closing the channel returns its unacknowledged deliveries to
             * the queue at once; connection.close alone does it too, but
             * the broker may log it as an abrupt close. */
            amqp_channel_close(c->state, CH_MAIN, AMQP_REPLY_SUCCESS);
            amqp_connection_close(c->state, AMQP_REPLY_SUCCESS);
        }
        amqp_destroy_connection(c->state);
    }
    free(c);
}

const char *mqr_conn_errmsg(const mqr_conn *c)
{
    return c->err;
}

int mqr_conn_fd(const mqr_conn *c)
{
    return c && c->open ? amqp_get_sockfd(c->state) : -1;
}

bool mqr_conn_buffered(const mqr_conn *c)
{
    return c->open &&
           (amqp_frames_enqueued(c->state) || amqp_data_in_buffer(c->state));
}

bool mqr_conn_blocked(const mqr_conn *c)
{
    return c->blocked;
}

bool mqr_conn_can_publish(mqr_conn *c, size_t len)
{
    int fd, unsent = 0, sndbuf = 0;
    socklen_t sl = sizeof sndbuf;

    if (!c->open || c->blocked)
        return false;
    /* The frames around the body (method, header with our properties,
     * frame ends) stay well under this much. */
    len += PUBLISH_OVERHEAD;
    /* room is a lower bound of the free space (publishes subtract from it,
     * the kernel only adds): ask the kernel only when it runs low. */
    if (c->room >= len)
        return true;
    fd = amqp_get_sockfd(c->state);
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &sl) != 0 ||
        ioctl(fd, SIOCOUTQ, &unsent) != 0)
        return true; /* cannot tell: behave as rabbitmq-c would */
    c->room = unsent >= 0 && unsent < sndbuf ? (size_t)(sndbuf - unsent) : 0;
    return c->room >= len;
}

void mqr_conn_abort(mqr_conn *c, const char *why)
{
    /* No polite close: it could wait on a broker that does not read. The
     * socket closes with the connection's state in mqr_conn_free. */
    set_err(c, "%s", why);
    c->open = false;
}

int mqr_conn_heartbeat_s(const mqr_conn *c)
{
    return c->heartbeat;
}

static amqp_table_entry_t int_entry(const char *key, int64_t v)
{
    amqp_table_entry_t t;
    t.key = amqp_cstring_bytes(key);
    t.value.kind = AMQP_FIELD_KIND_I64;
    t.value.value.i64 = v;
    return t;
}

/* A string header as the OpenTelemetry instrumentations (and pika, for a
 * Python str) write it: an AMQP long string. */
static amqp_table_entry_t str_entry(const char *key, mqr_str v)
{
    amqp_table_entry_t t;
    t.key = amqp_cstring_bytes(key);
    t.value.kind = AMQP_FIELD_KIND_UTF8;
    t.value.value.bytes = bytes_of(v);
    return t;
}

mqrpc_err mqr_conn_declare_queue(mqr_conn *c, const char *queue,
                                 const mqr_queue_opts *o, char *name_out)
{
    amqp_queue_declare_ok_t *ok;
    amqp_table_entry_t args[7];
    amqp_table_t table = {0, args};
    mqrpc_err e;

    if (!c->open)
        return MQRPC_ECLOSED;
    if (o->quorum) {
        args[table.num_entries].key = amqp_cstring_bytes("x-queue-type");
        args[table.num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
        args[table.num_entries++].value.value.bytes =
            amqp_cstring_bytes("quorum");
        if (o->delivery_limit)
            args[table.num_entries++] =
                int_entry("x-delivery-limit", o->delivery_limit);
        if (o->dead_letter_to) {
            args[table.num_entries].key =
                amqp_cstring_bytes("x-dead-letter-exchange");
            args[table.num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
            args[table.num_entries++].value.value.bytes = amqp_empty_bytes;
            args[table.num_entries].key =
                amqp_cstring_bytes("x-dead-letter-routing-key");
            args[table.num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
            args[table.num_entries++].value.value.bytes =
                amqp_cstring_bytes(o->dead_letter_to);
        }
    }
    if (o->max_length) {
        args[table.num_entries++] = int_entry("x-max-length", o->max_length);
        /* Refuse new requests rather than drop the oldest (the default):
         * with publisher confirms the caller learns it at once. */
        args[table.num_entries].key = amqp_cstring_bytes("x-overflow");
        args[table.num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
        args[table.num_entries++].value.value.bytes =
            amqp_cstring_bytes("reject-publish");
    }
    if (o->expires_ms)
        args[table.num_entries++] = int_entry("x-expires", o->expires_ms);
    /* The seed declares service queues with pika's defaults: not durable,
     * not exclusive, not auto-delete, no arguments. Declaring one with
     * anything else fails with PRECONDITION_FAILED against a seed-declared
     * queue, so the defaults stay the seed's. */
    ok = amqp_queue_declare(c->state, CH_MAIN, amqp_cstring_bytes(queue), 0,
                            o->durable || o->quorum, o->exclusive,
                            o->exclusive, table);
    e = check_reply(c, CH_MAIN, amqp_get_rpc_reply(c->state), "queue.declare");
    if (e != MQRPC_OK)
        return e;
    if (name_out) {
        size_t n = ok->queue.len < 255 ? ok->queue.len : 255;
        memcpy(name_out, ok->queue.bytes, n);
        name_out[n] = '\0';
    }
    return MQRPC_OK;
}

mqrpc_err mqr_conn_confirm_select(mqr_conn *c)
{
    if (!c->open)
        return MQRPC_ECLOSED;
    amqp_confirm_select(c->state, CH_MAIN);
    c->pub_seq = 0;
    return check_reply(c, CH_MAIN, amqp_get_rpc_reply(c->state),
                       "confirm.select");
}

uint64_t mqr_conn_publish_seq(const mqr_conn *c)
{
    return c->pub_seq;
}

mqrpc_err mqr_conn_qos(mqr_conn *c, unsigned prefetch)
{
    if (!c->open)
        return MQRPC_ECLOSED;
    amqp_basic_qos(c->state, CH_MAIN, 0, (uint16_t)prefetch, 0);
    return check_reply(c, CH_MAIN, amqp_get_rpc_reply(c->state), "basic.qos");
}

mqrpc_err mqr_conn_consume(mqr_conn *c, const char *queue, bool no_ack)
{
    amqp_basic_consume_ok_t *ok;
    mqrpc_err e;

    if (!c->open)
        return MQRPC_ECLOSED;
    ok = amqp_basic_consume(c->state, CH_MAIN, amqp_cstring_bytes(queue),
                            amqp_empty_bytes, 0, no_ack, 0, amqp_empty_table);
    e = check_reply(c, CH_MAIN, amqp_get_rpc_reply(c->state),
                    "basic.consume");
    if (e == MQRPC_OK) {
        size_t n = ok->consumer_tag.len < 255 ? ok->consumer_tag.len : 255;
        memcpy(c->consumer_tag, ok->consumer_tag.bytes, n);
        c->consumer_tag[n] = '\0';
    }
    return e;
}

mqrpc_err mqr_conn_cancel(mqr_conn *c)
{
    mqrpc_err e;

    if (!c->open)
        return MQRPC_ECLOSED;
    if (!c->consumer_tag[0])
        return MQRPC_OK;
    /* A synchronous call: rabbitmq-c keeps the frames that arrive before
     * cancel-ok (deliveries already on the way) for mqr_conn_wait. */
    amqp_basic_cancel(c->state, CH_MAIN,
                      amqp_cstring_bytes(c->consumer_tag));
    e = check_reply(c, CH_MAIN, amqp_get_rpc_reply(c->state), "basic.cancel");
    if (e == MQRPC_OK)
        c->consumer_tag[0] = '\0';
    return e;
}

static mqrpc_err publish_on(mqr_conn *c, amqp_channel_t ch,
                            const char *exchange, mqr_str routing_key,
                            const mqr_props *p, const void *body, size_t len,
                            bool mandatory)
{
    amqp_basic_properties_t props;
    amqp_bytes_t b = {len, (void *)body};
    amqp_table_entry_t headers[5];
    mqrpc_err e;

    if (!c->open)
        return MQRPC_ECLOSED;
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.content_type = amqp_cstring_bytes("application/json");
#define SET_PROP(field, flag)             \
    if (p->field.len) {                   \
        props._flags |= flag;             \
        props.field = bytes_of(p->field); \
    }
    SET_PROP(correlation_id, AMQP_BASIC_CORRELATION_ID_FLAG)
    SET_PROP(reply_to, AMQP_BASIC_REPLY_TO_FLAG)
    SET_PROP(type, AMQP_BASIC_TYPE_FLAG)
    SET_PROP(app_id, AMQP_BASIC_APP_ID_FLAG)
    SET_PROP(expiration, AMQP_BASIC_EXPIRATION_FLAG)
#undef SET_PROP
    if (p->persistent) {
        props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
        props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    }
    props.headers.num_entries = 0;
    props.headers.entries = headers;
    if (p->deadline_ms)
        headers[props.headers.num_entries++] =
            int_entry(MQR_HDR_DEADLINE, p->deadline_ms);
    if (p->deliveries)
        headers[props.headers.num_entries++] =
            int_entry(MQR_HDR_DELIVERIES, p->deliveries);
    if (p->progress)
        headers[props.headers.num_entries++] = int_entry(MQR_HDR_PROGRESS, 1);
    if (p->traceparent.len)
        headers[props.headers.num_entries++] =
            str_entry(MQR_HDR_TRACEPARENT, p->traceparent);
    if (p->tracestate.len)
        headers[props.headers.num_entries++] =
            str_entry(MQR_HDR_TRACESTATE, p->tracestate);
    if (props.headers.num_entries)
        props._flags |= AMQP_BASIC_HEADERS_FLAG;
    e = check_status(c,
                     amqp_basic_publish(c->state, ch,
                                        exchange ? amqp_cstring_bytes(exchange)
                                                 : amqp_empty_bytes,
                                        bytes_of(routing_key), mandatory, 0,
                                        &props, b),
                     "publish");
    if (e == MQRPC_OK) {
        len += PUBLISH_OVERHEAD;
        c->room = c->room > len ? c->room - len : 0;
    }
    return e;
}

mqrpc_err mqr_conn_publish(mqr_conn *c, mqr_str routing_key, const mqr_props *p,
                           const void *body, size_t len, bool mandatory)
{
    mqrpc_err e =
        publish_on(c, CH_MAIN, NULL, routing_key, p, body, len, mandatory);

    if (e == MQRPC_OK)
        c->pub_seq++;
    return e;
}

mqrpc_err mqr_conn_publish_confirmed(mqr_conn *c, mqr_str routing_key,
                                     const mqr_props *p, const void *body,
                                     size_t len, uint64_t *seq)
{
    mqrpc_err e;

    if (!c->open)
        return MQRPC_ECLOSED;
    if (!c->confirm_open) {
        amqp_channel_open(c->state, CH_CONFIRM);
        e = check_reply(c, CH_CONFIRM, amqp_get_rpc_reply(c->state),
                        "channel.open");
        if (e != MQRPC_OK)
            return e;
        amqp_confirm_select(c->state, CH_CONFIRM);
        e = check_reply(c, CH_CONFIRM, amqp_get_rpc_reply(c->state),
                        "confirm.select");
        if (e != MQRPC_OK)
            return e;
        c->confirm_open = true;
        c->confirm_seq = 0;
    }
    e = publish_on(c, CH_CONFIRM, NULL, routing_key, p, body, len, false);
    if (e == MQRPC_OK)
        *seq = ++c->confirm_seq;
    return e;
}

mqrpc_err mqr_conn_ack(mqr_conn *c, uint64_t delivery_tag, bool multiple)
{
    if (!c->open)
        return MQRPC_ECLOSED;
    return check_status(
        c, amqp_basic_ack(c->state, CH_MAIN, delivery_tag, multiple),
        "basic.ack");
}

void mqr_conn_cork(mqr_conn *c, bool on)
{
#ifdef TCP_CORK
    int v = on;
    /* Best effort: without it the frames still go, only in more packets. */
    if (c->open)
        (void)setsockopt(amqp_get_sockfd(c->state), IPPROTO_TCP, TCP_CORK, &v,
                         sizeof v);
#else
    (void)c;
    (void)on;
#endif
}

/* An integer header of any AMQP integer type; false if it has another
 * type (a peer's mistake, reported as a bad request). */
static bool int_value(const amqp_field_value_t *v, int64_t *out)
{
    switch (v->kind) {
    case AMQP_FIELD_KIND_I8: *out = v->value.i8; return true;
    case AMQP_FIELD_KIND_U8: *out = v->value.u8; return true;
    case AMQP_FIELD_KIND_I16: *out = v->value.i16; return true;
    case AMQP_FIELD_KIND_U16: *out = v->value.u16; return true;
    case AMQP_FIELD_KIND_I32: *out = v->value.i32; return true;
    case AMQP_FIELD_KIND_U32: *out = v->value.u32; return true;
    case AMQP_FIELD_KIND_I64: *out = v->value.i64; return true;
    case AMQP_FIELD_KIND_U64:
        *out = v->value.u64 > INT64_MAX ? INT64_MAX : (int64_t)v->value.u64;
        return true;
    default: return false;
    }
}

/* Picks our headers out of the table; others are ignored, however many. */
static void read_headers(const amqp_table_t *t, mqr_msg *m)
{
    for (int i = 0; i < t->num_entries; i++) {
        const amqp_table_entry_t *h = &t->entries[i];
        mqr_str key = str_of(h->key);
        int64_t v;

        if (mqr_str_eq(key, MQR_HDR_DEADLINE)) {
            if (int_value(&h->value, &v) && v > 0)
                m->deadline_ms = v;
            else
                m->bad_headers = true;
        } else if (mqr_str_eq(key, MQR_HDR_DELIVERIES)) {
            if (int_value(&h->value, &v) && v >= 0)
                m->deliveries = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
            else
                m->bad_headers = true;
        } else if (mqr_str_eq(key, "x-delivery-count")) {
            /* The broker's own: a quorum queue's returns of the message. */
            if (int_value(&h->value, &v) && v >= 0)
                m->delivery_count = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
        } else if (mqr_str_eq(key, MQR_HDR_PROGRESS)) {
            /* Advisory: a header of another type asks for nothing. */
            m->progress = int_value(&h->value, &v) && v != 0;
        } else if (mqr_str_eq(key, MQR_HDR_TRACEPARENT) ||
                   mqr_str_eq(key, MQR_HDR_TRACESTATE)) {
            /* Advisory too: a value of another type is no trace context,
             * and whoever reads it starts a trace of its own. */
            if (h->value.kind == AMQP_FIELD_KIND_UTF8 ||
                h->value.kind == AMQP_FIELD_KIND_BYTES) {
                if (key.len == sizeof MQR_HDR_TRACEPARENT - 1)
                    m->traceparent = str_of(h->value.value.bytes);
                else
                    m->tracestate = str_of(h->value.value.bytes);
            }
        }
    }
}

/* Fills the message's properties from a content header's. */
static void read_props(const amqp_basic_properties_t *p, mqr_msg *m)
{
#define GET_PROP(field, flag) \
    if (p->_flags & flag)     \
        m->field = str_of(p->field);
    GET_PROP(correlation_id, AMQP_BASIC_CORRELATION_ID_FLAG)
    GET_PROP(reply_to, AMQP_BASIC_REPLY_TO_FLAG)
    GET_PROP(type, AMQP_BASIC_TYPE_FLAG)
    GET_PROP(app_id, AMQP_BASIC_APP_ID_FLAG)
    GET_PROP(content_type, AMQP_BASIC_CONTENT_TYPE_FLAG)
#undef GET_PROP
    m->persistent = (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG) &&
                    p->delivery_mode == AMQP_DELIVERY_PERSISTENT;
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG)
        read_headers(&p->headers, m);
}

/* A failure in the middle of a message: whatever the cause, a half-read
 * message leaves the frame stream out of step, so the connection cannot be
 * trusted any more. */
static mqrpc_err content_failed(mqr_conn *c)
{
    c->open = false;
    return MQRPC_ECLOSED;
}

/* The next frame of a message's content on channel ch, straight from the
 * socket. RabbitMQ writes a message's frames in one piece (one write of
 * the channel's writer), so nothing of another channel comes between
 * them; if something did, the stream would be out of step for us. */
static bool content_frame(mqr_conn *c, amqp_channel_t ch, uint8_t type,
                          amqp_frame_t *f)
{
    int st = amqp_simple_wait_frame(c->state, f);

    if (st != AMQP_STATUS_OK) {
        check_status(c, st, "reading a message");
        return false;
    }
    if (f->frame_type == type && f->channel == ch)
        return true;
    if (f->frame_type == AMQP_FRAME_METHOD &&
        (f->payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
         f->payload.method.id == AMQP_CONNECTION_CLOSE_METHOD))
        server_close(c, f->channel, &f->payload.method, "reading a message");
    else
        set_err(c, "reading a message on %s: frame of type %u on channel %u "
                   "where content of channel %u was due",
                c->where, (unsigned)f->frame_type, (unsigned)f->channel,
                (unsigned)ch);
    return false;
}

/* Reads the header and body that follow a deliver or return method and
 * fills the message's properties. Nothing is copied when the body fits one
 * frame (every body under frame_max, 128 KiB): the properties and the body
 * point into the frames in rabbitmq-c's pools, which mqr_conn_wait's
 * amqp_maybe_release_buffers recycles only before the next read.
 * amqp_read_message copies both into a fresh 4 KiB pool page and a
 * malloc'd body and frees them again: a third of the client's
 * instructions per call (callgrind). It is still used when frames wait in
 * rabbitmq-c's queue (a synchronous method, such as a passive declare,
 * set aside what came meanwhile), since only it can take the content from
 * there; and a body of several frames is assembled in c->msg.body, freed
 * by amqp_destroy_message as if amqp_read_message had filled it. */
static mqrpc_err read_content(mqr_conn *c, amqp_channel_t ch, mqr_msg *m)
{
    amqp_frame_t f;
    const amqp_basic_properties_t *p;
    uint64_t size;
    size_t got;

    if (amqp_frames_enqueued(c->state)) {
        if (check_reply(c, ch, amqp_read_message(c->state, ch, &c->msg, 0),
                        "reading a message") != MQRPC_OK)
            return content_failed(c);
        c->have_msg = true;
        m->body = str_of(c->msg.body);
        read_props(&c->msg.properties, m);
        return MQRPC_OK;
    }
    if (!content_frame(c, ch, AMQP_FRAME_HEADER, &f))
        return content_failed(c);
    p = f.payload.properties.decoded;
    size = f.payload.properties.body_size;
    m->body.ptr = "";
    m->body.len = 0;
    for (got = 0; got < size;) {
        amqp_bytes_t frag;
        if (!content_frame(c, ch, AMQP_FRAME_BODY, &f))
            return content_failed(c);
        frag = f.payload.body_fragment;
        if (frag.len > size - got) {
            set_err(c, "reading a message on %s: body longer than its "
                       "header says",
                    c->where);
            return content_failed(c);
        }
        if (got == 0 && frag.len == size) {
            m->body = str_of(frag); /* the common case: one frame */
            break;
        }
        if (got == 0) {
            /* An empty pool allocates nothing: amqp_destroy_message then
             * frees the body alone. */
            memset(&c->msg, 0, sizeof c->msg);
            init_amqp_pool(&c->msg.pool, 4096);
            c->msg.body = size > SIZE_MAX ? amqp_empty_bytes
                                          : amqp_bytes_malloc((size_t)size);
            if (!c->msg.body.bytes) {
                set_err(c, "reading a message on %s: no memory for a body "
                           "of %llu bytes",
                        c->where, (unsigned long long)size);
                return content_failed(c);
            }
            c->have_msg = true;
            m->body = str_of(c->msg.body);
        }
        memcpy((char *)c->msg.body.bytes + got, frag.bytes, frag.len);
        got += frag.len;
    }
    read_props(p, m);
    return MQRPC_OK;
}

void mqr_conn_set_wake_fd(mqr_conn *c, int fd)
{
    c->wake_fd = fd;
}

/* Waits until the socket or the wake fd is readable, deadline (0: none)
 * passes, or a heartbeat may be due: 1 when woken, 0 otherwise, -1 on a
 * poll failure. */
static int poll_wake(mqr_conn *c, int64_t deadline)
{
    struct pollfd p[2] = {{.fd = amqp_get_sockfd(c->state), .events = POLLIN},
                          {.fd = c->wake_fd, .events = POLLIN}};
    /* rabbitmq-c sends a heartbeat only when called: come back often
     * enough for it (a quarter of the interval, at most a second). */
    int64_t slice = c->heartbeat > 0 ? c->heartbeat * 250LL : 1000;
    int64_t ms = slice > 1000 ? 1000 : slice;
    int n;

    if (deadline) {
        int64_t left = (deadline - mqr_now_us() + 999) / 1000;
        if (left < ms)
            ms = left < 0 ? 0 : left;
    }
    do
        n = poll(p, 2, (int)ms);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -1;
    return (p[1].revents & POLLIN) ? 1 : 0;
}

mqrpc_err mqr_conn_wait(mqr_conn *c, int timeout_ms, mqr_msg *m)
{
    int64_t deadline = timeout_ms < 0 ? 0 : mqr_now_us() + timeout_ms * 1000LL;

    if (!c->open) {
        if (!c->err[0])
            set_err(c, "connection to %s is closed", c->where);
        return MQRPC_ECLOSED;
    }
    if (c->have_msg) {
        amqp_destroy_message(&c->msg);
        c->have_msg = false;
    }
    /* The previous message's frames live in rabbitmq-c's pools until here. */
    amqp_maybe_release_buffers(c->state);
    memset(m, 0, sizeof *m);

    for (;;) {
        struct timeval tv, *tvp = NULL;
        amqp_frame_t f;
        int st;

        if (c->wake_fd >= 0 && !mqr_conn_buffered(c)) {
            switch (poll_wake(c, deadline)) {
            case 1: m->kind = MQR_WAKE; return MQRPC_OK;
            case 0: break;
            default:
                set_err(c, "waiting on %s: %s", c->where, strerror(errno));
                c->open = false;
                return MQRPC_ECLOSED;
            }
            /* Reads what came and sends a heartbeat if one is due, without
             * waiting: rabbitmq-c's own wait cannot watch the wake fd. */
            tv.tv_sec = 0;
            tv.tv_usec = 0;
            tvp = &tv;
        } else if (timeout_ms >= 0) {
            int64_t left = deadline - mqr_now_us();
            if (left < 0)
                left = 0;
            tv.tv_sec = (time_t)(left / 1000000);
            tv.tv_usec = (suseconds_t)(left % 1000000);
            tvp = &tv;
        }
        st = amqp_simple_wait_frame_noblock(c->state, &f, tvp);
        if (st == AMQP_STATUS_TIMEOUT) {
            if (c->wake_fd >= 0 &&
                (timeout_ms < 0 || mqr_now_us() < deadline))
                continue;
            return MQRPC_ETIMEOUT;
        }
        if (st != AMQP_STATUS_OK) {
            set_err(c, "connection to %s lost: %s", c->where,
                    amqp_error_string2(st));
            c->open = false;
            return MQRPC_ECLOSED;
        }
        if (f.frame_type != AMQP_FRAME_METHOD)
            continue; /* content without a method: nothing to attach it to */
        m->channel = f.channel;

        switch (f.payload.method.id) {
        case AMQP_BASIC_DELIVER_METHOD: {
            const amqp_basic_deliver_t *d = f.payload.method.decoded;
            m->kind = MQR_DELIVERY;
            m->delivery_tag = d->delivery_tag;
            m->redelivered = d->redelivered;
            return read_content(c, f.channel, m);
        }
        case AMQP_BASIC_ACK_METHOD: {
            const amqp_basic_ack_t *a = f.payload.method.decoded;
            m->kind = MQR_ACK;
            m->delivery_tag = a->delivery_tag;
            m->multiple = a->multiple;
            return MQRPC_OK;
        }
        case AMQP_BASIC_NACK_METHOD: {
            const amqp_basic_nack_t *n = f.payload.method.decoded;
            m->kind = MQR_NACK;
            m->delivery_tag = n->delivery_tag;
            m->multiple = n->multiple;
            return MQRPC_OK;
        }
        case AMQP_BASIC_RETURN_METHOD: {
            const amqp_basic_return_t *r = f.payload.method.decoded;
            m->kind = MQR_RETURN;
            m->reply_code = r->reply_code;
            m->reply_text = str_of(r->reply_text);
            return read_content(c, f.channel, m);
        }
        case AMQP_CHANNEL_CLOSE_METHOD:
        case AMQP_CONNECTION_CLOSE_METHOD: {
            mqrpc_err e = server_close(c, f.channel, &f.payload.method,
                                       "closed by the broker");
            if (c->open)
                continue; /* only the side channel went */
            return e == MQRPC_OK ? MQRPC_ECLOSED : e;
        }
        case AMQP_BASIC_CANCEL_METHOD:
            /* The broker cancels a consumer when its queue is deleted
             * (consumer_cancel_notify); the owner decides what follows. */
            m->kind = MQR_CANCEL;
            if (f.channel == CH_CONTROL)
                c->control_consuming = false;
            else if (f.channel == CH_MAIN)
                c->consumer_tag[0] = '\0';
            return MQRPC_OK;
        case AMQP_CONNECTION_BLOCKED_METHOD: {
            const amqp_connection_blocked_t *b = f.payload.method.decoded;
            c->blocked = true;
            m->kind = MQR_BLOCKED;
            m->reply_text = str_of(b->reason);
            return MQRPC_OK;
        }
        case AMQP_CONNECTION_UNBLOCKED_METHOD:
            c->blocked = false;
            m->kind = MQR_UNBLOCKED;
            return MQRPC_OK;
        default: continue;
        }
    }
}

static mqrpc_err open_side(mqr_conn *c)
{
    mqrpc_err e;

    if (!c->open)
        return MQRPC_ECLOSED;
    if (c->side_open)
        return MQRPC_OK;
    amqp_channel_open(c->state, CH_SIDE);
    e = check_reply(c, CH_SIDE, amqp_get_rpc_reply(c->state), "channel.open");
    if (e == MQRPC_OK)
        c->side_open = true;
    return e;
}

mqrpc_err mqr_conn_delete_queue(mqr_conn *c, const char *queue)
{
    mqrpc_err e = open_side(c);

    if (e != MQRPC_OK)
        return e;
    amqp_queue_delete(c->state, CH_SIDE, amqp_cstring_bytes(queue), 0, 0);
    return check_reply(c, CH_SIDE, amqp_get_rpc_reply(c->state),
                       "queue.delete");
}

mqrpc_err mqr_conn_queue_info(mqr_conn *c, const char *queue,
                              uint32_t *messages, uint32_t *consumers)
{
    amqp_queue_declare_ok_t *ok;
    mqrpc_err e = open_side(c);

    if (e != MQRPC_OK)
        return e;
    ok = amqp_queue_declare(c->state, CH_SIDE, amqp_cstring_bytes(queue), 1, 0,
                            0, 0, amqp_empty_table);
    e = check_reply(c, CH_SIDE, amqp_get_rpc_reply(c->state),
                    "queue.declare (passive)");
    if (e != MQRPC_OK)
        return e;
    if (messages)
        *messages = ok->message_count;
    if (consumers)
        *consumers = ok->consumer_count;
    return MQRPC_OK;
}

/* ------------------------------------------------------------- control */

bool mqr_conn_consuming(const mqr_conn *c)
{
    return c->open && c->consumer_tag[0];
}

const char *mqr_conn_where(const mqr_conn *c)
{
    return c->where;
}

void mqr_conn_cluster_name(const mqr_conn *c, char *buf, size_t len)
{
    const amqp_table_t *t;

    buf[0] = '\0';
    if (!c->state || !(t = amqp_get_server_properties(c->state)))
        return;
    for (int i = 0; i < t->num_entries; i++) {
        const amqp_table_entry_t *e = &t->entries[i];
        if (e->key.len == 12 && memcmp(e->key.bytes, "cluster_name", 12) == 0 &&
            (e->value.kind == AMQP_FIELD_KIND_UTF8 ||
             e->value.kind == AMQP_FIELD_KIND_BYTES)) {
            snprintf(buf, len, "%.*s", (int)e->value.value.bytes.len,
                     (const char *)e->value.value.bytes.bytes);
            return;
        }
    }
}

mqrpc_err mqr_conn_control_open(mqr_conn *c, const char *exchange,
                                const char *queue, const char *const *keys,
                                size_t nkeys)
{
    mqrpc_err e;

    if (!c->open)
        return MQRPC_ECLOSED;
    if (!c->control_ch) {
        amqp_channel_open(c->state, CH_CONTROL);
        e = check_reply(c, CH_CONTROL, amqp_get_rpc_reply(c->state),
                        "channel.open");
        if (e != MQRPC_OK)
            return e;
        c->control_ch = true;
    }
    /* Durable, so that callers find it across broker restarts even before
     * an instance is back; every instance declares it the same way. */
    amqp_exchange_declare(c->state, CH_CONTROL, amqp_cstring_bytes(exchange),
                          amqp_cstring_bytes("direct"), 0, 1, 0, 0,
                          amqp_empty_table);
    e = check_reply(c, CH_CONTROL, amqp_get_rpc_reply(c->state),
                    "exchange.declare");
    if (e != MQRPC_OK)
        return e;
    /* Exclusive and auto-delete: it lives exactly as long as this
     * connection, so a dead instance leaves nothing behind to answer. */
    amqp_queue_declare(c->state, CH_CONTROL, amqp_cstring_bytes(queue), 0, 0, 1,
                       1, amqp_empty_table);
    e = check_reply(c, CH_CONTROL, amqp_get_rpc_reply(c->state),
                    "queue.declare");
    for (size_t i = 0; i < nkeys && e == MQRPC_OK; i++) {
        amqp_queue_bind(c->state, CH_CONTROL, amqp_cstring_bytes(queue),
                        amqp_cstring_bytes(exchange),
                        amqp_cstring_bytes(keys[i]), amqp_empty_table);
        e = check_reply(c, CH_CONTROL, amqp_get_rpc_reply(c->state),
                        "queue.bind");
    }
    if (e != MQRPC_OK)
        return e;
    /* No acknowledgements: a ping is answered at once or not at all, and
     * the request consumer's prefetch must not count it. */
    amqp_basic_consume(c->state, CH_CONTROL, amqp_cstring_bytes(queue),
                       amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
    e = check_reply(c, CH_CONTROL, amqp_get_rpc_reply(c->state),
                    "basic.consume");
    if (e == MQRPC_OK)
        c->control_consuming = true;
    return e;
}

bool mqr_conn_control_on(const mqr_conn *c)
{
    return c->open && c->control_consuming;
}

mqrpc_err mqr_conn_publish_to(mqr_conn *c, const char *exchange,
                              mqr_str routing_key, const mqr_props *p,
                              const void *body, size_t len)
{
    mqrpc_err e =
        publish_on(c, CH_MAIN, exchange, routing_key, p, body, len, false);

    if (e == MQRPC_OK)
        c->pub_seq++;
    return e;
}

mqrpc_err mqr_conn_exchange_exists(mqr_conn *c, const char *exchange)
{
    mqrpc_err e = open_side(c);

    if (e != MQRPC_OK)
        return e;
    amqp_exchange_declare(c->state, CH_SIDE, amqp_cstring_bytes(exchange),
                          amqp_cstring_bytes("direct"), 1, 0, 0, 0,
                          amqp_empty_table);
    return check_reply(c, CH_SIDE, amqp_get_rpc_reply(c->state),
                       "exchange.declare (passive)");
}
