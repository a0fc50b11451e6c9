// The Worker's side of ZBW01, message by message, against a scripted broker.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { NonRetryableError, RetryLater, Worker } from '../index.js'
import { CMD, FakeBroker } from '../testlib/fake-broker.js'
import { sleep, waitUntil } from '../testlib/broker.js'
import { deferred } from '../testlib/helpers.js'

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

test('READY declares service, credit, tags and batch; TASK is acknowledged before PROGRESS and DONE', async (t) => {
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
  assert.deepEqual(ready.meta, { service: 'svc', credit: 3, tags: ['gpu', 'de-DE'], batch: true })
  assert.ok(ready.metaFrame.includes(Buffer.from([0xa5, ...Buffer.from('batch'), 0xc3])), 'batch is msgpack true')
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
  const done = await broker.results(3)
  assert.deepEqual(done.map((r) => r.id).sort(), ['a', 'b', 'c'])
  assert.deepEqual(done.map((r) => r.frames[0]).sort(), ['a', 'b', 'c'])
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
  assert.equal(broker.seen(CMD.DONE).length + broker.seen(CMD.DONES).length, 0, 'no DONE for the cancelled attempt')
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
  assert.deepEqual(again.meta, { service: 'svc', credit: 1, batch: true })
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
  assert.equal(broker.seen(CMD.DONE).length + broker.seen(CMD.DONES).length, 0)
  assert.equal(worker.stats.staleResultsDropped, 1)
})

test('a malformed broker message is dropped and counted', async (t) => {
  const { broker, identity, worker } = await setup(t, { handler: () => 'ok' })
  await broker.router.send([identity, '', 'ZBW01', Buffer.from([CMD.TASK]), Buffer.from([0xc1])])
  await broker.send(identity, CMD.TASK, { id: 'fine', attempt: 1, service: 'svc' })
  assert.equal((await broker.command(CMD.DONE)).meta.id, 'fine')
  assert.equal(worker.stats.malformed, 1)
})

test('TASKS is decoded into its tasks, all acknowledged in one ACK before any result', async (t) => {
  const seen = []
  const { broker, identity, worker } = await setup(t, {
    concurrency: 3,
    handler: async (task) => {
      seen.push(task)
      return task.frames
    }
  })
  await broker.sendTasks(identity, [
    { id: 'a', attempt: 1, service: 'svc', frames: ['a1', 'a2'] },
    { id: 'b', attempt: 2, service: 'other', headers: { lang: 'de' }, timeout_s: 1.5, frames: [] },
    { id: 'c', attempt: 1, service: 'svc', frames: ['c1'] }
  ])
  const ack = await broker.command(CMD.ACK)
  assert.deepEqual(ack.meta, { tasks: [['a', 1], ['b', 2], ['c', 1]] })
  const results = await broker.results(3)
  assert.ok(results.every((r) => ack.seq < r.seq), 'the ACK goes first')
  assert.deepEqual(results.map(({ id, attempt, frames }) => [id, attempt, frames]), [['a', 1, ['a1', 'a2']], ['b', 2, []], ['c', 1, ['c1']]])
  assert.equal(broker.seen(CMD.ACK).length, 0, 'one ACK for the whole TASKS')

  assert.deepEqual(seen.map((task) => task.id), ['a', 'b', 'c'])
  const [a, b, c] = seen
  assert.deepEqual(a.frames.map(String), ['a1', 'a2'])
  assert.equal(a.payload.toString(), 'a1')
  assert.deepEqual(a.headers, {})
  assert.equal(a.timeoutS, null)
  assert.equal(b.attempt, 2)
  assert.equal(b.service, 'other')
  assert.deepEqual(b.frames, [])
  assert.equal(b.payload.length, 0)
  assert.deepEqual(b.headers, { lang: 'de' })
  assert.equal(b.timeoutS, 1.5)
  assert.deepEqual(c.frames.map(String), ['c1'])
  assert.equal(worker.stats.received, 3)
  assert.equal(worker.stats.acked, 3)
  assert.equal(worker.stats.handled, 3)
})

test('results finished in the same turn leave as one DONES; a single one as a plain DONE', async (t) => {
  const gate = deferred()
  const { broker, identity, worker } = await setup(t, {
    concurrency: 3,
    handler: async (task) => {
      if (task.id === 'solo') return 'alone'
      await gate.promise
      return { none: null, one: 'x', two: ['y', 'z'] }[task.id]
    }
  })
  await broker.sendTasks(identity, ['none', 'one', 'two'].map((id) => ({ id, attempt: 1, service: 'svc', frames: [id] })))
  await waitUntil(() => worker.running === 3, { what: 'three handlers running' })
  gate.resolve()
  const dones = await broker.command(CMD.DONES)
  assert.deepEqual(dones.meta, { tasks: [['none', 1, 0], ['one', 1, 1], ['two', 1, 2]] })
  assert.deepEqual(dones.frames, ['x', 'y', 'z'])
  assert.equal(worker.stats.handled, 3)

  await broker.send(identity, CMD.TASK, { id: 'solo', attempt: 4, service: 'svc' })
  const done = await broker.command(CMD.DONE)
  assert.deepEqual(done.meta, { id: 'solo', attempt: 4 })
  assert.deepEqual(done.frames, ['alone'])
  assert.equal(broker.seen(CMD.DONES).length, 0)
  assert.equal(worker.stats.handled, 4)
})

