/*
 * media: the handler of the "service_media" queue, the arithmetic mean of a
 * list of numbers.
 */
#ifndef SVC_MEDIA_H
#define SVC_MEDIA_H

#include "mqrpc/mqrpc.h"

/*
 * media_handle is an mqrpc_handler_fn: it answers {"numeros": [x1, ...]}
 * with their mean, always a real: {"numeros": [10, 20, 30, 40]} -> 25.0.
 * Other fields are ignored. Fails with bad_request when numeros is missing,
 * not an array or empty, when an element is not a number (the message names
 * its index), or when the mean is not finite. request is borrowed; the
 * result is a new reference owned by the caller. arg is unused (NULL).
 */
json_t *media_handle(json_t *request, mqrpc_fault *fault, void *arg);

#endif /* SVC_MEDIA_H */
