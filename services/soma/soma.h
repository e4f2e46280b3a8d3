/*
 * soma: the handler of the "service_soma" queue, which adds two numbers.
 */
#ifndef SVC_SOMA_H
#define SVC_SOMA_H

#include "mqrpc/mqrpc.h"

/*
 * soma_handle is an mqrpc_handler_fn: it answers {"a": x, "b": y} with
 * x + y. Two integers give an integer, e.g. {"a": 10, "b": 5} -> 15; if
 * either operand is a real, the result is a real. Other fields are ignored.
 * Fails with bad_request when a or b is missing or not a number (booleans,
 * strings and null are not numbers), when an integer sum does not fit in a
 * 64-bit integer, or when a real sum is not finite. request is borrowed;
 * the result is a new reference owned by the caller. arg is unused (NULL).
 */
json_t *soma_handle(json_t *request, mqrpc_fault *fault, void *arg);

#endif /* SVC_SOMA_H */
