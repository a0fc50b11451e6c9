// The Client's side of ZBC01, message by message, against a scripted broker:
// rid matching, answers in any order, waits that run out and are resumed,
// resends after a reconnect, error mapping.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { BrokerError, Client, ProtocolError, QueueFull, TaskDead, TimeoutError } from '../index.js'
import { MAX_BATCH, pack } from '../lib/protocol.js'
import { sleep } from '../testlib/broker.js'
import { FakeZbcBroker } from '../testlib/fake-zbc-broker.js'

const CALL = { ENQUEUE: 1, REQUEST: 2, RESULT: 3, STATUS: 4, CANCEL: 5, DEAD: 6, REDRIVE: 7 }
async function setup (t, options) {
  const broker = await new FakeZbcBroker().bind()
  const client = new Client(broker.endpoint, options)
  t.after(() => {
    client.close()
    broker.close()
  })
  return { broker, client }
}

test('enqueue sends service, options in snake_case and a generated key; answers are matched by rid', async (t) => {
  const { broker, client } = await setup(t)
  const first = client.enqueue('tts', 'one', { priority: 3, delayS: 1.5, ttlS: 60, maxAttempts: 2, timeoutS: 10, headers: { a: 1 } })
  const second = client.enqueue('tts', ['two', 'frames'], { key: 'my-key', notBefore: new Date(1_800_000_000_000) })
  const c1 = await broker.next(CALL.ENQUEUE)
  const c2 = await broker.next(CALL.ENQUEUE)
  assert.equal(c1.header, 'ZBC01')
  assert.ok(Number.isInteger(c1.meta.rid) && c1.meta.rid !== c2.meta.rid)
  assert.deepEqual({ ...c1.meta, rid: 0, key: 'k' }, { rid: 0, key: 'k', service: 'tts', priority: 3, delay_s: 1.5, ttl_s: 60, max_attempts: 2, timeout_s: 10, headers: { a: 1 } })
  assert.match(c1.meta.key, /^[0-9a-f-]{36}$/)
  assert.deepEqual(c1.frames, ['one'])
  assert.equal(c2.meta.key, 'my-key')
  assert.equal(c2.meta.not_before, 1_800_000_000)
  assert.deepEqual(c2.frames, ['two', 'frames'])
  // answered in the other order
  await broker.reply(c2, { ids: ['t2'] })
  await broker.reply(c1, { ids: ['t1'] })
  assert.equal(await first, 't1')
  assert.equal(await second, 't2')
  await broker.reply(c1, { ids: ['t1'] }) // a duplicate answer is dropped and counted
  await sleep(20)
  assert.equal(client.stats.lateAnswers, 1)
})

test('enqueueMany: counts and keys per message, split at the frame cap', async (t) => {
  const { broker, client } = await setup(t, { maxFrames: 8 }) // 3 payload frames per message
  const pending = client.enqueueMany('svc', ['a', ['b', 'c'], 'd', 'e'], { keys: [null, 'kb', null, null] })
  const m1 = await broker.next(CALL.ENQUEUE)
  assert.deepEqual(m1.meta.counts, [1, 2])
  assert.deepEqual(m1.frames, ['a', 'b', 'c'])
  assert.equal(m1.meta.keys[1], 'kb')
  assert.equal(m1.meta.keys.length, 2)
  await broker.reply(m1, { ids: ['t1', 't2'] })
  const m2 = await broker.next(CALL.ENQUEUE)
  assert.deepEqual(m2.meta.counts, [1, 1])
  assert.deepEqual(m2.frames, ['d', 'e'])
  await broker.reply(m2, { ids: ['t3', 't4'] })
  assert.deepEqual(await pending, ['t1', 't2', 't3', 't4'])
})

test('request: ids first, a wait that runs out is resumed with RESULT, then the result', async (t) => {
  const { broker, client } = await setup(t)
  const pending = client.request('llm', 'prompt', { timeoutMs: 60_000 })
  const call = await broker.next(CALL.REQUEST)
  assert.ok(call.meta.wait_s > 50 && call.meta.wait_s <= 60)
  assert.equal(typeof call.meta.key, 'string')
  await broker.reply(call, { ids: ['t9'] })
  await broker.reply(call, { id: 't9', state: 'inflight' }) // the broker's wait ran out
  const again = await broker.next(CALL.RESULT)
  assert.notEqual(again.meta.rid, call.meta.rid) // every message of a call has a rid of its own
  assert.equal(again.meta.id, 't9')
  assert.ok(again.meta.wait_s > 0)
  await broker.reply(again, { id: 't9', state: 'done' }, 'the answer')
  assert.equal((await pending).toString(), 'the answer')
})

