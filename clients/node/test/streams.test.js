// Task streams (docs/protocol.md §13) end to end against a real broker: Node
// workers emit chunks (task.emit, generator handlers), Node clients read them
// (client.stream, client.readStream) with flow control, attempts, resumption,
// cancellation and typed errors.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import {
  Client,
  NonRetryableError,
  Service,
  TaskCancelled,
  TaskDead,
  TaskNotFound,
  TimeoutError
} from '../index.js'
import { unpack } from '../lib/protocol.js'
import { sleep, startBroker, waitUntil } from '../testlib/broker.js'
import { deferred, workerStarter } from '../testlib/helpers.js'

const HEARTBEAT_MS = 200 // the test broker's --heartbeat-interval, and the workers'

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

// Every chunk of a stream as strings, and the attempt of each.
async function collect (stream) {
  const chunks = []
  const attempts = []
  for await (const chunk of stream) {
    chunks.push(chunk.toString())
    attempts.push(stream.attempt)
  }
  return { chunks, attempts }
}

test('stream(): a generator handler\'s chunks arrive in order, then the result', async () => {
  await startWorker('llm', async function * (task) {
    const words = task.payload.toString().split(' ')
    for (const word of words) {
      yield word
      await sleep(2)
    }
    return `${words.length} words`
  })
  const stream = client.stream('llm', 'the quick brown fox')
  const { chunks, attempts } = await collect(stream)
  assert.deepEqual(chunks, ['the', 'quick', 'brown', 'fox'])
  assert.deepEqual(attempts, [1, 1, 1, 1])
  assert.equal(stream.result.toString(), '4 words')
  assert.equal(stream.offset, 4)
  assert.equal(typeof stream.taskId, 'string')
  assert.equal(await stream.accepted, stream.taskId)
  const status = await client.status(stream.taskId)
  assert.equal(status.state, 'done')
  assert.equal(status.streamChunks, 4)
})

test('task.emit() in a plain handler, and a sync generator', async () => {
  await startWorker('emitter', async (task) => {
    task.emit('a')
    task.emit(Buffer.from('b'))
    await task.emit(new TextEncoder().encode('c'))
    await sleep(5)
    task.emit('d')
    return 'emitted'
  })
  await startWorker('sync-gen', function * (task) {
    yield 'x'
    yield task.payload
    return ['r', 's']
  })
  const emitted = client.stream('emitter', '')
  assert.deepEqual((await collect(emitted)).chunks, ['a', 'b', 'c', 'd'])
  assert.equal(emitted.result.toString(), 'emitted')
  const sync = client.stream('sync-gen', 'y', { frames: true })
  assert.deepEqual((await collect(sync)).chunks, ['x', 'y'])
  assert.deepEqual(sync.result.map(String), ['r', 's'])
})

test('readStream() of a finished task, from offset 0 and from the middle', async () => {
  await startWorker('count', function * () {
    for (let i = 0; i < 10; i++) yield String(i)
    return 'ten'
  })
  const id = await client.enqueue('count', '')
  assert.equal((await client.result(id)).toString(), 'ten')
  const all = client.readStream(id)
  assert.equal(all.taskId, id)
  assert.deepEqual((await collect(all)).chunks, ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])
  assert.equal(all.result.toString(), 'ten')
  const tail = client.readStream(id, { offset: 7 })
  assert.deepEqual((await collect(tail)).chunks, ['7', '8', '9'])
  assert.equal(tail.offset, 10)
  const past = client.readStream(id, { offset: 10 })
  assert.deepEqual((await collect(past)).chunks, [])
  assert.equal(past.result.toString(), 'ten')
  await assert.rejects(collect(client.readStream('t0-0000000000000000')), TaskNotFound)
})

test('a reader that starts late gets what was sent before it, then the rest as it comes', async () => {
  const go = deferred()
  await startWorker('slow-llm', async function * () {
    yield 'early-1'
    yield 'early-2'
    await go.promise
    yield 'late-1'
    return 'finished'
  })
  const id = await client.enqueue('slow-llm', '')
  await waitUntil(async () => (await client.status(id)).streamChunks === 2, { what: 'two chunks stored' })
  const stream = client.readStream(id)
  const iterator = stream[Symbol.asyncIterator]()
  assert.equal((await iterator.next()).value.toString(), 'early-1')
  assert.equal((await iterator.next()).value.toString(), 'early-2')
  go.resolve()
  assert.equal((await iterator.next()).value.toString(), 'late-1')
  assert.equal((await iterator.next()).done, true)
  assert.equal(stream.result.toString(), 'finished')
})

