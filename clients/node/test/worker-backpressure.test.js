// The Worker under back-pressure (its send queue to the broker at the
// high-water mark) and against the broker's message caps, message by message
// against a scripted broker: no DONE, FAIL or ACK is ever dropped, PROGRESS is
// dropped only when counted as such, and no message goes out larger than the
// broker accepts.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Worker } from '../index.js'
import { CMD, FakeBroker } from '../testlib/fake-broker.js'
import { waitUntil } from '../testlib/broker.js'
import { deferred } from '../testlib/helpers.js'

const INTERVAL_MS = 100

// A fake broker and a worker on it, greeted; both closed when the test ends.
// The fake broker never heartbeats: a long liveness keeps the worker on its
// first connection however slow the machine (a reconnect would drop results).
async function setup (t, options) {
  const broker = await new FakeBroker().bind()
  const worker = new Worker({ endpoint: broker.endpoint, service: 'svc', heartbeatIntervalMs: INTERVAL_MS, liveness: 600, logger: null, ...options })
  t.after(() => assert.equal(worker.stats.reconnects, 0, 'one connection throughout'))
  t.after(async () => {
    await worker.stop({ timeoutMs: 200 })
    broker.close()
  })
  const started = worker.start()
  const ready = await broker.command(CMD.READY)
  await broker.send(ready.identity, CMD.HEARTBEAT)
  await started
  return { broker, worker, identity: ready.identity }
}

const ids = (n, prefix = 't') => Array.from({ length: n }, (_, i) => `${prefix}${i}`)

// Every outcome the fake broker received, in order: [{id, kind: 'done'|'fail', seq}].
async function outcomes (broker, count) {
  const out = []
  while (out.length < count) {
    const m = await broker.next((x) => x.command === CMD.DONE || x.command === CMD.DONES || x.command === CMD.FAIL)
    if (m.command === CMD.DONES) for (const [id] of m.meta.tasks) out.push({ id, kind: 'done', seq: m.seq })
    else out.push({ id: m.meta.id, kind: m.command === CMD.FAIL ? 'fail' : 'done', seq: m.seq, meta: m.meta })
  }
  return out
}

test('a burst of FAILs and DONEs past the send high-water mark: every one reaches the broker, after the ACK', async (t) => {
  const count = 400
  const gate = deferred()
  const { broker, identity, worker } = await setup(t, {
    concurrency: count,
    hwm: 1,
    handler: async (task) => {
      await gate.promise
      if (Number(task.id.slice(1)) % 2 === 1) throw new Error(`odd ${task.id}`)
      return task.id
    }
  })
  const all = ids(count)
  await broker.sendTasks(identity, all.map((id) => ({ id, attempt: 1, service: 'svc', frames: [] })))
  const ack = await broker.command(CMD.ACK)
  assert.equal(ack.meta.tasks.length, count)
  await waitUntil(() => worker.running === count, { what: 'every handler running' })
  gate.resolve() // every handler ends in the same turn: ~count messages (each FAIL flushes the DONEs before it)
  const got = await outcomes(broker, count)
  assert.deepEqual(got.map((o) => o.id).sort(), [...all].sort())
  assert.deepEqual(got.map((o) => o.id), all, 'in the order the handlers ended')
  for (const o of got) assert.equal(o.kind, Number(o.id.slice(1)) % 2 === 1 ? 'fail' : 'done')
  assert.ok(got.every((o) => o.seq > ack.seq))
  assert.equal(worker.stats.handled, count / 2)
  assert.equal(worker.stats.failed, count / 2)
  assert.equal(worker.stats.staleResultsDropped, 0)
})

