// The ZBC01 calls of Client against a real broker: enqueue, enqueueMany,
// request, result, status, cancel, dead letters and redrive, options, errors.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import {
  BrokerError,
  Client,
  NonRetryableError,
  QueueFull,
  TaskCancelled,
  TaskExpired,
  TaskNotFound,
  TimeoutError
} from '../index.js'
import { startBroker, waitUntil } from '../testlib/broker.js'
import { workerStarter } from '../testlib/helpers.js'

let broker
let client
const workers = []

const startWorker = workerStarter(() => broker.endpoint, workers)

before(async () => {
  broker = await startBroker({ args: ['--durability', 'memory', '--retry-base', '0.05', '--retry-max', '0.1', '--max-tasks', '50'] })
  client = new Client(broker.endpoint, { timeoutMs: 10_000 })
  await startWorker('echo', (task) => task.frames.length === 1 ? Buffer.concat([Buffer.from('echo:'), task.payload]) : task.frames)
})

after(async () => {
  client?.close()
  await Promise.all(workers.map((w) => w.stop({ timeoutMs: 1000 })))
  await broker?.dispose()
})

test('enqueue -> Node worker -> result, also from another client', async () => {
  const id = await client.enqueue('echo', 'hi')
  assert.equal(typeof id, 'string')
  assert.equal((await client.result(id)).toString(), 'echo:hi')
  const other = new Client(broker.endpoint)
  try {
    assert.equal((await other.result(id, { timeoutMs: 0 })).toString(), 'echo:hi')
  } finally {
    other.close()
  }
})

test('multi-frame payloads and results', async () => {
  const id = await client.enqueue('echo', ['a', Buffer.from('b')])
  assert.deepEqual((await client.result(id, { frames: true })).map(String), ['a', 'b'])
  assert.deepEqual((await client.request('echo', ['c', 'd'], { frames: true })).map(String), ['c', 'd'])
})

test('enqueueMany returns one id per payload, in order, even past the broker frame cap', async () => {
  const payloads = Array.from({ length: 45 }, (_, i) => `item-${i}`)
  const ids = await client.enqueueMany('echo', payloads)
  assert.equal(ids.length, 45)
  assert.equal(new Set(ids).size, 45)
  const results = await Promise.all(ids.map((id) => client.result(id)))
  assert.deepEqual(results.map(String), payloads.map((p) => `echo:${p}`))

  // 3 frames per task: 135 payload frames need several ENQUEUE messages (64-frame cap)
  const triples = Array.from({ length: 45 }, (_, i) => ['x', String(i), 'y'])
  const more = await client.enqueueMany('echo', triples)
  assert.equal(more.length, 45)
  assert.deepEqual((await client.result(more[44], { frames: true })).map(String), ['x', '44', 'y'])
})

test('idempotency keys: the same key gives the same task, never a second one', async () => {
  const first = await client.enqueue('echo', 'once', { key: 'order-17' })
  const again = await client.enqueue('echo', 'once', { key: 'order-17' })
  assert.equal(again, first)
  const batch = await client.enqueueMany('echo', ['p', 'q'], { keys: ['order-17', null] })
  assert.equal(batch[0], first)
  assert.notEqual(batch[1], first)
})

test('request() enqueues and waits for the result in one call', async () => {
  const result = await client.request('echo', 'ping', { priority: 5 })
  assert.equal(result.toString(), 'echo:ping')
})

test('request() with the key of a task that already ended answers with its result', { timeout: 15_000 }, async () => {
  assert.equal((await client.request('echo', 'same', { key: 'req-key-1' })).toString(), 'echo:same')
  // The broker would hold this call for its whole wait: the client asks for the result instead.
  assert.equal((await client.request('echo', 'same', { key: 'req-key-1', timeoutMs: 60_000 })).toString(), 'echo:same')
})

test('status() shows the record with camelCase keys and Date times', async () => {
  const id = await client.enqueue('nobody', 'x', { priority: -3, ttlS: 60, maxAttempts: 7, timeoutS: 12.5, headers: { who: 'me' } })
  const status = await client.status(id)
  assert.equal(status.id, id)
  assert.equal(status.service, 'nobody')
  assert.equal(status.state, 'ready')
  assert.equal(status.attempt, 0)
  assert.equal(status.maxAttempts, 7)
  assert.equal(status.priority, -3)
  assert.equal(status.timeoutS, 12.5)
  assert.deepEqual(status.headers, { who: 'me' })
  assert.ok(status.createdAt instanceof Date)
  assert.ok(status.expiresAt instanceof Date && status.expiresAt > status.createdAt)
  assert.equal(typeof status.key, 'string') // generated: resends never duplicate
  assert.equal(status.history[0][0], 'enqueued')
  await client.cancel(id)
})

test('delayS and notBefore hold a task back', async () => {
  const delayed = await client.enqueue('nobody', 'x', { delayS: 3600 })
  assert.equal((await client.status(delayed)).state, 'delayed')
  const later = new Date(Date.now() + 3_600_000)
  const scheduled = await client.enqueue('nobody', 'x', { notBefore: later })
  const status = await client.status(scheduled)
  assert.equal(status.state, 'delayed')
  assert.ok(Math.abs(status.notBefore.getTime() - later.getTime()) < 5)
  await client.cancel(delayed)
  await client.cancel(scheduled)
})

test('priority: higher first', async () => {
  const order = []
  const low = await client.enqueue('prio', 'low', { priority: -10 })
  const high = await client.enqueue('prio', 'high', { priority: 10 })
  await startWorker('prio', (task) => {
    order.push(task.payload.toString())
    return 'ok'
  })
  await client.result(low)
  await client.result(high)
  assert.deepEqual(order, ['high', 'low'])
})