test('request: a task that ends without a result rejects with its typed error', async (t) => {
  const { broker, client } = await setup(t)
  const pending = client.request('llm', 'prompt')
  const call = await broker.next(CALL.REQUEST)
  await broker.reply(call, { ids: ['t5'] })
  await broker.reply(call, { id: 't5', state: 'dead', error: 'out of memory' })
  const err = await pending.catch((e) => e)
  assert.ok(err instanceof TaskDead)
  assert.equal(err.taskId, 't5')
  assert.equal(err.error, 'out of memory')
})

test('result: a result of several frames needs {frames: true}', async (t) => {
  const { broker, client } = await setup(t)
  const one = client.result('t1')
  const call = await broker.next(CALL.RESULT)
  await broker.reply(call, { id: 't1', state: 'done' }, 'a', 'b')
  await assert.rejects(one, ProtocolError)
  const all = client.result('t1', { frames: true })
  await broker.reply(await broker.next(CALL.RESULT), { id: 't1', state: 'done' }, 'a', 'b')
  assert.deepEqual((await all).map(String), ['a', 'b'])
})

test('ERROR answers become typed errors', async (t) => {
  const { broker, client } = await setup(t)
  const full = client.enqueue('svc', 'x')
  await broker.error(await broker.next(CALL.ENQUEUE), 'queue_full', 'svc holds 10 waiting tasks (cap 10)')
  const err = await full.catch((e) => e)
  assert.ok(err instanceof QueueFull && err instanceof BrokerError)
  assert.equal(err.code, 'queue_full')
  assert.equal(err.brokerMessage, 'svc holds 10 waiting tasks (cap 10)')
  const bad = client.redrive('svc', ['t1'])
  await broker.error(await broker.next(CALL.REDRIVE), 'bad_request', 'nope')
  await assert.rejects(bad, (e) => e instanceof BrokerError && e.code === 'bad_request')
})

test('redrive sends at most MAX_BATCH ids: a longer list is a RangeError and nothing goes out', async (t) => {
  const { broker, client } = await setup(t)
  const ids = Array.from({ length: MAX_BATCH + 1 }, (_, i) => `t${i}`)
  await assert.rejects(client.redrive('svc', ids), RangeError)
  // The next call on the socket is the first the broker sees: MAX_BATCH ids, all sent.
  const moved = client.redrive('svc', ids.slice(0, MAX_BATCH))
  const call = await broker.next(CALL.REDRIVE)
  assert.equal(call.meta.ids.length, MAX_BATCH)
  assert.equal(broker.inbox.length, 0)
  await broker.reply(call, { ids: ['t0'] })
  assert.deepEqual(await moved, ['t0'])
})

test('a call nobody answers times out; the error carries the task id when known', async (t) => {
  const { broker, client } = await setup(t)
  const err = await client.status('t1', { timeoutMs: 50 }).catch((e) => e)
  assert.ok(err instanceof TimeoutError)
  assert.equal(err.taskId, 't1')
  const req = client.request('svc', 'x', { timeoutMs: 100 })
  await broker.reply(await broker.next(CALL.REQUEST), { ids: ['t7'] })
  const reqErr = await req.catch((e) => e)
  assert.ok(reqErr instanceof TimeoutError)
  assert.equal(reqErr.taskId, 't7')
})

test('after the broker comes back on the same endpoint, waiting calls are resent; a resent cancel that conflicts checks the state', async (t) => {
  const first = await new FakeZbcBroker().bind()
  const endpoint = first.endpoint
  const client = new Client(endpoint)
  let second = null
  t.after(() => {
    client.close()
    first.close()
    second?.close()
  })
  const enqueued = client.enqueue('svc', 'x', { key: 'k1' })
  const waiting = client.request('svc', 'y')
  const cancelled = client.cancel('t3')
  const e1 = await first.next(CALL.ENQUEUE)
  const r1 = await first.next(CALL.REQUEST)
  await first.next(CALL.CANCEL)
  await first.reply(r1, { ids: ['t2'] })
  await sleep(20)
  first.close() // the broker goes away without answering the rest

  second = await new FakeZbcBroker().bind(endpoint)
  const e2 = await second.next(CALL.ENQUEUE)
  assert.notEqual(e2.meta.rid, e1.meta.rid) // a new rid: an answer to the first send is told apart
  assert.equal(e2.meta.key, 'k1') // same key: the broker cannot store it twice
  await second.reply(e2, { ids: ['t1'], existing: [0] })
  assert.equal(await enqueued, 't1')

  const r2 = await second.next(CALL.RESULT) // resumed by task id, not a second REQUEST
  assert.equal(r2.meta.id, 't2')
  await second.reply(r2, { id: 't2', state: 'done' }, 'ok')
  assert.equal((await waiting).toString(), 'ok')

  const c2 = await second.next(CALL.CANCEL)
  await second.error(c2, 'conflict', 'task t3 already cancelled')
  const s2 = await second.next(CALL.STATUS)
  await second.reply(s2, { task: { id: 't3', state: 'cancelled' } })
  assert.deepEqual(await cancelled, { id: 't3', state: 'cancelled', was: null })
  assert.equal(client.stats.resends >= 3, true)
})

