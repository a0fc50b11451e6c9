// The Client against a real broker with a small --max-message-bytes (1 MiB):
// messages over the cap are refused before they are sent, and enqueueMany
// splits batches by their real size, meta frame included.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { BrokerError, Client, Worker } from '../index.js'
import { pack } from '../lib/protocol.js'
import { startBroker } from '../testlib/broker.js'

const CAP = 1024 * 1024
let broker
let client
let worker

before(async () => {
  broker = await startBroker({ args: ['--durability', 'memory', '--max-message-bytes', String(CAP)] })
  client = new Client(broker.endpoint, { timeoutMs: 5000, maxMessageBytes: CAP })
  worker = new Worker({ endpoint: broker.endpoint, service: 'echo', handler: (task) => task.payload, heartbeatIntervalMs: 200, logger: null })
  await worker.start()
})

after(async () => {
  client?.close()
  await worker?.stop({ timeoutMs: 1000 })
  await broker?.dispose()
})

test('a message over maxMessageBytes is refused with too_large before it is sent; other calls are not disturbed', async () => {
  // A call in flight on the same client while the large ones are refused.
  const waiting = client.request('echo', 'still here', { timeoutMs: 5000 })
  const started = Date.now()
  // 5 MiB: more than four times the broker's cap, which would make its libzmq drop the connection.
  for (const [what, call] of [
    ['enqueue', () => client.enqueue('big', Buffer.alloc(5 * CAP))],
    ['request', () => client.request('big', Buffer.alloc(5 * CAP))],
    ['enqueue just over', () => client.enqueue('big', Buffer.alloc(CAP))],
    ['enqueueMany', () => client.enqueueMany('big', ['small', Buffer.alloc(2 * CAP)], { keys: ['small-one', null] })]
  ]) {
    const err = await call().catch((e) => e)
    assert.ok(err instanceof BrokerError, `${what}: ${err}`)
    assert.equal(err.code, 'too_large', what)
  }
  assert.ok(Date.now() - started < 1000, 'refused at once, not after a timeout')
  assert.equal((await waiting).toString(), 'still here')
  assert.equal(client.stats.resends, 0) // the connection never dropped
  // Nothing of the refused batch was stored, not even its small first task: its key is free.
  const small = await client.enqueue('big', 'small', { key: 'small-one', receipt: true })
  assert.equal(small.existing, false)
  await client.cancel(small.id)

  // The largest payload the client lets through is one the broker stores.
  const key = 'largest-payload'
  const largest = CAP - (5 + 5 + 1 + pack({ key, service: 'big', rid: Number.MAX_SAFE_INTEGER }).length)
  const id = await client.enqueue('big', Buffer.alloc(largest), { key })
  assert.equal((await client.status(id)).state, 'ready')
  await client.cancel(id)
})

test('enqueueMany fits long keys and large headers under the broker cap', async () => {
  const n = 2000
  const keys = Array.from({ length: n }, (_, i) => `k${i}:` + 'x'.repeat(200))
  const ids = await client.enqueueMany('batch', Array.from({ length: n }, () => Buffer.alloc(400)), { keys })
  assert.equal(ids.length, n)
  assert.equal(new Set(ids).size, n)
  assert.equal((await client.status(ids[n - 1])).key, keys[n - 1])

  const headers = { blob: 'y'.repeat(200 * 1024) }
  const more = await client.enqueueMany('batch2', Array.from({ length: n }, () => Buffer.alloc(400)), { headers })
  assert.equal(more.length, n)
  assert.equal((await client.status(more[n - 1])).headers.blob.length, 200 * 1024)
})