test('cancel: a queued task never runs; cancelling twice is a conflict', async () => {
  const id = await client.enqueue('nobody', 'x')
  assert.deepEqual(await client.cancel(id), { id, state: 'cancelled', was: 'ready' })
  await assert.rejects(client.result(id), (err) => err instanceof TaskCancelled && err.taskId === id && err.state === 'cancelled')
  const err = await client.cancel(id).catch((e) => e)
  assert.ok(err instanceof BrokerError)
  assert.equal(err.code, 'conflict')
})

test('a task whose ttl passes before it starts expires', async () => {
  const id = await client.enqueue('nobody', 'x', { ttlS: 0.05 })
  await assert.rejects(client.result(id, { timeoutMs: 5000 }), TaskExpired)
})

test('dead letters: listed page by page, redriven back to the queue', async () => {
  let failing = true
  await startWorker('poison', (task) => {
    if (failing) throw new NonRetryableError(`bad ${task.payload}`)
    return 'fixed'
  })
  const ids = await client.enqueueMany('poison', ['a', 'b', 'c'])
  await waitUntil(async () => (await client.deadLetters('poison')).tasks.length === 3, { what: 'three dead letters' })

  const page1 = await client.deadLetters('poison', { limit: 2 })
  assert.deepEqual(page1.tasks.map((t) => t.id), ids.slice(0, 2))
  assert.notEqual(page1.next, null)
  const page2 = await client.deadLetters('poison', { limit: 2, after: page1.next })
  assert.deepEqual(page2.tasks.map((t) => t.id), ids.slice(2))
  assert.equal(page2.next, null)
  assert.match(page1.tasks[0].error, /NonRetryableError: bad a/)
  assert.ok(page1.tasks[0].finishedAt instanceof Date)
  const all = []
  for await (const t of client.iterDeadLetters('poison', { limit: 1 })) all.push(t.id)
  assert.deepEqual(all, ids)

  failing = false
  assert.deepEqual(await client.redrive('poison', [ids[0]]), [ids[0]])
  assert.equal((await client.result(ids[0])).toString(), 'fixed')
  assert.deepEqual((await client.redrive('poison')).sort(), ids.slice(1).sort())
  assert.equal((await client.result(ids[2])).toString(), 'fixed')
  assert.deepEqual((await client.deadLetters('poison')).tasks, [])
})

test('errors: TaskNotFound, QueueFull, bad requests, TimeoutError with the task id', async () => {
  await assert.rejects(client.result('no-such-task'), TaskNotFound)
  await assert.rejects(client.status('no-such-task'), (err) => err instanceof TaskNotFound && err.code === 'not_found')

  const err = await client.result((await client.enqueue('nobody', 'x')), { timeoutMs: 100 }).catch((e) => e)
  assert.ok(err instanceof TimeoutError)
  assert.equal(err.state, 'ready')
  assert.equal(typeof err.taskId, 'string')

  const reqErr = await client.request('nobody', 'x', { timeoutMs: 150 }).catch((e) => e)
  assert.ok(reqErr instanceof TimeoutError)
  assert.equal((await client.status(reqErr.taskId)).state, 'ready') // it still waits for a worker

  // --max-tasks 50: a batch that does not fit is refused whole
  const full = await client.enqueueMany('crowded', Array.from({ length: 51 }, () => 'x')).catch((e) => e)
  assert.ok(full instanceof QueueFull, `expected QueueFull, got ${full}`)
  assert.equal(full.code, 'queue_full')

  await assert.rejects(client.enqueue('mmi.x', 'x'), RangeError)
  await assert.rejects(client.enqueue('echo', 'x', { priority: 500 }), RangeError)
  await assert.rejects(client.enqueue('echo', 'x', { delayS: 1, notBefore: new Date() }), TypeError)
  await assert.rejects(client.enqueue('echo', 'x', { maxAttempts: 1.5 }), RangeError)
  await assert.rejects(client.enqueueMany('echo', ['a', 'b'], { key: 'k' }), /keys/)
  await assert.rejects(client.enqueue('echo', 'x', { delay_s: 5 }), /unknown option "delay_s"/)
})

test('an AbortSignal rejects a waiting call with its reason', async () => {
  const id = await client.enqueue('nobody', 'x')
  const controller = new AbortController()
  const pending = client.result(id, { timeoutMs: 60_000, signal: controller.signal })
  controller.abort(new Error('not interested any more'))
  await assert.rejects(pending, /not interested any more/)
  await assert.rejects(client.status(id, { signal: AbortSignal.abort() }), { name: 'AbortError' })
})

test('headers with a "__proto__" key (valid msgpack) reach the worker and come back in status() as an own property', async () => {
  const headers = JSON.parse('{"__proto__": {"polluted": true}, "reply_to": "x.y"}')
  let seen = null
  await startWorker('proto', (task) => {
    seen = task.headers
    return 'ok'
  })
  const id = await client.enqueue('proto', 'x', { headers })
  assert.equal((await client.result(id)).toString(), 'ok')
  for (const [what, got] of [['worker', seen], ['status', (await client.status(id)).headers]]) {
    assert.ok(Object.hasOwn(got, '__proto__'), what)
    assert.deepEqual(Object.getOwnPropertyDescriptor(got, '__proto__').value, { polluted: true }, what)
    assert.equal(Object.getPrototypeOf(got), Object.prototype, what)
    assert.equal(got.reply_to, 'x.y', what)
  }
  assert.equal(client.stats.malformed, 0)
})
