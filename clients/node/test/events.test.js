// Topic events through the broker's XSUB/XPUB proxy.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { ClosedError, Publisher, Subscriber } from '../index.js'
import * as zmq from 'zeromq'
import { pack } from '../lib/protocol.js'
import { sleep, startBroker, waitUntil } from '../testlib/broker.js'

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

// ------------------------------------------------------------ batches (payloads)

const publishRaw = (raw, topic, envelope) => raw.send([Buffer.from(topic), pack(envelope)])

test('publishMany() sends one batch; the Subscriber hands out each event separately, in order', async (t) => {
  const sub = new Subscriber(broker.eventsOut, { topics: ['batch.'] })
  const pub = new Publisher(broker.eventsIn, { source: 'batcher' })
  t.after(() => { sub.close(); pub.close() })
  await joined(pub, sub, 'batch.probe')
  const receivedBefore = sub.received
  const publishedBefore = pub.published

  const sent = await pub.publishMany('batch.step', [{ n: 1 }, 'two', Buffer.from([3])], { correlationId: 'flow-9', replyTo: 'batch.ack' })
  assert.equal(sent.length, 3)
  assert.equal(pub.published - publishedBefore, 3)
  assert.deepEqual(sent.map((e) => Object.keys(e).sort()), Array(3).fill(['correlationId', 'payload', 'replyTo', 'source', 'timestamp', 'type']))
  assert.deepEqual(sent.map((e) => e.payload), [{ n: 1 }, 'two', sent[2].payload])
  assert.equal(new Set(sent.map((e) => e.timestamp)).size, 1)

  const got = []
  for (let i = 0; i < 3; i++) got.push(await sub.recv({ timeoutMs: 5000 }))
  assert.deepEqual(got.map((e) => e.payload), [{ n: 1 }, 'two', got[2].payload])
  assert.deepEqual([...got[2].payload], [3])
  for (const event of got) {
    assert.equal(event.topic, 'batch.step')
    assert.equal(event.type, 'batch.step')
    assert.equal(event.source, 'batcher')
    assert.equal(event.correlationId, 'flow-9')
    assert.equal(event.replyTo, 'batch.ack')
    assert.equal(event.timestamp, sent[0].timestamp)
  }
  assert.equal(sub.received - receivedBefore, 3)
  assert.equal(sub.dropped, 0)
  assert.equal(await sub.recv({ timeoutMs: 50 }), null) // one message, three events: nothing more
})

test('queued events of a batch survive recv() timeouts and come out in order', async (t) => {
  const sub = new Subscriber(broker.eventsOut, { topics: ['queue.'] })
  const pub = new Publisher(broker.eventsIn, { source: 'q' })
  t.after(() => { sub.close(); pub.close() })
  await joined(pub, sub, 'queue.probe')

  // A recv() gives up while its receive is still pending; the batch that then
  // arrives is queued whole, and recv({timeoutMs: 0}) takes it one event at a time.
  assert.equal(await sub.recv({ timeoutMs: 20 }), null)
  await pub.publishMany('queue.a', ['a1', 'a2', 'a3'])
  await waitUntil(async () => {
    const first = await sub.recv({ timeoutMs: 0 })
    if (first === null) return false
    assert.equal(first.payload, 'a1')
    return true
  }, { what: 'the batch to arrive' })
  assert.equal((await sub.recv({ timeoutMs: 0 })).payload, 'a2')
  assert.equal((await sub.recv({ timeoutMs: 0 })).payload, 'a3')
  assert.equal(await sub.recv({ timeoutMs: 0 }), null)

  // Batches and single events mixed, recv() calls that time out in between:
  // the rest of a batch waits in the queue for the next recv().
  await pub.publishMany('queue.b', ['b1', 'b2', 'b3'])
  await pub.publish('queue.c', 'c1')
  await pub.publishMany('queue.d', ['d1', 'd2'])
  const got = [(await sub.recv({ timeoutMs: 5000 })).payload]
  await sleep(50) // the rest has long arrived: b2, b3 queued, c1 and the d batch behind them
  for (let turns = 0; got.length < 6; turns++) {
    assert.ok(turns < 100, `events lost: got ${got}`)
    const event = await sub.recv({ timeoutMs: got.length % 2 ? 0 : 5000 })
    if (event === null) continue // a timeout: nothing may be lost to it
    got.push(event.payload)
    assert.equal(await sub.recv({ timeoutMs: 0, signal: AbortSignal.abort() }).catch((err) => err.name), 'AbortError')
  }
  assert.deepEqual(got, ['b1', 'b2', 'b3', 'c1', 'd1', 'd2'])
  assert.equal(await sub.recv({ timeoutMs: 20 }), null)

  // Several recv() calls waiting at once share a batch in call order.
  const waiting = [sub.recv({ timeoutMs: 5000 }), sub.recv({ timeoutMs: 5000 }), sub.recv({ timeoutMs: 5000 }), sub.recv({ timeoutMs: 5000 })]
  await pub.publishMany('queue.e', ['e1', 'e2', 'e3'])
  await pub.publish('queue.f', 'f1')
  assert.deepEqual((await Promise.all(waiting)).map((e) => e.payload), ['e1', 'e2', 'e3', 'f1'])
})