test('maxPending bounds the calls in flight', async (t) => {
  const { client } = await setup(t, { maxPending: 2 })
  const a = client.status('a', { timeoutMs: 100 }).catch((e) => e)
  const b = client.status('b', { timeoutMs: 100 }).catch((e) => e)
  await assert.rejects(client.status('c'), /too many calls in flight/)
  assert.ok((await a) instanceof TimeoutError)
  assert.ok((await b) instanceof TimeoutError)
})

// ------------------------------------------------------------ receipts: did a key match a stored task?

test('enqueue receipt: a caller key listed in existing is existing: true, not listed is false', async (t) => {
  const { broker, client } = await setup(t)
  const matched = client.enqueue('svc', 'x', { key: 'file-abc', receipt: true })
  const fresh = client.enqueue('svc', 'y', { key: 'file-def', receipt: true })
  const c1 = await broker.next(CALL.ENQUEUE)
  const c2 = await broker.next(CALL.ENQUEUE)
  assert.equal(c1.meta.key, 'file-abc')
  assert.equal(c1.meta.receipt, undefined) // a client-side option: not sent
  await broker.reply(c1, { ids: ['t-old'], existing: [0] })
  await broker.reply(c2, { ids: ['t-new'] })
  assert.deepEqual(await matched, { id: 't-old', existing: true })
  assert.deepEqual(await fresh, { id: 't-new', existing: false })
  const empty = client.enqueue('svc', 'z', { key: 'file-ghi', receipt: true })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t3'], existing: [] })
  assert.deepEqual(await empty, { id: 't3', existing: false })
})

test('enqueue receipt: a generated key the broker matched (a resend after a lost answer) is not existing; a caller key is', async (t) => {
  const first = await new FakeZbcBroker().bind()
  const endpoint = first.endpoint
  const client = new Client(endpoint)
  let second = null
  t.after(() => {
    client.close()
    first.close()
    second?.close()
  })
  const generated = client.enqueue('svc', 'x', { receipt: true })
  const given = client.enqueue('svc', 'y', { key: 'mine', receipt: true })
  const g1 = await first.next(CALL.ENQUEUE)
  const k1 = await first.next(CALL.ENQUEUE)
  await sleep(20)
  first.close() // stored, but the answers are lost with the broker

  second = await new FakeZbcBroker().bind(endpoint)
  const g2 = await second.next(CALL.ENQUEUE)
  const k2 = await second.next(CALL.ENQUEUE)
  assert.equal(g2.meta.key, g1.meta.key) // the resend: same generated key
  assert.equal(k2.meta.key, k1.meta.key)
  await second.reply(g2, { ids: ['t1'], existing: [0] })
  await second.reply(k2, { ids: ['t2'], existing: [0] })
  assert.deepEqual(await generated, { id: 't1', existing: false })
  // A caller's key is reported, though here the match may be the call's own first send.
  assert.deepEqual(await given, { id: 't2', existing: true })
  assert.ok(client.stats.resends >= 2)
})

test('enqueueMany receipt: existing indexes of each message map back to the tasks of its chunk', async (t) => {
  const { broker, client } = await setup(t, { maxFrames: 8 }) // 3 payload frames per message
  const pending = client.enqueueMany('svc', ['a', 'b', 'c', 'd', 'e'], { keys: [null, 'k1', null, 'k3', null], receipt: true })
  const m1 = await broker.next(CALL.ENQUEUE)
  assert.deepEqual(m1.meta.counts, [1, 1, 1])
  await broker.reply(m1, { ids: ['t0', 't1', 't2'], existing: [0] }) // index 0: a generated key
  const m2 = await broker.next(CALL.ENQUEUE)
  assert.deepEqual(m2.meta.counts, [1, 1])
  assert.equal(m2.meta.keys[0], 'k3')
  await broker.reply(m2, { ids: ['t3', 't4'], existing: [0] }) // the 4th task of the batch
  assert.deepEqual(await pending, [
    { id: 't0', existing: false },
    { id: 't1', existing: false }, // a caller's key, not listed in its own message
    { id: 't2', existing: false },
    { id: 't3', existing: true },
    { id: 't4', existing: false }
  ])
})

