#include "soma.h"

#include <math.h>

/* operand fetches request[name] as a number, or fills fault. */
static json_t *operand(json_t *request, const char *name, mqrpc_fault *fault)
{
    json_t *v = json_object_get(request, name);

    if (v == NULL)
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"%s\" is missing", name);
    if (!json_is_number(v))
        return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                               "field \"%s\" must be a number, got %s", name,
                               mqrpc_json_typename(v));
    return v;
}

json_t *soma_handle(json_t *request, mqrpc_fault *fault, void *arg)
{
    json_t *a, *b, *result;

    (void)arg;
    if ((a = operand(request, "a", fault)) == NULL ||
        (b = operand(request, "b", fault)) == NULL)
        return NULL;

    if (json_is_integer(a) && json_is_integer(b)) {
        json_int_t isum;

        /* A wrapped sum would be a wrong answer that looks right. */
        if (__builtin_add_overflow(json_integer_value(a), json_integer_value(b),
                                   &isum))
            return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                                   "a + b overflows a 64-bit integer");
        result = json_integer(isum);
    } else {
        double sum = json_number_value(a) + json_number_value(b);

        /* JSON has no Infinity: the reply could not even be encoded. */
        if (!isfinite(sum))
            return mqrpc_fault_set(fault, MQRPC_BAD_REQUEST,
                                   "a + b is too large for a real number");
        result = json_real(sum);
    }
    if (result == NULL)
        return mqrpc_fault_set(fault, MQRPC_INTERNAL, "out of memory");
    return result;
}
