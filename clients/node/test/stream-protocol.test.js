// Task streams (docs/protocol.md §13) message by message, against scripted
// brokers: the Client's STREAM, READ, MORE and CLOSE, and the Worker's CHUNK.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Client, TaskDead, TaskStream, TimeoutError, Worker } from '../index.js'
import { CMD, FakeBroker } from '../testlib/fake-broker.js'
import { FakeZbcBroker } from '../testlib/fake-zbc-broker.js'
import { sleep } from '../testlib/broker.js'
import { deferred } from '../testlib/helpers.js'

const CALL = { STREAM: 0x12, READ: 0x13, MORE: 0x14, CLOSE: 0x15 }

async function client (t, options) {
  const broker = await new FakeZbcBroker().bind()
  const c = new Client(broker.endpoint, options)
  t.after(() => {
    c.close()
    broker.close()
  })
  return { broker, client: c }
}

// Take `n` chunks from an iterator, as strings.
async function take (iterator, n) {
  const out = []
  for (let i = 0; i < n; i++) {
    const { value, done } = await iterator.next()
    assert.equal(done, false, `chunk ${i} of ${n}`)
    out.push(value.toString())
  }
  return out
}

test('stream(): STREAM with the task options and follow fields, then chunks in order and the result', async (t) => {
  const { broker, client: c } = await client(t)
  const stream = c.stream('llm', 'hi', { priority: 2, key: 'k1', window: 8, attempts: 'current', waitS: 30 })
  assert.ok(stream instanceof TaskStream)
  assert.equal(stream.taskId, null)
  const call = await broker.next(CALL.STREAM)
  assert.deepEqual({ ...call.meta, rid: 0 }, {
    rid: 0, service: 'llm', priority: 2, key: 'k1', window: 8, attempts: 'current', cancel_on_abandon: true, wait_s: 30
  })
  assert.deepEqual(call.frames, ['hi'])
  assert.throws(() => stream.result, /known once the iteration has ended/)

  await broker.reply(call, { ids: ['t9'] })
  assert.equal(await stream.accepted, 't9')
  assert.equal(stream.taskId, 't9')
  await broker.chunks(call, { id: 't9', offset: 0, attempt: 1 }, 'Hel', 'lo')
  await broker.chunks(call, { id: 't9', offset: 2, attempt: 1 }, ' there')
  await broker.reply(call, { id: 't9', state: 'done', next: 3 }, 'Hello there')
  const chunks = []
  for await (const chunk of stream) {
    assert.ok(Buffer.isBuffer(chunk))
    chunks.push(chunk.toString())
    assert.equal(stream.attempt, 1)
    assert.equal(stream.offset, chunks.length)
  }
  assert.deepEqual(chunks, ['Hel', 'lo', ' there'])
  assert.equal(stream.result.toString(), 'Hello there')
  assert.equal(stream.offset, 3)
  await sleep(20)
  assert.deepEqual(broker.inbox.map((m) => m.command), [], 'no MORE for 3 of 8, no CLOSE after the end')
})

test('MORE credits what was taken once half the window is; the waiting chunks stay bounded', async (t) => {
  const { broker, client: c } = await client(t)
  const stream = c.readStream('t1', { window: 4, offset: 5 })
  assert.equal(stream.taskId, 't1')
  assert.equal(await stream.accepted, 't1')
  const call = await broker.next(CALL.READ)
  assert.deepEqual({ ...call.meta, rid: 0, wait_s: 0 }, { rid: 0, id: 't1', offset: 5, window: 4, attempts: 'all', cancel_on_abandon: false, wait_s: 0 })
  await broker.chunks(call, { id: 't1', offset: 5, attempt: 2 }, 'a', 'b', 'c', 'd')
  assert.deepEqual(await take(stream, 1), ['a'])
  await sleep(20)
  assert.equal(broker.inbox.length, 0, 'one of 4 taken: no MORE yet')
  assert.deepEqual(await take(stream, 1), ['b'])
  const more = await broker.next(CALL.MORE)
  assert.deepEqual(more.meta, { rid: call.meta.rid, credit: 2 })
  assert.equal(stream.attempt, 2)
  assert.equal(stream.offset, 7)
  assert.deepEqual(await take(stream, 2), ['c', 'd'])
  assert.deepEqual((await broker.next(CALL.MORE)).meta, { rid: call.meta.rid, credit: 2 })
  await broker.reply(call, { id: 't1', state: 'done', next: 9 }, 'r')
  assert.deepEqual(await stream.next(), { done: true, value: undefined })
  assert.equal(stream.result.toString(), 'r')
})