test('a DONES carries at most 1024 results; more go in the next one', async (t) => {
  const count = 1030
  const { broker, identity, worker } = await setup(t, { concurrency: count, handler: (task) => task.id })
  const tasks = Array.from({ length: count }, (_, i) => ({ id: `t${i}`, attempt: 1, service: 'svc', frames: [] }))
  await broker.sendTasks(identity, tasks)
  const ack = await broker.command(CMD.ACK)
  assert.equal(ack.meta.tasks.length, count)
  const first = await broker.command(CMD.DONES)
  const second = await broker.next((m) => m.command === CMD.DONES || m.command === CMD.DONE)
  assert.equal(first.meta.tasks.length, 1024)
  assert.equal(second.meta.tasks.length, count - 1024)
  const ids = [...first.meta.tasks, ...second.meta.tasks].map(([id]) => id)
  assert.deepEqual(ids, tasks.map((task) => task.id))
  assert.deepEqual([...first.frames, ...second.frames], ids)
  assert.ok(ack.seq < first.seq && first.seq < second.seq)
  assert.equal(worker.stats.handled, count)
})

test('FAIL and PROGRESS never overtake the ACK or the DONEs finished before them', async (t) => {
  const gate = deferred()
  const ticks = async (n) => { for (let i = 0; i < n; i++) await null }
  const { broker, identity } = await setup(t, {
    concurrency: 4,
    handler: async (task) => {
      await gate.promise
      if (task.id === 'bad') {
        await ticks(5) // after ok1 and ok2 are reported, in the same turn
        throw new Error('boom')
      }
      if (task.id === 'prog') {
        await ticks(15) // after the FAIL, still in the same turn
        task.progress('half')
        return 'prog done'
      }
      return task.id
    }
  })
  await broker.sendTasks(identity, ['ok1', 'ok2', 'bad', 'prog'].map((id) => ({ id, attempt: 1, service: 'svc', frames: [] })))
  const ack = await broker.command(CMD.ACK)
  gate.resolve()
  const dones = await broker.command(CMD.DONES)
  const fail = await broker.command(CMD.FAIL)
  const progress = await broker.command(CMD.PROGRESS)
  const last = await broker.command(CMD.DONE)
  assert.deepEqual(ack.meta.tasks.map(([id]) => id), ['ok1', 'ok2', 'bad', 'prog'])
  assert.deepEqual(dones.meta, { tasks: [['ok1', 1, 1], ['ok2', 1, 1]] })
  assert.deepEqual(fail.meta, { id: 'bad', attempt: 1, reason: 'Error: boom', retry: true })
  assert.deepEqual(progress.meta, { id: 'prog', attempt: 1 })
  assert.deepEqual(last.meta, { id: 'prog', attempt: 1 })
  assert.ok(ack.seq < dones.seq, 'ACK before the results')
  assert.ok(dones.seq < fail.seq, 'the DONEs finished before the FAIL go out before it')
  assert.ok(fail.seq < progress.seq && progress.seq < last.seq)
})

test('a malformed TASKS is dropped and counted, none of its tasks run', async (t) => {
  const calls = []
  const { broker, identity, worker } = await setup(t, { handler: (task) => { calls.push(task.id); return 'ok' } })
  const entry = (id, n) => ({ id, attempt: 1, service: 'svc', n })
  const bad = [
    [{ tasks: [entry('x1', 2)] }, 'p'], // fewer frames than announced
    [{ tasks: [entry('x2', 1)] }, 'p', 'extra'], // more frames than announced
    [{ tasks: [entry('x3', 0), entry('x4', -1)] }], // negative count
    [{ tasks: [{ id: 'x5', attempt: 1, service: 'svc' }] }], // no count
    [{ tasks: [entry('x6', 0), ['x7', 1, 0]] }], // an entry that is not a map
    [{ tasks: [{ ...entry('x8', 0), attempt: 'one' }] }], // bad attempt
    [{ tasks: [{ ...entry('x9', 0), headers: [] }] }], // bad headers
    [{ tasks: [] }], // empty
    [{ nothing: true }] // no list
  ]
  for (const [meta, ...frames] of bad) await broker.send(identity, CMD.TASKS, meta, ...frames)
  await broker.router.send([identity, '', 'ZBW01', Buffer.from([CMD.TASKS])]) // no meta at all
  await broker.sendTasks(identity, [{ id: 'fine', attempt: 1, service: 'svc', frames: ['p'] }])
  const [result] = await broker.results(1)
  assert.equal(result.id, 'fine')
  assert.equal(worker.stats.malformed, bad.length + 1)
  assert.deepEqual(calls, ['fine'])
  assert.deepEqual((await broker.command(CMD.ACK)).meta, { tasks: [['fine', 1]] })
  assert.equal(broker.seen(CMD.ACK).length, 0)
})

