// Service: task queues, topic handlers, result events, heartbeats and clean
// stops, against a real broker; the signal test runs the service in a child
// Node process of its own, as a real service would run.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import {
  Client,
  ClosedError,
  NonRetryableError,
  Publisher,
  SERVICE_HEARTBEAT_PREFIX,
  Service,
  Subscriber,
  TaskDead
} from '../index.js'
import { unpack } from '../lib/protocol.js'
import { startBroker, waitUntil } from '../testlib/broker.js'

const INDEX = pathToFileURL(resolve(dirname(fileURLToPath(import.meta.url)), '..', 'index.js')).href

let broker
let client
const services = []

function makeService (name, options = {}) {
  const svc = new Service(name, {
    endpoint: broker.endpoint,
    eventsIn: broker.eventsIn,
    eventsOut: broker.eventsOut,
    heartbeatMs: null,
    graceMs: 5000,
    logger: null,
    ...options
  })
  services.push(svc)
  return svc
}

async function started (svc) {
  assert.equal(await svc.start(), true)
  return svc
}

// Publish probes until the subscriber gets one (the pub/sub slow joiner), then drain the rest.
async function joinBus (publish, subscriber) {
  await waitUntil(async () => {
    await publish()
    return (await subscriber.recv({ timeoutMs: 50 })) !== null
  }, { what: 'subscription reaching the publisher' })
  while (await subscriber.recv({ timeoutMs: 100 }) !== null) {}
}

// The next event of topic `type`, skipping others.
async function nextEvent (subscriber, type, timeoutMs = 10_000) {
  let found = null
  await waitUntil(async () => {
    const event = await subscriber.recv({ timeoutMs: 50 })
    if (event !== null && event.type === type) found = event
    return found !== null
  }, { timeoutMs, what: `an event ${type}` })
  return found
}

before(async () => {
  broker = await startBroker({ args: ['--durability', 'memory'] })
  client = new Client(broker.endpoint, { timeoutMs: 10_000 })
})

after(async () => {
  client?.close()
  await Promise.all(services.map((s) => s.stop({ timeoutMs: 1000 })))
  await broker?.dispose()
})

// ------------------------------------------------------------ tasks

test('a task result is returned and published with the task id as correlationId', async (t) => {
  // Given a service serving "tts" that publishes its results on speech.done
  const svc = makeService('speaker')
  svc.task('tts', async (task) => ({ text: task.payload.toString().toUpperCase(), attempt: task.attempt }),
    { concurrency: 2, publish: 'speech.done' })
  await started(svc)
  const sub = new Subscriber(broker.eventsOut, { topics: ['speech.'] })
  t.after(() => sub.close())
  await joinBus(() => svc.publish('speech.probe'), sub)

  // When a client enqueues a task with a reply_to header
  const id = await client.enqueue('tts', 'hello', { headers: { reply_to: 'chat.reply' } })

  // Then the result is the handler's value packed with msgpack, and the same value is an event
  const result = await client.result(id)
  assert.deepEqual(unpack(result), { text: 'HELLO', attempt: 1 })
  const event = await nextEvent(sub, 'speech.done')
  assert.deepEqual(event.payload, { text: 'HELLO', attempt: 1 })
  assert.equal(event.correlationId, id)
  assert.equal(event.source, 'speaker')
  assert.equal(event.replyTo, 'chat.reply')
  assert.equal(svc.stats.tasksDone, 1)
  assert.equal(svc.stats.resultsPublished, 1)
  assert.equal(svc.workers.get('tts').concurrency, 2)
})

test("maxMessageBytes reaches the service's workers and is checked", async () => {
  assert.throws(() => new Service('x', { maxMessageBytes: 100 }), RangeError)
  // A worker held to 4096 bytes fails a 5000-byte result for good (the broker would take it)
  const svc = makeService('capped', { maxMessageBytes: 4096 })
  svc.task('capped', () => Buffer.alloc(5000))
  await started(svc)
  const id = await client.enqueue('capped', 'x')
  const err = await client.result(id).catch((e) => e)
  assert.ok(err instanceof TaskDead, String(err))
  assert.match(err.error, /too large/)
})

test('a Buffer result is the task result and the event payload as it is', async (t) => {
  const svc = makeService('buffers')
  svc.task('raw', (task) => Buffer.concat([Buffer.from('audio:'), task.payload]), { publish: 'raw.done' })
  await started(svc)
  const sub = new Subscriber(broker.eventsOut, { topics: ['raw.'] })
  t.after(() => sub.close())
  await joinBus(() => svc.publish('raw.probe'), sub)

  const result = await client.request('raw', 'hi')

  assert.equal(result.toString(), 'audio:hi')
  const event = await nextEvent(sub, 'raw.done')
  assert.equal(Buffer.from(event.payload).toString(), 'audio:hi')
  assert.equal(event.replyTo, undefined)
})

