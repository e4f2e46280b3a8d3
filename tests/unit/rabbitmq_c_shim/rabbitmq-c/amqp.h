/*
 * Test shim (tests/unit/rabbitmq_layout_test.sh): rabbitmq-c 0.12+'s
 * <rabbitmq-c/amqp.h>, forwarding to the system's <amqp.h>
 * without the warning the shim's amqp.h gives other includers.
 */
#ifdef MQRPC_SHIM_FORWARDING
#include <amqp.h>
#else
#define MQRPC_SHIM_FORWARDING
#include <amqp.h>
#undef MQRPC_SHIM_FORWARDING
#endif
