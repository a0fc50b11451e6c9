// The Client's side of ZBC01, message by message, against a scripted broker:
// rid matching, answers in any order, waits that run out and are resumed,
// resends after a reconnect, error mapping.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import * as zmq from 'zeromq'
import { BrokerError, Client, ProtocolError, QueueFull, TaskDead, TimeoutError } from '../index.js'
import { pack, unpack } from '../lib/protocol.js'
import { sleep } from '../testlib/broker.js'

const CALL = { ENQUEUE: 1, REQUEST: 2, RESULT: 3, STATUS: 4, CANCEL: 5, DEAD: 6, REDRIVE: 7 }
const REPLY = 0x10
const ERROR = 0x11

class FakeZbcBroker {
  constructor () {
    this.inbox = []
    this.waiters = new Set()
  }

  async bind (endpoint = 'tcp://127.0.0.1:*') {
    this.router = new zmq.Router({ linger: 0 })
    for (let i = 0; ; i++) {
      try {
        await this.router.bind(endpoint)
        break
      } catch (err) {
        if (i > 50) throw err
        await sleep(50) // the port of a just-closed socket may take a moment
      }
    }
    this.endpoint = this.router.lastEndpoint
    this.#loop(this.router).catch(() => {})
    return this
  }

  async #loop (router) {
    for await (const [identity, , header, command, meta, ...frames] of router) {
      this.inbox.push({ identity, header: header.toString(), command: command[0], meta: unpack(meta), frames: frames.map(String) })
      for (const wake of [...this.waiters]) wake()
    }
  }

  next (command, timeoutMs = 5000) {
    const take = () => {
      const i = this.inbox.findIndex((m) => m.command === command)
      return i < 0 ? undefined : this.inbox.splice(i, 1)[0]
    }
    const found = take()
    if (found) return Promise.resolve(found)
    return new Promise((resolve, reject) => {
      const wake = () => {
        const m = take()
        if (m) {
          this.waiters.delete(wake)
          clearTimeout(timer)
          resolve(m)
        }
      }
      const timer = setTimeout(() => {
        this.waiters.delete(wake)
        reject(new Error(`fake broker: no call ${command} within ${timeoutMs}ms`))
      }, timeoutMs)
      this.waiters.add(wake)
    })
  }

  reply (call, meta, ...frames) {
    return this.router.send([call.identity, '', 'ZBC01', Buffer.from([REPLY]), pack({ ...meta, rid: call.meta.rid }), ...frames])
  }

  error (call, code, message) {
    return this.router.send([call.identity, '', 'ZBC01', Buffer.from([ERROR]), pack({ rid: call.meta.rid, code, message })])
  }

  close () { this.router.close() }
}

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
  assert.equal(again.meta.rid, call.meta.rid)
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
  assert.equal(e2.meta.rid, e1.meta.rid)
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