test('failing task handlers follow the worker semantics and publish nothing', async () => {
  // Given a handler that fails for good, and one whose result msgpack cannot pack
  const svc = makeService('parser')
  svc
    .task('parse', () => { throw new NonRetryableError('not JSON') }, { publish: 'parsed' })
    .task('odd', () => 10n, { publish: 'parsed' })
  await started(svc)

  // When tasks are requested from both, then both are dead letters at once
  const dead = await client.request('parse', 'garbage').catch((err) => err)
  const unpackable = await client.request('odd', 'x').catch((err) => err)
  assert.ok(dead instanceof TaskDead, String(dead))
  assert.equal(dead.error, 'NonRetryableError: not JSON')
  assert.ok(unpackable instanceof TaskDead, String(unpackable))
  assert.match(unpackable.error, /msgpack/)
  assert.equal((await client.status(dead.taskId)).attempt, 1)
  assert.equal(svc.stats.tasksFailed, 2)
  assert.equal(svc.stats.tasksDone, 0)
  assert.equal(svc.stats.resultsPublished, 0)
})

// ------------------------------------------------------------ events

test('an event handler gets the events of its prefix and can publish', async (t) => {
  // Given a service whose transcript. handler answers each event with transcript.seen
  const svc = makeService('indexer')
  const seen = []
  svc.on('transcript.final', async (event) => {
    seen.push(event)
    await svc.publish('transcript.seen', event.payload, { correlationId: event.correlationId })
  })
  await started(svc)
  assert.deepEqual(svc.topics, ['transcript.final'])
  const pub = new Publisher(broker.eventsIn, { source: 'stt' })
  const sub = new Subscriber(broker.eventsOut, { topics: ['transcript.seen'] })
  t.after(() => { pub.close(); sub.close() })

  // When transcript.final is published (again until the bus has joined up)
  await waitUntil(async () => {
    await pub.publish('transcript.final', { text: 'hallo' }, { correlationId: 'flow-1' })
    return (await sub.recv({ timeoutMs: 50 })) !== null
  }, { what: 'the handler answering' })

  // Then the handler got the event, and its own event reached the bus
  assert.equal(seen[0].type, 'transcript.final')
  assert.equal(seen[0].source, 'stt')
  assert.deepEqual(seen[0].payload, { text: 'hallo' })
  assert.equal(seen[0].correlationId, 'flow-1')
  await waitUntil(() => svc.stats.eventsHandled >= 1, { what: 'the call counted' })
  assert.equal(svc.stats.eventsFailed, 0)
})

test('an event handler that throws is counted and the service carries on', async (t) => {
  // Given a handler that throws on "boom", and a second one for the same prefix
  const svc = makeService('fragile')
  const handled = []
  const also = []
  svc
    .on('cmd.', (event) => {
      if (event.payload === 'boom') throw new Error('handler exploded')
      handled.push(event.payload)
    })
    .on('cmd.', async (event) => { also.push(event.payload) })
  await started(svc)
  const pub = new Publisher(broker.eventsIn, { source: 'test' })
  t.after(() => pub.close())

  // When "boom" is published (until it has been handled at least once)
  await waitUntil(async () => {
    await pub.publish('cmd.run', 'boom')
    return svc.stats.eventsFailed > 0
  }, { what: 'the failure' })

  // Then the service still handles the next event, with both handlers
  await waitUntil(async () => {
    await pub.publish('cmd.run', 'fine')
    return handled.includes('fine')
  }, { what: 'the next event' })
  await waitUntil(() => also.includes('fine'), { what: 'the second handler' })
  assert.ok(also.includes('boom'))
  await waitUntil(() => svc.stats.eventsHandled >= 3, { what: 'the calls counted' })
  assert.equal(svc.stopping, false)
})

// ------------------------------------------------------------ heartbeats

test('the service publishes its heartbeat', async (t) => {
  // Given a service with a heartbeat every 100 ms that has done one task
  const sub = new Subscriber(broker.eventsOut, { topics: [SERVICE_HEARTBEAT_PREFIX] })
  t.after(() => sub.close())
  const svc = makeService('beating', { heartbeatMs: 100 })
  svc.task('beat', () => Buffer.from('ok')).on('nothing.', () => {})
  await started(svc)
  assert.equal((await client.request('beat', '')).toString(), 'ok')

  // When heartbeats arrive, then one reports the done task and the service's shape
  let beat = null
  await waitUntil(async () => {
    const event = await sub.recv({ timeoutMs: 50 })
    if (event !== null && event.payload.tasks_done === 1) beat = event
    return beat !== null
  }, { what: 'a heartbeat after the task' })
  assert.equal(beat.type, 'service.heartbeat.beating')
  assert.equal(beat.source, 'beating')
  assert.equal(beat.payload.name, 'beating')
  assert.equal(beat.payload.pid, process.pid)
  assert.deepEqual(beat.payload.queues, ['beat'])
  assert.deepEqual(beat.payload.topics, ['nothing.'])
  assert.equal(beat.payload.tasks_failed, 0)
  assert.ok(beat.payload.uptime_s > 0)
  assert.ok(svc.stats.heartbeats >= 1)
})

