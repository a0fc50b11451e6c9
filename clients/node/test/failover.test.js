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
import * as zmq from 'zeromq'
import { Client, Publisher, Subscriber, TimeoutError, Worker } from '../index.js'
import { connectSocket } from '../lib/sockets.js'
import { BrokerProcess, freePorts, waitUntil } from '../testlib/broker.js'

// These end a hung test; nothing asserts how long anything took.
const DEADLINE_MS = 60_000
// A worker that waited for silence would notice a lost broker only after
// FOLLOWER_SILENCE_MS (its liveness), or send its next heartbeat after
// FOLLOWER_HEARTBEAT_MS (answered by the new broker with DISCONNECT, which also
// makes it register again): a task done within this deadline after a takeover
// was served because the worker followed the takeover itself.
const FOLLOWER_HEARTBEAT_MS = 60_000
const FOLLOWER_LIVENESS = 2
const FOLLOWER_SILENCE_MS = FOLLOWER_HEARTBEAT_MS * FOLLOWER_LIVENESS
const TAKEOVER_DEADLINE_MS = 30_000
// Reconnects of a worker given two independent live brokers while watched for 3 s:
// a DISCONNECT or two make a few, a loop hundreds.
const MIXED_RECONNECTS_MAX = 10

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

// A worker of `endpoints` with a heartbeat too slow to notice a takeover within
// TAKEOVER_DEADLINE_MS; its info lines go to `said`.
function follower (endpoints, said) {
  const worker = new Worker({
    endpoint: endpoints,
    service: 'echo',
    handler: (task) => task.payload,
    heartbeatIntervalMs: FOLLOWER_HEARTBEAT_MS,
    liveness: FOLLOWER_LIVENESS,
    logger: { info: (line) => said.push(line) }
  })
  return keep(worker, () => worker.stop({ timeoutMs: 1000 }))
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

test('a worker registers with the broker that took over after a SIGKILL, without waiting for silence', async () => {
  // Given a worker of [A, B] served by A, whose silence detection would take minutes
  assert.ok(FOLLOWER_SILENCE_MS > 2 * TAKEOVER_DEADLINE_MS && FOLLOWER_HEARTBEAT_MS > TAKEOVER_DEADLINE_MS)
  const { a, b } = pair()
  await a.start()
  await assignPorts(b)
  const endpoints = [a.endpoint, b.endpoint]
  const said = []
  const worker = follower(endpoints, said)
  await worker.start()
  const client = keep(new Client(endpoints, { timeoutMs: TAKEOVER_DEADLINE_MS }), () => client.close())
  assert.equal((await client.request('echo', 'before', { timeoutMs: DEADLINE_MS })).toString(), 'before')

  // When A is killed and B takes over on its journal
  await a.kill()
  await b.start()

  // Then a task enqueued after the takeover is done by the same worker, registered with B
  const id = await client.enqueue('echo', 'after')
  assert.equal((await client.result(id, { timeoutMs: TAKEOVER_DEADLINE_MS })).toString(), 'after')
  assert.equal(worker.stats.reconnects, 1)
  assert.ok(said.some((line) => line.includes('registering again')), said.join('\n'))
})

test('a worker registers with the broker that took over from a frozen one', async () => {
  // Given a worker of [A, B] served by A, whose silence detection would take minutes.
  // B has a journal of its own: A, frozen, still holds the lock of its LMDB data
  // directory (a second broker on it refuses to start), as a frozen broker of a
  // PostgreSQL group still holds its lease until the lease runs out.
  const a = new BrokerProcess()
  const b = new BrokerProcess()
  closers.push(() => a.kill(), () => b.dispose(), () => a.dispose())
  await a.start()
  await assignPorts(b)
  const endpoints = [a.endpoint, b.endpoint]
  const said = []
  const worker = follower(endpoints, said)
  await worker.start()
  const client = keep(new Client(endpoints), () => client.close())
  assert.equal((await client.request('echo', 'before', { timeoutMs: DEADLINE_MS })).toString(), 'before')

  // When A freezes (SIGSTOP: its kernel still accepts TCP, it never answers) and B starts
  a.child.kill('SIGSTOP')
  try {
    await b.start()

    // Then the worker registers with B once the ZMTP heartbeats dropped its connection
    // to A, and serves a task the same client enqueues: its call, sent to A while A
    // was frozen (B's handshake came first), goes again to B once A's is found lost.
    // (Several calls: the DEALER deals them between A's connection and B's.)
    const ids = await Promise.all(['a1', 'a2', 'a3', 'a4', 'a5', 'a6'].map((p) => client.enqueue('echo', p, { timeoutMs: 60000 })))
    await waitUntil(() => worker.stats.reconnects > 0, { timeoutMs: TAKEOVER_DEADLINE_MS, what: 'the worker registering again' })
    for (const [i, id] of ids.entries()) {
      assert.equal((await client.result(id, { timeoutMs: TAKEOVER_DEADLINE_MS })).toString(), `a${i + 1}`)
    }
    assert.ok(client.stats.resends >= 1, 'no call went again to the broker that took over')
    assert.equal(worker.stats.reconnects, 1)
    assert.ok(said.some((line) => line.includes('registering again')), said.join('\n'))
  } finally {
    await a.kill() // SIGKILL ends a stopped process too
  }
})

test('two live brokers given to one worker do not make it register again in a loop', async () => {
  // Given two independent brokers, both up, slow to send heartbeats: the worker's
  // messages alternate between its connections, so every message after READY that
  // reaches the broker it did not register with is answered with DISCONNECT (a
  // reconnect of another kind, not watched here), and each of its answers to a
  // broker heartbeat is such a message
  const a = new BrokerProcess({ heartbeatInterval: 30 })
  const b = new BrokerProcess({ heartbeatInterval: 30 })
  closers.push(() => a.dispose(), () => b.dispose())
  await Promise.all([a.start(), b.start()])
  const said = []

  // When one worker connects to both
  const worker = follower([a.endpoint, b.endpoint], said)
  await worker.start()

  // Then no handshake makes it register again: a loop would do so at every new
  // connection's second handshake, at once, so its reconnects would run into the
  // hundreds while we watch (a loop's absence can only be watched over some time)
  const client = keep(new Client(b.endpoint), () => client.close())
  const watchUntil = Date.now() + 3000
  await waitUntil(async () => {
    await client.queues() // B stays up and answering throughout
    assert.ok(worker.stats.reconnects <= MIXED_RECONNECTS_MAX, said.join('\n'))
    return Date.now() > watchUntil
  }, { timeoutMs: DEADLINE_MS, stepMs: 100, what: 'three seconds of watching' })
  assert.ok(!said.some((line) => line.includes('registering again')), said.join('\n'))
})

// A socket of `endpoints` (lib/sockets.js) whose watch counts onTakeover calls.
function watched (endpoints) {
  const heard = { takeovers: 0 }
  const { sock, watch } = connectSocket(zmq.Dealer, endpoints, { watch: { onTakeover: () => heard.takeovers++ } })
  closers.push(() => sock.close())
  return { watch, heard }
}

async function boundRouter (endpoint) {
  const router = new zmq.Router({ linger: 0 })
  await router.bind(endpoint)
  closers.push(() => router.close())
  return router
}

test('the handshake watch says "took over" only after a lost connection and another handshake', async () => {
  // Given A up, B up later and C never: sockets of [A, B], of [A, C] and of A alone
  const [endpointA, endpointB, endpointC] = (await freePorts(3)).map((port) => `tcp://127.0.0.1:${port}`)
  let a = await boundRouter(endpointA)
  const toB = watched([endpointA, endpointB])
  const back = watched([endpointA, endpointC])
  const single = watched(endpointA)
  await waitUntil(() => [toB, back, single].every(({ watch }) => watch.handshakes === 1), { what: 'handshakes with A' })

  // When B binds too: two brokers up, nothing lost
  await boundRouter(endpointB)
  await waitUntil(() => toB.watch.handshakes === 2, { what: 'the handshake with B' })
  assert.equal(toB.watch.tookOver, false)
  assert.equal(toB.heard.takeovers, 0)

  // When A goes: [A, B] has B, the others nothing
  a.close()
  await waitUntil(() => [toB, back, single].every(({ watch }) => watch.disconnects === 1), { what: 'A lost' })
  assert.equal(toB.heard.takeovers, 1)
  assert.equal(back.heard.takeovers, 0)

  // When A comes back: [A, C] has it again
  a = await boundRouter(endpointA)
  await waitUntil(() => back.watch.handshakes === 2 && single.watch.handshakes === 2, { what: 'A back' })

  // Then each socket of two endpoints heard of one takeover; a socket of one never does
  assert.ok(toB.watch.tookOver && back.watch.tookOver)
  assert.deepEqual([toB.heard.takeovers, back.heard.takeovers], [1, 1])
  assert.equal(single.watch.tookOver, false)
  assert.equal(single.heard.takeovers, 0)
})