test('enqueueMany receipt: a refused later message keeps enqueuedIds as ids and adds enqueuedReceipts', async (t) => {
  const { broker, client } = await setup(t, { maxFrames: 7 }) // 2 payload frames per message
  const withReceipt = client.enqueueMany('svc', ['a', 'b', 'c'], { keys: ['ka', 'kb', 'kc'], receipt: true })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1', 't2'], existing: [1] })
  await broker.error(await broker.next(CALL.ENQUEUE), 'queue_full', 'full')
  const err = await withReceipt.catch((e) => e)
  assert.ok(err instanceof QueueFull)
  assert.deepEqual(err.enqueuedIds, ['t1', 't2'])
  assert.deepEqual(err.enqueuedReceipts, [{ id: 't1', existing: false }, { id: 't2', existing: true }])

  const plain = client.enqueueMany('svc', ['a', 'b', 'c'])
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1', 't2'] })
  await broker.error(await broker.next(CALL.ENQUEUE), 'queue_full', 'full')
  const plainErr = await plain.catch((e) => e)
  assert.deepEqual(plainErr.enqueuedIds, ['t1', 't2'])
  assert.equal('enqueuedReceipts' in plainErr, false)
})

test('a malformed existing rejects with bad_reply, with or without receipt', async (t) => {
  const { broker, client } = await setup(t, { maxFrames: 7 }) // 2 payload frames per message
  const bad = ['0', { 0: 0 }, true, [1], [-1], [0, 0], [0.5], ['0'], [null], [true]]
  for (const receipt of [true, false]) {
    for (const existing of bad) {
      const what = `enqueue, receipt ${receipt}, existing ${JSON.stringify(existing)}`
      const one = client.enqueue('svc', 'x', { key: 'k', receipt })
      await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1'], existing })
      await assert.rejects(one, (e) => e instanceof ProtocolError && e.code === 'bad_reply', what)
    }
    for (const existing of [[2], [1, 1], [0, 1, 0]]) {
      const what = `enqueueMany, receipt ${receipt}, existing ${JSON.stringify(existing)}`
      const many = client.enqueueMany('svc', ['a', 'b'], { keys: ['ka', 'kb'], receipt })
      await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1', 't2'], existing })
      await assert.rejects(many, (e) => e instanceof ProtocolError && e.code === 'bad_reply', what)
    }
    // In a later message: the index is checked against that message's chunk (2 tasks), not the batch (3).
    const split = client.enqueueMany('svc', ['a', 'b', 'c'], { receipt })
    await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1', 't2'] })
    await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t3'], existing: [1] })
    const err = await split.catch((e) => e)
    assert.ok(err instanceof ProtocolError && err.code === 'bad_reply', `split, receipt ${receipt}`)
    assert.deepEqual(err.enqueuedIds, ['t1', 't2']) // the first message's tasks are stored
  }
})

test('without receipt, enqueue and enqueueMany resolve with id strings, existing or not', async (t) => {
  const { broker, client } = await setup(t, { maxFrames: 7 }) // 2 payload frames per message
  const one = client.enqueue('svc', 'x', { key: 'k' })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1'], existing: [0] })
  assert.equal(await one, 't1')
  const off = client.enqueue('svc', 'x', { key: 'k', receipt: false })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1'], existing: [0] })
  assert.equal(await off, 't1')
  const many = client.enqueueMany('svc', ['a', 'b', 'c'], { keys: ['ka', null, 'kc'] })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1', 't2'], existing: [0] })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t3'], existing: [0] })
  assert.deepEqual(await many, ['t1', 't2', 't3'])
})

test('enqueueMany of one payload sends keys and counts (with or without receipt); receipt must be a boolean', async (t) => {
  const { broker, client } = await setup(t)
  const plain = client.enqueueMany('svc', ['only'])
  const m1 = await broker.next(CALL.ENQUEUE)
  assert.deepEqual(m1.meta.counts, [1])
  assert.equal(m1.meta.keys.length, 1)
  assert.match(m1.meta.keys[0], /^[0-9a-f-]{36}$/)
  assert.equal(m1.meta.key, undefined)
  await broker.reply(m1, { ids: ['t1'] })
  assert.deepEqual(await plain, ['t1'])
  const keyed = client.enqueueMany('svc', ['only'], { keys: ['k1'], receipt: true })
  const m2 = await broker.next(CALL.ENQUEUE)
  assert.deepEqual(m2.meta.keys, ['k1'])
  await broker.reply(m2, { ids: ['t0'], existing: [0] })
  assert.deepEqual(await keyed, [{ id: 't0', existing: true }])
  await assert.rejects(client.enqueueMany('svc', ['only'], { key: 'k' }), /keys/)
  await assert.rejects(client.enqueue('svc', 'x', { receipt: 'yes' }), TypeError)
  await assert.rejects(client.request('svc', 'x', { receipt: true }), /unknown option "receipt"/) // enqueue only
})

