package main

import "math/bits"

// hist is apps/common/latency.c in nanoseconds: fixed size (18 KiB),
// every value below 128 ns has its bucket, each power of two above is split
// into 64, so a percentile is within 1.6% and memory does not grow with the
// number of calls.
const (
	histLinear  = 128
	histSubBits = 6
	histBuckets = 2304 // up to 2^41 ns, 36 minutes
)

type hist struct {
	count, sum, max, min uint64
	bucket               [histBuckets]uint64
}

func newHist() *hist { return &hist{min: ^uint64(0)} }

func bucketOf(v uint64) int {
	if v < histLinear {
		return int(v)
	}
	e := 63 - bits.LeadingZeros64(v)
	shift := e - histSubBits
	idx := (1<<histSubBits)*(e-histSubBits) + int(v>>uint(shift))
	if idx >= histBuckets {
		return histBuckets - 1
	}
	return idx
}

// bucketUpper is the largest value that falls into bucket idx.
func bucketUpper(idx int) uint64 {
	if idx < histLinear {
		return uint64(idx)
	}
	e := idx/(1<<histSubBits) + histSubBits - 1
	shift := e - histSubBits
	sub := uint64(idx - (1<<histSubBits)*(e-histSubBits))
	return (sub+1)<<uint(shift) - 1
}

func (h *hist) record(ns int64) {
	if ns < 0 { // cannot happen with a monotonic clock; never index with it
		ns = 0
	}
	v := uint64(ns)
	h.bucket[bucketOf(v)]++
	h.count++
	h.sum += v
	if v > h.max {
		h.max = v
	}
	if v < h.min {
		h.min = v
	}
}

func (h *hist) merge(o *hist) {
	for i := range h.bucket {
		h.bucket[i] += o.bucket[i]
	}
	h.count += o.count
	h.sum += o.sum
	if o.max > h.max {
		h.max = o.max
	}
	if o.min < h.min {
		h.min = o.min
	}
}

// percentileUS is the nearest-rank percentile (per mille, as
// bare_pingpong's) in microseconds: the upper bound of its bucket, capped
// at the true maximum. 0 when empty.
func (h *hist) percentileUS(perMille uint64) float64 {
	if h.count == 0 {
		return 0
	}
	want := (h.count*perMille + 999) / 1000
	if want == 0 {
		want = 1
	}
	var seen uint64
	for i, n := range h.bucket {
		seen += n
		if seen >= want {
			v := bucketUpper(i)
			if v > h.max {
				v = h.max
			}
			return float64(v) / 1e3
		}
	}
	return float64(h.max) / 1e3
}
