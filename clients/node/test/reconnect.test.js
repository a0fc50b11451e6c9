// Broker restarts (kill -9, then a new process on the same ports): workers
// re-register, durable calls resume by task id and never enqueue twice.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { Client, Worker } from '../index.js'
import { sleep, startBroker, waitUntil } from '../testlib/broker.js'

let broker
const closers = []

before(async () => {
  // async durability: a confirmed task survives the broker process being killed
  broker = await startBroker({ args: ['--durability', 'async'] })
})

after(async () => {
  for (const close of closers.reverse()) await close()
  await broker?.dispose()
})

function startWorker (service, handler) {
  const worker = new Worker({ endpoint: broker.endpoint, service, handler, heartbeatIntervalMs: 200, logger: null })
  closers.push(() => worker.stop({ timeoutMs: 1000 }))
  return worker
}

function newClient (options) {
  const client = new Client(broker.endpoint, options)
  closers.push(() => client.close())
  return client
}

test('a worker re-registers after the broker is killed and restarted', async () => {
  const worker = startWorker('echo', (task) => task.payload)
  await worker.start()
  const client = newClient()
  assert.equal((await client.mdpRequest('echo', 'before')).toString(), 'before')

  await broker.kill()
  await waitUntil(() => !worker.connected, { what: 'worker noticed the broker is gone' })
  await broker.start()
  await waitUntil(() => worker.connected, { what: 'worker registered with the new broker' })
  assert.equal(await client.mmiService('echo'), true)
  assert.equal((await client.mdpRequest('echo', 'after')).toString(), 'after')
  assert.equal(worker.stats.reconnects >= 1, true)
})

test('request() resumes by task id across a broker restart, and the task is enqueued once', async () => {
  const client = newClient({ timeoutMs: 20_000 })
  const pending = client.request('later', 'survive', { key: 'restart-1' })
  // The same key from another client names the same task: that is how we learn its id.
  const probe = newClient()
  const id = await probe.enqueue('later', 'survive', { key: 'restart-1' })
  assert.equal((await probe.status(id)).state, 'ready')

  await broker.kill()
  await broker.start()
  const worker = startWorker('later', (task) => `done: ${task.payload}`)
  await worker.start()

  assert.equal((await pending).toString(), 'done: survive')
  assert.equal(await probe.enqueue('later', 'survive', { key: 'restart-1' }), id)
  assert.equal(client.stats.resends >= 1, true)
  assert.equal(worker.stats.handled, 1)
})

test('an enqueue made while the broker is down is delivered once it is back', async () => {
  const client = newClient({ timeoutMs: 20_000 })
  assert.equal(typeof (await client.enqueue('offline', 'warm-up')), 'string')
  await broker.kill()
  const pending = client.enqueue('offline', 'queued while down')
  await broker.start()
  const id = await pending
  const worker = startWorker('offline', (task) => task.payload)
  await worker.start()
  assert.equal((await client.result(id)).toString(), 'queued while down')
  const { tasks } = await client.deadLetters('offline')
  assert.deepEqual(tasks, [])
})

test('a request() made while the broker is down resolves once it is back (its copy is answered too, harmlessly)', async () => {
  const client = newClient({ timeoutMs: 20_000 })
  assert.equal(typeof (await client.enqueue('down-req', 'warm-up')), 'string')
  await broker.kill()
  await sleep(300) // the client has seen the connection go
  const pending = client.request('down-req', 'asked while down')
  await broker.start()
  const worker = startWorker('down-req', (task) => `ok:${task.payload}`)
  await worker.start()
  assert.equal((await pending).toString(), 'ok:asked while down')
  assert.equal(worker.stats.handled, 2) // the warm-up and this one: the copy did not make a second task
  assert.equal(client.stats.malformed, 0)
})

test('an enqueue that timed out while the broker was down names its key: enqueueing again with it finds the stored task', async () => {
  const client = newClient({ timeoutMs: 20_000 })
  assert.equal(typeof (await client.enqueue('ghost', 'warm-up')), 'string')
  await broker.kill()
  const err = await client.enqueue('ghost', 'A', { timeoutMs: 300 }).catch((e) => e)
  assert.equal(err.name, 'TimeoutError')
  assert.equal(typeof err.key, 'string')
  const batchErr = await client.enqueueMany('ghost', ['B', 'C'], { timeoutMs: 300 }).catch((e) => e)
  assert.equal(batchErr.name, 'TimeoutError')
  assert.equal(batchErr.keys.length, 2)
  await broker.start()
  // libzmq still delivers the messages of the ended calls once the broker is back:
  // a retry with the keys finds those tasks instead of storing them twice.
  const again = await client.enqueue('ghost', 'A', { key: err.key, receipt: true })
  const batchAgain = await client.enqueueMany('ghost', ['B', 'C'], { keys: batchErr.keys, receipt: true })
  const status = await client.status(again.id)
  assert.equal(status.key, err.key)
  assert.deepEqual(batchAgain.map((r) => r.existing), [true, true])
  assert.equal(again.existing, true)
})
