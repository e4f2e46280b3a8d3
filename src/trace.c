/*
 * W3C Trace Context (https://www.w3.org/TR/trace-context/): parsing and
 * formatting the traceparent and tracestate headers, and the random ids of
 * traces and spans. Pure but for getrandom; unit-tested without a broker.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

static int hex_value(char ch)
{
    /* Lowercase only: the recommendation says producers MUST write
     * lowercase, and a receiver that takes uppercase would send back a
     * different trace id than it got. */
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    return -1;
}

/* n hex digits at s, not all zero when nonzero is true. */
static bool hex_field(const char *s, size_t n, bool nonzero)
{
    bool zero = true;

    for (size_t i = 0; i < n; i++) {
        int v = hex_value(s[i]);
        if (v < 0)
            return false;
        if (v)
            zero = false;
    }
    return !(nonzero && zero);
}

bool mqr_traceparent_parse(const char *s, size_t len, mqr_trace_ids *out)
{
    /* version "-" trace-id "-" parent-id "-" flags: 2+1+32+1+16+1+2 */
    if (!s || len < MQRPC_TRACEPARENT_LEN || !hex_field(s, 2, false) ||
        s[2] != '-' || s[35] != '-' || s[52] != '-')
        return false;
    /* Version ff is forbidden; version 00 has exactly these fields; a later
     * version may add fields after a '-', which a 00 parser skips. */
    if (s[0] == 'f' && s[1] == 'f')
        return false;
    if (s[0] == '0' && s[1] == '0' ? len != MQRPC_TRACEPARENT_LEN
                                   : len > MQRPC_TRACEPARENT_LEN &&
                                         s[MQRPC_TRACEPARENT_LEN] != '-')
        return false;
    if (!hex_field(s + 3, 32, true) || !hex_field(s + 36, 16, true) ||
        !hex_field(s + 53, 2, false))
        return false;
    if (out) {
        memcpy(out->trace_id, s + 3, 32);
        out->trace_id[32] = '\0';
        memcpy(out->span_id, s + 36, 16);
        out->span_id[16] = '\0';
        memcpy(out->flags, s + 53, 2);
        out->flags[2] = '\0';
    }
    return true;
}

bool mqr_tracestate_ok(const char *s, size_t len)
{
    /* Not the full list-member grammar: what matters to us is that it is
     * one header line of printable ASCII we can pass on, as the
     * recommendation's 512-character limit allows. */
    if (!s || len == 0 || len > MQRPC_TRACESTATE_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return false;
    return true;
}

void mqr_traceparent_format(char out[MQRPC_TRACEPARENT_LEN + 1],
                            const char *trace_id, const char *span_id,
                            const char *flags)
{
    memcpy(out, "00-", 3);
    memcpy(out + 3, trace_id, 32);
    out[35] = '-';
    memcpy(out + 36, span_id, 16);
    out[52] = '-';
    memcpy(out + 53, flags, 2);
    out[MQRPC_TRACEPARENT_LEN] = '\0';
}

void mqr_trace_random_hex(char *out, size_t nbytes)
{
    static const char digits[] = "0123456789abcdef";
    unsigned char b[16];
    bool zero = true;

    if (nbytes == 0 || nbytes > sizeof b)
        nbytes = sizeof b;
    mqr_random_bytes(b, nbytes);
    for (size_t i = 0; i < nbytes; i++)
        if (b[i])
            zero = false;
    if (zero) /* all-zero ids are invalid; 2^-64 at worst, but never */
        b[0] = 1;
    for (size_t i = 0; i < nbytes; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * nbytes] = '\0';
}

void mqr_trace_start(mqr_trace *t, mqr_str incoming)
{
    mqr_trace_ids in;

    if (mqr_traceparent_parse(incoming.ptr, incoming.len, &in)) {
        memcpy(t->trace_id, in.trace_id, sizeof t->trace_id);
        memcpy(t->parent_id, in.span_id, sizeof t->parent_id);
        memcpy(t->flags, in.flags, sizeof t->flags);
    } else {
        /* None, or one we cannot read: the recommendation says to start
         * a new trace rather than pass on what we do not understand. */
        mqr_trace_random_hex(t->trace_id, 16);
        t->parent_id[0] = '\0';
        memcpy(t->flags, "01", 3);
    }
    mqr_trace_random_hex(t->span_id, 8);
    mqr_traceparent_format(t->traceparent, t->trace_id, t->span_id, t->flags);
}

int mqrpc_traceparent_valid(const char *traceparent)
{
    return traceparent &&
           mqr_traceparent_parse(traceparent, strlen(traceparent), NULL);
}
