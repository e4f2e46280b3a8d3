// Command go_pingpong is the Go peer of bench/bare_pingpong.c: the same
// request/reply over AMQP, written the way a Go user would with
// github.com/rabbitmq/amqp091-go (Debian's golang-github-rabbitmq-amqp091-go-dev),
// so that scripts/bench.sh can put the library most Go users pick next to
// ours and the bare rabbitmq-c floor.
//
// The AMQP pattern is the floor's: the request goes to a named queue through
// the default exchange with reply_to (an exclusive, server-named queue of the
// client's, consumed without acknowledgements) and correlation_id; the
// service publishes the reply to reply_to with the same correlation_id, then
// acknowledges that one request. Nothing is batched.
//
//	go_pingpong serve [--url URL] [--queue Q] [--prefetch N]
//	go_pingpong call  [--url URL] [--queue Q] [-c INFLIGHT] [--connections N]
//	                  [-n CALLS | -d SECONDS] [--warmup CALLS] [--rate R[,R...]]
//
// The command line, the JSON line and the exit codes are bare_pingpong's, so
// scripts/bench.sh can run one in place of the other. Exit codes: 0 ok, 1
// some replies were wrong (unknown correlation id, or a body that is not
// the request's), 2 usage error, 3 any other failure (one line on stderr).
//
// Build (offline, GOPATH mode; bench/CMakeLists.txt does this with
// -DMQRPC_BENCH_GO=ON):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o go_pingpong .
package main

import (
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
)

const (
	prog          = "go_pingpong"
	exitErrors    = 1
	exitUsage     = 2
	exitFailure   = 3
	defaultURL    = "amqp://guest:guest@localhost:5672/"
	defaultQueue  = "service_bare"
	requestBody   = `{"a":1,"b":2}`
	maxInflight   = 65536 // rpc_bench's; also the open loop's default cap
	maxConns      = 1000
	maxRate       = 10000000.0
	unlimited     = math.MaxUint64
	defaultCalls  = 20000
	defaultWarmup = 1000
)

const usageText = "usage: " + prog + " serve [--url URL] [--queue Q] [--prefetch N]\n" +
	"       " + prog + " call [--url URL] [--queue Q] [-c INFLIGHT] [--connections N]" +
	" [-n CALLS | -d SECONDS] [--warmup CALLS] [--rate R[,R...]]\n"

const helpText = usageText + `
serve  echoes each request body to its reply_to with its correlation_id, then
       acknowledges the request; prints "ready" once consuming; SIGTERM or
       SIGINT stops it (exit 0). --prefetch: basic.qos (default 1, 0 = none).
call   closed loop (default): each of --connections connections (default 1)
       keeps -c calls outstanding (default 1), first --warmup calls each
       (default 1000) unmeasured, then -n calls over all connections (default
       20000) or -d seconds. Prints one JSON line.
       --rate R[,R...]: open loop instead, as rpc_bench --rate. After the
       warm-up (one call at a time), calls start on a fixed schedule of R
       calls/s spread evenly over the connections, whatever the replies do;
       each latency is measured from the call's scheduled start. -n calls or
       -d seconds per rate, one JSON line per rate. -c is then the most calls
       in flight per connection (default 65536): a due call that finds them
       all in flight is not sent and counts as an error (inflight_limit).
Every reply is checked: unknown correlation ids and bodies that differ from
the request count as errors. URL: --url, else $AMQP_URL, else
` + defaultURL + `.
Exit: 0 ok, 1 errors in replies, 2 usage error, 3 any other failure.
`

// die reports a failure that is not the replies' fault and exits 3.
func die(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, prog+": "+format+"\n", args...)
	os.Exit(exitFailure)
}

func usageError(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, prog+": "+format+"\n"+usageText, args...)
	os.Exit(exitUsage)
}

type options struct {
	url         string
	queue       string
	prefetch    int
	inflight    int
	connections int
	calls       uint64  // measured calls over all connections
	seconds     float64 // > 0: measure for this long instead of -n calls
	warmup      uint64  // per connection
	rates       []float64
}

