// The Worker across a broker restart, against a scripted broker that sees the
// exact READY: it offers only the handler slots really free, and the broker's
// STOPPING notice disturbs nothing in flight. A restarted broker does not know
// the worker and answers it with DISCONNECT: that is what the fake broker sends.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Worker } from '../index.js'
import { CMD, FakeBroker } from '../testlib/fake-broker.js'
import { waitUntil } from '../testlib/broker.js'
import { deferred } from '../testlib/helpers.js'

// A handler that holds 'block' tasks until `gate` resolves, whatever their
// abort signal says (a handler that cannot be interrupted), and echoes the others.
function blocking (gate) {
  return async (task) => {
    if (task.payload.toString() === 'block') await gate.promise
    return task.payload
  }
}

async function setup (t, options) {
  const gate = deferred()
  const broker = await new FakeBroker().bind()
  const worker = new Worker({ endpoint: broker.endpoint, service: 'svc', heartbeatIntervalMs: 5000, reconnectDelayMs: 50, logger: null, handler: blocking(gate), ...options })
  t.after(async () => {
    gate.resolve()
    await worker.stop({ timeoutMs: 200 })
    broker.close()
  })
  const started = worker.start()
  const ready = await broker.command(CMD.READY)
  await broker.send(ready.identity, CMD.HEARTBEAT)
  await started
  await broker.send(ready.identity, CMD.TASK, { id: 't1', attempt: 1, service: 'svc' }, 'block')
  await broker.command(CMD.ACK)
  await waitUntil(() => worker.running === 1, { what: 'the blocking handler runs' })
  return { broker, worker, gate, identity: ready.identity }
}

test('after a restart the worker offers only its free handlers, and a new task runs beside the abandoned one', async (t) => {
  const { broker, worker, gate, identity } = await setup(t, { concurrency: 2 })
  assert.equal(worker.credit, 2)
  await broker.send(identity, CMD.DISCONNECT, { reason: 'unknown worker: send READY' })
  const again = await broker.command(CMD.READY)
  assert.notDeepEqual(again.identity, identity, 'a fresh socket')
  assert.deepEqual(again.meta, { service: 'svc', credit: 1, batch: true })
  assert.equal(worker.credit, 1)
  await broker.send(again.identity, CMD.HEARTBEAT)
  await broker.send(again.identity, CMD.TASK, { id: 't2', attempt: 1, service: 'svc' }, 'fresh')
  const [done] = await broker.results(1)
  assert.deepEqual([done.id, done.attempt, done.frames], ['t2', 1, ['fresh']])
  gate.resolve()
  await waitUntil(() => worker.stats.staleResultsDropped === 1, { what: 'the abandoned result dropped' })
  assert.equal(worker.running, 0)
})

test('with every handler busy on an abandoned attempt, READY waits until one returns', async (t) => {
  const { broker, worker, gate, identity } = await setup(t, { concurrency: 1 })
  await broker.send(identity, CMD.DISCONNECT, { reason: 'unknown worker: send READY' })
  await assert.rejects(broker.command(CMD.READY, { timeoutMs: 500 }), /no matching message/)
  gate.resolve()
  const again = await broker.command(CMD.READY)
  assert.equal(again.meta.credit, 1)
  await waitUntil(() => worker.stats.staleResultsDropped === 1, { what: 'the abandoned result dropped' })
})

test('STOPPING is counted, and the result in flight still goes out on the same connection', async (t) => {
  const { broker, worker, gate, identity } = await setup(t, { concurrency: 2 })
  await broker.send(identity, CMD.STOPPING, { drain_s: 10.0 })
  await waitUntil(() => worker.stats.brokerStopping === 1, { what: 'STOPPING heard' })
  gate.resolve()
  const [done] = await broker.results(1)
  assert.deepEqual([done.id, done.attempt, done.frames], ['t1', 1, ['block']])
  assert.equal(worker.stats.malformed, 0)
  assert.equal(worker.stats.reconnects, 0)
})
