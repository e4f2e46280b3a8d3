/* --log-format json: log records as JSON lines, through jansson. */
#include "jsonlog.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const level_names[] = {"error", "warn", "info", "debug"};

/* A JSON string of s; bytes that are not UTF-8 (a peer's correlation id
 * may have any) become '?' rather than losing the line. */
static json_t *json_text(const char *s)
{
    json_t *v = json_string(s);
    char *copy;

    if (v || !(copy = strdup(s)))
        return v;
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    v = json_string(copy);
    free(copy);
    return v;
}

static void set_text(json_t *o, const char *key, const char *s)
{
    if (s)
        json_object_set_new(o, key, json_text(s));
}

void jsonlog_line(const char *instance, const mqrpc_log_record *rec)
{
    struct timespec now;
    struct tm tm;
    char ts[40], *text;
    json_t *o = json_object();

    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + strlen(ts), sizeof ts - strlen(ts), ".%03ldZ",
             now.tv_nsec / 1000000);
    set_text(o, "ts", ts);
    set_text(o, "level",
             (unsigned)rec->level < 4 ? level_names[rec->level] : "debug");
    set_text(o, "instance", instance);
    set_text(o, "msg", rec->msg);
    set_text(o, "queue", rec->queue);
    set_text(o, "correlation_id", rec->correlation_id);
    set_text(o, "trace_id", rec->trace_id);
    set_text(o, "span_id", rec->span_id);
    if (rec->duration_ms >= 0)
        json_object_set_new(o, "duration_ms",
                            json_real((double)(long long)(rec->duration_ms *
                                                          1000 + 0.5) /
                                      1000));
    set_text(o, "code", rec->code);
    text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER |
                             JSON_REAL_PRECISION(9));
    json_decref(o);
    if (text) {
        /* One write per line: workers log from several threads. */
        flockfile(stderr);
        fputs(text, stderr);
        fputc('\n', stderr);
        funlockfile(stderr);
        free(text);
    }
}