// ------------------------------------------------------------ duplicates: a call answered twice

// Calls made while the broker is away reach it twice once it is back: libzmq
// delivers what was queued meanwhile, and the client sends every waiting call
// again after the reconnect (it cannot know what the lost connection took).
// `makeCalls(client)` makes the calls; the broker that comes back is returned.
async function whileAway (t, makeCalls, options) {
  const first = await new FakeZbcBroker().bind()
  const endpoint = first.endpoint
  const client = new Client(endpoint, { timeoutMs: 10_000, ...options })
  let second = null
  t.after(() => {
    client.close()
    first.close()
    second?.close()
  })
  const warm = client.status('warm') // opens the connection
  await first.reply(await first.next(CALL.STATUS), { task: { id: 'warm' } })
  await warm
  first.close()
  await sleep(300) // the client has seen the connection go
  const calls = makeCalls(client)
  await sleep(50)
  second = await new FakeZbcBroker().bind(endpoint)
  return { client, broker: second, calls }
}

// Both copies of one call (the same idempotency key or task id), in the order they came.
async function bothCopies (broker, command, match = () => true) {
  const a = await broker.next(command, 5000, match)
  const b = await broker.next(command, 5000, match)
  return [a, b]
}

test('request made while the broker is away: the copy\'s acceptance is ignored once the task id is known', async (t) => {
  const { client, broker, calls: [pending] } = await whileAway(t, (c) => [c.request('svc', 'x')])
  const [a, b] = await bothCopies(broker, CALL.REQUEST)
  assert.equal(a.meta.key, b.meta.key) // the same task: the broker stores it once
  await broker.reply(a, { ids: ['t1'] })
  await broker.reply(b, { ids: ['t1'], existing: [0] }) // the key matched the first copy's task
  // Both waits run out: only the newest one's end leads to a RESULT.
  await broker.reply(a, { id: 't1', state: 'ready' })
  await broker.reply(b, { id: 't1', state: 'ready' })
  const poll = await broker.next(CALL.RESULT)
  assert.equal(poll.meta.id, 't1')
  await sleep(100)
  assert.equal(broker.inbox.length, 0, 'one RESULT, no more')
  await broker.reply(poll, { id: 't1', state: 'done' }, 'the result')
  assert.equal((await pending).toString(), 'the result')
  assert.ok(client.stats.resends >= 1)
  assert.equal(client.stats.lateAnswers, 2) // the copy's acceptance, the older wait's end
  assert.notEqual(a.meta.rid, b.meta.rid) // every message has a rid of its own
})

