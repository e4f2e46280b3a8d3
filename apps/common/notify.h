/*
 * A service program's part in systemd's notification protocol (sd_notify):
 * READY=1 once every worker consumes, STATUS= lines, WATCHDOG=1 while every
 * worker's connection loop ticks, STOPPING=1 at a stop. Built on
 * libsystemd when it was found at build time; otherwise every call does
 * nothing. Outside systemd (no $NOTIFY_SOCKET) it costs nothing either.
 */
#ifndef MQRPC_NOTIFY_H
#define MQRPC_NOTIFY_H

#include "mqrpc/mqrpc.h"

/* notify_init prepares for nworkers services (one per --workers) and
 * returns the tick_ms to give each in mqrpc_service_opts: a quarter of the
 * ping interval (half of $WATCHDOG_USEC) when the watchdog is on for this
 * process ($WATCHDOG_PID, as sd_watchdog_enabled checks), else 0. Returns
 * -1 when out of memory. Call it once, before the services connect. */
int notify_init(unsigned nworkers);

/* notify_event is the mqrpc_service_event_fn of worker i: give it as
 * opts.event with opts.event_arg = notify_arg(i). Thread-safe. */
void notify_event(mqrpc_service *s, mqrpc_service_event event,
                  const char *detail, void *arg);
void *notify_arg(unsigned i);

/* notify_done frees what notify_init took, once the services are freed. */
void notify_done(void);

#endif