// ------------------------------------------------------------ stopping

test('stop() and an AbortSignal end run() and close everything', async () => {
  for (const how of ['stop', 'signal']) {
    // Given a service running with run()
    const svc = makeService(`stopping-${how}`)
    svc.task(`stopping-${how}`, (task) => task.payload).on('nothing.', () => {})
    const controller = new AbortController()
    const running = svc.run({ signal: controller.signal, handleSignals: false })
    assert.equal(await svc.waitReady({ timeoutMs: 10_000 }), true)
    await waitUntil(() => client.mmiService(`stopping-${how}`), { what: 'the worker registered' })

    // When stop() is called, or the signal aborts
    if (how === 'stop') svc.stop()
    else controller.abort()

    // Then run() resolves after a clean stop, and the worker has left the broker
    assert.equal(await running, true)
    assert.equal(svc.stopped, true)
    await waitUntil(async () => !(await client.mmiService(`stopping-${how}`)), { what: 'the worker gone' })
    await assert.rejects(svc.publish('late'), ClosedError)
    await assert.rejects(async () => svc.run(), /runs only once/)
  }
})

const SERVICE_SCRIPT = `
import { existsSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Service } from ${JSON.stringify(INDEX)}

const [endpoint, eventsIn, eventsOut, dir] = process.argv.slice(2)
const svc = new Service('slow', { endpoint, eventsIn, eventsOut, heartbeatMs: 100, logger: console })
svc.task('slow', async (task) => {
  writeFileSync(join(dir, 'started-' + task.payload), '')
  while (!existsSync(join(dir, 'release'))) await new Promise((resolve) => setTimeout(resolve, 10))
  return { payload: task.payload.toString(), attempt: task.attempt }
}, { publish: 'slow.done' })
console.log('clean stop:', await svc.run())
`

test('SIGTERM lets the task in flight finish and the process exits 0', async (t) => {
  // Given a service process whose handler holds its task until released
  const dir = mkdtempSync(join(tmpdir(), 'zbroker-service-test-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const script = join(dir, 'slow-service.mjs')
  writeFileSync(script, SERVICE_SCRIPT)
  let output = ''
  const child = spawn(process.execPath, [script, broker.endpoint, broker.eventsIn, broker.eventsOut, dir], { stdio: ['ignore', 'pipe', 'pipe'] })
  child.stdout.on('data', (data) => { output += data })
  child.stderr.on('data', (data) => { output += data })
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal)))
  t.after(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL') })
  // And a subscriber for its result events, joined up through its heartbeats
  const sub = new Subscriber(broker.eventsOut, { topics: ['slow.done', `${SERVICE_HEARTBEAT_PREFIX}slow`] })
  t.after(() => sub.close())
  await nextEvent(sub, `${SERVICE_HEARTBEAT_PREFIX}slow`, 20_000)

  const first = await client.enqueue('slow', 'one')
  const second = await client.enqueue('slow', 'two')
  await waitUntil(() => existsSync(join(dir, 'started-one')), { timeoutMs: 20_000, what: 'the first task started' })

  // When the process gets SIGTERM while the first task runs
  child.kill('SIGTERM')
  await waitUntil(() => output.includes('service "slow" stopping'), { what: 'the service stopping' })
  writeFileSync(join(dir, 'release'), '')

  // Then the process exits 0, after a clean stop
  assert.equal(await exited, 0, output)
  assert.match(output, /clean stop: true/)
  // And the task in flight finished once, its result stored and published
  assert.deepEqual(unpack(await client.result(first, { timeoutMs: 5000 })), { payload: 'one', attempt: 1 })
  const status = await client.status(first)
  assert.equal(status.state, 'done')
  assert.equal(status.attempt, 1)
  const event = await nextEvent(sub, 'slow.done')
  assert.equal(event.correlationId, first)
  // And the queued task was never started: it waits for the next worker
  assert.equal(existsSync(join(dir, 'started-two')), false)
  assert.ok(!['done', 'dead', 'cancelled', 'expired'].includes((await client.status(second)).state))
})
