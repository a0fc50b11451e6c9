// Topic events through the broker's XSUB/XPUB proxy.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { ClosedError, Publisher, Subscriber } from '../index.js'
import { startBroker } from '../testlib/broker.js'

let broker

before(async () => { broker = await startBroker() })
after(async () => { await broker?.dispose() })

// Pub/sub has a slow joiner: publish a probe until the subscriber gets one,
// so that the subscription has reached the broker before the real events.
async function joined (publisher, subscriber, topic) {
  for (let i = 0; i < 200; i++) {
    await publisher.publish(topic, 'probe')
    const event = await subscriber.recv({ timeoutMs: 50 })
    if (event !== null) {
      while (await subscriber.recv({ timeoutMs: 20 }) !== null) {} // drain the other probes
      return
    }
  }
  throw new Error('subscription never reached the broker')
}

test('an event goes from a Publisher to a Subscriber, envelope fields intact', async (t) => {
  const sub = new Subscriber(broker.eventsOut, { topics: ['fs.'] })
  const pub = new Publisher(broker.eventsIn, { source: 'watcher' })
  t.after(() => { sub.close(); pub.close() })
  await joined(pub, sub, 'fs.probe')

  const sent = await pub.publish('fs.change', { path: '/tmp/a.wav', bytes: Buffer.from([1, 2, 3]), size: 3 }, { correlationId: 'flow-1', replyTo: 'fs.ack' })
  const event = await sub.recv({ timeoutMs: 5000 })
  assert.equal(event.topic, 'fs.change')
  assert.equal(event.type, 'fs.change')
  assert.equal(event.source, 'watcher')
  assert.equal(event.correlationId, 'flow-1')
  assert.equal(event.replyTo, 'fs.ack')
  assert.equal(event.timestamp, sent.timestamp)
  assert.equal(event.payload.path, '/tmp/a.wav')
  assert.equal(event.payload.size, 3)
  assert.deepEqual([...event.payload.bytes], [1, 2, 3])
})

test('subscribers only get the topics they asked for; async iteration; close ends the loop', async (t) => {
  const sub = new Subscriber(broker.eventsOut, { topics: ['transcript.'] })
  const pub = new Publisher(broker.eventsIn, { source: 'stt' })
  t.after(() => { sub.close(); pub.close() })
  await joined(pub, sub, 'transcript.probe')

  await pub.publish('tts.done', 'not for this subscriber')
  await pub.publish('transcript.partial', 'hel')
  await pub.publish('transcript.final', 'hello', { source: 'stt-2' })
  const got = []
  for await (const event of sub) {
    got.push([event.type, event.payload, event.source])
    if (got.length === 2) sub.close()
  }
  assert.deepEqual(got, [['transcript.partial', 'hel', 'stt'], ['transcript.final', 'hello', 'stt-2']])
  assert.equal(sub.received >= 2, true)
  await assert.rejects(sub.recv(), ClosedError)
})

test('recv() returns null at its timeout and an abort signal rejects it', async (t) => {
  const sub = new Subscriber({ endpoint: broker.eventsOut, topics: ['nothing.here'] })
  t.after(() => sub.close())
  assert.equal(await sub.recv({ timeoutMs: 50 }), null)
  const controller = new AbortController()
  const pending = sub.recv({ signal: controller.signal })
  controller.abort(new Error('stop waiting'))
  await assert.rejects(pending, /stop waiting/)
})

test('a constructor signal closes the subscriber and ends its iteration', async () => {
  const controller = new AbortController()
  const sub = new Subscriber(broker.eventsOut, { signal: controller.signal })
  const loop = (async () => { for await (const _ of sub) {} })() // eslint-disable-line no-unused-vars
  controller.abort()
  await loop
  assert.equal(sub.closed, true)
})

test('publish() checks its arguments', async (t) => {
  const pub = new Publisher(broker.eventsIn)
  t.after(() => pub.close())
  await assert.rejects(pub.publish('', 'x'), RangeError)
  await assert.rejects(pub.publish('x'.repeat(256), 'x'), RangeError)
  await assert.rejects(pub.publish('ok', 'x', { correlationId: 5 }), TypeError)
  await assert.rejects(pub.publish('ok', () => {}), TypeError)
  pub.close()
  await assert.rejects(pub.publish('ok', 'x'), ClosedError)
})
