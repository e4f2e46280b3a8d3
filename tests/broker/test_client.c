/*
 * Library-level tests against the real test broker: the client's
 * asynchronous core and the service runtime as users see them. Services are
 * the real programs from $MQRPC_BIN, each test on queues of its own.
 */
#include "mqrpc/mqrpc.h"

#include <errno.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

extern char **environ;

#define MAX_PROCS 8

struct proc {
    pid_t pid;
    int out; /* read end of its stdout */
};

static struct proc procs[MAX_PROCS];
static int nprocs;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t dropped(const mqrpc_client *c)
{
    mqrpc_client_stats st;
    mqrpc_client_get_stats(c, &st, sizeof st);
    return st.dropped;
}

static void unique_queue(char *buf, size_t len, const char *what)
{
    snprintf(buf, len, "service_t_%ld_%s_%lld", (long)getpid(), what,
             (long long)now_ms());
}

/* Starts $MQRPC_BIN/prog with args and waits (10 s at most) for its
 * "[x] Serviço ... pronto..." line. Returns its index in procs. */
static int start_service(const char *prog, ...)
{
    char path[1024];
    char *argv[16];
    int argc = 0, pipefd[2];
    posix_spawn_file_actions_t fa;
    struct proc *p = &procs[nprocs];
    char buf[512];
    size_t got = 0;
    int64_t deadline = now_ms() + 10000;
    va_list ap;

    assert_true(nprocs < MAX_PROCS);
    if (prog[0] == '/')
        snprintf(path, sizeof path, "%s", prog);
    else
        snprintf(path, sizeof path, "%s/%s", getenv("MQRPC_BIN"), prog);
    argv[argc++] = path;
    va_start(ap, prog);
    for (char *a; (a = va_arg(ap, char *)) && argc < 15;)
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;

    assert_int_equal(pipe(pipefd), 0);
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, pipefd[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, pipefd[0]);
    posix_spawn_file_actions_addclose(&fa, pipefd[1]);
    assert_int_equal(posix_spawn(&p->pid, path, &fa, NULL, argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    close(pipefd[1]);
    p->out = pipefd[0];
    nprocs++;

    buf[0] = '\0';
    while (!strstr(buf, "pronto")) {
        struct pollfd pfd = {p->out, POLLIN, 0};
        int left = (int)(deadline - now_ms());
        ssize_t n;
        if (left <= 0 || poll(&pfd, 1, left) <= 0)
            fail_msg("%s did not become ready within 10 s", prog);
        n = read(p->out, buf + got, sizeof buf - 1 - got);
        if (n <= 0)
            fail_msg("%s exited before it was ready", prog);
        got += (size_t)n;
        buf[got] = '\0';
    }
    return nprocs - 1;
}

/* Sends sig to a service and returns its exit status (waits 10 s at most,
 * then kills it and fails). */
static int stop_service(int i, int sig)
{
    int status = 0;
    int64_t deadline = now_ms() + 10000;

    kill(procs[i].pid, sig);
    while (waitpid(procs[i].pid, &status, WNOHANG) == 0) {
        if (now_ms() > deadline) {
            kill(procs[i].pid, SIGKILL);
            waitpid(procs[i].pid, &status, 0);
            procs[i].pid = 0;
            fail_msg("service did not exit within 10 s of signal %d", sig);
        }
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    }
    procs[i].pid = 0;
    close(procs[i].out);
    return status;
}

static int teardown_procs(void **state)
{
    (void)state;
    for (int i = 0; i < nprocs; i++)
        if (procs[i].pid > 0)
            stop_service(i, SIGTERM);
    nprocs = 0;
    return 0;
}

static mqrpc_client *connect_client(void)
{
    mqrpc_client *c = mqrpc_client_new(NULL);
    assert_non_null(c);
    if (mqrpc_client_connect(c) != MQRPC_OK)
        fail_msg("connect: %s", mqrpc_client_errmsg(c));
    return c;
}

/* ------------------------------------------------------------ helpers */

struct result {
    int calls; /* times the callback ran */
    mqrpc_err status;
    json_int_t value; /* integer result, if any */
    char app_id[128];
    int64_t at_ms;
};

static void record(const mqrpc_reply *r, void *arg)
{
    struct result *res = arg;
    json_t *v = mqrpc_reply_result(r);

    res->calls++;
    res->status = mqrpc_reply_status(r);
    res->at_ms = now_ms();
    if (json_is_integer(v))
        res->value = json_integer_value(v);
    else if (json_is_object(v) && json_is_integer(json_object_get(v, "slept")))
        res->value = json_integer_value(json_object_get(v, "slept"));
    snprintf(res->app_id, sizeof res->app_id, "%s",
             mqrpc_reply_app_id(r) ? mqrpc_reply_app_id(r) : "");
}

/* Drives c until nothing is pending, for at most limit_ms. */
static void drain(mqrpc_client *c, int limit_ms)
{
    int64_t deadline = now_ms() + limit_ms;
    while (mqrpc_client_pending(c) > 0) {
        mqrpc_err e = mqrpc_client_process(c, 100);
        assert_true(e == MQRPC_OK || e == MQRPC_ETIMEOUT);
        if (now_ms() > deadline)
            fail_msg("%zu calls still pending after %d ms",
                     mqrpc_client_pending(c), limit_ms);
    }
}

static void send_soma(mqrpc_client *c, const char *queue, int i,
                      struct result *res)
{
    char body[64];
    int n = snprintf(body, sizeof body, "{\"a\": %d, \"b\": %d}", i, 1000);
    assert_int_equal(
        mqrpc_call_async(c, queue, body, (size_t)n, 10000, 0, record, res),
        MQRPC_OK);
}

/* -------------------------------------------------------------- tests */

/* Counts, per started instance, the replies it sent (app_id ends in its
 * pid). */
static void tally(const struct result *res, int n, int count[], int ninst)
{
    for (int k = 0; k < ninst; k++) {
        char want[32];
        size_t wl;
        count[k] = 0;
        snprintf(want, sizeof want, ":%ld", (long)procs[k].pid);
        wl = strlen(want);
        for (int i = 0; i < n; i++) {
            size_t al = strlen(res[i].app_id);
            if (al > wl && strcmp(res[i].app_id + al - wl, want) == 0)
                count[k]++;
        }
    }
}

/* Runs n soma calls on queue with at most in_flight outstanding. */
static void run_calls(mqrpc_client *c, const char *queue, struct result *res,
                      int n, size_t in_flight)
{
    int sent = 0;

    memset(res, 0, sizeof *res * (size_t)n);
    while (sent < n || mqrpc_client_pending(c) > 0) {
        while (sent < n && mqrpc_client_pending(c) < in_flight) {
            send_soma(c, queue, sent, &res[sent]);
            sent++;
        }
        mqrpc_err e = mqrpc_client_process(c, 1000);
        assert_true(e == MQRPC_OK || e == MQRPC_ETIMEOUT);
    }
    for (int i = 0; i < n; i++) {
        assert_int_equal(res[i].calls, 1);
        assert_int_equal(res[i].status, MQRPC_OK);
        assert_int_equal(res[i].value, i + 1000);
    }
}

/* Three instances on one queue share 300 requests. One at a time, each
 * request finds every instance idle and RabbitMQ deals them round-robin:
 * an even split. Pipelined with prefetch 1, each instance takes the next
 * request when it is done with one, so the split follows speed, and no
 * instance is left idle. */
static void round_robin_three_instances(void **state)
{
    enum { N = 300 };
    static struct result res[N];
    char queue[128];
    int count[3];
    mqrpc_client *c;

    (void)state;
    unique_queue(queue, sizeof queue, "rr");
    for (int i = 0; i < 3; i++)
        start_service("service_soma", "--queue", queue, NULL);
    c = connect_client();

    run_calls(c, queue, res, N, 1);
    tally(res, N, count, 3);
    print_message("one at a time, split over 3 instances: %d / %d / %d\n",
                  count[0], count[1], count[2]);
    assert_int_equal(count[0] + count[1] + count[2], N);
    for (int k = 0; k < 3; k++)
        assert_in_range(count[k], 95, 105);

    run_calls(c, queue, res, N, 12);
    tally(res, N, count, 3);
    print_message("12 in flight, split over 3 instances: %d / %d / %d\n",
                  count[0], count[1], count[2]);
    assert_int_equal(count[0] + count[1] + count[2], N);
    for (int k = 0; k < 3; k++)
        assert_in_range(count[k], 50, 150);
    assert_int_equal(dropped(c), 0);
    mqrpc_client_free(c);
}

/* SIGTERM while a request is in the handler: that request is still
 * answered by the stopping instance, the instance exits 0, and the requests
 * queued behind it are answered by the other instance: none lost. */
static void sigterm_while_busy_loses_nothing(void **state)
{
    enum { N = 20 };
    static struct result res[N];
    char queue[128], want[64];
    int a, from_a_after = 0, from_b = 0, status;
    int64_t signalled;
    mqrpc_client *c;

    (void)state;
    memset(res, 0, sizeof res);
    unique_queue(queue, sizeof queue, "busy");
    a = start_service("service_work", "--queue", queue, NULL);
    snprintf(want, sizeof want, ":%ld", (long)procs[a].pid);
    c = connect_client();
    for (int i = 0; i < N; i++)
        assert_int_equal(mqrpc_call_async(c, queue, "{\"ms\": 200}", 11, 30000, 0,
                                          record, &res[i]),
                         MQRPC_OK);
    /* Let instance A take its first request, then start B and stop A. */
    for (int64_t until = now_ms() + 300; now_ms() < until;)
        mqrpc_client_process(c, 50);
    start_service("service_work", "--queue", queue, NULL);
    /* Catch up on replies A already sent, so that what arrives after the
     * signal is what A had in its hands. */
    for (int64_t until = now_ms() + 50; now_ms() < until;)
        mqrpc_client_process(c, 10);
    signalled = now_ms();
    status = stop_service(a, SIGTERM);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    drain(c, 20000);

    for (int i = 0; i < N; i++) {
        assert_int_equal(res[i].calls, 1);
        assert_int_equal(res[i].status, MQRPC_OK);
        assert_int_equal(res[i].value, 200);
        if (strstr(res[i].app_id, want) == NULL)
            from_b++;
        else if (res[i].at_ms >= signalled)
            from_a_after++;
    }
    print_message("answered by the stopping instance after SIGTERM: %d, by "
                  "the other: %d\n",
                  from_a_after, from_b);
    /* The request in A's hands when the signal came (two only if A ended
     * one within the last moments before it). */
    assert_in_range(from_a_after, 1, 2);
    assert_true(from_b >= N / 2);
    mqrpc_client_free(c);
}

/* Every asynchronous call completes exactly once, whatever its outcome:
 * reply, error reply, no route, timeout, or cancellation by free. */
static void every_call_completes_exactly_once(void **state)
{
    static struct result ok[50], remote[10], noroute[10], timeout[5], cancel[5];
    char soma[128], sleepq[128];
    mqrpc_client *c;

    (void)state;
    unique_queue(soma, sizeof soma, "once");
    unique_queue(sleepq, sizeof sleepq, "slow");
    start_service("service_soma", "--queue", soma, NULL);
    start_service("service_work", "--queue", sleepq, NULL);
    c = connect_client();
    for (int i = 0; i < 50; i++)
        send_soma(c, soma, i, &ok[i]);
    for (int i = 0; i < 10; i++) {
        assert_int_equal(mqrpc_call_async(c, soma, "{\"a\": 1}", 8, 10000, 0,
                                          record, &remote[i]),
                         MQRPC_OK);
        assert_int_equal(mqrpc_call_async(c, "service_t_nobody_declared_this",
                                          "{}", 2, 10000, 0, record, &noroute[i]),
                         MQRPC_OK);
    }
    for (int i = 0; i < 5; i++)
        assert_int_equal(mqrpc_call_async(c, sleepq, "{\"ms\": 3000}", 12, 300, 0,
                                          record, &timeout[i]),
                         MQRPC_OK);
    assert_int_equal(mqrpc_client_pending(c), 75);
    drain(c, 10000);
    for (int i = 0; i < 50; i++) {
        assert_int_equal(ok[i].calls, 1);
        assert_int_equal(ok[i].status, MQRPC_OK);
        assert_int_equal(ok[i].value, i + 1000);
    }
    for (int i = 0; i < 10; i++) {
        assert_int_equal(remote[i].calls, 1);
        assert_int_equal(remote[i].status, MQRPC_EREMOTE);
        assert_int_equal(noroute[i].calls, 1);
        assert_int_equal(noroute[i].status, MQRPC_ENOROUTE);
    }
    for (int i = 0; i < 5; i++) {
        assert_int_equal(timeout[i].calls, 1);
        assert_int_equal(timeout[i].status, MQRPC_ETIMEOUT);
    }
    for (int i = 0; i < 5; i++)
        assert_int_equal(mqrpc_call_async(c, sleepq, "{\"ms\": 1}", 9, 60000, 0,
                                          record, &cancel[i]),
                         MQRPC_OK);
    mqrpc_client_free(c);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(cancel[i].calls, 1);
        assert_int_equal(cancel[i].status, MQRPC_ECANCELED);
    }
}

/* Starts tests/broker/dup_service.py on queue with its extra arguments. */
static void start_pika_service(const char *queue, const char *arg1,
                               const char *arg2)
{
    char dir[1024], script[1100];

    snprintf(dir, sizeof dir, "%s/tests/broker", getenv("MQRPC_SOURCE_DIR"));
    snprintf(script, sizeof script, "%s/dup_service.py", dir);
    setenv("PYTHONPATH", dir, 1); /* for mqrpc_pika */
    start_service("/usr/bin/python3", script, queue, arg1, arg2, NULL);
}

/* A reply that arrives after its call timed out (from a peer that ignores
 * deadlines; ours does not send it) is dropped and counted, and the
 * blocking call reports the error with its context. */
static void late_reply_is_dropped_and_counted(void **state)
{
    char queue[128];
    mqrpc_reply *r = NULL;
    mqrpc_client *c;
    mqrpc_err e;

    (void)state;
    unique_queue(queue, sizeof queue, "late");
    start_pika_service(queue, "--late", "400");
    c = connect_client();
    e = mqrpc_call(c, queue, "{}", 2, 100, 0, &r);
    assert_int_equal(e, MQRPC_ETIMEOUT);
    assert_non_null(r);
    assert_string_equal(mqrpc_reply_error_code(r), "timeout");
    assert_non_null(strstr(mqrpc_reply_error_message(r), "within 100 ms"));
    mqrpc_reply_free(r);
    for (int64_t until = now_ms() + 1500;
         now_ms() < until && dropped(c) == 0;)
        mqrpc_client_process(c, 100);
    assert_int_equal(dropped(c), 1);
    /* The client is still perfectly usable. */
    e = mqrpc_call(c, queue, "{}", 2, 5000, 0, &r);
    assert_int_equal(e, MQRPC_OK);
    assert_true(json_is_object(mqrpc_reply_result(r)));
    mqrpc_reply_free(r);
    mqrpc_client_free(c);
}

/* A call whose deadline passes between two visits to process completes at
 * the next visit, even one that may wait forever: process must not then
 * block on a socket that has nothing more to say (mqrpc_call waits with -1
 * for exactly that call). The reply would come 5 s later. */
static void expiry_between_visits_returns_at_once(void **state)
{
    char queue[128];
    struct result res = {0};
    struct timespec nap = {0, 150 * 1000000L};
    mqrpc_client *c;
    int64_t t0;

    (void)state;
    unique_queue(queue, sizeof queue, "gap");
    start_service("service_work", "--queue", queue, NULL);
    c = connect_client();
    assert_int_equal(mqrpc_call_async(c, queue, "{\"ms\": 5000}", 12, 100, 0,
                                      record, &res),
                     MQRPC_OK);
    /* Read the broker's confirm, so nothing is left to read but the reply. */
    mqrpc_client_process(c, 50);
    nanosleep(&nap, NULL);
    t0 = now_ms();
    assert_int_equal(mqrpc_client_process(c, -1), MQRPC_OK);
    assert_true(now_ms() - t0 < 2500);
    assert_int_equal(res.calls, 1);
    assert_int_equal(res.status, MQRPC_ETIMEOUT);
    mqrpc_client_free(c);
}

/* A second reply to one request (its instance died after replying, before
 * acknowledging, and another instance answered the redelivery) never
 * reaches the caller: the callback runs once, the extra reply is counted. */
static void duplicate_reply_is_dropped_and_counted(void **state)
{
    char queue[128];
    struct result res = {0};
    mqrpc_client *c;

    (void)state;
    unique_queue(queue, sizeof queue, "dup");
    start_pika_service(queue, NULL, NULL);
    c = connect_client();
    assert_int_equal(mqrpc_call_async(c, queue, "{}", 2, 10000, 0, record,
                                      &res),
                     MQRPC_OK);
    for (int64_t until = now_ms() + 5000;
         now_ms() < until && (res.calls == 0 || dropped(c) == 0);)
        mqrpc_client_process(c, 100);
    assert_int_equal(res.calls, 1);
    assert_int_equal(res.status, MQRPC_OK);
    assert_int_equal(dropped(c), 1);
    mqrpc_client_free(c);
}

/* A request that waited in the queue past its caller's timeout is dropped
 * by the broker (expiration = timeout), not executed late: the request
 * behind it is answered at once, and no late reply ever arrives. */
static void expired_request_is_never_executed(void **state)
{
    static struct result first, expired, next;
    char queue[128];
    mqrpc_client *c;
    int64_t t0;

    (void)state;
    memset(&first, 0, sizeof first);
    memset(&expired, 0, sizeof expired);
    memset(&next, 0, sizeof next);
    unique_queue(queue, sizeof queue, "exp");
    start_service("service_work", "--queue", queue, NULL);
    c = connect_client();
    /* The only instance is busy for 800 ms ... */
    assert_int_equal(
        mqrpc_call_async(c, queue, "{\"ms\": 800}", 11, 5000, 0, record, &first),
        MQRPC_OK);
    /* ... so this one waits in the queue longer than its 200 ms. */
    assert_int_equal(
        mqrpc_call_async(c, queue, "{\"ms\": 1500}", 12, 200, 0, record, &expired),
        MQRPC_OK);
    drain(c, 5000);
    assert_int_equal(first.status, MQRPC_OK);
    assert_int_equal(expired.status, MQRPC_ETIMEOUT);
    t0 = now_ms();
    assert_int_equal(
        mqrpc_call_async(c, queue, "{\"ms\": 0}", 9, 5000, 0, record, &next),
        MQRPC_OK);
    drain(c, 5000);
    assert_int_equal(next.status, MQRPC_OK);
    print_message("next request answered after %lld ms\n",
                  (long long)(next.at_ms - t0));
    /* Had the expired request run, this one would wait behind its 1500 ms. */
    assert_true(next.at_ms - t0 < 1000);
    for (int64_t until = now_ms() + 300; now_ms() < until;)
        mqrpc_client_process(c, 50);
    assert_int_equal(dropped(c), 0);
    mqrpc_client_free(c);
}

/* queue_info on a missing queue fails cleanly without disturbing calls on
 * the same connection (the broker closes only the side channel). */
static void queue_info_missing_queue(void **state)
{
    char queue[128];
    uint32_t msgs = 99, cons = 99;
    mqrpc_reply *r = NULL;
    mqrpc_client *c;

    (void)state;
    unique_queue(queue, sizeof queue, "info");
    start_service("service_soma", "--queue", queue, NULL);
    c = connect_client();
    assert_int_equal(
        mqrpc_client_queue_info(c, "service_t_no_such_queue", &msgs, &cons),
        MQRPC_ENOROUTE);
    assert_int_equal(mqrpc_client_queue_info(c, queue, &msgs, &cons), MQRPC_OK);
    assert_int_equal(cons, 1);
    assert_int_equal(msgs, 0);
    assert_int_equal(mqrpc_call(c, queue, "{\"a\": 2, \"b\": 3}", 16, 5000, 0, &r),
                     MQRPC_OK);
    assert_int_equal(json_integer_value(mqrpc_reply_result(r)), 5);
    mqrpc_reply_free(r);
    mqrpc_client_free(c);
}

/* An outside event loop drives the client with poll() on its fd and
 * mqrpc_client_next_timeout_ms, calling process(0) only. */
static void driven_by_an_external_poll_loop(void **state)
{
    enum { N = 100 };
    static struct result res[N];
    char queue[128];
    mqrpc_client *c;
    int64_t deadline;

    (void)state;
    memset(res, 0, sizeof res);
    unique_queue(queue, sizeof queue, "poll");
    start_service("service_soma", "--queue", queue, NULL);
    c = connect_client();
    assert_true(mqrpc_client_fd(c) >= 0);
    for (int i = 0; i < N; i++)
        send_soma(c, queue, i, &res[i]);
    deadline = now_ms() + 10000;
    while (mqrpc_client_pending(c) > 0 && now_ms() < deadline) {
        struct pollfd pfd = {mqrpc_client_fd(c), POLLIN, 0};
        int t = mqrpc_client_next_timeout_ms(c);
        assert_true(t >= 0); /* calls are pending: something is due */
        if (t > 0)
            poll(&pfd, 1, t);
        mqrpc_client_process(c, 0);
    }
    for (int i = 0; i < N; i++) {
        assert_int_equal(res[i].calls, 1);
        assert_int_equal(res[i].value, i + 1000);
    }
    mqrpc_client_free(c);
}

/* Connection failures are statuses with a one-line reason. */
static void connect_failures_are_clear(void **state)
{
    mqrpc_client_opts o;
    mqrpc_client *c;

    (void)state;
    mqrpc_client_opts_init(&o);
    o.url = "amqp://u:p@127.0.0.1:1/";
    c = mqrpc_client_new(&o);
    assert_int_equal(mqrpc_client_connect(c), MQRPC_ECONNECT);
    assert_string_equal(mqrpc_client_errmsg(c),
                        "cannot connect to 127.0.0.1:1: connection refused");
    assert_int_equal(mqrpc_call_async(c, "q", "{}", 2, 100, 0, record, NULL),
                     MQRPC_ESTATE);
    mqrpc_client_free(c);

    o.url = "http://nope";
    c = mqrpc_client_new(&o);
    assert_int_equal(mqrpc_client_connect(c), MQRPC_EURL);
    assert_non_null(strstr(mqrpc_client_errmsg(c), "malformed broker URL"));
    mqrpc_client_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(round_robin_three_instances, teardown_procs),
        cmocka_unit_test_teardown(sigterm_while_busy_loses_nothing,
                                  teardown_procs),
        cmocka_unit_test_teardown(every_call_completes_exactly_once,
                                  teardown_procs),
        cmocka_unit_test_teardown(expiry_between_visits_returns_at_once,
                                  teardown_procs),
        cmocka_unit_test_teardown(duplicate_reply_is_dropped_and_counted,
                                  teardown_procs),
        cmocka_unit_test_teardown(late_reply_is_dropped_and_counted,
                                  teardown_procs),
        cmocka_unit_test_teardown(expired_request_is_never_executed,
                                  teardown_procs),
        cmocka_unit_test_teardown(queue_info_missing_queue, teardown_procs),
        cmocka_unit_test_teardown(driven_by_an_external_poll_loop,
                                  teardown_procs),
        cmocka_unit_test(connect_failures_are_clear),
    };
    if (!getenv("MQRPC_BIN")) {
        fprintf(stderr, "MQRPC_BIN is not set: run through ctest\n");
        return 1;
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