test('flow control: a window of 2 still delivers 50 chunks, all in order', async () => {
  await startWorker('fifty', async (task) => {
    for (let i = 0; i < 50; i++) task.emit(`c${i}`)
    return 'all sent'
  })
  const stream = client.stream('fifty', '', { window: 2 })
  const chunks = []
  for await (const chunk of stream) {
    chunks.push(chunk.toString())
    if (chunks.length % 10 === 0) await sleep(5) // a reader slower than the worker
  }
  assert.deepEqual(chunks, Array.from({ length: 50 }, (_, i) => `c${i}`))
  assert.equal(stream.result.toString(), 'all sent')
})

test('a failed attempt and its retry: attempts tell them apart; attempts "current" skips the first', async () => {
  await startWorker('flaky-llm', async function * (task) {
    yield `try ${task.attempt}: a`
    yield `try ${task.attempt}: b`
    if (task.attempt === 1) throw new Error('gpu fell over')
    yield `try ${task.attempt}: c`
    return `answer of attempt ${task.attempt}`
  })
  const stream = client.stream('flaky-llm', '', { maxAttempts: 3 })
  const { chunks, attempts } = await collect(stream)
  assert.deepEqual(chunks, ['try 1: a', 'try 1: b', 'try 2: a', 'try 2: b', 'try 2: c'])
  assert.deepEqual(attempts, [1, 1, 2, 2, 2])
  assert.equal(stream.result.toString(), 'answer of attempt 2')

  const current = client.readStream(stream.taskId, { attempts: 'current' })
  const seen = await collect(current)
  assert.deepEqual(seen.chunks, ['try 2: a', 'try 2: b', 'try 2: c'])
  assert.deepEqual(seen.attempts, [2, 2, 2])
  assert.equal(current.offset, 5)
})

test('leaving the loop cancels the task: the handler\'s signal aborts within about a heartbeat', async () => {
  const aborted = deferred()
  const closed = deferred()
  let pulled = 0
  await startWorker('endless', async function * (task) {
    task.signal.addEventListener('abort', () => aborted.resolve(performance.now()))
    try {
      for (;;) {
        pulled++
        yield `token ${pulled}`
        await sleep(10)
      }
    } finally {
      closed.resolve(task.signal.aborted) // return(): the worker pulls it no further
    }
  })
  const stream = client.stream('endless', '')
  let left = 0
  let n = 0
  for await (const chunk of stream) {
    assert.equal(chunk.toString(), `token ${++n}`)
    if (n === 3) {
      left = performance.now()
      break
    }
  }
  const abortedAt = await aborted.promise
  assert.ok(abortedAt - left < 3 * HEARTBEAT_MS, `the handler saw the abort ${Math.round(abortedAt - left)}ms after the reader left`)
  const status = await client.status(stream.taskId)
  assert.equal(status.state, 'cancelled')
  assert.match(status.error, /abandoned by its reader/)
  assert.throws(() => stream.result, /closed before/)
  assert.equal(await closed.promise, true, 'closed after the abort')
  const pulledThen = pulled
  await sleep(100)
  assert.equal(pulled, pulledThen, 'the generator is pulled no further')
})

test('an AbortSignal closes the stream: the iteration rejects with its reason and the task is cancelled', async () => {
  const aborted = deferred()
  await startWorker('abortable', async (task) => {
    task.emit('first')
    await new Promise((resolve) => task.signal.addEventListener('abort', resolve))
    task.emit('after the cancel') // a no-op, never an error
    aborted.resolve()
    return 'too late'
  })
  const controller = new AbortController()
  const stream = client.stream('abortable', '', { signal: controller.signal })
  const reason = new Error('the user closed the tab')
  const seen = []
  await assert.rejects(async () => {
    for await (const chunk of stream) {
      seen.push(chunk.toString())
      controller.abort(reason)
    }
  }, (err) => err === reason)
  assert.deepEqual(seen, ['first'])
  await aborted.promise
  await waitUntil(async () => (await client.status(stream.taskId)).state === 'cancelled', { what: 'task cancelled' })
  await assert.rejects(collect(client.readStream(stream.taskId)), TaskCancelled)
})

