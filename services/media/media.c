#include "media.h"

#include <math.h>

json_t *media_handle(json_t *request, mqrpc_fault *fault, void *arg)
{
    const media_opts *opts = arg;
    json_t *numeros = json_object_get(request, "numeros");
    json_t *v, *result;
    long double sum = 0;
    double mean;
    size_t i, n, max;

    max = opts && opts->max_items ? opts->max_items : MEDIA_DEFAULT_MAX_ITEMS;
    if (numeros == NULL)
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"numeros\" is missing");
    if (!json_is_array(numeros))
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"numeros\" must be an array, got %s",
                               mqrpc_json_typename(numeros));
    n = json_array_size(numeros);
    if (n == 0)
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "numeros must not be empty");
    if (n > max)
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "numeros has %zu elements; the limit is %zu", n,
                               max);

    /*
     * long double keeps integers up to 2^63 exact and, where it is wider
     * than double, lets the sum of large reals exceed DBL_MAX without
     * becoming infinite before the division brings it back.
     */
    json_array_foreach (numeros, i, v) {
        if (json_is_integer(v))
            sum += (long double)json_integer_value(v);
        else if (json_is_real(v))
            sum += (long double)json_real_value(v);
        else
            return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                                   "numeros[%zu] must be a number, got %s", i,
                                   mqrpc_json_typename(v));
    }
    mean = (double)(sum / (long double)n);
    if (!isfinite(mean))
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "the mean of numeros is too large");
    if ((result = json_real(mean)) == NULL)
        return mqrpc_fault_set(fault, MQRPC_INTERNAL, "out of memory");
    return result;
}
