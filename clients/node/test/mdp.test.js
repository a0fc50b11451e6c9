// 7/MDP requests and 8/MMI through a real broker, served by Node workers.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { Client, ClosedError, ProtocolError, TimeoutError } from '../index.js'
import { startBroker } from '../testlib/broker.js'
import { workerStarter } from '../testlib/helpers.js'

let broker
let client
const workers = []

const startWorker = workerStarter(() => broker.endpoint, workers)

before(async () => {
  broker = await startBroker()
  client = new Client(broker.endpoint)
  await startWorker('echo', (task) => Buffer.from(task.payload.toString().toUpperCase()))
  await startWorker('split', (task) => task.frames.map((f) => `<${f}>`))
})

after(async () => {
  client?.close()
  await Promise.all(workers.map((w) => w.stop({ timeoutMs: 1000 })))
  await broker?.dispose()
})

test('an MDP request is served by a Node worker', async () => {
  const reply = await client.mdpRequest('echo', 'hello')
  assert.ok(Buffer.isBuffer(reply))
  assert.equal(reply.toString(), 'HELLO')
})

test('many MDP requests in flight at once each get their own reply', async () => {
  const bodies = Array.from({ length: 20 }, (_, i) => `msg-${i}`)
  const replies = await Promise.all(bodies.map((b) => client.mdpRequest('echo', b)))
  assert.deepEqual(replies.map(String), bodies.map((b) => b.toUpperCase()))
})

test('multi-frame bodies and replies', async () => {
  const frames = await client.mdpRequestFrames('split', ['a', Buffer.from('b'), new Uint8Array([99])])
  assert.deepEqual(frames.map(String), ['<a>', '<b>', '<c>'])
  await assert.rejects(client.mdpRequest('split', ['a', 'b']), ProtocolError)
})

test('8/MMI: mmi.service says whether a worker is registered now', async () => {
  assert.equal(await client.mmiService('echo'), true)
  assert.equal(await client.mmiService('nobody-serves-this'), false)
})

test('a request nobody serves times out after its retries; an aborted one rejects with the reason', async () => {
  const err = await client.mdpRequest('nobody-serves-this', 'x', { timeoutMs: 150, retries: 1 }).catch((e) => e)
  assert.ok(err instanceof TimeoutError)
  assert.match(err.message, /after 2 attempts/)
  assert.equal(client.stats.mdpResends >= 1, true)

  const controller = new AbortController()
  const pending = client.mdpRequest('nobody-serves-this', 'x', { signal: controller.signal })
  controller.abort(new Error('user gave up'))
  await assert.rejects(pending, /user gave up/)
})

test('close() rejects requests in flight with ClosedError, and later calls too', async () => {
  const other = new Client(broker.endpoint)
  const pending = other.mdpRequest('nobody-serves-this', 'x', { timeoutMs: 10_000 })
  other.close()
  await assert.rejects(pending, ClosedError)
  await assert.rejects(other.mdpRequest('echo', 'x'), ClosedError)
  await assert.rejects(other.enqueue('echo', 'x'), ClosedError)
  other.close() // twice is fine
})

test('arguments are checked before anything is sent', async () => {
  await assert.rejects(client.mdpRequest('', 'x'), TypeError)
  await assert.rejects(client.mdpRequest('echo', 42), /body must be a Buffer/)
  assert.throws(() => new Client('localhost:5555'), /endpoint/)
  assert.throws(() => new Client({ timeoutMs: -1 }), RangeError)
})