test('readStream does not cancel by default when it is left early', async () => {
  const go = deferred()
  await startWorker('patient', async function * () {
    yield 'one'
    await go.promise
    yield 'two'
    return 'kept'
  })
  const id = await client.enqueue('patient', '')
  for await (const chunk of client.readStream(id)) {
    assert.equal(chunk.toString(), 'one')
    break
  }
  await sleep(100)
  assert.equal((await client.status(id)).state, 'inflight')
  go.resolve()
  const rest = client.readStream(id, { offset: 1 })
  assert.deepEqual((await collect(rest)).chunks, ['two'])
  assert.equal(rest.result.toString(), 'kept')
})

test('a task that goes dead: its chunks, then TaskDead', async () => {
  await startWorker('doomed', async function * () {
    yield 'partial'
    throw new NonRetryableError('cannot continue')
  })
  const stream = client.stream('doomed', '')
  const seen = []
  await assert.rejects(async () => {
    for await (const chunk of stream) seen.push(chunk.toString())
  }, (err) => err instanceof TaskDead && err.taskId === stream.taskId && /cannot continue/.test(err.error))
  assert.deepEqual(seen, ['partial'])
  assert.throws(() => stream.result, TaskDead)
})

test('wait_s running out is a TimeoutError with the id and offset to read on from', async () => {
  const stream = client.stream('nobody-serves-yet', 'x', { waitS: 0.3 })
  const err = await collect(stream).catch((e) => e)
  assert.ok(err instanceof TimeoutError, String(err))
  assert.equal(err.taskId, stream.taskId)
  assert.equal(err.state, 'ready')
  assert.equal(err.next, 0)
  assert.throws(() => stream.result, TimeoutError)

  await startWorker('nobody-serves-yet', function * (task) {
    yield task.payload
    return 'served'
  })
  const resumed = client.readStream(err.taskId, { offset: err.next })
  assert.deepEqual((await collect(resumed)).chunks, ['x'])
  assert.equal(resumed.result.toString(), 'served')
})

// §13: the final REPLY comes once the task has ended and every chunk of it has
// been sent to the call; a call whose chunks wait for MORE is not idle, so a
// reader that pauses longer than wait_s after the task ended still gets them all.
test('a reader that pauses longer than wait_s still gets every chunk of an ended task', async () => {
  await startWorker('burst', (task) => {
    for (let i = 0; i < 10; i++) task.emit(`c${i}`)
    return 'r'
  })
  const stream = client.stream('burst', '', { window: 2, waitS: 0.5 })
  await stream.accepted
  await sleep(1200) // the task ends meanwhile; the broker has sent 2 chunks and waits for MORE
  const { chunks } = await collect(stream)
  assert.deepEqual(chunks, Array.from({ length: 10 }, (_, i) => `c${i}`))
})

test('a Service handler may be a generator: chunks encoded like its results (msgpack)', async () => {
  const svc = new Service('streamer', {
    endpoint: broker.endpoint,
    eventsIn: broker.eventsIn,
    eventsOut: broker.eventsOut,
    heartbeatMs: null,
    logger: null
  })
  svc.task('svc-gen', async function * (task) {
    yield 'text'
    yield { n: 1 }
    yield Buffer.from('raw')
    return { words: 3, payload: task.payload.toString() }
  })
  svc.task('svc-emit', async (task) => {
    await task.emit(['a', 1])
    return null
  })
  await svc.start()
  try {
    const stream = client.stream('svc-gen', 'p')
    const chunks = []
    for await (const chunk of stream) chunks.push(chunk)
    assert.deepEqual([unpack(chunks[0]), unpack(chunks[1]), chunks[2].toString()], ['text', { n: 1 }, 'raw'])
    assert.deepEqual(unpack(stream.result), { words: 3, payload: 'p' })
    const emitted = client.stream('svc-emit', '')
    const frames = []
    for await (const chunk of emitted) frames.push(unpack(chunk))
    assert.deepEqual(frames, [['a', 1]])
    assert.equal(unpack(emitted.result), null)
    assert.equal(svc.stats.tasksDone, 2)
  } finally {
    await svc.stop({ timeoutMs: 1000 })
  }
})
