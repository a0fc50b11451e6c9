// The Worker's side of ZBW01, message by message, against a scripted broker.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { NonRetryableError, RetryLater, Worker } from '../index.js'
import { CMD, FakeBroker } from '../testlib/fake-broker.js'
import { waitUntil } from '../testlib/broker.js'

const INTERVAL_MS = 100

// A fake broker and a worker on it, greeted; both closed when the test ends.
async function setup (t, options) {
  const broker = await new FakeBroker().bind()
  const worker = new Worker({ endpoint: broker.endpoint, service: 'svc', heartbeatIntervalMs: INTERVAL_MS, logger: null, ...options })
  t.after(async () => {
    await worker.stop({ timeoutMs: 200 })
    broker.close()
  })
  const started = worker.start()
  const ready = await broker.command(CMD.READY)
  await broker.send(ready.identity, CMD.HEARTBEAT)
  await started
  return { broker, worker, ready, identity: ready.identity }
}

function deferred () {
  let resolve
  const promise = new Promise((r) => { resolve = r })
  return { promise, resolve }
}

test('READY declares service, credit and tags; TASK is acknowledged before PROGRESS and DONE', async (t) => {
  const seen = []
  const { broker, worker, ready, identity } = await setup(t, {
    concurrency: 3,
    tags: ['gpu', 'de-DE'],
    handler: async (task) => {
      seen.push(task)
      task.progress('half')
      return ['a', Buffer.from('b')]
    }
  })
  assert.equal(ready.header, 'ZBW01')
  assert.equal(ready.empty, true)
  assert.deepEqual(ready.meta, { service: 'svc', credit: 3, tags: ['gpu', 'de-DE'] })
  assert.equal(worker.connected, true)

  await broker.send(identity, CMD.TASK, { id: 't1', attempt: 1, service: 'svc', headers: { lang: 'de' }, timeout_s: 2.5 }, 'p1', 'p2')
  const ack = await broker.command(CMD.ACK)
  const progress = await broker.command(CMD.PROGRESS)
  const done = await broker.command(CMD.DONE)
  assert.deepEqual(ack.meta, { tasks: [['t1', 1]] })
  assert.deepEqual(progress.meta, { id: 't1', attempt: 1 })
  assert.deepEqual(progress.frames, ['half'])
  assert.deepEqual(done.meta, { id: 't1', attempt: 1 })
  assert.deepEqual(done.frames, ['a', 'b'])
  assert.ok(ack.seq < progress.seq && progress.seq < done.seq, 'ACK, then PROGRESS, then DONE')

  const task = seen[0]
  assert.equal(task.id, 't1')
  assert.equal(task.attempt, 1)
  assert.equal(task.service, 'svc')
  assert.equal(task.payload.toString(), 'p1')
  assert.deepEqual(task.frames.map(String), ['p1', 'p2'])
  assert.deepEqual(task.headers, { lang: 'de' })
  assert.equal(task.timeoutS, 2.5)
  assert.equal(task.signal.aborted, false)
  assert.equal(worker.stats.handled, 1)
  assert.equal(worker.stats.acked, 1)
})

test('several TASKs are all acknowledged and run at once, up to the credit', async (t) => {
  const gate = deferred()
  let running = 0
  let most = 0
  const { broker, identity, worker } = await setup(t, {
    concurrency: 3,
    handler: async (task) => {
      most = Math.max(most, ++running)
      await gate.promise
      running--
      return task.payload
    }
  })
  for (const id of ['a', 'b', 'c']) await broker.send(identity, CMD.TASK, { id, attempt: 1, service: 'svc' }, id)
  const acked = []
  while (acked.length < 3) acked.push(...(await broker.command(CMD.ACK)).meta.tasks)
  assert.deepEqual(acked.map(([id]) => id).sort(), ['a', 'b', 'c'])
  await waitUntil(() => worker.running === 3, { what: 'three handlers running' })
  gate.resolve()
  const done = []
  while (done.length < 3) done.push((await broker.command(CMD.DONE)).meta.id)
  assert.deepEqual(done.sort(), ['a', 'b', 'c'])
  assert.equal(most, 3)
})

