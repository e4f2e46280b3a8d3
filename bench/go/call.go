package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const (
	impl = "go amqp091-go"
	// As the floor: a reply that takes longer means the run is broken.
	replyTimeout = 10 * time.Second
)

var epoch = time.Now()

// nowNS reads the monotonic clock (time.Since uses it).
func nowNS() int64 { return int64(time.Since(epoch)) }

// peer is one client connection with its reply queue. Only the goroutine
// that runs a phase touches it (as the floor, a channel is never shared).
type peer struct {
	conn    *amqp.Connection
	ch      *amqp.Channel
	closed  chan *amqp.Error
	replies <-chan amqp.Delivery
	replyTo string
	queue   string
	body    []byte
	ctx     context.Context
	timer   *time.Timer

	// Since the last collect:
	lat       *hist
	kinds     errorKinds
	end       int64  // when the last measured call completed (nowNS)
	scheduled uint64 // open loop: calls that came due

	slots  []slot           // closed loop (and warm-up)
	nextID uint64           // open loop: the next call's correlation id
	open   map[uint64]int64 // open loop: calls in flight, by id: when due
}

// errorKinds counts the replies that were wrong, and the open loop's calls
// that came due with -c calls in flight (not sent).
type errorKinds struct {
	unknownReply  uint64 // no call in flight has its correlation id
	wrongResult   uint64 // the body is not the request's
	inflightLimit uint64
}

func (k errorKinds) total() uint64 {
	return k.unknownReply + k.wrongResult + k.inflightLimit
}

// Closed loop: slot s carries the calls s, s + C, s + 2C, ... (C = -c): the
// correlation id is that number in decimal and id % C finds the slot.
type slot struct {
	id, nextID uint64
	started    int64
	busy       bool
}

func dialPeer(o *options) *peer {
	conn, err := amqp.Dial(o.url)
	if err != nil {
		die("cannot connect: %v", err)
	}
	p := &peer{conn: conn, queue: o.queue, body: []byte(requestBody),
		ctx: context.Background(), lat: newHist(),
		open: make(map[uint64]int64)}
	p.closed = conn.NotifyClose(make(chan *amqp.Error, 1))
	if p.ch, err = conn.Channel(); err != nil {
		die("channel.open: %v", err)
	}
	// The floor's reply queue: server-named, exclusive, not auto-delete,
	// consumed without acknowledgements.
	q, err := p.ch.QueueDeclare("", false, false, true, false, nil)
	if err != nil {
		die("queue.declare (reply queue): %v", err)
	}
	p.replyTo = q.Name
	if p.replies, err = p.ch.Consume(q.Name, "", true, false, false, false, nil); err != nil {
		die("basic.consume (reply queue): %v", err)
	}
	window := o.inflight
	if len(o.rates) > 0 {
		window = 1 // the open loop warms up one call at a time
	}
	p.slots = make([]slot, window)
	for i := range p.slots {
		p.slots[i].nextID = uint64(i)
	}
	p.timer = time.NewTimer(time.Hour)
	return p
}

func (p *peer) close() {
	if err := p.ch.Close(); err != nil {
		die("channel.close: %v", err)
	}
	if err := p.conn.Close(); err != nil {
		die("connection.close: %v", err)
	}
}

func (p *peer) publish(id uint64) {
	err := p.ch.PublishWithContext(p.ctx, "", p.queue, false, false,
		amqp.Publishing{ReplyTo: p.replyTo,
			CorrelationId: strconv.FormatUint(id, 10), Body: p.body})
	if err != nil {
		die("publishing a request: %v", err)
	}
}

func (p *peer) resetTimer(d time.Duration) {
	if !p.timer.Stop() {
		select {
		case <-p.timer.C:
		default:
		}
	}
	p.timer.Reset(d)
}

// ready returns a reply that has already arrived, if any.
func (p *peer) ready() (amqp.Delivery, bool) {
	select {
	case d, ok := <-p.replies:
		if !ok {
			die("reading replies: %v", closeReason(p.closed))
		}
		return d, true
	default:
		return amqp.Delivery{}, false
	}
}

// await waits up to wait for a reply; false when the time is up first.
func (p *peer) await(wait time.Duration) (amqp.Delivery, bool) {
	if d, ok := p.ready(); ok {
		return d, true // no timer to arm: the common case under load
	}
	p.resetTimer(wait)
	select {
	case d, ok := <-p.replies:
		if !ok {
			die("reading replies: %v", closeReason(p.closed))
		}
		return d, true
	case <-p.timer.C:
		return amqp.Delivery{}, false
	}
}

// parseCorr returns the decimal correlation id of a reply.
func parseCorr(s string) (uint64, bool) {
	if len(s) == 0 || len(s) > 19 {
		return 0, false
	}
	var v uint64
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		v = v*10 + uint64(s[i]-'0')
	}
	return v, true
}

// ---- closed loop ----------------------------------------------------------

func (p *peer) startSlot(s *slot) {
	s.id = s.nextID
	s.nextID += uint64(len(p.slots))
	s.busy = true
	s.started = nowNS()
	p.publish(s.id)
}