test('async iteration yields each event of a batch; malformed batches are dropped and counted', async (t) => {
  const sub = new Subscriber(broker.eventsOut, { topics: ['iter.'] })
  const pub = new Publisher(broker.eventsIn, { source: 'it' })
  const raw = new zmq.Publisher()
  raw.connect(broker.eventsIn)
  t.after(() => { sub.close(); pub.close(); raw.close() })
  await joined(pub, sub, 'iter.probe')
  // the plain PUB socket is a slow joiner of its own
  await joined({ publish: (topic, payload) => publishRaw(raw, topic, { type: topic, source: 'raw', payload, timestamp: 1 }) }, sub, 'iter.probe')
  const droppedBefore = sub.dropped

  // Order holds per publisher only, so the raw socket's messages are read first.
  const base = { type: 'iter.x', source: 'raw', timestamp: 1700000000.5 }
  await publishRaw(raw, 'iter.x', { ...base, payload: 1, payloads: [1, 2] }) // both keys
  await publishRaw(raw, 'iter.x', { ...base, payloads: [] }) // empty batch
  await publishRaw(raw, 'iter.x', { ...base, payloads: 'no' }) // not an array
  await raw.send([Buffer.from('iter.x')]) // one frame
  await publishRaw(raw, 'iter.x', { ...base, payloads: ['r1', 'r2'] }) // a good batch from a plain PUB socket
  await publishRaw(raw, 'iter.end', { type: 'iter.end', source: 'raw', timestamp: 1 })
  const got = []
  for await (const event of sub) {
    if (event.type === 'iter.end') break
    got.push([event.type, event.source, event.payload])
  }
  assert.deepEqual(got, [['iter.x', 'raw', 'r1'], ['iter.x', 'raw', 'r2']])
  assert.equal(sub.dropped - droppedBefore, 4)

  await pub.publishMany('iter.y', [10, 20, 30])
  await pub.publish('iter.end', null)
  got.length = 0
  for await (const event of sub) { // leaving the loop with break left the subscriber open
    if (event.type === 'iter.end') break
    got.push([event.type, event.source, event.payload])
  }
  assert.deepEqual(got, [['iter.y', 'it', 10], ['iter.y', 'it', 20], ['iter.y', 'it', 30]])
  assert.equal(sub.dropped - droppedBefore, 4)
})

test('publishMany() checks its arguments like publish()', async (t) => {
  const pub = new Publisher(broker.eventsIn)
  t.after(() => pub.close())
  await assert.rejects(pub.publishMany('ok', []), RangeError)
  await assert.rejects(pub.publishMany('ok', 'abc'), TypeError)
  await assert.rejects(pub.publishMany('ok'), TypeError)
  await assert.rejects(pub.publishMany('', ['x']), RangeError)
  await assert.rejects(pub.publishMany('x'.repeat(256), ['x']), RangeError)
  await assert.rejects(pub.publishMany(5, ['x']), TypeError)
  await assert.rejects(pub.publishMany('ok', ['x'], { correlationId: 5 }), TypeError)
  await assert.rejects(pub.publishMany('ok', ['x'], { source: 5 }), TypeError)
  await assert.rejects(pub.publishMany('ok', [() => {}]), TypeError)
  assert.equal(pub.published, 0)
  const [one] = await pub.publishMany('ok', [undefined], { source: 'other' })
  assert.deepEqual(Object.keys(one).sort(), ['payload', 'source', 'timestamp', 'type'])
  assert.equal(one.payload, null)
  assert.equal(one.source, 'other')
  assert.equal(pub.published, 1)
  pub.close()
  await assert.rejects(pub.publishMany('ok', ['x']), ClosedError)
})

test('a script that publishes without keys and never closes its Publisher still exits', async () => {
  const { spawnSync } = await import('node:child_process')
  const script = `
    import { Publisher } from ${JSON.stringify(new URL('../index.js', import.meta.url).href)}
    const pub = new Publisher('tcp://127.0.0.1:1', { source: 'script' })
    await pub.publish('fs.change', 'x')
  `
  const done = spawnSync(process.execPath, ['--input-type=module', '-e', script], { timeout: 10_000 })
  assert.equal(done.error, undefined, 'the script did not exit by itself')
  assert.equal(done.status, 0, done.stderr.toString())
})