test('large chunks are credited once half the broker\'s uncredited-bytes cap is taken', async (t) => {
  const { broker, client: c } = await client(t)
  const stream = c.readStream('t1', { window: 100 })
  const call = await broker.next(CALL.READ)
  const mib = 'x'.repeat(1024 * 1024)
  await broker.chunks(call, { id: 't1', offset: 0, attempt: 1 }, mib, mib, mib)
  await take(stream, 1)
  await sleep(20)
  assert.equal(broker.inbox.length, 0, '1 MiB taken: no MORE yet')
  await take(stream, 1)
  assert.deepEqual((await broker.next(CALL.MORE)).meta, { rid: call.meta.rid, credit: 2 })
  stream.close()
})

test('leaving the loop early sends CLOSE; the result is not known then', async (t) => {
  const { broker, client: c } = await client(t)
  const stream = c.stream('llm', 'x')
  const call = await broker.next(CALL.STREAM)
  await broker.reply(call, { ids: ['t2'] })
  await broker.chunks(call, { id: 't2', offset: 0, attempt: 1 }, 'a', 'b', 'c')
  for await (const chunk of stream) {
    assert.equal(chunk.toString(), 'a')
    break
  }
  const close = await broker.next(CALL.CLOSE)
  assert.deepEqual(close.meta, { rid: call.meta.rid })
  assert.throws(() => stream.result, /closed before the task's result came/)
  assert.deepEqual(await stream.next(), { done: true, value: undefined })
  await broker.chunks(call, { id: 't2', offset: 3, attempt: 1 }, 'late')
  await sleep(20)
  assert.equal(c.stats.lateAnswers, 1)
})

test('an AbortSignal closes the stream: CLOSE, and the waiting next() rejects with its reason', async (t) => {
  const { broker, client: c } = await client(t)
  const controller = new AbortController()
  const stream = c.stream('llm', 'x', { signal: controller.signal })
  const call = await broker.next(CALL.STREAM)
  await broker.reply(call, { ids: ['t3'] })
  const pending = stream.next()
  const reason = new Error('user went away')
  controller.abort(reason)
  await assert.rejects(pending, (err) => err === reason)
  assert.deepEqual((await broker.next(CALL.CLOSE)).meta, { rid: call.meta.rid })
  assert.throws(() => stream.result, (err) => err === reason)
  assert.deepEqual(await stream.next(), { done: true, value: undefined })

  const early = new AbortController()
  early.abort(new Error('never mind'))
  const never = c.stream('llm', 'x', { signal: early.signal })
  await assert.rejects(never.next(), /never mind/)
  await assert.rejects(never.accepted, /never mind/)
  await sleep(20)
  assert.equal(broker.inbox.filter((m) => m.command === CALL.STREAM).length, 0, 'nothing sent')
})

test('a task that ends dead: its chunks, then TaskDead; wait_s running out: TimeoutError with the offset to read on from', async (t) => {
  const { broker, client: c } = await client(t)
  const stream = c.stream('llm', 'x', { waitS: 5 })
  const call = await broker.next(CALL.STREAM)
  await broker.reply(call, { ids: ['t4'] })
  await broker.chunks(call, { id: 't4', offset: 0, attempt: 3 }, 'partial')
  await broker.reply(call, { id: 't4', state: 'dead', error: 'gpu gone', next: 1 })
  const seen = []
  await assert.rejects(async () => {
    for await (const chunk of stream) seen.push(chunk.toString())
  }, (err) => err instanceof TaskDead && err.taskId === 't4' && err.error === 'gpu gone')
  assert.deepEqual(seen, ['partial'])
  assert.throws(() => stream.result, TaskDead)

  const idle = c.readStream('t5', { offset: 2, waitS: 0.5 })
  const read = await broker.next(CALL.READ)
  assert.equal(read.meta.wait_s, 0.5)
  await broker.chunks(read, { id: 't5', offset: 2, attempt: 1 }, 'c')
  await broker.reply(read, { id: 't5', state: 'inflight', next: 3 })
  assert.deepEqual(await take(idle, 1), ['c'])
  const err = await idle.next().catch((e) => e)
  assert.ok(err instanceof TimeoutError, String(err))
  assert.equal(err.taskId, 't5')
  assert.equal(err.state, 'inflight')
  assert.equal(err.next, 3)
  assert.equal(idle.offset, 3)
})

test('without an idle limit (timeoutMs Infinity) a stream reads on when wait_s runs out', async (t) => {
  const { broker, client: c } = await client(t)
  const stream = c.readStream('t6', { timeoutMs: Infinity })
  const first = await broker.next(CALL.READ)
  assert.equal(first.meta.wait_s, 60)
  await broker.chunks(first, { id: 't6', offset: 0, attempt: 1 }, 'a')
  await broker.reply(first, { id: 't6', state: 'inflight', next: 1 })
  const second = await broker.next(CALL.READ)
  assert.equal(second.meta.offset, 1)
  assert.notEqual(second.meta.rid, first.meta.rid)
  await broker.reply(second, { id: 't6', state: 'done', next: 1 }, 'r')
  assert.deepEqual(await take(stream, 1), ['a'])
  assert.equal((await stream.next()).done, true)
  assert.equal(stream.result.toString(), 'r')
})

test('a silent broker: TimeoutError after wait_s and a grace, naming the key before acceptance', async (t) => {
  const { broker, client: c } = await client(t)
  const stream = c.stream('llm', 'x', { waitS: 0.1, key: 'k7' })
  await broker.next(CALL.STREAM)
  const err = await stream.next().catch((e) => e)
  assert.ok(err instanceof TimeoutError, String(err))
  assert.equal(err.key, 'k7')
  assert.equal(err.taskId, null)
  await assert.rejects(stream.accepted, TimeoutError)
})

test('options are checked before anything is sent', async (t) => {
  const { client: c } = await client(t)
  assert.throws(() => c.stream('llm', 'x', { window: 0 }), RangeError)
  assert.throws(() => c.stream('llm', 'x', { window: 10_001 }), RangeError)
  assert.throws(() => c.stream('llm', 'x', { attempts: 'some' }), TypeError)
  assert.throws(() => c.stream('llm', 'x', { cancelOnAbandon: 'yes' }), TypeError)
  assert.throws(() => c.stream('llm', 'x', { offset: 3 }), /readStream/)
  assert.throws(() => c.stream('llm', 'x', { colour: 'red' }), /unknown option/)
  assert.throws(() => c.readStream('t1', { priority: 1 }), /unknown option/)
  assert.throws(() => c.readStream('t1', { offset: -1 }), RangeError)
  assert.throws(() => c.readStream(''), TypeError)
})

test('after a reconnect, the stream reads on from the last chunk received', async (t) => {
  const first = await new FakeZbcBroker().bind()
  const endpoint = first.endpoint
  const c = new Client(endpoint)
  let second = null
  t.after(() => {
    c.close()
    first.close()
    second?.close()
  })
  const stream = c.stream('llm', 'x', { key: 'k8' })
  const call = await first.next(CALL.STREAM)
  await first.reply(call, { ids: ['t8'] })
  await first.chunks(call, { id: 't8', offset: 0, attempt: 1 }, 'a', 'b')
  assert.deepEqual(await take(stream, 1), ['a'])
  await sleep(20)
  first.close()

  second = await new FakeZbcBroker().bind(endpoint)
  const read = await second.next(CALL.READ)
  assert.deepEqual({ ...read.meta, rid: 0 }, { rid: 0, id: 't8', offset: 2, window: 256, attempts: 'all', cancel_on_abandon: true, wait_s: 30 })
  await second.chunks(read, { id: 't8', offset: 2, attempt: 1 }, 'c')
  await second.reply(read, { id: 't8', state: 'done', next: 3 }, 'r')
  assert.deepEqual(await take(stream, 2), ['b', 'c'])
  assert.equal((await stream.next()).done, true)
  assert.equal(stream.result.toString(), 'r')
})

// ------------------------------------------------------------ the Worker's CHUNK

async function worker (t, options) {
  const broker = await new FakeBroker().bind()
  const w = new Worker({ endpoint: broker.endpoint, service: 'svc', heartbeatIntervalMs: 100, logger: null, ...options })
  t.after(async () => {
    await w.stop({ timeoutMs: 200 })
    broker.close()
  })
  const started = w.start()
  const ready = await broker.command(CMD.READY)
  await broker.send(ready.identity, CMD.HEARTBEAT)
  await started
  return { broker, worker: w, identity: ready.identity }
}

test('emit(): chunks of one turn go as one CHUNK, after the ACK and before the DONE', async (t) => {
  const { broker, identity, worker: w } = await worker(t, {
    handler: async (task) => {
      task.emit('a')
      task.emit(Buffer.from('b'))
      await task.emit(new Uint8Array([0x63]))
      await sleep(10)
      task.emit('d')
      return 'result'
    }
  })
  await broker.send(identity, CMD.TASK, { id: 't1', attempt: 1, service: 'svc' }, 'p')
  const ack = await broker.command(CMD.ACK)
  const first = await broker.command(CMD.CHUNK)
  const second = await broker.command(CMD.CHUNK)
  const done = await broker.command(CMD.DONE)
  assert.deepEqual(first.meta, { id: 't1', attempt: 1 })
  assert.deepEqual(first.frames, ['a', 'b', 'c'])
  assert.deepEqual(second.frames, ['d'])
  assert.deepEqual(done.frames, ['result'])
  assert.ok(ack.seq < first.seq && first.seq < second.seq && second.seq < done.seq)
  assert.equal(w.stats.chunksSent, 4)
})

test('a generator handler: each value a chunk, its return value the result; sync generators too', async (t) => {
  const { broker, identity } = await worker(t, {
    concurrency: 2,
    handler: (task) => task.payload.toString() === 'sync'
      ? (function * () { yield 'x'; yield 'y'; return 'sync done' })()
      : (async function * () {
          for (let i = 0; i < 3; i++) yield `tok${i}`
          await sleep(5)
          yield 'last'
          return ['r1', 'r2']
        })()
  })
  await broker.send(identity, CMD.TASK, { id: 'ta', attempt: 1, service: 'svc' }, 'async')
  const chunks = []
  while (chunks.length < 4) chunks.push(...(await broker.command(CMD.CHUNK)).frames)
  assert.deepEqual(chunks, ['tok0', 'tok1', 'tok2', 'last'])
  const done = await broker.command(CMD.DONE)
  assert.deepEqual(done.frames, ['r1', 'r2'])

  await broker.send(identity, CMD.TASK, { id: 'ts', attempt: 1, service: 'svc' }, 'sync')
  const chunk = await broker.command(CMD.CHUNK)
  assert.deepEqual(chunk.frames, ['x', 'y'], 'a sync generator yields in one turn: one CHUNK')
  assert.deepEqual((await broker.command(CMD.DONE)).frames, ['sync done'])
})

test('CANCEL stops a generator (its finally runs, nothing more is pulled) and makes emit() a no-op', async (t) => {
  const finished = deferred()
  const emitted = deferred()
  let pulled = 0
  let emitAfter = null
  const { broker, identity, worker: w } = await worker(t, {
    concurrency: 2,
    handler: (task) => {
      if (task.id === 'te') {
        return (async () => {
          task.emit('one')
          await new Promise((resolve) => task.signal.addEventListener('abort', resolve))
          emitAfter = task.emit('two')
          emitted.resolve()
          return 'never sent'
        })()
      }
      return (async function * () {
        try {
          for (;;) {
            pulled++
            yield `n${pulled}`
            await sleep(5)
          }
        } finally {
          finished.resolve(pulled)
        }
      })()
    }
  })
  await broker.send(identity, CMD.TASK, { id: 'tg', attempt: 1, service: 'svc' }, 'p')
  await broker.command(CMD.CHUNK)
  await broker.send(identity, CMD.CANCEL, { id: 'tg', attempt: 1, reason: 'stream over its cap' })
  const at = await finished.promise
  await sleep(30)
  assert.equal(pulled, at, 'not pulled after the cancel')

  await broker.send(identity, CMD.TASK, { id: 'te', attempt: 1, service: 'svc' }, 'p')
  // A chunk of 'tg' sent before its CANCEL arrived may still come first: not this one.
  const first = await broker.next((m) => m.command === CMD.CHUNK && m.meta.id === 'te')
  assert.deepEqual(first.frames, ['one'])
  await broker.send(identity, CMD.CANCEL, { id: 'te', attempt: 1 })
  await emitted.promise
  assert.equal(await emitAfter, undefined, 'emit() after the cancel resolves, sends nothing')
  await sleep(30)
  assert.equal(broker.seen(CMD.CHUNK).filter((m) => m.meta.id === 'te').length, 0)
  assert.equal(broker.seen(CMD.DONE).length, 0)
  assert.ok(w.stats.chunksDropped >= 1)
})

test('a chunk that is not a frame or cannot fit fails the attempt for good', async (t) => {
  const { broker, identity, worker: w } = await worker(t, {
    concurrency: 2,
    maxMessageBytes: 4096,
    handler: (task) => task.id === 'big'
      ? (function * () { yield Buffer.alloc(5000) })()
      : (async () => { task.emit(42) })()
  })
  await broker.send(identity, CMD.TASK, { id: 'big', attempt: 1, service: 'svc' })
  const big = await broker.command(CMD.FAIL)
  assert.equal(big.meta.retry, false)
  assert.match(big.meta.reason, /stream chunk too large/)
  await broker.send(identity, CMD.TASK, { id: 'num', attempt: 1, service: 'svc' })
  const num = await broker.command(CMD.FAIL)
  assert.equal(num.meta.retry, false)
  assert.match(num.meta.reason, /NonRetryableError: a stream chunk must be a Buffer/)
  assert.equal(w.stats.tooLarge, 1)
})

test('many chunks in one turn are split to fit the frame cap', async (t) => {
  const { broker, identity } = await worker(t, {
    maxFrames: 10, // 5 frames of chunks per message
    handler: (task) => {
      for (let i = 0; i < 12; i++) task.emit(String(i))
      return 'ok'
    }
  })
  await broker.send(identity, CMD.TASK, { id: 't1', attempt: 1, service: 'svc' })
  const sizes = []
  const all = []
  while (all.length < 12) {
    const m = await broker.command(CMD.CHUNK)
    sizes.push(m.frames.length)
    all.push(...m.frames)
  }
  assert.deepEqual(sizes, [5, 5, 2])
  assert.deepEqual(all, Array.from({ length: 12 }, (_, i) => String(i)))
  await broker.command(CMD.DONE)
})