// closedPhase keeps every slot busy: each reply starts the slot's next call
// while fewer than quota calls have been started and the deadline (if not
// 0) has not passed, then waits for the calls still out. measure: record
// their latencies (publish to reply).
func (p *peer) closedPhase(quota uint64, deadline int64, measure bool) {
	var started uint64
	more := func(now int64) bool {
		return started < quota && (deadline == 0 || now < deadline)
	}
	outstanding := 0
	for i := range p.slots {
		if !more(nowNS()) {
			break
		}
		p.startSlot(&p.slots[i])
		started++
		outstanding++
	}
	for outstanding > 0 {
		d, ok := p.await(replyTimeout)
		if !ok {
			die("no reply within %d s (%d calls outstanding)",
				int(replyTimeout/time.Second), outstanding)
		}
		now := nowNS()
		id, ok := parseCorr(d.CorrelationId)
		var s *slot
		if ok {
			s = &p.slots[id%uint64(len(p.slots))]
		}
		if s == nil || !s.busy || s.id != id {
			p.kinds.unknownReply++
			continue
		}
		s.busy = false
		outstanding--
		if !bytes.Equal(d.Body, p.body) {
			p.kinds.wrongResult++
		} else if measure {
			p.lat.record(now - s.started)
			p.end = now
		}
		if more(now) {
			p.startSlot(s)
			started++
			outstanding++
		}
	}
}

// ---- open loop ------------------------------------------------------------

// openPhase makes this connection's share of one row's schedule: the calls
// g = first, first + step, ... below limit, call g due at due(g), whatever
// the replies do. A call's latency runs from when it was due, not from when
// it was sent, so a client that falls behind its schedule shows as latency
// (no coordinated omission). A due call that finds maxOpen calls in flight
// is not sent and counts as an error. Returns when every call sent has its
// reply.
func (p *peer) openPhase(first, step, limit uint64, due func(g uint64) int64,
	maxOpen int) {
	lastProgress := nowNS()
	for g := first; ; {
		// Replies that have arrived first, so that publishing a backlog
		// never delays reading them.
		for {
			d, ok := p.ready()
			if !ok {
				break
			}
			p.openReply(d)
			lastProgress = nowNS()
		}
		now := nowNS()
		if g < limit && due(g) <= now {
			p.scheduled++
			if len(p.open) >= maxOpen {
				p.kinds.inflightLimit++
			} else {
				id := p.nextID
				p.nextID++
				if len(p.open) == 0 {
					lastProgress = now
				}
				p.open[id] = due(g)
				p.publish(id)
			}
			g += step
			continue
		}
		if g >= limit && len(p.open) == 0 {
			return
		}
		if len(p.open) > 0 && now-lastProgress > int64(replyTimeout) {
			die("no reply within %d s (%d calls outstanding)",
				int(replyTimeout/time.Second), len(p.open))
		}
		wait := replyTimeout
		if g < limit {
			wait = time.Duration(due(g) - now)
		}
		if d, ok := p.await(wait); ok {
			p.openReply(d)
			lastProgress = nowNS()
		}
	}
}

func (p *peer) openReply(d amqp.Delivery) {
	now := nowNS()
	id, ok := parseCorr(d.CorrelationId)
	due, known := p.open[id]
	if !ok || !known {
		p.kinds.unknownReply++
		return
	}
	delete(p.open, id)
	if !bytes.Equal(d.Body, p.body) {
		p.kinds.wrongResult++
		return
	}
	p.lat.record(now - due)
	p.end = now
}

// ---- runs -----------------------------------------------------------------

// row is one JSON line with bare_pingpong's fields in its order, plus
// rpc_bench's min_us and mean_us. Open loop: with rate, offered_per_s,
// scheduled, achieved_per_s and errors_by_kind (only the kinds that
// occurred, as the floor's); the closed loop prints errors_by_kind only when
// there are errors.
type row struct {
	Impl         string             `json:"impl"`
	Connections  int                `json:"connections"`
	Inflight     int                `json:"inflight"`
	Rate         *float64           `json:"rate,omitempty"`
	OfferedPerS  *float64           `json:"offered_per_s,omitempty"`
	Scheduled    *uint64            `json:"scheduled,omitempty"`
	Calls        uint64             `json:"calls"`
	Seconds      float64            `json:"seconds"`
	CallsPerS    float64            `json:"calls_per_s"`
	AchievedPerS *float64           `json:"achieved_per_s,omitempty"`
	P50          float64            `json:"p50_us"`
	P90          float64            `json:"p90_us"`
	P99          float64            `json:"p99_us"`
	P999         float64            `json:"p999_us"`
	Max          float64            `json:"max_us"`
	Min          float64            `json:"min_us"`
	Mean         float64            `json:"mean_us"`
	Errors       uint64             `json:"errors"`
	ErrorsByKind *map[string]uint64 `json:"errors_by_kind,omitempty"`
}

func round1(v float64) float64 {
	return float64(int64(v*10+0.5)) / 10
}

