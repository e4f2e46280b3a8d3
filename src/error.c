#include "mqrpc/mqrpc.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const char *const error_text[] = {
#define MQRPC_TEXT_(name, short_name, text) text,
    MQRPC_ERRORS(MQRPC_TEXT_)
#undef MQRPC_TEXT_
};

static const char *const error_name[] = {
#define MQRPC_NAME_(name, short_name, text) short_name,
    MQRPC_ERRORS(MQRPC_NAME_)
#undef MQRPC_NAME_
};

#define COUNT (sizeof error_text / sizeof error_text[0])

const char *mqrpc_strerror(mqrpc_err err)
{
    if ((unsigned)err >= COUNT)
        return "unknown error";
    return error_text[err];
}

const char *mqrpc_errname(mqrpc_err err)
{
    if ((unsigned)err >= COUNT)
        return "unknown";
    return error_name[err];
}

json_t *mqrpc_fault_set(mqrpc_fault *fault, const char *code, const char *fmt,
                        ...)
{
    va_list ap;

    snprintf(fault->code, sizeof fault->code, "%s", code);
    va_start(ap, fmt);
    vsnprintf(fault->message, sizeof fault->message, fmt, ap);
    va_end(ap);
    return NULL;
}

static const char *const code_name[] = {
#define MQRPC_CODE_NAME_(name, text) text,
    MQRPC_CODES(MQRPC_CODE_NAME_)
#undef MQRPC_CODE_NAME_
};

_Static_assert(MQRPC_CODE_COUNT <= MQRPC_CODE_SLOTS,
               "the stats structs have no room for that many codes");

const char *mqrpc_code_name(unsigned code)
{
    return code < MQRPC_CODE_COUNT ? code_name[code] : NULL;
}

mqrpc_code mqrpc_code_of(const char *code)
{
    if (!code || !*code)
        return MQRPC_CODE_OK;
    /* OTHER is a bucket, not a code a handler can name to land in it. */
    for (unsigned i = 0; i < MQRPC_CODE_OTHER; i++)
        if (strcmp(code, code_name[i]) == 0)
            return (mqrpc_code)i;
    return MQRPC_CODE_OTHER;
}

static const double duration_bounds_s[] = {MQRPC_DURATION_BOUNDS_S};

_Static_assert(sizeof duration_bounds_s / sizeof duration_bounds_s[0] ==
                   MQRPC_DURATION_BUCKETS,
               "MQRPC_DURATION_BUCKETS must count MQRPC_DURATION_BOUNDS_S");

unsigned mqr_duration_bucket(int64_t us)
{
    double s = (double)us / 1e6;
    unsigned i = 0;

    /* A linear walk: 18 comparisons cost less than a reply's syscall. */
    while (i < MQRPC_DURATION_BUCKETS && s > duration_bounds_s[i])
        i++;
    return i;
}
