# Broker-tier scripted tests, included by tests/broker/CMakeLists.txt.
# Each runs with the broker fixture and the test environment (MQRPC_BIN,
# MQRPC_STATE_DIR, ...) set up by mqrpc_broker_test().

# rpc_client and the services as a user runs them: answers, every error and
# its exit code, the menu, heartbeats, stopping a busy service.
mqrpc_broker_test(cli bash ${CMAKE_CURRENT_SOURCE_DIR}/cli_test.sh)

# Wire compatibility with the seed's Python (pika) client and service.
mqrpc_broker_test(interop bash ${CMAKE_CURRENT_SOURCE_DIR}/interop_test.sh)

# Performance features as a user meets them (--workers, batched prefetch,
# rpc_bench's accounting); correctness only, speed is scripts/bench.sh's.
mqrpc_broker_test(perf bash ${CMAKE_CURRENT_SOURCE_DIR}/perf_test.sh)

# Accounts and their refusals, credentials out of sight, --url-file, password
# rotation, input limits; over TLS also every refused TLS connection.
mqrpc_broker_test(security bash ${CMAKE_CURRENT_SOURCE_DIR}/security_test.sh)

# Address lists on the one test broker: a dead first address, entries
# refused by position, a service and a client whose "node" (a TCP relay)
# goes move to the next address; calls in flight fail at once or are
# re-sent (rpc_bench --retries). About 20 s.
mqrpc_broker_test(failover bash ${CMAKE_CURRENT_SOURCE_DIR}/failover_test.sh)

# Faults: killed connections, broker restarts and hangs (heartbeats),
# SIGKILLed instances, poison messages, deadlines, full queues, malformed
# messages. Restarts and SIGSTOPs the test broker: the resource lock keeps
# other broker tests from running meanwhile.
mqrpc_broker_test(reliability bash ${CMAKE_CURRENT_SOURCE_DIR}/reliability_test.sh)
set_tests_properties(broker.reliability PROPERTIES TIMEOUT 400)

# Broker flow control (a memory alarm): calls end by their deadline with the
# broker's reason. Sets the test broker's memory watermark and restores it.
mqrpc_broker_test(flow bash ${CMAKE_CURRENT_SOURCE_DIR}/flow_test.sh)

# The service runtime and the broker's own events: a cancelled consumer, a
# memory alarm (connection.blocked), refused re-publishes (policies),
# hand-back at a stop, batch replies, long instance ids. Raises and lowers
# the broker's memory alarm: the resource lock keeps others out meanwhile.
mqrpc_broker_test(service bash ${CMAKE_CURRENT_SOURCE_DIR}/service_test.sh)

# Services that do real work: a handler of several heartbeat intervals
# answered once, --threads, progress replies (a pika caller gets none), a
# handler that stops when its caller gives up, stopping with work in hand,
# and the broker's consumer_timeout (lowered for one service, restored).
mqrpc_broker_test(long bash ${CMAKE_CURRENT_SOURCE_DIR}/long_test.sh)

# service_resumo: a service that calls service_soma and service_media with
# deferred replies (its handler thread is free while its calls are out).
mqrpc_broker_test(resumo bash ${CMAKE_CURRENT_SOURCE_DIR}/resumo_test.sh)

# Open-loop load (rpc_bench --rate): a 5 ms service offered half and twice
# its capacity; latency from the scheduled start grows with the backlog.
# Ratios, not speeds; about 20 s.
mqrpc_broker_test(load bash ${CMAKE_CURRENT_SOURCE_DIR}/load_test.sh)

# Prometheus metrics: a service's --metrics endpoint checked by promtool,
# counters that move by exactly the calls made, bad --metrics values,
# rpc_bench --metrics-out, and a real Prometheus server scraping the service
# and the broker's rabbitmq_prometheus endpoint. HTTP ports: the one below
# and the next (Prometheus itself).
set(MQRPC_TEST_HTTP_PORT 9464 CACHE STRING
    "HTTP port of the metrics test's service (Prometheus takes the next)")
mqrpc_broker_test(metrics bash ${CMAKE_CURRENT_SOURCE_DIR}/metrics_test.sh)
set_property(TEST broker.metrics APPEND PROPERTY ENVIRONMENT
  MQRPC_TEST_HTTP_PORT=${MQRPC_TEST_HTTP_PORT})

# systemd's notification protocol, sd_supervisor.py playing systemd: READY=1
# only once consuming, WATCHDOG=1 at half of WATCHDOG_USEC (none without),
# STATUS= through a lost connection, STOPPING=1 after SIGTERM; and
# `systemd-analyze verify` of packaging/systemd/mqrpc-service@.service.
# Skipped (77) in a build without libsystemd, after the unit's check.
mqrpc_broker_test(systemd bash ${CMAKE_CURRENT_SOURCE_DIR}/systemd_test.sh
                  ${MQRPC_HAVE_SYSTEMD})
set_tests_properties(broker.systemd PROPERTIES SKIP_RETURN_CODE 77)

# W3C trace context and structured logs: rpc_client --traceparent, a pika
# caller's trace continued, one trace through service_resumo, the services'
# log lines (text and --log-format json) naming trace and span ids.
mqrpc_broker_test(trace bash ${CMAKE_CURRENT_SOURCE_DIR}/trace_test.sh)

# Health and discovery over the broker: rpc_client ping, services and health
# against two soma instances, one media, a pika seed service (no control
# queue), an instance killed with SIGKILL, busy and stopping instances.
mqrpc_broker_test(control bash ${CMAKE_CURRENT_SOURCE_DIR}/control_test.sh)