// collect merges and resets the peers' measurements since the last collect
// into a row measured from t0.
func collect(peers []*peer, t0 int64) (r row, scheduled uint64) {
	lat := newHist()
	var k errorKinds
	end := t0
	for _, p := range peers {
		lat.merge(p.lat)
		k.unknownReply += p.kinds.unknownReply
		k.wrongResult += p.kinds.wrongResult
		k.inflightLimit += p.kinds.inflightLimit
		scheduled += p.scheduled
		if p.end > end {
			end = p.end
		}
		p.lat, p.kinds, p.scheduled = newHist(), errorKinds{}, 0
	}
	secs := float64(end-t0) / 1e9
	r = row{Impl: impl, Connections: len(peers), Calls: lat.count,
		Seconds: float64(int64(secs*1000+0.5)) / 1000,
		P50:     round1(lat.percentileUS(500)),
		P90:     round1(lat.percentileUS(900)),
		P99:     round1(lat.percentileUS(990)),
		P999:    round1(lat.percentileUS(999)),
		Max:     round1(float64(lat.max) / 1e3),
		Errors:  k.total()}
	if lat.count > 0 {
		r.Min = round1(float64(lat.min) / 1e3)
		r.Mean = round1(float64(lat.sum) / float64(lat.count) / 1e3)
		if secs > 0 {
			r.CallsPerS = round1(float64(lat.count) / secs)
		}
	}
	kinds := map[string]uint64{}
	for name, n := range map[string]uint64{"unknown_reply": k.unknownReply,
		"wrong_result": k.wrongResult, "inflight_limit": k.inflightLimit} {
		if n > 0 {
			kinds[name] = n
		}
	}
	if len(kinds) > 0 {
		r.ErrorsByKind = &kinds
	}
	return r, scheduled
}

func printRow(r row) {
	b, err := json.Marshal(r)
	if err != nil {
		die("encoding the result: %v", err)
	}
	fmt.Printf("%s\n", b)
}

// each runs f on every peer at once, one goroutine each, and waits.
func each(peers []*peer, f func(i int, p *peer)) {
	var wg sync.WaitGroup
	for i, p := range peers {
		wg.Add(1)
		go func(i int, p *peer) {
			defer wg.Done()
			f(i, p)
		}(i, p)
	}
	wg.Wait()
}

func call(o *options) int {
	peers := make([]*peer, o.connections)
	for i := range peers {
		peers[i] = dialPeer(o)
	}
	// Every connection warms up, then all measure from the same moment
	// (as rpc_bench does); the open loop warms up one call at a time.
	if o.warmup > 0 {
		each(peers, func(i int, p *peer) { p.closedPhase(o.warmup, 0, false) })
		for _, p := range peers {
			p.kinds.inflightLimit = 0 // never set in a closed loop
		}
	}
	var errors uint64
	if len(o.rates) == 0 {
		errors = closedLoop(o, peers)
	} else {
		for _, rate := range o.rates {
			errors += openLoop(o, peers, rate)
		}
	}
	for _, p := range peers {
		p.close()
	}
	if errors > 0 {
		return exitErrors
	}
	return 0
}

// closedLoop measures -n calls (split over the connections) or -d seconds.
func closedLoop(o *options, peers []*peer) uint64 {
	t0 := nowNS()
	var deadline int64
	if o.seconds > 0 {
		deadline = t0 + int64(o.seconds*1e9)
	}
	n, c := o.calls, uint64(len(peers))
	each(peers, func(i int, p *peer) {
		quota := uint64(unlimited)
		if deadline == 0 {
			quota = n / c
			if uint64(i) < n%c {
				quota++
			}
		}
		p.closedPhase(quota, deadline, true)
	})
	r, _ := collect(peers, t0)
	r.Inflight = o.inflight
	printRow(r)
	return r.Errors
}

// openLoop measures one row: call g (0, 1, ... over all connections) is due
// at t0 + g/rate and connection i makes the calls g = i, i + N, ..., so
// together they offer rate calls/s evenly spaced; -n calls or -d seconds'
// worth. Warm-up replies of an earlier row never arrive late: each row
// waits for all of its replies.
func openLoop(o *options, peers []*peer, rate float64) uint64 {
	limit := o.calls
	if o.seconds > 0 {
		limit = uint64(math.Ceil(rate * o.seconds))
	}
	t0 := nowNS()
	each(peers, func(i int, p *peer) {
		due := func(g uint64) int64 {
			return t0 + int64(float64(g)*1e9/rate) // from t0: no drift
		}
		p.openPhase(uint64(i), uint64(len(peers)), limit, due, o.inflight)
	})
	r, scheduled := collect(peers, t0)
	offered := float64(scheduled) * rate / float64(limit)
	achieved := r.CallsPerS
	r.Inflight = o.inflight
	r.Rate, r.OfferedPerS, r.Scheduled = &rate, &offered, &scheduled
	r.AchievedPerS = &achieved
	if r.ErrorsByKind == nil {
		r.ErrorsByKind = &map[string]uint64{}
	}
	printRow(r)
	return r.Errors
}
