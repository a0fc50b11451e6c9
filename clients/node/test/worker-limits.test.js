// The Node Worker against a real broker's message caps (--max-message-bytes,
// default 16 MiB, and 16384 frames) and with a tiny send high-water mark: every
// task ends, none is left inflight by a message the broker dropped or a send
// the worker gave up on.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { Client, NonRetryableError, TaskDead } from '../index.js'
import { startBroker } from '../testlib/broker.js'
import { deferred, workerStarter } from '../testlib/helpers.js'

const MiB = 1024 * 1024

let broker
let client
const workers = []

const startWorker = workerStarter(() => broker.endpoint, workers)

before(async () => {
  // the broker's default caps: 16 MiB and 16384 frames per message
  broker = await startBroker({ args: ['--durability', 'memory', '--retry-base', '0.05', '--retry-max', '0.1'] })
  client = new Client(broker.endpoint, { timeoutMs: 20_000 })
})

after(async () => {
  client?.close()
  await Promise.all(workers.map((w) => w.stop({ timeoutMs: 1000 })))
  await broker?.dispose()
})

test('many handlers each returning 1 MiB and finishing together: every task is done (results split under 16 MiB)', async () => {
  const count = 40
  const gate = deferred()
  let running = 0
  const worker = await startWorker('big-results', async (task) => {
    running++
    await gate.promise
    return Buffer.alloc(MiB, task.payload.toString())
  }, { concurrency: count })
  const ids = await client.enqueueMany('big-results', Array.from({ length: count }, (_, i) => String.fromCharCode(65 + (i % 26))))
  const deadline = Date.now() + 10_000
  while (running < count && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(running, count, 'every handler running before they all end together')
  gate.resolve()
  const results = await Promise.all(ids.map((id) => client.result(id, { timeoutMs: 20_000 })))
  results.forEach((result, i) => {
    assert.equal(result.length, MiB)
    assert.equal(result[0], 65 + (i % 26))
  })
  assert.equal(worker.stats.handled, count)
})

test('many handlers each returning 1000 frames and finishing together: every task is done (results split under 16384 frames)', async () => {
  const count = 30
  const gate = deferred()
  let running = 0
  const worker = await startWorker('many-frames', async (task) => {
    running++
    await gate.promise
    return Array.from({ length: 1000 }, (_, i) => `${task.payload}.${i}`)
  }, { concurrency: count })
  const ids = await client.enqueueMany('many-frames', Array.from({ length: count }, (_, i) => `j${i}`))
  const deadline = Date.now() + 10_000
  while (running < count && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(running, count)
  gate.resolve()
  const results = await Promise.all(ids.map((id) => client.result(id, { frames: true, timeoutMs: 20_000 })))
  results.forEach((frames, i) => {
    assert.equal(frames.length, 1000)
    assert.equal(frames[999].toString(), `j${i}.999`)
  })
  assert.equal(worker.stats.handled, count)
})

test('a result over 16 MiB dead-letters its task with a reason naming its size and the cap; one just under it is delivered', async () => {
  const attempts = []
  const worker = await startWorker('too-big', (task) => {
    attempts.push(task.attempt)
    return Buffer.alloc(task.payload.toString() === 'big' ? 17 * MiB : 16 * MiB - 1024)
  })
  const fits = await client.request('too-big', 'fits', { timeoutMs: 20_000 })
  assert.equal(fits.length, 16 * MiB - 1024)
  attempts.length = 0
  const err = await client.request('too-big', 'big', { maxAttempts: 3, timeoutMs: 20_000 }).catch((e) => e)
  assert.ok(err instanceof TaskDead, `expected TaskDead, got ${err}`)
  assert.match(err.error, /result too large: 17825792 bytes in 1 frame/)
  assert.match(err.error, /maxMessageBytes 16777216/)
  assert.deepEqual(attempts, [1], 'not retried: no attempt can do better')
  assert.equal(worker.stats.tooLarge, 1)
  assert.equal(worker.stats.handled, 1)
})

test('a result of more frames than a message may carry dead-letters its task readably; 16379 frames (the cap) are delivered', async () => {
  await startWorker('too-many-frames', (task) => Array.from({ length: Number(task.payload.toString()) }, () => 'f'))
  const fits = await client.request('too-many-frames', '16379', { frames: true, timeoutMs: 20_000 })
  assert.equal(fits.length, 16379)
  const err = await client.request('too-many-frames', '16380', { timeoutMs: 20_000 }).catch((e) => e)
  assert.ok(err instanceof TaskDead, `expected TaskDead, got ${err}`)
  assert.match(err.error, /result too large: 16380 bytes in 16380 frames/)
  assert.match(err.error, /maxFrames 16384/)
})

test('send high-water mark 1: a burst of DONEs and FAILs all reach the broker, every task ends', async () => {
  const count = 400
  const gate = deferred()
  let running = 0
  const worker = await startWorker('burst', async (task) => {
    running++
    await gate.promise
    const n = Number(task.payload.toString())
    if (n % 2 === 1) throw new NonRetryableError(`odd ${n}`)
    task.progress(Buffer.alloc(64 * 1024)) // large enough to fill the socket: back-pressure
    return `even ${n}`
  }, { concurrency: count, hwm: 1 })
  const ids = await client.enqueueMany('burst', Array.from({ length: count }, (_, i) => String(i)))
  const deadline = Date.now() + 10_000
  while (running < count && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(running, count)
  gate.resolve()
  const ends = await Promise.all(ids.map((id) => client.result(id, { timeoutMs: 20_000 }).then(String, (e) => e)))
  ends.forEach((end, i) => {
    if (i % 2 === 1) {
      assert.ok(end instanceof TaskDead, `task ${i}: expected TaskDead, got ${end}`)
      assert.match(end.error, new RegExp(`odd ${i}$`))
    } else {
      assert.equal(end, `even ${i}`)
    }
  })
  assert.equal(worker.stats.handled, count / 2)
  assert.equal(worker.stats.failed, count / 2)
  assert.equal(worker.stats.progressSent + worker.stats.progressDropped, count / 2)
  // Back-pressure did happen: with the socket full, PROGRESS (advisory) was dropped
  // rather than queued, while the DONEs and FAILs waited in the outbox.
  assert.ok(worker.stats.progressDropped > 0, `progressDropped ${worker.stats.progressDropped}: the socket was never full`)
})