test('two answers to each call made while the broker was away, in any order: settled once, never misread', async (t) => {
  const { client, broker, calls } = await whileAway(t, (c) => [
    c.enqueue('svc', 'x', { key: 'ka', receipt: true }),
    c.enqueue('svc', 'y', { key: 'kb' }),
    c.result('t1'),
    c.status('t2'),
    c.cancel('t3'),
    c.deadLetters('svc'),
    c.redrive('svc')
  ])
  const byKey = (key) => (m) => m.meta.key === key
  // ENQUEUE: the older copy refused (the queue was full then), the newer one stored.
  const [ea1, ea2] = await bothCopies(broker, CALL.ENQUEUE, byKey('ka'))
  await broker.error(ea1, 'queue_full', 'full')
  await broker.reply(ea2, { ids: ['ta'] })
  // ENQUEUE: both stored it (the second found the first one's task by key).
  const [eb1, eb2] = await bothCopies(broker, CALL.ENQUEUE, byKey('kb'))
  await broker.reply(eb1, { ids: ['tb'] })
  await broker.reply(eb2, { ids: ['tb'], existing: [0] })
  // RESULT: the older wait ran out (not final), the newer one saw the end.
  const [r1, r2] = await bothCopies(broker, CALL.RESULT)
  await broker.reply(r1, { id: 't1', state: 'ready' })
  await broker.reply(r2, { id: 't1', state: 'done' }, 'one')
  // STATUS: the first answer is the call's.
  const [s1, s2] = await bothCopies(broker, CALL.STATUS)
  await broker.reply(s1, { task: { id: 't2', state: 'ready' } })
  await broker.reply(s2, { task: { id: 't2', state: 'inflight' } })
  // CANCEL: the newer copy's conflict comes first, the client checks with STATUS,
  // then the older copy's success arrives: that is the call's answer.
  const [c1, c2] = await bothCopies(broker, CALL.CANCEL)
  await broker.error(c2, 'conflict', 'task t3 already cancelled')
  const check = await broker.next(CALL.STATUS)
  await broker.reply(c1, { id: 't3', state: 'cancelled', was: 'inflight' })
  await broker.reply(check, { task: { id: 't3', state: 'cancelled' } })
  // DEAD: the older copy refused, the newer one answered.
  const [d1, d2] = await bothCopies(broker, CALL.DEAD)
  await broker.error(d1, 'unavailable', 'journal failure')
  await broker.reply(d2, { tasks: [], next: null })
  // REDRIVE: the first moved the task, the second found nothing left to move.
  const [x1, x2] = await bothCopies(broker, CALL.REDRIVE)
  await broker.reply(x1, { ids: ['t4'] })
  await broker.reply(x2, { ids: [] })

  const [a, b, result, status, cancelled, dead, redriven] = await Promise.all(calls)
  assert.deepEqual(a, { id: 'ta', existing: false })
  assert.equal(b, 'tb')
  assert.equal(result.toString(), 'one')
  assert.equal(status.state, 'ready')
  assert.deepEqual(cancelled, { id: 't3', state: 'cancelled', was: 'inflight' })
  assert.deepEqual(dead, { tasks: [], next: null })
  assert.deepEqual(redriven, ['t4'])
  await sleep(100)
  assert.deepEqual(broker.inbox.map((m) => m.command), [], 'nothing more was asked')
  assert.equal(client.stats.lateAnswers, 7)
})

// ------------------------------------------------------------ a decoder that takes any valid msgpack

test('a "__proto__" key in an answer (task headers) is an own property; nothing is polluted', async (t) => {
  const { broker, client } = await setup(t)
  const headers = JSON.parse('{"__proto__": {"polluted": true}, "reply_to": "a"}')
  const pending = client.status('t1', { timeoutMs: 2000 })
  await broker.reply(await broker.next(CALL.STATUS), { task: { id: 't1', state: 'ready', headers } })
  const status = await pending
  assert.ok(Object.hasOwn(status.headers, '__proto__'))
  assert.deepEqual(status.headers.__proto__, { polluted: true }) // eslint-disable-line no-proto
  assert.equal(Object.getPrototypeOf(status.headers), Object.prototype)
  assert.equal(status.headers.reply_to, 'a')
  assert.equal(client.stats.malformed, 0)
})

// ------------------------------------------------------------ a timed-out enqueue names its keys

test('TimeoutError of enqueue, request and enqueueMany carries the idempotency keys sent', async (t) => {
  const { broker, client } = await setup(t, { maxFrames: 7 }) // 2 payload frames per message
  const one = client.enqueue('svc', 'x', { timeoutMs: 100 })
  const sent = await broker.next(CALL.ENQUEUE)
  const err = await one.catch((e) => e)
  assert.ok(err instanceof TimeoutError)
  assert.equal(err.key, sent.meta.key) // generated, and named so a retry cannot duplicate
  assert.equal(err.keys, null)
  assert.ok(err.message.includes(sent.meta.key))

  const mine = client.enqueue('svc', 'x', { key: 'k1', timeoutMs: 50 })
  await broker.next(CALL.ENQUEUE)
  assert.equal((await mine.catch((e) => e)).key, 'k1')

  const req = client.request('svc', 'x', { timeoutMs: 100 })
  const reqSent = await broker.next(CALL.REQUEST)
  const reqErr = await req.catch((e) => e)
  assert.ok(reqErr instanceof TimeoutError)
  assert.equal(reqErr.taskId, null)
  assert.equal(reqErr.key, reqSent.meta.key)

  const many = client.enqueueMany('svc', ['a', 'b', 'c', 'd', 'e'], { keys: [null, 'kb', null, 'kd', null], timeoutMs: 200 })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t1', 't2'] })
  const unanswered = await broker.next(CALL.ENQUEUE)
  const manyErr = await many.catch((e) => e)
  assert.ok(manyErr instanceof TimeoutError)
  assert.deepEqual(manyErr.enqueuedIds, ['t1', 't2'])
  // The keys of every task not known to be stored: the unanswered message's, then the unsent ones'.
  assert.equal(manyErr.keys.length, 3)
  assert.deepEqual(manyErr.keys.slice(0, 2), unanswered.meta.keys)
  assert.equal(manyErr.keys[1], 'kd')
  assert.equal(manyErr.key, null)
})

