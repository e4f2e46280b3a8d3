package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	amqp "github.com/rabbitmq/amqp091-go"
)

func serve(o *options) int {
	// Before connecting, so a stop asked for during start-up is not lost.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	conn, err := amqp.Dial(o.url)
	if err != nil {
		die("cannot connect: %v", err)
	}
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	ch, err := conn.Channel()
	if err != nil {
		die("channel.open: %v", err)
	}
	if _, err := ch.QueueDeclare(o.queue, false, false, false, false, nil); err != nil {
		die("queue.declare: %v", err)
	}
	if err := ch.Qos(o.prefetch, 0, false); err != nil {
		die("basic.qos: %v", err)
	}
	requests, err := ch.Consume(o.queue, "", false, false, false, false, nil)
	if err != nil {
		die("basic.consume: %v", err)
	}
	fmt.Println("ready") // os.Stdout is unbuffered: bench.sh sees it now

	ctx := context.Background()
	for {
		select {
		case <-stop:
			ch.Close()
			conn.Close()
			return 0
		case d, ok := <-requests:
			if !ok {
				die("consuming: %v", closeReason(closed))
			}
			if d.ReplyTo != "" {
				err := ch.PublishWithContext(ctx, "", d.ReplyTo, false, false,
					amqp.Publishing{CorrelationId: d.CorrelationId, Body: d.Body})
				if err != nil {
					die("publishing a reply: %v", err)
				}
			} // else: nobody to answer; acknowledged and dropped
			if err := d.Ack(false); err != nil {
				die("basic.ack: %v", err)
			}
		}
	}
}

// closeReason says why the broker closed the connection or the channel,
// once their delivery channel has been closed.
func closeReason(closed <-chan *amqp.Error) string {
	select {
	case e := <-closed:
		if e != nil {
			return e.Error()
		}
	default:
	}
	return "the channel was closed"
}