test('setTags(): TAGS on the current connection, in order; a reconnect\'s READY carries the tags of the moment', async (t) => {
  // A reconnect waits 300 ms: time enough to change the tags between two connections
  const { broker, identity, worker } = await setup(t, { handler: (task) => task.payload, tags: ['cpu'], reconnectDelayMs: 300, maxReconnectDelayMs: 300 })
  assert.deepEqual(worker.tags, ['cpu'])
  const given = ['gpu', 'model:llama3']
  worker.setTags(given)
  given.push('changed later') // the worker keeps its own copy
  const tags = await broker.command(CMD.TAGS)
  assert.equal(tags.header, 'ZBW01')
  assert.deepEqual(tags.meta, { tags: ['gpu', 'model:llama3'] })
  assert.deepEqual(tags.frames, [])
  assert.deepEqual(worker.tags, ['gpu', 'model:llama3'])
  // In order with the rest: behind the ACK and DONE of a task read before it
  await broker.send(identity, CMD.TASK, { id: 't1', attempt: 1, service: 'svc' }, 'p')
  await broker.command(CMD.ACK)
  const done = await broker.command(CMD.DONE)
  worker.setTags([])
  const cleared = await broker.command(CMD.TAGS)
  assert.deepEqual(cleared.meta, { tags: [] })
  assert.ok(cleared.seq > done.seq)
  worker.setTags(['gpu'])
  await broker.command(CMD.TAGS)
  assert.equal(worker.stats.tagsSent, 3)
  // Bad tags are refused and change nothing
  assert.throws(() => worker.setTags('gpu'), TypeError)
  assert.throws(() => worker.setTags(['gpu', 7]), /tags\[1\]/)
  assert.throws(() => worker.setTags(new Array(33).fill('t')), RangeError)
  assert.deepEqual(worker.tags, ['gpu'])

  // A restarted broker does not know the worker: the new READY carries the current tags
  await broker.send(identity, CMD.DISCONNECT, { reason: 'unknown worker' })
  const again = await broker.command(CMD.READY)
  assert.deepEqual(again.meta, { service: 'svc', credit: 1, tags: ['gpu'], batch: true })
  assert.notDeepEqual(again.identity, identity)
  await broker.send(again.identity, CMD.HEARTBEAT)
  await waitUntil(() => worker.connected, { what: 'greeted again' })
  // Between two connections setTags sends nothing: the next READY says it
  await broker.send(again.identity, CMD.DISCONNECT, { reason: 'unknown worker' })
  await waitUntil(() => !worker.connected, { what: 'connection dropped' })
  worker.setTags(['gpu', 'de-DE'])
  const third = await broker.command(CMD.READY)
  assert.deepEqual(third.meta.tags, ['gpu', 'de-DE'])
  assert.equal(broker.seen(CMD.TAGS).length, 0, 'no TAGS besides those asked for')
  assert.equal(worker.stats.tagsSent, 3)
})

test('setTags() before start(): the first READY carries them; once stopping, nothing is sent', async (t) => {
  const broker = await new FakeBroker().bind()
  const worker = new Worker({ endpoint: broker.endpoint, service: 'svc', handler: () => 'x', heartbeatIntervalMs: INTERVAL_MS, logger: null })
  t.after(async () => {
    await worker.stop({ timeoutMs: 200 })
    broker.close()
  })
  worker.setTags(['gpu'])
  const started = worker.start()
  const ready = await broker.command(CMD.READY)
  assert.deepEqual(ready.meta, { service: 'svc', credit: 1, tags: ['gpu'], batch: true })
  await broker.send(ready.identity, CMD.HEARTBEAT)
  await started
  await worker.stop({ timeoutMs: 200 })
  worker.setTags(['cpu'])
  assert.deepEqual(worker.tags, ['cpu'])
  await sleep(50)
  assert.equal(broker.seen(CMD.TAGS).length, 0)
  assert.equal(worker.stats.tagsSent, 0)
})

test('constructor arguments are checked', () => {
  const handler = () => 'x'
  assert.throws(() => new Worker({ handler }), /service name/)
  assert.throws(() => new Worker({ service: 'mmi.x', handler }), /mmi\./)
  assert.throws(() => new Worker({ service: 's' }), /handler/)
  assert.throws(() => new Worker({ service: 's', handler, concurrency: 0 }), /concurrency/)
  assert.throws(() => new Worker({ service: 's', handler, tags: 'gpu' }), /tags/)
  assert.throws(() => new Worker({ service: 's', handler, tags: new Array(33).fill('t') }), /at most 32 tags/)
  assert.throws(() => new Worker({ service: 's', handler, endpoint: 'localhost:5555' }), /endpoint/)
})