// ------------------------------------------------------------ message size: refused before it is sent

test('an enqueue or request over maxMessageBytes is refused with too_large and never sent', async (t) => {
  const cap = 4096
  const { broker, client } = await setup(t, { maxMessageBytes: cap })
  for (const call of [
    () => client.enqueue('svc', Buffer.alloc(cap)),
    () => client.request('svc', ['a', Buffer.alloc(cap)]),
    () => client.enqueue('svc', 'x', { headers: { blob: 'y'.repeat(cap) } }),
    () => client.enqueueMany('svc', ['a', Buffer.alloc(cap), 'b']) // one payload too large: nothing sent
  ]) {
    const err = await call().catch((e) => e)
    assert.ok(err instanceof BrokerError, String(err))
    assert.equal(err.code, 'too_large')
    assert.match(err.message, /maxMessageBytes/)
  }
  await sleep(100)
  assert.deepEqual(broker.inbox, [])
  assert.equal(client.stats.calls, 0)

  // The largest payload that fits is sent, and its message is within the cap as the broker counts it.
  const meta = pack({ key: 'k', service: 'svc', rid: Number.MAX_SAFE_INTEGER })
  const largest = cap - (5 + 5 + 1 + meta.length)
  const fits = client.enqueue('svc', Buffer.alloc(largest), { key: 'k' })
  const m = await broker.next(CALL.ENQUEUE)
  assert.ok(m.bytes <= cap)
  await broker.reply(m, { ids: ['t1'] })
  assert.equal(await fits, 't1')
  await assert.rejects(client.enqueue('svc', Buffer.alloc(largest + 1), { key: 'k' }), (e) => e.code === 'too_large')
})

test('enqueueMany counts keys and headers: every message within maxMessageBytes, none far below', async (t) => {
  const cap = 256 * 1024
  const { broker, client } = await setup(t, { maxMessageBytes: cap })
  const check = async (pending, n) => {
    const ids = []
    const sizes = []
    while (ids.length < n) {
      const m = await broker.next(CALL.ENQUEUE)
      sizes.push(m.bytes)
      const chunk = m.meta.counts.map((_, i) => `t${ids.length + i}`)
      ids.push(...chunk)
      await broker.reply(m, { ids: chunk })
    }
    assert.deepEqual(await pending, ids)
    for (const [i, size] of sizes.entries()) {
      assert.ok(size <= cap, `message ${i}: ${size} bytes > ${cap}`)
      if (i < sizes.length - 1) assert.ok(size > cap - 1024, `message ${i}: ${size} bytes, far below the cap`)
    }
    return sizes
  }
  // Long keys: 200-byte keys with 100-byte payloads (the keys are two thirds of the meta frame).
  const n = 2000
  const keys = Array.from({ length: n }, (_, i) => `k${i}:` + 'x'.repeat(200))
  const sizes = await check(client.enqueueMany('svc', Array.from({ length: n }, () => Buffer.alloc(100)), { keys }), n)
  assert.ok(sizes.length >= 2)
  // Large headers (shared by every task, in every message): 100 KiB of them.
  await check(client.enqueueMany('svc', Array.from({ length: n }, () => Buffer.alloc(100)), { headers: { blob: 'y'.repeat(100 * 1024) } }), n)
  // Non-ASCII keys count in UTF-8 bytes.
  const wide = Array.from({ length: n }, (_, i) => `ключ-${i}-` + 'ж'.repeat(60))
  await check(client.enqueueMany('svc', Array.from({ length: n }, () => Buffer.alloc(50)), { keys: wide }), n)
})

