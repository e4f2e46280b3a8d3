/*
 * Structured logs of the service programs (--log-format json).
 */
#ifndef MQRPC_JSONLOG_H
#define MQRPC_JSONLOG_H

#include "mqrpc/mqrpc.h"

/* jsonlog_line writes rec as one JSON object and a newline on stderr, in
 * one piece (workers log from several threads): ts (RFC 3339, UTC, ms),
 * level, instance, msg, then queue, correlation_id, trace_id, span_id,
 * duration_ms and code when the record has them. Bytes of the strings
 * that are not UTF-8 become '?'. */
void jsonlog_line(const char *instance, const mqrpc_log_record *rec);

#endif
