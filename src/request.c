/*
 * Handler threads and the requests they work on. The connection thread
 * queues requests (mqr_workers_submit); a handler thread decodes one, runs
 * the user's function on it, and whoever ends it (that thread, or any
 * other for a deferred reply) encodes the answer and hands it back through
 * the done list, waking the connection thread. Progress takes the same
 * way; a newer progress replaces one the connection thread has not sent.
 */
#include "service.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static mqr_str copy_into(char **at, mqr_str s)
{
    mqr_str r = {*at, s.len};

    if (s.len)
        memcpy(*at, s.ptr, s.len);
    (*at)[s.len] = '\0'; /* correlation_id is handed out as a C string */
    *at += s.len + 1;
    return r;
}

mqrpc_request *mqr_request_new(mqrpc_service *s, const mqr_msg *m,
                               const mqr_trace *trace)
{
    mqr_str ts = mqr_tracestate_ok(m->tracestate.ptr, m->tracestate.len)
                     ? m->tracestate
                     : (mqr_str){NULL, 0};
    size_t n = m->correlation_id.len + m->reply_to.len + m->content_type.len +
               m->body.len + m->traceparent.len + ts.len + 6;
    mqrpc_request *r = calloc(1, sizeof *r + n);
    char *at;

    if (!r)
        return NULL;
    at = r->data;
    r->s = s;
    r->tag = m->delivery_tag;
    r->gen = s->gen;
    r->deadline_ms = m->deadline_ms;
    r->arrived_us = mqr_now_us();
    r->deliveries = m->deliveries;
    r->persistent = m->persistent;
    r->want_progress = m->progress;
    r->bad_headers = m->bad_headers;
    atomic_init(&r->gone, false);
    r->correlation_id = copy_into(&at, m->correlation_id);
    r->reply_to = copy_into(&at, m->reply_to);
    r->content_type = copy_into(&at, m->content_type);
    r->body = copy_into(&at, m->body);
    r->traceparent = copy_into(&at, m->traceparent);
    r->tracestate = copy_into(&at, ts);
    r->trace = *trace;
    r->start_us = mqr_now_us();
    return r;
}

void mqr_request_free(mqrpc_request *r)
{
    if (!r)
        return;
    json_decref(r->params);
    free(r->reply_body);
    free(r);
}

/* The job queue and the done list: FIFOs of requests under s->lock. */
static void fifo_push(mqrpc_request **head, mqrpc_request **tail,
                      mqrpc_request *r)
{
    r->next = NULL;
    if (*tail)
        (*tail)->next = r;
    else
        *head = r;
    *tail = r;
}

/* Empties a FIFO; returns its requests, in order, linked by next. */
static mqrpc_request *fifo_take_all(mqrpc_service *s, mqrpc_request **head,
                                    mqrpc_request **tail)
{
    mqrpc_request *r;

    pthread_mutex_lock(&s->lock);
    r = *head;
    *head = *tail = NULL;
    pthread_mutex_unlock(&s->lock);
    return r;
}

/* Appends r to the done list (under s->lock); wakes the connection thread
 * when the list was empty, since otherwise it is awake already, and unless
 * this is the connection thread in an inline handler: it drains the list
 * when the handler returns (or the stand-in does, when it takes over). */
static void post_locked(mqrpc_service *s, mqrpc_request *r)
{
    bool was_empty = s->done_head == NULL;

    if (s->inline_since_us && !s->taken_over &&
        pthread_equal(pthread_self(), s->conn_thread))
        was_empty = false;

    if (r->queued_done)
        return;
    r->queued_done = true;
    fifo_push(&s->done_head, &s->done_tail, r);
    if (was_empty)
        mqr_wake_signal(s->wake_fd);
}

mqrpc_request *mqr_take_done(mqrpc_service *s)
{
    return fifo_take_all(s, &s->done_head, &s->done_tail);
}

mqrpc_request *mqr_done_unqueue(mqrpc_service *s, mqrpc_request *r,
                                struct mqr_done *d)
{
    mqrpc_request *next;

    pthread_mutex_lock(&s->lock);
    next = r->next;
    r->queued_done = false;
    d->ended = r->ended;
    d->progress = r->has_progress && !r->ended;
    r->has_progress = false;
    d->percent = r->percent;
    memcpy(d->text, r->progress_text, sizeof d->text);
    pthread_mutex_unlock(&s->lock);
    return next;
}

/* ------------------------------------------------------- ending requests */