test('failures: FAIL with retry, NonRetryableError, RetryLater delay, and a result that is not frames', async (t) => {
  const { broker, identity } = await setup(t, {
    concurrency: 4,
    handler: async (task) => {
      switch (task.payload.toString()) {
        case 'boom': throw new Error('boom')
        case 'never': throw new NonRetryableError('bad input')
        case 'later': throw new RetryLater(1.5, 'gpu busy')
        default: return 42
      }
    }
  })
  for (const id of ['boom', 'never', 'later', 'weird']) await broker.send(identity, CMD.TASK, { id, attempt: 1, service: 'svc' }, id)
  const fails = {}
  while (Object.keys(fails).length < 4) {
    const fail = await broker.command(CMD.FAIL)
    fails[fail.meta.id] = fail.meta
  }
  assert.deepEqual(fails.boom, { id: 'boom', attempt: 1, reason: 'Error: boom', retry: true })
  assert.deepEqual(fails.never, { id: 'never', attempt: 1, reason: 'NonRetryableError: bad input', retry: false })
  assert.deepEqual(fails.later, { id: 'later', attempt: 1, reason: 'RetryLater: gpu busy', retry: true, delay_s: 1.5 })
  assert.equal(fails.weird.retry, false)
  assert.match(fails.weird.reason, /handler result must be a Buffer, Uint8Array or string, got number/)
})

test('CANCEL aborts the handler signal and the result of that attempt is never sent', async (t) => {
  const started = deferred()
  const { broker, identity, worker } = await setup(t, {
    concurrency: 2,
    handler: async (task) => {
      if (task.id === 'long') {
        started.resolve()
        await new Promise((resolve) => task.signal.addEventListener('abort', resolve, { once: true }))
        assert.equal(task.signal.reason.name, 'AbortError')
        return 'too late'
      }
      return 'quick'
    }
  })
  await broker.send(identity, CMD.TASK, { id: 'long', attempt: 1, service: 'svc' })
  await started.promise
  await broker.send(identity, CMD.CANCEL, { id: 'long', attempt: 1 })
  await waitUntil(() => worker.stats.staleResultsDropped === 1, { what: 'result of the cancelled attempt dropped' })
  await broker.send(identity, CMD.TASK, { id: 'next', attempt: 1, service: 'svc' })
  const done = await broker.command(CMD.DONE)
  assert.equal(done.meta.id, 'next')
  assert.equal(broker.seen(CMD.DONE).length, 0, 'no DONE for the cancelled attempt')
  assert.equal(worker.stats.cancelled, 1)
})

test('a CANCEL for another attempt is ignored, and a redelivery supersedes the earlier attempt', async (t) => {
  const signals = {}
  const { broker, identity } = await setup(t, {
    concurrency: 2,
    handler: async (task) => {
      signals[task.attempt] = task.signal
      if (task.attempt === 1) await new Promise((resolve) => task.signal.addEventListener('abort', resolve, { once: true }))
      return `attempt ${task.attempt}`
    }
  })
  await broker.send(identity, CMD.TASK, { id: 't', attempt: 1, service: 'svc' })
  await waitUntil(() => signals[1] !== undefined, { what: 'attempt 1 running' })
  await broker.send(identity, CMD.CANCEL, { id: 't', attempt: 7 })
  await broker.send(identity, CMD.TASK, { id: 't', attempt: 2, service: 'svc' })
  const done = await broker.command(CMD.DONE)
  assert.deepEqual(done.meta, { id: 't', attempt: 2 })
  assert.deepEqual(done.frames, ['attempt 2'])
  assert.equal(signals[1].aborted, true)
})

test('DISCONNECT from the broker makes the worker re-register on a fresh connection; held tasks are aborted', async (t) => {
  const started = deferred()
  let signal
  const { broker, identity, worker } = await setup(t, {
    handler: async (task) => {
      signal = task.signal
      started.resolve()
      await new Promise((resolve) => task.signal.addEventListener('abort', resolve, { once: true }))
      return 'late'
    }
  })
  await broker.send(identity, CMD.TASK, { id: 't', attempt: 1, service: 'svc' })
  await started.promise
  await broker.send(identity, CMD.DISCONNECT, { reason: 'unknown worker' })
  const again = await broker.command(CMD.READY)
  assert.deepEqual(again.meta, { service: 'svc', credit: 1 })
  assert.notDeepEqual(again.identity, identity, 'a fresh socket')
  assert.equal(signal.aborted, true)
  assert.equal(worker.stats.reconnects, 1)
  await broker.send(again.identity, CMD.HEARTBEAT)
  await waitUntil(() => worker.connected, { what: 'greeted again' })
})

