// A Node Publisher and Subscriber driven by commands on stdin (see io.mjs).
//
//   node events.mjs EVENTS_IN EVENTS_OUT [SOURCE]
//
// Ops:
//   publish {type, payload (base64 msgpack), correlationId?, replyTo?, source?, fakeNowMs?}
//       -> the event as sent: {type, source, payload (base64 msgpack), timestamp, correlationId, replyTo}
//   subscribe {topics} -> null; from then on every event received is printed as
//       {"event": "event", topic, type, source, payload (base64 msgpack), timestamp, correlationId, replyTo}
// Payloads are msgpack-packed with the client's own codec so that binary data,
// integers, floats and nil keep their types across JSON.

import { Publisher, Subscriber } from '../../../clients/node/index.js'
import { pack, unpack } from '../../../clients/node/lib/protocol.js'
import { b64, emit, serveCommands, unb64 } from './io.mjs'

const [eventsIn, eventsOut, source = 'node-test'] = process.argv.slice(2)
const publisher = new Publisher(eventsIn, { source })
let subscriber = null

function wire (event) {
  return {
    topic: event.topic ?? null,
    type: event.type,
    source: event.source,
    payload: b64(pack(event.payload)),
    timestamp: event.timestamp,
    correlationId: event.correlationId ?? null,
    replyTo: event.replyTo ?? null
  }
}

async function listen (sub) {
  for await (const event of sub) emit({ event: 'event', ...wire(event) })
}

serveCommands({
  publish: async (c) => {
    const options = {}
    if (c.correlationId != null) options.correlationId = c.correlationId
    if (c.replyTo != null) options.replyTo = c.replyTo
    if (c.source != null) options.source = c.source
    // fakeNowMs: the publisher's clock reads this (ms since the epoch) for this call.
    const realNow = Date.now
    if (c.fakeNowMs != null) Date.now = () => c.fakeNowMs
    try {
      return wire(await publisher.publish(c.type, unpack(unb64(c.payload)), options))
    } finally {
      Date.now = realNow
    }
  },
  subscribe: (c) => {
    if (subscriber === null) {
      subscriber = new Subscriber(eventsOut, { topics: c.topics })
      listen(subscriber).catch((err) => emit({ event: 'error', message: String(err) }))
    } else {
      subscriber.subscribe(...c.topics)
    }
    return null
  }
}, () => {
  publisher.close()
  subscriber?.close()
})
emit({ event: 'ready' })