static void end_with(mqrpc_request *r, char *body, size_t len, bool is_error)
{
    mqrpc_service *s = r->s;

    /* The handler may hold on to nothing it got from the request. */
    json_decref(r->params);
    r->params = NULL;
    pthread_mutex_lock(&s->lock);
    r->reply_body = body;
    r->reply_len = len;
    r->reply_is_error = is_error;
    if (!is_error)
        memcpy(r->code, "ok", 3);
    r->ended = true;
    post_locked(s, r);
    pthread_mutex_unlock(&s->lock);
}

static void end_with_fault(mqrpc_request *r, const mqrpc_fault *fault)
{
    size_t len = 0;
    char *body = mqr_encode_fault(fault, &len);

    /* Set before the request ends, by the one thread that ends it. */
    snprintf(r->code, sizeof r->code, "%s", fault->code);
    if (r->s->opts.verbose) {
        mqr_req_fields f;
        mqr_request_fields(r, &f);
        f.code = r->code;
        mqr_log_req(&r->s->log, MQRPC_LOG_DEBUG, &f, "error reply %s: %s",
                    fault->code, fault->message);
    }
    /* Out of memory: an empty error reply still tells the caller. */
    end_with(r, body, body ? len : 0, true);
}

void mqrpc_request_reply(mqrpc_request *r, json_t *result)
{
    mqrpc_fault fault;
    size_t len = 0;
    char *body;

    if (!result) {
        mqrpc_fault_set(&fault, MQRPC_INTERNAL,
                        "the handler failed without saying why");
        end_with_fault(r, &fault);
        return;
    }
    body = mqr_encode_result(result, &len);
    json_decref(result);
    if (!body) {
        mqrpc_fault_set(&fault, MQRPC_INTERNAL,
                        "the result could not be encoded as JSON");
        end_with_fault(r, &fault);
        return;
    }
    end_with(r, body, len, false);
}

void mqrpc_request_fail(mqrpc_request *r, const char *code, const char *fmt,
                        ...)
{
    mqrpc_fault fault;
    va_list ap;

    snprintf(fault.code, sizeof fault.code, "%s",
             code && *code ? code : MQRPC_INTERNAL);
    fault.message[0] = '\0';
    if (fmt) {
        va_start(ap, fmt);
        vsnprintf(fault.message, sizeof fault.message, fmt, ap);
        va_end(ap);
    }
    end_with_fault(r, &fault);
}

mqrpc_err mqrpc_request_progress(mqrpc_request *r, double percent,
                                 const char *text)
{
    mqrpc_service *s = r->s;

    if (isnan(percent))
        return MQRPC_EINVAL;
    if (!r->want_progress)
        return MQRPC_OK;
    percent = percent < 0 ? 0 : percent > 100 ? 100 : percent;
    pthread_mutex_lock(&s->lock);
    r->percent = percent;
    snprintf(r->progress_text, sizeof r->progress_text, "%s",
             text ? text : "");
    r->has_progress = true;
    post_locked(s, r);
    pthread_mutex_unlock(&s->lock);
    return MQRPC_OK;
}

json_t *mqrpc_request_params(const mqrpc_request *r)
{
    return r->params;
}

const char *mqrpc_request_correlation_id(const mqrpc_request *r)
{
    return r->correlation_id.ptr;
}

const char *mqrpc_request_traceparent(const mqrpc_request *r)
{
    return r->trace.traceparent;
}

const char *mqrpc_request_tracestate(const mqrpc_request *r)
{
    return r->tracestate.len ? r->tracestate.ptr : NULL;
}

void mqr_request_fields(const mqrpc_request *r, mqr_req_fields *f)
{
    f->queue = r->s->queue;
    f->correlation_id = r->correlation_id.ptr;
    f->trace_id = r->trace.trace_id;
    f->span_id = r->trace.span_id;
    f->code = NULL;
    f->duration_ms = -1;
}

int64_t mqrpc_request_time_left_ms(const mqrpc_request *r)
{
    int64_t left;

    if (!r->deadline_ms)
        return -1;
    left = r->deadline_ms - mqr_wall_ms();
    return left > 0 ? left : 0;
}

int mqrpc_request_cancelled(const mqrpc_request *r)
{
    return atomic_load(&r->gone) || mqrpc_request_time_left_ms(r) == 0;
}

/* ------------------------------------------------------- handler threads */

/* A request problem found before decoding the body, or NULL. */
static const char *envelope_problem(const mqrpc_request *r, char *buf,
                                    size_t len)
{
    static const char json[] = "application/json";
    mqr_str ct = r->content_type;

    if (r->bad_headers)
        return "headers " MQR_HDR_DEADLINE " and " MQR_HDR_DELIVERIES
               " must be integers";
    /* pika's seed client sends no content type; "application/json;
     * charset=utf-8" is still JSON. */
    if (ct.len && !(ct.len >= sizeof json - 1 &&
                    strncasecmp(ct.ptr, json, sizeof json - 1) == 0 &&
                    (ct.len == sizeof json - 1 || ct.ptr[sizeof json - 1] == ';'))) {
        snprintf(buf, len,
                 "content_type must be application/json (got \"%.*s\")",
                 mqr_service_shown_len(ct), ct.ptr);
        return buf;
    }
    return NULL;
}

