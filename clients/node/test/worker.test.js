// The Node Worker serving durable tasks of a real broker: results, progress,
// retries, non-retryable failures, delays, cancellation, time limits, credit.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { Client, NonRetryableError, RetryLater, TaskCancelled, TaskDead, Worker } from '../index.js'
import { startBroker, waitUntil } from '../testlib/broker.js'
import { zbwEncode } from '../lib/protocol.js'
import { workerStarter } from '../testlib/helpers.js'

let broker
let client
const workers = []

const startWorker = workerStarter(() => broker.endpoint, workers)

before(async () => {
  broker = await startBroker({ args: ['--durability', 'memory', '--retry-base', '0.05', '--retry-max', '0.1'] })
  client = new Client(broker.endpoint, { timeoutMs: 10_000 })
})

after(async () => {
  client?.close()
  await Promise.all(workers.map((w) => w.stop({ timeoutMs: 1000 })))
  await broker?.dispose()
})

test('a task goes to the Node worker and its result comes back; headers and time limit reach the handler', async () => {
  let seen
  const worker = await startWorker('upper', (task) => {
    seen = task
    task.progress('started')
    task.progress(['half', 'way'])
    return task.payload.toString().toUpperCase()
  })
  const result = await client.request('upper', 'hello', { headers: { lang: 'de', n: 2 }, timeoutS: 30 })
  assert.equal(result.toString(), 'HELLO')
  assert.equal(seen.attempt, 1)
  assert.equal(seen.service, 'upper')
  assert.deepEqual(seen.headers, { lang: 'de', n: 2 })
  assert.equal(seen.timeoutS, 30)
  assert.equal(worker.stats.progressSent, 2)
  assert.equal(worker.stats.handled, 1)
})

test('a failed attempt is retried and the next attempt succeeds', async () => {
  const attempts = []
  await startWorker('flaky', (task) => {
    attempts.push(task.attempt)
    if (task.attempt === 1) throw new Error('transient')
    return `ok on attempt ${task.attempt}`
  })
  const id = await client.enqueue('flaky', 'x', { maxAttempts: 3 })
  assert.equal((await client.result(id)).toString(), 'ok on attempt 2')
  assert.deepEqual(attempts, [1, 2])
  const status = await client.status(id)
  assert.equal(status.state, 'done')
  assert.equal(status.attempt, 2)
  assert.ok(status.history.some(([event, , reason]) => event === 'retry' && /transient/.test(reason)))
})

test('RetryLater asks for a delay before the next attempt', async () => {
  await startWorker('later', (task) => {
    if (task.attempt === 1) throw new RetryLater(0.05, 'busy')
    return 'done'
  })
  const id = await client.enqueue('later', 'x')
  assert.equal((await client.result(id)).toString(), 'done')
  const retry = (await client.status(id)).history.find(([event]) => event === 'retry')
  assert.equal(retry[3], 0.05)
})

test('NonRetryableError dead-letters the task at once with its reason', async () => {
  const attempts = []
  await startWorker('strict', (task) => {
    attempts.push(task.attempt)
    throw new NonRetryableError('cannot parse input')
  })
  const err = await client.request('strict', 'garbage', { maxAttempts: 5 }).catch((e) => e)
  assert.ok(err instanceof TaskDead, `expected TaskDead, got ${err}`)
  assert.equal(err.state, 'dead')
  assert.match(err.error, /NonRetryableError: cannot parse input/)
  assert.deepEqual(attempts, [1])
  const { tasks } = await client.deadLetters('strict')
  assert.deepEqual(tasks.map((t) => t.id), [err.taskId])
})

test('cancelling a running task aborts the handler signal; the requester gets TaskCancelled', async () => {
  const started = []
  const worker = await startWorker('long', async (task) => {
    started.push(task.id)
    await new Promise((resolve) => task.signal.addEventListener('abort', resolve, { once: true }))
    return 'never delivered'
  })
  const id = await client.enqueue('long', 'x')
  await waitUntil(() => started.includes(id), { what: 'handler started' })
  const cancelled = await client.cancel(id)
  assert.deepEqual(cancelled, { id, state: 'cancelled', was: 'inflight' })
  await assert.rejects(client.result(id), TaskCancelled)
  await waitUntil(() => worker.stats.cancelled === 1, { what: 'worker saw the CANCEL' })
  await waitUntil(() => worker.running === 0, { what: 'handler ended' })
})

test('an attempt past its timeoutS is taken back (CANCEL) and retried', async () => {
  const aborted = []
  await startWorker('slow-once', async (task) => {
    if (task.attempt === 1) {
      await new Promise((resolve) => task.signal.addEventListener('abort', resolve, { once: true }))
      aborted.push(task.attempt)
      return 'too late'
    }
    return 'second time lucky'
  })
  const result = await client.request('slow-once', 'x', { timeoutS: 0.3, maxAttempts: 2 })
  assert.equal(result.toString(), 'second time lucky')
  assert.deepEqual(aborted, [1])
})

test('a worker never holds more tasks than its concurrency', async () => {
  let release
  const gate = new Promise((resolve) => { release = resolve })
  let running = 0
  let most = 0
  const worker = await startWorker('pool', async (task) => {
    most = Math.max(most, ++running)
    await gate
    running--
    return task.payload
  }, { concurrency: 4 })
  const ids = await client.enqueueMany('pool', Array.from({ length: 10 }, (_, i) => `job-${i}`))
  await waitUntil(() => worker.running === 4, { what: 'four tasks running' })
  release()
  const results = await Promise.all(ids.map((id) => client.result(id)))
  assert.deepEqual(results.map(String), ids.map((_, i) => `job-${i}`))
  assert.equal(most, 4)
})

test('batches with the real broker: waiting tasks arrive as TASKS, results leave as DONES', async (t) => {
  // Count the DONES this process sends (the Worker encodes through this shared object).
  const sizes = []
  const dones = zbwEncode.dones
  zbwEncode.dones = (results) => {
    sizes.push(results.length)
    return dones(results)
  }
  t.after(() => { zbwEncode.dones = dones })
  const ids = await client.enqueueMany('batched', Array.from({ length: 300 }, (_, i) => `job-${i}`))
  const worker = await startWorker('batched', (task) => [task.payload, String(task.frames.length)], { concurrency: 64 })
  const results = await Promise.all(ids.map((id) => client.result(id, { frames: true })))
  assert.deepEqual(results.map((frames) => frames.map(String)), ids.map((_, i) => [`job-${i}`, '1']))
  assert.equal(worker.stats.received, 300)
  assert.equal(worker.stats.acked, 300)
  assert.equal(worker.stats.handled, 300)
  assert.equal(worker.stats.malformed, 0)
  assert.ok(sizes.length > 0 && Math.max(...sizes) > 1, `results went out in DONES (sizes ${sizes})`)
})
