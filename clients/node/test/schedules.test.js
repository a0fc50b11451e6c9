// Recurring tasks (docs/protocol.md §17) against a real broker: schedule(),
// schedules() and unschedule(), and a Node worker running the firings.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { BrokerError, Client } from '../index.js'
import { startBroker, waitUntil } from '../testlib/broker.js'
import { workerStarter } from '../testlib/helpers.js'

let broker
let client
const workers = []

const startWorker = workerStarter(() => broker.endpoint, workers)

before(async () => {
  broker = await startBroker()
  client = new Client(broker.endpoint, { timeoutMs: 10_000 })
})

after(async () => {
  client?.close()
  await Promise.all(workers.map((w) => w.stop({ timeoutMs: 1000 })))
  await broker?.dispose()
})

test('schedule(): fires every second to a worker, each firing keyed by its instant', async () => {
  const runs = []
  await startWorker('beat', async (task) => {
    runs.push({ id: task.id, payload: task.payload.toString(), headers: task.headers })
    return 'ok'
  })
  const added = await client.schedule('pulse', 'beat', 'tick', { everyS: 1, headers: { from: 'node' } })
  assert.equal(added.name, 'pulse')
  assert.equal(added.everyS, 1)
  assert.equal(added.cron, null)
  assert.equal(added.fired, 0)
  assert.ok(added.nextAt instanceof Date)
  await waitUntil(() => runs.length >= 2, { timeoutMs: 10_000 })
  assert.deepEqual(runs[0].payload, 'tick')
  assert.deepEqual(runs[0].headers, { from: 'node' })
  const status = await client.status(runs[0].id)
  assert.match(status.key, /^schedule:pulse:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/)
  const [listed] = await client.schedules()
  assert.ok(listed.fired >= 2)
  assert.ok(listed.lastAt instanceof Date)
  assert.equal(listed.nextAt.getTime() - listed.lastAt.getTime(), 1000)
  assert.equal(await client.unschedule('pulse'), true)
  assert.equal(await client.unschedule('pulse'), false)
  assert.deepEqual(await client.schedules(), [])
})

test('schedule(): a cron rule in a time zone, replaced by name', async () => {
  const first = await client.schedule('report', 'reports', undefined, { cron: '0 6 * * mon-fri', tz: 'Europe/Paris', priority: 4 })
  assert.deepEqual([first.cron, first.tz, first.everyS, first.priority], ['0 6 * * mon-fri', 'Europe/Paris', null, 4])
  assert.ok([4, 5].includes(first.nextAt.getUTCHours()))
  const same = await client.schedule('report', 'reports', undefined, { cron: '0 6 * * mon-fri', tz: 'Europe/Paris', priority: 4 })
  assert.deepEqual(same, first) // the same definition again: unchanged
  const other = await client.schedule('report', 'reports', Buffer.from('{}'), { everyS: 3600 })
  assert.deepEqual([other.everyS, other.cron, other.payloadBytes], [3600, null, 2])
  assert.equal((await client.schedules()).length, 1)
  assert.equal(await client.unschedule('report'), true)
})

test('schedule(): a bad rule is refused, by the client or by the broker', async () => {
  await assert.rejects(client.schedule('x', 'svc', 'p', {}), /exactly one of everyS and cron/)
  await assert.rejects(client.schedule('x', 'svc', 'p', { everyS: 0.5 }), RangeError)
  await assert.rejects(client.schedule('x', 'svc', 'p', { everyS: 5, tz: 'UTC' }), /tz goes with cron/)
  await assert.rejects(client.schedule('x', 'svc', 'p', { every: 5 }), /unknown option "every"/)
  await assert.rejects(client.schedule('', 'svc', 'p', { everyS: 5 }), TypeError)
  await assert.rejects(
    client.schedule('x', 'svc', 'p', { cron: '61 * * * *' }),
    (err) => err instanceof BrokerError && err.code === 'bad_request' && /out of 0\.\.59/.test(err.message)
  )
  await assert.rejects(
    client.schedule('x', 'svc', 'p', { cron: '* * * * *', tz: 'Nowhere/City' }),
    (err) => err instanceof BrokerError && err.code === 'bad_request' && /time zone/.test(err.message)
  )
  assert.deepEqual(await client.schedules(), [])
})