test('PROGRESS under back-pressure is dropped and counted as dropped, never as sent; the DONE still goes', async (t) => {
  const count = 50
  const perTask = 40
  const gate = deferred()
  const returned = []
  const { broker, identity, worker } = await setup(t, {
    concurrency: count,
    hwm: 1,
    handler: async (task) => {
      await gate.promise
      for (let i = 0; i < perTask; i++) returned.push(task.progress(`${task.id}:${i}`))
      throw new Error('and then it failed') // a FAIL per task: it must arrive whatever happened to the PROGRESS
    }
  })
  await broker.sendTasks(identity, ids(count).map((id) => ({ id, attempt: 1, service: 'svc', frames: [] })))
  await waitUntil(() => worker.running === count, { what: 'every handler running' })
  gate.resolve()
  await outcomes(broker, count)
  await waitUntil(() => worker.stats.failed === count, { what: 'every FAIL sent' })
  const sent = returned.filter(Boolean).length
  assert.equal(worker.stats.progressSent + worker.stats.progressDropped, count * perTask)
  assert.equal(worker.stats.progressSent, sent, 'progress() returned true exactly for the PROGRESS counted as sent')
  assert.ok(worker.stats.progressDropped > 0, 'the burst met back-pressure (else this test proves nothing)')
  await waitUntil(() => broker.seen(CMD.PROGRESS).length === sent, { what: `${sent} PROGRESS at the broker` })
  await new Promise((resolve) => setTimeout(resolve, 50))
  assert.equal(broker.seen(CMD.PROGRESS).length, worker.stats.progressSent, 'exactly the PROGRESS counted as sent arrived')
})

test('stop() under back-pressure: every collected result goes out, then DISCONNECT', async (t) => {
  const count = 300
  const gate = deferred()
  const { broker, identity, worker } = await setup(t, {
    concurrency: count,
    hwm: 1,
    handler: async (task) => {
      await gate.promise
      if (Number(task.id.slice(1)) % 2 === 1) throw new Error('odd')
      return 'even'
    }
  })
  await broker.sendTasks(identity, ids(count).map((id) => ({ id, attempt: 1, service: 'svc', frames: [] })))
  await waitUntil(() => worker.running === count, { what: 'every handler running' })
  const stopped = worker.stop({ timeoutMs: 5000 })
  gate.resolve()
  assert.equal(await stopped, true)
  const got = await outcomes(broker, count)
  const bye = await broker.command(CMD.DISCONNECT)
  assert.ok(got.every((o) => o.seq < bye.seq), 'every result before DISCONNECT')
  assert.equal(worker.stats.handled + worker.stats.failed, count)
})

test('DONES are split under the byte cap (maxMessageBytes), in order', async (t) => {
  const count = 40
  const size = 10_000
  const maxMessageBytes = 64 * 1024
  const gate = deferred()
  const { broker, identity, worker } = await setup(t, {
    concurrency: count,
    maxMessageBytes,
    handler: async (task) => {
      await gate.promise
      return Buffer.alloc(size, task.id)
    }
  })
  const all = ids(count)
  await broker.sendTasks(identity, all.map((id) => ({ id, attempt: 1, service: 'svc', frames: [] })))
  await waitUntil(() => worker.running === count, { what: 'every handler running' })
  gate.resolve()
  const got = []
  const messages = []
  while (got.length < count) {
    const m = await broker.next((x) => x.command === CMD.DONE || x.command === CMD.DONES)
    // every byte the broker counts: routing id, "", "ZBW01", command, metadata, results
    messages.push(m.identity.length + 0 + 5 + 1 + m.metaFrame.length + m.frames.reduce((n, f) => n + Buffer.byteLength(f), 0))
    if (m.command === CMD.DONE) got.push(m.meta.id)
    else got.push(...m.meta.tasks.map(([id]) => id))
  }
  assert.deepEqual(got, all)
  assert.ok(messages.every((bytes) => bytes <= maxMessageBytes), `message sizes ${messages} within ${maxMessageBytes}`)
  assert.ok(messages.length >= Math.ceil((count * size) / maxMessageBytes), `split into ${messages.length} messages`)
  assert.ok(Math.max(...messages) > 5 * size, 'still batched')
  assert.equal(worker.stats.handled, count)
})

test('DONES are split under the frame cap (maxFrames)', async (t) => {
  const count = 30
  const gate = deferred()
  const { broker, identity, worker } = await setup(t, {
    concurrency: count,
    maxFrames: 105, // 100 result frames per message, besides routing id, header frames and metadata
    handler: async (task) => {
      await gate.promise
      return Array.from({ length: 10 }, (_, i) => `${task.id}.${i}`)
    }
  })
  const all = ids(count)
  await broker.sendTasks(identity, all.map((id) => ({ id, attempt: 1, service: 'svc', frames: [] })))
  await waitUntil(() => worker.running === count, { what: 'every handler running' })
  gate.resolve()
  const results = await broker.results(count)
  assert.deepEqual(results.map((r) => r.id), all)
  assert.deepEqual(results[7].frames, Array.from({ length: 10 }, (_, i) => `t7.${i}`))
  assert.ok(results.every((r) => r.batch <= 10), 'at most 10 results of 10 frames in a message')
  assert.equal(new Set(results.map((r) => r.seq)).size, 3)
  assert.equal(worker.stats.handled, count)
})