test('placement options and debounceS go out in snake_case; a debounce receipt says replaced', async (t) => {
  const { broker, client } = await setup(t)
  const placed = client.enqueue('llm', 'p', { require: ['gpu', 'model:llama3'], prefer: ['de'], affinity: 'conv-7', concurrencyKey: 'user:42' })
  const call = await broker.next(CALL.ENQUEUE)
  assert.deepEqual({ ...call.meta, rid: 0, key: 'k' }, {
    rid: 0, key: 'k', service: 'llm', require: ['gpu', 'model:llama3'], prefer: ['de'], affinity: 'conv-7', concurrency_key: 'user:42'
  })
  await broker.reply(call, { ids: ['t1'] })
  assert.equal(await placed, 't1')
  // Empty tag lists and null keys are no rule: nothing is sent for them
  const plain = client.enqueueMany('llm', ['a', 'b'], { require: [], prefer: null, affinity: null, concurrencyKey: null })
  const many = await broker.next(CALL.ENQUEUE)
  assert.deepEqual(Object.keys(many.meta).sort(), ['counts', 'keys', 'rid', 'service'])
  await broker.reply(many, { ids: ['t2', 't3'] })
  await plain
  // debounceS (with its key): the broker names the waiting task, existing and replaced
  const first = client.enqueue('index', 'v1', { key: 'file:a', debounceS: 0.25, receipt: true })
  const c1 = await broker.next(CALL.ENQUEUE)
  assert.equal(c1.meta.debounce_s, 0.25)
  assert.equal(c1.meta.key, 'file:a')
  await broker.reply(c1, { ids: ['t4'] })
  assert.deepEqual(await first, { id: 't4', existing: false })
  const second = client.enqueue('index', 'v2', { key: 'file:a', debounceS: 0.25, receipt: true })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t4'], existing: [0], replaced: [0] })
  assert.deepEqual(await second, { id: 't4', existing: true, replaced: true })
  const bare = client.enqueue('index', 'v3', { key: 'file:a', debounceS: 0.25 })
  await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t4'], existing: [0], replaced: [0] })
  assert.equal(await bare, 't4')
  // A malformed `replaced` is a malformed answer
  for (const replaced of ['0', [1], [0, 0], [true]]) {
    const bad = client.enqueue('index', 'v', { key: 'file:a', debounceS: 1, receipt: true })
    await broker.reply(await broker.next(CALL.ENQUEUE), { ids: ['t4'], existing: [0], replaced })
    await assert.rejects(bad, (e) => e instanceof ProtocolError && e.code === 'bad_reply' && /'replaced'/.test(e.message), JSON.stringify(replaced))
  }
})

test('limit() and rate() send LIMIT and RATE and resolve with the answer', async (t) => {
  const { broker, client } = await setup(t)
  const limited = client.limit('gen', 2)
  const l1 = await broker.next(0x0e)
  assert.deepEqual({ ...l1.meta, rid: 0 }, { rid: 0, service: 'gen', limit: 2 })
  await broker.reply(l1, { service: 'gen', limit: 2, per_key: false })
  assert.deepEqual(await limited, { service: 'gen', limit: 2, perKey: false })
  const perKey = client.limit('gen', null, { perKey: true })
  const l2 = await broker.next(0x0e)
  assert.deepEqual({ ...l2.meta, rid: 0 }, { rid: 0, service: 'gen', limit: null, per_key: true })
  await broker.reply(l2, { service: 'gen', limit: null, per_key: true })
  assert.deepEqual(await perKey, { service: 'gen', limit: null, perKey: true })

  const rated = client.rate('gen', 2.5, { burst: 4, perKey: true })
  const r1 = await broker.next(0x19)
  assert.deepEqual({ ...r1.meta, rid: 0 }, { rid: 0, service: 'gen', rate: 2.5, burst: 4, per_key: true })
  await broker.reply(r1, { service: 'gen', rate: 2.5, burst: 4, per_key: true })
  assert.deepEqual(await rated, { service: 'gen', rate: 2.5, burst: 4, perKey: true })
  const removed = client.rate('gen', null)
  const r2 = await broker.next(0x19)
  assert.deepEqual({ ...r2.meta, rid: 0 }, { rid: 0, service: 'gen', rate: null })
  await broker.error(r2, 'forbidden', 'not an admin')
  await assert.rejects(removed, (e) => e instanceof BrokerError && e.code === 'forbidden')
  const odd = client.limit('gen', 1)
  await broker.reply(await broker.next(0x0e), { limit: 1 })
  await assert.rejects(odd, (e) => e instanceof ProtocolError && e.code === 'bad_reply')
})

test('status() of a broker that predates dependencies and placement: those fields as a task without them', async (t) => {
  const { broker, client } = await setup(t)
  const old = client.status('t1')
  await broker.reply(await broker.next(CALL.STATUS), { task: { id: 't1', service: 's', state: 'ready', not_before: 0, history: [] } })
  const status = await old
  assert.deepEqual(
    [status.dependsOn, status.blockedOn, status.runAnyway, status.input, status.require, status.prefer, status.affinity, status.concurrencyKey],
    [[], 0, false, null, [], [], null, null])
  const current = client.status('t2')
  await broker.reply(await broker.next(CALL.STATUS), {
    task: { id: 't2', service: 's', state: 'ready', require: ['gpu'], prefer: ['de'], affinity: 'a', concurrency_key: 'user:1', depends_on: [], blocked_on: 0, run_anyway: false, input: null }
  })
  const got = await current
  assert.deepEqual([got.require, got.prefer, got.affinity, got.concurrencyKey], [['gpu'], ['de'], 'a', 'user:1'])
})
