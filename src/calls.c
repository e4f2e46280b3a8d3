/*
 * The client's call table: an id map by sequence number (the correlation
 * id's suffix), a list in deadline order, a list in publish order for the
 * calls the broker has not confirmed, and the finished calls waiting for
 * their callbacks. Pure bookkeeping: the client (client.c) does the I/O and
 * runs the callbacks.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

bool mqr_calls_init(mqr_calls *t)
{
    memset(t, 0, sizeof *t);
    t->map_size = 64;
    t->map = calloc(t->map_size, sizeof *t->map);
    return t->map != NULL;
}

/* Calls kept for reuse: a closed loop keeps about as many in flight as it
 * had, and an allocation and a free per call were ~500 of the client's
 * instructions per call (callgrind). */
#define MAX_SPARE 64
/* Queue names up to this long share one size of allocation, so that any
 * spare fits the next call of most programs. */
#define MIN_QUEUE_CAP 64

static mqr_call *call_alloc(const char *queue, size_t qlen)
{
    size_t cap = qlen + 1 < MIN_QUEUE_CAP ? MIN_QUEUE_CAP : qlen + 1;
    mqr_call *k = calloc(1, sizeof *k + cap);

    if (!k)
        return NULL;
    k->queue_cap = cap;
    memcpy(k->queue, queue, qlen + 1);
    return k;
}

mqr_call *mqr_call_new(const char *queue)
{
    return call_alloc(queue, strlen(queue));
}

/* Frees what k owns, not k. */
static void call_clear(mqr_call *k)
{
    if (k->own_body)
        free(k->body);
    json_decref(k->reply.result);
    free(k->text);
    free(k->tracestate);
    k->tracestate = NULL;
}

void mqr_call_free(mqr_call *k)
{
    if (!k)
        return;
    call_clear(k);
    free(k);
}

mqr_call *mqr_calls_new_call(mqr_calls *t, const char *queue)
{
    size_t qlen = strlen(queue), cap;
    mqr_call *k = t->spare;

    if (!k || k->queue_cap < qlen + 1)
        return call_alloc(queue, qlen);
    t->spare = k->hnext;
    t->nspare--;
    cap = k->queue_cap;
    memset(k, 0, sizeof *k);
    k->queue_cap = cap;
    memcpy(k->queue, queue, qlen + 1);
    return k;
}

void mqr_calls_release(mqr_calls *t, mqr_call *k)
{
    if (t->nspare >= MAX_SPARE) {
        mqr_call_free(k);
        return;
    }
    call_clear(k);
    k->hnext = t->spare;
    t->spare = k;
    t->nspare++;
}

void mqr_calls_clear(mqr_calls *t)
{
    mqr_call *k, *next;

    for (k = t->head; k; k = next) {
        next = k->next;
        mqr_call_free(k);
    }
    for (k = t->dhead; k; k = next) {
        next = k->next;
        mqr_call_free(k);
    }
    for (k = t->spare; k; k = next) {
        next = k->hnext;
        free(k);
    }
    free(t->map);
    memset(t, 0, sizeof *t);
}

static mqr_call **map_slot(const mqr_calls *t, uint64_t seq)
{
    return &t->map[seq & (t->map_size - 1)];
}

static void map_grow(mqr_calls *t)
{
    size_t n = t->map_size * 2;
    mqr_call **m = calloc(n, sizeof *m);

    if (!m)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < t->map_size; i++) {
        mqr_call *k = t->map[i], *next;
        for (; k; k = next) {
            next = k->hnext;
            k->hnext = m[k->seq & (n - 1)];
            m[k->seq & (n - 1)] = k;
        }
    }
    free(t->map);
    t->map = m;
    t->map_size = n;
}

void mqr_calls_add(mqr_calls *t, mqr_call *k)
{
    mqr_call *at;

    if (t->pending >= t->map_size)
        map_grow(t);
    k->hnext = *map_slot(t, k->seq);
    *map_slot(t, k->seq) = k;
    /* Deadlines mostly arrive in order: walk back from the tail. */
    for (at = t->tail; at && at->deadline_us > k->deadline_us; at = at->prev)
        ;
    k->prev = at;
    k->next = at ? at->next : t->head;
    if (k->next)
        k->next->prev = k;
    else
        t->tail = k;
    if (at)
        at->next = k;
    else
        t->head = k;
    t->pending++;
}

mqr_call *mqr_calls_find(const mqr_calls *t, uint64_t seq)
{
    for (mqr_call *k = *map_slot(t, seq); k; k = k->hnext)
        if (k->seq == seq)
            return k;
    return NULL;
}

void mqr_calls_unconfirmed_append(mqr_calls *t, mqr_call *k)
{
    k->cnext = NULL;
    k->cprev = t->ctail;
    if (t->ctail)
        t->ctail->cnext = k;
    else
        t->chead = k;
    t->ctail = k;
    k->unconfirmed = true;
}

void mqr_calls_unconfirmed_unlink(mqr_calls *t, mqr_call *k)
{
    if (!k->unconfirmed)
        return;
    if (k->cprev)
        k->cprev->cnext = k->cnext;
    else
        t->chead = k->cnext;
    if (k->cnext)
        k->cnext->cprev = k->cprev;
    else
        t->ctail = k->cprev;
    k->cprev = k->cnext = NULL;
    k->unconfirmed = false;
}

void mqr_calls_finish(mqr_calls *t, mqr_call *k)
{
    mqr_call **p;

    if (k->finished)
        return;
    for (p = map_slot(t, k->seq); *p; p = &(*p)->hnext) {
        if (*p == k) {
            *p = k->hnext;
            break;
        }
    }
    if (k->prev)
        k->prev->next = k->next;
    else
        t->head = k->next;
    if (k->next)
        k->next->prev = k->prev;
    else
        t->tail = k->prev;
    mqr_calls_unconfirmed_unlink(t, k);
    t->pending--;
    k->finished = true;
    k->hnext = NULL;
    k->prev = t->dtail;
    k->next = NULL;
    if (t->dtail)
        t->dtail->next = k;
    else
        t->dhead = k;
    t->dtail = k;
}

mqr_call *mqr_calls_pop_finished(mqr_calls *t)
{
    mqr_call *k = t->dhead;

    if (!k)
        return NULL;
    t->dhead = k->next;
    if (t->dhead)
        t->dhead->prev = NULL;
    else
        t->dtail = NULL;
    k->next = k->prev = NULL;
    return k;
}