test('a result over the caps is not sent: the attempt fails for good with a reason naming its size and the cap', async (t) => {
  const maxMessageBytes = 64 * 1024
  const { broker, identity, worker } = await setup(t, {
    concurrency: 3,
    maxMessageBytes,
    maxFrames: 50,
    handler: (task) => {
      if (task.id === 'big') return Buffer.alloc(maxMessageBytes)
      if (task.id === 'many') return Array.from({ length: 60 }, () => 'f')
      return 'small'
    }
  })
  await broker.sendTasks(identity, ['big', 'many', 'ok'].map((id) => ({ id, attempt: 1, service: 'svc', frames: [] })))
  const got = await outcomes(broker, 3)
  const byId = Object.fromEntries(got.map((o) => [o.id, o]))
  assert.equal(byId.ok.kind, 'done')
  assert.equal(byId.big.kind, 'fail')
  assert.equal(byId.big.meta.retry, false)
  assert.match(byId.big.meta.reason, new RegExp(`result too large: ${maxMessageBytes} bytes in 1 frame`))
  assert.match(byId.big.meta.reason, new RegExp(`maxMessageBytes ${maxMessageBytes}`))
  assert.equal(byId.many.kind, 'fail')
  assert.equal(byId.many.meta.retry, false)
  assert.match(byId.many.meta.reason, /result too large: 60 bytes in 60 frames/)
  assert.match(byId.many.meta.reason, /maxFrames 50/)
  assert.equal(worker.stats.tooLarge, 2)
  assert.equal(worker.stats.failed, 2)
  assert.equal(worker.stats.handled, 1)
})

test('a PROGRESS over the caps is dropped and counted, never sent', async (t) => {
  // What progress() returned, recorded in the handler and checked once the DONE is in
  // (an assertion failing inside the handler would turn into a FAIL, then a timeout).
  const returned = []
  const { broker, identity, worker } = await setup(t, {
    maxMessageBytes: 64 * 1024,
    handler: (task) => {
      returned.push(task.progress(Buffer.alloc(64 * 1024)))
      returned.push(task.progress('fits'))
      return 'ok'
    }
  })
  await broker.send(identity, CMD.TASK, { id: 't', attempt: 1, service: 'svc' })
  await broker.command(CMD.DONE)
  assert.deepEqual(returned, [false, true])
  assert.deepEqual(broker.seen(CMD.PROGRESS).map((m) => m.frames), [['fits']])
  assert.equal(worker.stats.progressSent, 1)
  assert.equal(worker.stats.progressDropped, 1)
})

test('an ACK whose metadata would pass the byte cap is split; every task is acknowledged once', async (t) => {
  const count = 300
  const maxMessageBytes = 4096
  const gate = deferred()
  const { broker, identity, worker } = await setup(t, {
    concurrency: count,
    maxMessageBytes,
    handler: async () => { await gate.promise }
  })
  const all = ids(count, 'a-rather-long-task-id-')
  await broker.sendTasks(identity, all.map((id) => ({ id, attempt: 1, service: 'svc', frames: [] })))
  const acked = []
  while (acked.length < count) {
    const ack = await broker.command(CMD.ACK)
    assert.ok(ack.identity.length + 5 + 1 + ack.metaFrame.length <= maxMessageBytes, `ACK of ${ack.metaFrame.length} bytes`)
    acked.push(...ack.meta.tasks.map(([id]) => id))
  }
  assert.deepEqual(acked, all)
  assert.equal(worker.stats.acked, count)
  gate.resolve()
  await broker.results(count)
})

test('maxMessageBytes and maxFrames are checked', () => {
  const handler = () => 'x'
  assert.throws(() => new Worker({ service: 's', handler, maxMessageBytes: 100 }), /maxMessageBytes/)
  assert.throws(() => new Worker({ service: 's', handler, maxMessageBytes: '16MiB' }), /maxMessageBytes/)
  assert.throws(() => new Worker({ service: 's', handler, maxMessageBytes: 4095 }), /maxMessageBytes/)
  assert.throws(() => new Worker({ service: 's', handler, maxFrames: 5 }), /maxFrames/)
})