void mqr_run_request(mqrpc_service *s, mqrpc_request *r)
{
    mqrpc_fault fault = {{0}, {0}};
    mqr_limits lim = {s->opts.max_body, s->opts.max_depth, s->opts.max_string};
    json_t *request = NULL;
    char why[160];
    const char *problem = envelope_problem(r, why, sizeof why);

    if (r->deadline_ms && mqr_wall_ms() >= r->deadline_ms) {
        /* It waited here for a thread until its caller gave up. */
        pthread_mutex_lock(&s->lock);
        r->skipped = r->ended = true;
        post_locked(s, r);
        pthread_mutex_unlock(&s->lock);
        return;
    }
    if (problem) {
        mqrpc_fault_set(&fault, MQRPC_BAD_REQUEST, "%s", problem);
        end_with_fault(r, &fault);
        return;
    }
    if (mqr_decode_request(r->body.ptr, r->body.len, &lim, &request,
                           &fault) != MQRPC_OK) {
        end_with_fault(r, &fault);
        return;
    }
    r->params = request;
    s->fn(r, s->arg);
}

/* How often a lone handler thread looks whether an inline handler has run
 * long enough for it to take the connection over. */
#define STAND_BY_CHECK_NS 50000000L

/* An inline handler ran long: the lone handler thread takes over. */
static bool due_to_stand_in(const mqrpc_service *s)
{
    return s->opts.threads == 1 && s->inline_since_us && !s->taken_over &&
           mqr_now_us() - s->inline_since_us >= INLINE_MAX_US;
}

static void stand_by(mqrpc_service *s)
{
    struct timespec t;

    if (s->opts.threads != 1) {
        pthread_cond_wait(&s->work, &s->lock);
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += STAND_BY_CHECK_NS;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&s->work, &s->lock, &t);
}

static void *worker(void *p)
{
    mqrpc_service *s = p;
    mqrpc_request *r;

    for (;;) {
        pthread_mutex_lock(&s->lock);
        for (;;) {
            /* After a stop, nothing new starts: the connection thread hands
             * what waits back to the queue. */
            r = atomic_load(&s->stop) ? NULL : s->jobs_head;
            if (r) {
                s->jobs_head = r->next;
                if (!s->jobs_head)
                    s->jobs_tail = NULL;
                s->busy++;
                break;
            }
            if (s->quit)
                break;
            if (due_to_stand_in(s)) {
                s->taken_over = true;
                pthread_mutex_unlock(&s->lock);
                mqr_service_stand_in(s);
                pthread_mutex_lock(&s->lock);
                continue;
            }
            stand_by(s);
        }
        pthread_mutex_unlock(&s->lock);
        if (!r)
            return NULL; /* quit, and nothing left */
        mqr_run_request(s, r);
        pthread_mutex_lock(&s->lock);
        s->busy--;
        pthread_mutex_unlock(&s->lock);
    }
}

void mqr_workers_submit(mqrpc_service *s, mqrpc_request *r)
{
    pthread_mutex_lock(&s->lock);
    fifo_push(&s->jobs_head, &s->jobs_tail, r);
    pthread_cond_signal(&s->work);
    pthread_mutex_unlock(&s->lock);
}

mqrpc_request *mqr_workers_take_unstarted(mqrpc_service *s)
{
    return fifo_take_all(s, &s->jobs_head, &s->jobs_tail);
}

mqrpc_err mqr_workers_start(mqrpc_service *s)
{
    s->quit = false;
    s->threads = calloc(s->opts.threads, sizeof *s->threads);
    if (!s->threads)
        return MQRPC_ENOMEM;
    for (s->nthreads = 0; s->nthreads < s->opts.threads; s->nthreads++) {
        int err = pthread_create(&s->threads[s->nthreads], NULL, worker, s);
        if (err) {
            snprintf(s->err, sizeof s->err,
                     "cannot start handler thread %u: %s", s->nthreads + 1,
                     strerror(err));
            mqr_workers_join(s);
            return MQRPC_ENOMEM;
        }
    }
    return MQRPC_OK;
}

void mqr_workers_join(mqrpc_service *s)
{
    pthread_mutex_lock(&s->lock);
    s->quit = true;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->lock);
    for (unsigned i = 0; i < s->nthreads; i++)
        pthread_join(s->threads[i], NULL);
    free(s->threads);
    s->threads = NULL;
    s->nthreads = 0;
}