test('a silent broker is given up after liveness x interval: the worker reconnects and sends READY again', async (t) => {
  const { broker, worker } = await setup(t, { handler: () => 'x', liveness: 2 })
  // The fake broker says nothing more: the worker heartbeats, then gives up.
  const heartbeat = await broker.command(CMD.HEARTBEAT)
  assert.equal(heartbeat.metaFrame, null)
  const again = await broker.command(CMD.READY)
  assert.equal(again.meta.service, 'svc')
  assert.equal(worker.stats.reconnects >= 1, true)
  assert.equal(worker.connected, false)
})

test('every broker HEARTBEAT is answered, with metrics when asked for', async (t) => {
  const { broker, identity } = await setup(t, { handler: () => 'x', metrics: () => ({ load: 0.5, queue: 3 }) })
  await broker.send(identity, CMD.HEARTBEAT)
  const heartbeat = await broker.next((m) => m.command === CMD.HEARTBEAT && m.meta !== null)
  assert.deepEqual(heartbeat.meta, { metrics: { load: 0.5, queue: 3 } })
})

test('stop(): the running handler finishes and its DONE goes out before DISCONNECT; queued tasks never start', async (t) => {
  const gate = deferred()
  const calls = []
  const { broker, identity, worker } = await setup(t, {
    concurrency: 1,
    handler: async (task) => {
      calls.push(task.id)
      await gate.promise
      return 'finished'
    }
  })
  await broker.send(identity, CMD.TASK, { id: 'first', attempt: 1, service: 'svc' })
  await broker.send(identity, CMD.TASK, { id: 'second', attempt: 1, service: 'svc' })
  await waitUntil(() => calls.length === 1 && worker.stats.received === 2, { what: 'first task running, second received' })
  const stopped = worker.stop({ timeoutMs: 5000 })
  assert.equal(worker.stopping, true)
  gate.resolve()
  assert.equal(await stopped, true)
  const done = await broker.command(CMD.DONE)
  const bye = await broker.command(CMD.DISCONNECT)
  assert.equal(done.meta.id, 'first')
  assert.ok(done.seq < bye.seq)
  assert.deepEqual(bye.meta, { reason: 'worker stopping' })
  assert.deepEqual(calls, ['first'])
  assert.equal(worker.stats.notStarted, 1)
})

test('stop() abandons a handler that outlives its timeout: signal aborted, result dropped, resolves false', async (t) => {
  let signal
  const { broker, identity, worker } = await setup(t, {
    handler: async (task) => {
      signal = task.signal
      await new Promise((resolve) => setTimeout(resolve, 300))
      return 'too late'
    }
  })
  await broker.send(identity, CMD.TASK, { id: 'stuck', attempt: 1, service: 'svc' })
  await waitUntil(() => worker.running === 1, { what: 'handler running' })
  assert.equal(await worker.stop({ timeoutMs: 50 }), false)
  assert.equal(signal.aborted, true)
  await broker.command(CMD.DISCONNECT)
  await waitUntil(() => worker.running === 0, { what: 'handler returned' })
  assert.equal(broker.seen(CMD.DONE).length, 0)
  assert.equal(worker.stats.staleResultsDropped, 1)
})

test('a malformed broker message is dropped and counted', async (t) => {
  const { broker, identity, worker } = await setup(t, { handler: () => 'ok' })
  await broker.router.send([identity, '', 'ZBW01', Buffer.from([CMD.TASK]), Buffer.from([0xc1])])
  await broker.send(identity, CMD.TASK, { id: 'fine', attempt: 1, service: 'svc' })
  assert.equal((await broker.command(CMD.DONE)).meta.id, 'fine')
  assert.equal(worker.stats.malformed, 1)
})

test('constructor arguments are checked', () => {
  const handler = () => 'x'
  assert.throws(() => new Worker({ handler }), /service name/)
  assert.throws(() => new Worker({ service: 'mmi.x', handler }), /mmi\./)
  assert.throws(() => new Worker({ service: 's' }), /handler/)
  assert.throws(() => new Worker({ service: 's', handler, concurrency: 0 }), /concurrency/)
  assert.throws(() => new Worker({ service: 's', handler, tags: 'gpu' }), /tags/)
  assert.throws(() => new Worker({ service: 's', handler, endpoint: 'localhost:5555' }), /endpoint/)
})