// optionValue returns VALUE when args[*i] is NAME VALUE or NAME=VALUE, and
// moves *i past it.
func optionValue(args []string, i *int, name string) (string, bool) {
	a := args[*i]
	if !strings.HasPrefix(a, name) {
		return "", false
	}
	if rest := a[len(name):]; rest != "" {
		if rest[0] != '=' {
			return "", false
		}
		return rest[1:], true
	}
	if *i+1 >= len(args) {
		usageError("%s needs a value", name)
	}
	*i++
	return args[*i], true
}

func parseCount(s, name string, min, max uint64) uint64 {
	if s == "" || s[0] < '0' || s[0] > '9' {
		usageError("%s: not a number: %s", name, s)
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || v < min || v > max {
		usageError("%s must be an integer in %d..%d, got %s", name, min, max, s)
	}
	return v
}

func parsePositive(s, name string, max float64) float64 {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || !(v > 0) || v > max {
		usageError("%s: a positive number up to %g, got %s", name, max, s)
	}
	return v
}

func parseOptions(args []string, serve bool) *options {
	o := &options{url: defaultURL, queue: defaultQueue, prefetch: 1,
		inflight: 1, connections: 1, calls: defaultCalls,
		warmup: defaultWarmup}
	if env := os.Getenv("AMQP_URL"); env != "" {
		o.url = env
	}
	haveN, haveC := false, false
	for i := 0; i < len(args); i++ {
		var v string
		var ok bool
		switch {
		case args[i] == "-h" || args[i] == "--help":
			fmt.Print(helpText)
			os.Exit(0)
		case func() bool { v, ok = optionValue(args, &i, "--url"); return ok }():
			o.url = v
		case func() bool { v, ok = optionValue(args, &i, "--queue"); return ok }():
			if v == "" || len(v) > 255 {
				usageError("--queue: 1 to 255 bytes")
			}
			o.queue = v
		case serve && func() bool { v, ok = optionValue(args, &i, "--prefetch"); return ok }():
			o.prefetch = int(parseCount(v, "--prefetch", 0, 65535))
		case !serve && func() bool { v, ok = optionValue(args, &i, "-c"); return ok }():
			o.inflight = int(parseCount(v, "-c", 1, maxInflight))
			haveC = true
		case !serve && func() bool { v, ok = optionValue(args, &i, "--connections"); return ok }():
			o.connections = int(parseCount(v, "--connections", 1, maxConns))
		case !serve && func() bool { v, ok = optionValue(args, &i, "-n"); return ok }():
			o.calls = parseCount(v, "-n", 1, 1000000000)
			haveN = true
		case !serve && func() bool { v, ok = optionValue(args, &i, "-d"); return ok }():
			o.seconds = parsePositive(v, "-d", 1e6)
		case !serve && func() bool { v, ok = optionValue(args, &i, "--warmup"); return ok }():
			o.warmup = parseCount(v, "--warmup", 0, 1000000000)
		case !serve && func() bool { v, ok = optionValue(args, &i, "--rate"); return ok }():
			o.rates = o.rates[:0]
			for _, r := range strings.Split(v, ",") {
				o.rates = append(o.rates, parsePositive(r, "--rate", maxRate))
			}
		default:
			usageError("unknown argument: %s", args[i])
		}
	}
	if haveN && o.seconds > 0 {
		usageError("-n and -d are exclusive")
	}
	if len(o.rates) > 0 && !haveC {
		o.inflight = maxInflight
	}
	if o.seconds == 0 && o.calls < uint64(o.connections) {
		usageError("-n must be at least the number of connections")
	}
	return o
}

func main() {
	if len(os.Args) < 2 {
		usageError("missing command (serve or call)")
	}
	switch os.Args[1] {
	case "serve":
		os.Exit(serve(parseOptions(os.Args[2:], true)))
	case "call":
		os.Exit(call(parseOptions(os.Args[2:], false)))
	case "-h", "--help":
		fmt.Print(helpText)
	default:
		usageError("unknown command: %s", os.Args[1])
	}
}
