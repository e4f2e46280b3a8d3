/* Small helpers shared by the library's files. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

mqr_str mqr_cstr(const char *s)
{
    mqr_str r = {s, s ? strlen(s) : 0};
    return r;
}

bool mqr_str_eq(mqr_str s, const char *lit)
{
    size_t n = strlen(lit);
    return s.len == n && (n == 0 || memcmp(s.ptr, lit, n) == 0);
}

int64_t mqr_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t mqr_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int mqr_jitter(uint64_t *rng, int d)
{
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    return d / 2 + (int)(*rng % (uint64_t)(d / 2 + 1));
}

int mqr_backoff_next(int d, int max)
{
    return d > max / 2 ? max : d * 2;
}

static bool dup_opt(const char *in, char **owned, const char **out)
{
    *owned = in ? strdup(in) : NULL;
    *out = *owned;
    return !in || *owned;
}

bool mqr_conn_cfg_init(mqr_conn_cfg *cfg, const mqr_conn_params *p)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->p = *p;
    if (dup_opt(p->url, &cfg->owned_[0], &cfg->p.url) &&
        dup_opt(p->url_file, &cfg->owned_[1], &cfg->p.url_file) &&
        dup_opt(p->name, &cfg->owned_[2], &cfg->p.name) &&
        dup_opt(p->tls.ca_file, &cfg->owned_[3], &cfg->p.tls.ca_file) &&
        dup_opt(p->tls.cert_file, &cfg->owned_[4], &cfg->p.tls.cert_file) &&
        dup_opt(p->tls.key_file, &cfg->owned_[5], &cfg->p.tls.key_file))
        return true;
    mqr_conn_cfg_clear(cfg);
    return false;
}

void mqr_conn_cfg_clear(mqr_conn_cfg *cfg)
{
    for (size_t i = 0; i < sizeof cfg->owned_ / sizeof cfg->owned_[0]; i++)
        free(cfg->owned_[i]);
    memset(cfg, 0, sizeof *cfg);
}

bool mqr_opts_copy(void *dst, size_t dst_size, const void *src)
{
    size_t size;
    const unsigned char *extra;

    memcpy(&size, src, sizeof size);
    if (size < sizeof size) {
        errno = EINVAL;
        return false;
    }
    if (size > dst_size) {
        /* Fields of a newer header that this library does not have: only
         * their zero (default) values can be honoured. */
        extra = (const unsigned char *)src + dst_size;
        for (size_t i = 0; i < size - dst_size; i++) {
            if (extra[i]) {
                errno = EINVAL;
                return false;
            }
        }
        size = dst_size;
    }
    memcpy(dst, src, size);
    memcpy(dst, &dst_size, sizeof dst_size);
    return true;
}

void mqr_struct_out(void *out, size_t out_size, const void *src,
                    size_t src_size)
{
    memcpy(out, src, out_size < src_size ? out_size : src_size);
}

/* Hands one formatted line to lg: a record, the program's function, or
 * stderr. f: the request it is about, or NULL. */
static void log_emit(const mqr_logger *lg, mqrpc_log_level level,
                     const mqr_req_fields *f, const char *msg)
{
    char line[1200], stamp[32];
    time_t now;
    struct tm tm;

    if (lg->record_fn) {
        mqrpc_log_record rec = {.size = sizeof rec,
                                .level = level,
                                .msg = msg,
                                .duration_ms = -1};
        if (f) {
            rec.queue = f->queue;
            rec.correlation_id = f->correlation_id;
            rec.trace_id = f->trace_id;
            rec.span_id = f->span_id;
            rec.code = f->code;
            rec.duration_ms = f->duration_ms;
        }
        lg->record_fn(&rec, lg->arg);
        return;
    }
    if (f && f->trace_id) {
        /* Text lines name the trace too, so a grep for a trace id finds
         * every line about it whatever the log format. */
        snprintf(line, sizeof line, "%s trace_id=%s span_id=%s", msg,
                 f->trace_id, f->span_id ? f->span_id : "");
        msg = line;
    }
    if (lg->fn) {
        lg->fn(level, msg, lg->arg);
        return;
    }
    /* UTC time and the instance first, so interleaved logs of several
     * instances stay readable. */
    now = time(NULL);
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);
    fprintf(stderr, "%s %s %s\n", stamp, lg->name ? lg->name : "mqrpc", msg);
}

void mqr_log(const mqr_logger *lg, mqrpc_log_level level, const char *fmt,
             ...)
{
    char line[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    log_emit(lg, level, NULL, line);
}

void mqr_log_req(const mqr_logger *lg, mqrpc_log_level level,
                 const mqr_req_fields *f, const char *fmt, ...)
{
    char line[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    log_emit(lg, level, f, line);
}

unsigned mqrpc_version(void)
{
    return MQRPC_VERSION_NUMBER;
}

const char *mqrpc_version_string(void)
{
    return MQRPC_VERSION;
}

int mqr_wake_open(void)
{
    return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

void mqr_wake_signal(int fd)
{
    uint64_t one = 1;

    if (write(fd, &one, sizeof one) < 0) {
        /* only a full counter, which still leaves it readable */
    }
}

void mqr_wake_drain(int fd)
{
    uint64_t n;

    if (read(fd, &n, sizeof n) < 0) {
        /* EAGAIN: nothing to drain (another read took it) */
    }
}

bool mqr_addrs_failed(mqr_addrs *a)
{
    a->next++;
    if (++a->misses < a->count)
        return false;
    a->misses = 0;
    return true;
}

void mqr_addrs_lost(mqr_addrs *a)
{
    /* The node that went may come back, but the others are up now. */
    a->next++;
    a->misses = 0;
}

void mqr_addrs_connected(mqr_addrs *a)
{
    a->misses = 0;
}

void mqr_append(char *buf, size_t size, const char *sep, const char *s)
{
    size_t n = strlen(buf);

    if (n && n + strlen(sep) < size) {
        memcpy(buf + n, sep, strlen(sep));
        n += strlen(sep);
    }
    for (; *s && n + 1 < size; s++)
        buf[n++] = *s;
    buf[n] = '\0';
}

/* Random bytes from the kernel; without any entropy source, bytes unique
 * enough within this process. */
void mqr_random_bytes(void *out, size_t len)
{
    unsigned char *buf = out;

    if (getrandom(buf, len, 0) == (ssize_t)len)
        return;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, buf, len);
        close(fd);
        if (n == (ssize_t)len)
            return;
    }
    /* No entropy source: unique enough within this process. */
    static _Atomic uint64_t counter;
    uint64_t x = (uint64_t)mqr_now_us() ^ ((uint64_t)getpid() << 40) ^
                 ++counter * 0x9e3779b97f4a7c15u;
    for (size_t i = 0; i < len; i++)
        buf[i] = (unsigned char)(x >> (8 * (i % 8))) ^ (unsigned char)i;
}
