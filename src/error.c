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
