/*
 * media: the handler of the "service_media" queue, the arithmetic mean of a
 * list of numbers.
 */
#ifndef SVC_MEDIA_H
#define SVC_MEDIA_H

#include "mqrpc/mqrpc.h"

#include <stddef.h>

/* Default limit of elements in numeros (--max-items). Far above any list a
 * person types, yet it caps the work one request can ask for, which
 * --max-body alone allows to grow to half a million short numbers. */
#define MEDIA_DEFAULT_MAX_ITEMS 100000

/* media_opts is media_handle's arg; read only, so workers may share one. */
typedef struct media_opts {
    size_t max_items; /* elements of numeros; 0: MEDIA_DEFAULT_MAX_ITEMS */
} media_opts;

/*
 * media_handle is an mqrpc_handler_fn: it answers {"numeros": [x1, ...]}
 * with their mean, always a real: {"numeros": [10, 20, 30, 40]} -> 25.0.
 * Other fields are ignored. Fails with bad_request when numeros is missing,
 * not an array, empty or longer than the limit, when an element is not a
 * number (the message names its index), or when the mean is not finite.
 * request is borrowed; the result is a new reference owned by the caller.
 * arg is a const media_opts * (borrowed), or NULL for the defaults.
 */
json_t *media_handle(json_t *request, mqrpc_fault *fault, void *arg);

#endif /* SVC_MEDIA_H */
