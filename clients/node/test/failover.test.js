// Several brokers, one active: clients, workers, publishers and subscribers given
// every broker's endpoints follow the one that is active (README, "Several brokers").
//
// Without PostgreSQL a failover is two real broker processes on one data
// directory, one after the other on their own ports: A serves, is killed with
// SIGKILL under load, then B starts on the same journal.

import { after, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Client, Publisher, Subscriber, TimeoutError, Worker } from '../index.js'
import { BrokerProcess, freePorts, waitUntil } from '../testlib/broker.js'

// These end a hung test; nothing asserts how long anything took.
const DEADLINE_MS = 60_000

const closers = []
const dataDirs = []

after(async () => {
  for (const close of closers.reverse()) await close()
  for (const dir of dataDirs) rmSync(dir, { recursive: true, force: true })
})

function pair () {
  const dataDir = mkdtempSync(join(tmpdir(), 'zbroker-node-failover-'))
  dataDirs.push(dataDir)
  const args = ['--durability', 'sync', '--data-dir', dataDir]
  const a = new BrokerProcess({ args })
  const b = new BrokerProcess({ args })
  closers.push(() => a.dispose(), () => b.dispose())
  return { a, b }
}

// B's own ports, known before it starts (a standby binds nothing until it takes over).
async function assignPorts (broker) {
  const [router, eventsIn, eventsOut] = await freePorts(3)
  broker.endpoint = `tcp://127.0.0.1:${router}`
  broker.eventsIn = `tcp://127.0.0.1:${eventsIn}`
  broker.eventsOut = `tcp://127.0.0.1:${eventsOut}`
}

function keep (thing, close) {
  closers.push(close)
  return thing
}

async function eventSeen (sub, type, publish) {
  let seen = null
  const reading = (async () => {
    for await (const event of sub) {
      if (event.type === type) {
        seen = event
        return
      }
    }
  })()
  await waitUntil(() => {
    if (seen === null) publish?.()
    return seen !== null
  }, { timeoutMs: DEADLINE_MS, stepMs: 50, what: `event ${type}` })
  await reading
  return seen
}

test('a client, a worker, a subscriber and a publisher follow the active broker across a SIGKILL', async () => {
  const { a, b } = pair()
  await a.start()
  await assignPorts(b)
  const endpoints = [a.endpoint, b.endpoint]

  const runs = new Map() // payload -> task ids it ran under
  const worker = keep(new Worker({
    endpoint: endpoints,
    service: 'jobs',
    concurrency: 4,
    heartbeatIntervalMs: 200,
    logger: null,
    handler: (task) => {
      const payload = task.payload.toString()
      runs.set(payload, [...(runs.get(payload) ?? []), task.id])
      return `done:${payload}`
    }
  }), () => worker.stop({ timeoutMs: 1000 }))
  await worker.start()
  const sub = keep(new Subscriber(`${a.eventsOut},${b.eventsOut}`, { topics: ['test.'] }), () => sub.close())
  const pub = keep(new Publisher([a.eventsIn, b.eventsIn], { source: 'node-failover' }), () => pub.close())
  await eventSeen(sub, 'test.before', () => pub.publish('test.before'))

  // Enqueues in flight while A dies are sent again, with their keys, to B.
  const client = keep(new Client(endpoints, { timeoutMs: 30_000 }), () => client.close())
  const total = 120
  const confirmed = new Map()
  const producing = (async () => {
    for (let i = 0; i < total; i += 10) {
      const batch = []
      for (let j = i; j < i + 10; j++) {
        batch.push(client.enqueue('jobs', `n${j}`).then((id) => confirmed.set(`n${j}`, id)))
      }
      await Promise.all(batch)
    }
  })()
  await waitUntil(() => confirmed.size >= total / 3, { timeoutMs: DEADLINE_MS, what: 'a third confirmed' })
  const reconnectsBefore = worker.stats.reconnects
  await a.kill()
  await b.start() // same data directory, its own ports
  await producing

  // Every confirmed task runs and ends with its result, under the id its enqueue returned.
  assert.equal(confirmed.size, total)
  for (const [payload, id] of confirmed) {
    assert.equal((await client.result(id, { timeoutMs: DEADLINE_MS })).toString(), `done:${payload}`)
    assert.deepEqual(new Set(runs.get(payload)), new Set([id]), payload)
  }
  assert.ok(worker.stats.reconnects > reconnectsBefore, 'the worker registered again')
  const jobs = (await client.queues()).find((q) => q.service === 'jobs')
  assert.equal(jobs.done, total) // no resent enqueue stored a second task

  // The publisher reaches the subscriber through B's bus.
  const event = await eventSeen(sub, 'test.after', () => pub.publish('test.after'))
  assert.equal(event.source, 'node-failover')
})

test('a standby endpoint that never binds costs nothing', async () => {
  const { a } = pair()
  await a.start()
  const [standby] = await freePorts(1)
  const endpoints = `tcp://127.0.0.1:${standby},${a.endpoint}`
  const worker = keep(new Worker({ endpoint: endpoints, service: 'echo', handler: (task) => task.payload, heartbeatIntervalMs: 200, logger: null }), () => worker.stop({ timeoutMs: 1000 }))
  await worker.start()
  const client = keep(new Client(endpoints), () => client.close())
  assert.equal((await client.request('echo', 'hi', { timeoutMs: DEADLINE_MS })).toString(), 'hi')
  assert.equal((await client.mdpRequest('echo', 'mdp')).toString(), 'mdp')
  assert.equal(client.stats.resends, 0)
  assert.equal(worker.stats.reconnects, 0)
})

test('no broker answering is a clear error, and a bad list a TypeError', async () => {
  const ports = await freePorts(2)
  const endpoints = ports.map((p) => `tcp://127.0.0.1:${p}`)
  const client = keep(new Client(endpoints, { timeoutMs: 300, mdpTimeoutMs: 200, retries: 1 }), () => client.close())
  for (const call of [() => client.enqueue('jobs', 'x'), () => client.mdpRequest('echo', 'x')]) {
    await assert.rejects(call(), (err) => {
      assert.ok(err instanceof TimeoutError, err)
      assert.match(err.message, /no broker of the 2 endpoints/)
      for (const e of endpoints) assert.ok(err.message.includes(e), err.message)
      return true
    })
  }
  for (const bad of ['', ',', 'tcp://a:1,,tcp://b:2', 'tcp://a:1,localhost:2', ['tcp://a:1', 'tcp://a:1'], []]) {
    assert.throws(() => new Client(bad), TypeError, JSON.stringify(bad))
    assert.throws(() => new Subscriber(bad), TypeError, JSON.stringify(bad))
  }
})
