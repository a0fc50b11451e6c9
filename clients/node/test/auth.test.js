// CURVE authentication against a real broker started with --auth: Credentials,
// refused handshakes (AuthenticationFailed at once, never a wait for a timeout)
// and refused calls (Forbidden), for Client, Worker, Publisher, Subscriber and
// Service. The principals are those of AUTH; 'stranger' has a key the broker
// does not know.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { inspect } from 'node:util'
import { join } from 'node:path'
import * as zmq from 'zeromq'
import {
  AuthenticationFailed,
  BrokerError,
  Client,
  Credentials,
  Forbidden,
  Publisher,
  Service,
  Subscriber,
  Worker,
  ZbrokerError
} from '../index.js'
import { unpack } from '../lib/protocol.js'
import { startBroker, waitUntil } from '../testlib/broker.js'

const AUTH = {
  principals: [
    { name: 'app', roles: ['client'], services: ['echo', 'svc.*'] },
    { name: 'echo-worker', roles: ['worker'], services: ['echo'] },
    { name: 'watcher', roles: ['publisher'], topics: ['fs.'] },
    { name: 'listener', roles: ['subscriber'], topics: ['fs.', 'task.'] },
    { name: 'ops', roles: ['admin'] },
    { name: 'svc', roles: ['worker', 'publisher', 'subscriber'], services: ['svc.*'], topics: ['svc.', 'service.'] }
  ],
  strangers: ['stranger']
}
// A refusal is reported within this (a handshake, or two for a wrong server key),
// far under every call's timeout in this file (30 s).
const PROMPT_MS = 5000
const TIMEOUT_MS = 30_000

let broker
const closers = [] // undo everything a test opened, even when it failed

before(async () => { broker = await startBroker({ auth: AUTH }) })
after(async () => {
  for (const close of closers.reverse()) await close()
  await broker?.dispose()
})

function keys (name) { return broker.credentials(name) }

function client (credentials, options = {}) {
  const c = new Client(broker.endpoint, { timeoutMs: TIMEOUT_MS, credentials, ...options })
  closers.push(() => c.close())
  return c
}

function worker (service, credentials, handler = (task) => task.payload) {
  const w = new Worker({ endpoint: broker.endpoint, service, handler, credentials, heartbeatIntervalMs: 200, logger: null })
  closers.push(() => w.stop({ timeoutMs: 1000 }))
  return w
}

function publisher (credentials) {
  const p = new Publisher(broker.eventsIn, { source: 'test', credentials })
  closers.push(() => p.close())
  return p
}

function subscriber (topics, credentials) {
  const s = new Subscriber(broker.eventsOut, { topics, credentials })
  closers.push(() => s.close())
  return s
}

/** `promise` rejects with an AuthenticationFailed for `endpoint`, well before any timeout. */
async function refusedAtOnce (promise, endpoint, reason) {
  const started = performance.now()
  const err = await promise.then(() => assert.fail('expected AuthenticationFailed'), (e) => e)
  const elapsedMs = performance.now() - started
  assert.ok(err instanceof AuthenticationFailed, `expected AuthenticationFailed, got ${inspect(err)}`)
  assert.ok(err instanceof ZbrokerError)
  assert.equal(err.endpoint, endpoint)
  assert.match(err.reason, reason)
  assert.ok(err.message.includes(endpoint) && err.message.includes(err.reason))
  assert.ok(elapsedMs < PROMPT_MS, `refused after ${Math.round(elapsedMs)}ms`)
  return err
}

// Publish on `topic` until `sub` receives it: the subscription is then in place
// end to end (the slow joiner), and the probes are drained.
async function joined (pub, sub, topic) {
  for (let i = 0; i < 200; i++) {
    await pub.publish(topic, 'probe')
    if (await sub.recv({ timeoutMs: 50 }) !== null) {
      while (await sub.recv({ timeoutMs: 20 }) !== null) {}
      return
    }
  }
  throw new Error(`no probe on ${topic} came through`)
}

// ------------------------------------------------------------ Credentials

test('Credentials.load reads the files `zbroker keys new` writes, or the server key as Z85 text', () => {
  const creds = keys('app')
  const serverZ85 = keys('ops').serverKey
  assert.match(creds.serverKey, /^.{40}$/)
  assert.match(creds.publicKey, /^.{40}$/)
  assert.notEqual(creds.publicKey, creds.serverKey)

  const fromText = Credentials.load(serverZ85, join(broker.keysDir, 'app.key_secret'))
  assert.equal(fromText.serverKey, creds.serverKey)
  assert.equal(fromText.publicKey, creds.publicKey)

  // The secret key shows nowhere: not in JSON, not in inspect().
  const secret = /secret-key = "(.{40})"/.exec(readFileSync(join(broker.keysDir, 'app.key_secret'), 'utf8'))[1]
  assert.equal(inspect(creds).includes(secret), false)
  assert.equal(JSON.stringify(creds).includes(secret), false)
  assert.deepEqual(Object.keys(creds).sort(), ['publicKey', 'serverKey'])
})

test('Credentials.load refuses a public certificate, a missing file and a bad key with clear errors', () => {
  assert.throws(() => Credentials.load(broker.serverKeyPath, join(broker.keysDir, 'app.key')),
    (err) => err instanceof ZbrokerError && /app\.key holds no secret key: give the NAME\.key_secret file/.test(err.message))
  assert.throws(() => Credentials.load(broker.serverKeyPath, join(broker.keysDir, 'nobody.key_secret')),
    (err) => err instanceof ZbrokerError && /cannot read certificate .*nobody\.key_secret: no such file/.test(err.message))
  assert.throws(() => Credentials.load('not a key', join(broker.keysDir, 'app.key_secret')), /cannot read certificate not a key/)
  assert.throws(() => new Credentials({ serverKey: 'short', publicKey: 'x', secretKey: 'y' }), TypeError)
  assert.throws(() => new Client(broker.endpoint, { credentials: { serverKey: 'x' } }), /credentials must be a Credentials/)
})

test('Credentials.fromEnvironment: both variables, neither, or an error for one alone', () => {
  const secret = join(broker.keysDir, 'app.key_secret')
  assert.equal(Credentials.fromEnvironment({}), null)
  const creds = Credentials.fromEnvironment({ ZBROKER_SERVER_KEY: broker.serverKeyPath, ZBROKER_KEY: secret })
  assert.equal(creds.publicKey, keys('app').publicKey)
  assert.throws(() => Credentials.fromEnvironment({ ZBROKER_KEY: secret }), /set both ZBROKER_SERVER_KEY and ZBROKER_KEY, or neither/)
  assert.throws(() => Credentials.fromEnvironment({ ZBROKER_SERVER_KEY: broker.serverKeyPath }), ZbrokerError)
})

// ------------------------------------------------------------ Client

test('a Client without keys: every waiting call rejects with AuthenticationFailed at once', async () => {
  const c = client(undefined)
  const calls = [c.enqueue('echo', 'a'), c.request('echo', 'b'), c.status('some-id')]
  await Promise.all(calls.map((call) => refusedAtOnce(call, broker.endpoint, /asks for CURVE authentication/)))
  // A later call hears it again at once (a new connection, refused again).
  await refusedAtOnce(c.enqueue('echo', 'c'), broker.endpoint, /asks for CURVE authentication/)
  await refusedAtOnce(c.mdpRequest('echo', 'd', { timeoutMs: TIMEOUT_MS }), broker.endpoint, /asks for CURVE authentication/)
})

test('a Client with an unknown key, or a key with no role on the ROUTER, is refused at once', async () => {
  await refusedAtOnce(client(keys('stranger')).enqueue('echo', 'x'), broker.endpoint, /refused this key \(ZAP status 400\)/)
  await refusedAtOnce(client(keys('watcher')).enqueue('echo', 'x'), broker.endpoint, /refused this key/)
})

test('a Client with a wrong server key is refused at once, and so is one with keys on a broker without CURVE', async () => {
  const wrong = new Credentials({ serverKey: keys('stranger').publicKey, ...zmq.curveKeyPair() })
  await refusedAtOnce(client(wrong).enqueue('echo', 'x'), broker.endpoint, /public key right/)

  const plain = new zmq.Router({ linger: 0 })
  await plain.bind('tcp://127.0.0.1:*')
  closers.push(() => plain.close())
  const c = new Client(plain.lastEndpoint, { timeoutMs: TIMEOUT_MS, credentials: keys('app') })
  closers.push(() => c.close())
  await refusedAtOnce(c.enqueue('echo', 'x'), plain.lastEndpoint, /does not use CURVE/)
})

test('right keys: a task goes from a Client to a Worker and back', async () => {
  const w = worker('echo', keys('echo-worker'), (task) => Buffer.concat([Buffer.from('echo:'), task.payload]))
  await w.start()
  const c = client(keys('app'))
  const id = await c.enqueue('echo', 'hi')
  assert.equal((await c.result(id)).toString(), 'echo:hi')
  assert.equal((await c.request('echo', 'again')).toString(), 'echo:again')
  assert.equal(await c.mmiService('echo'), true)
  assert.equal(await w.stop(), true)
})

test('right keys, call outside the grants: Forbidden, a BrokerError with code forbidden', async () => {
  const app = client(keys('app'))
  const err = await app.enqueue('billing', 'x').then(() => assert.fail('expected Forbidden'), (e) => e)
  assert.ok(err instanceof Forbidden && err instanceof BrokerError)
  assert.equal(err.code, 'forbidden')
  assert.match(err.brokerMessage, /app may not enqueue to 'billing'/)

  // Another principal (here a worker's) may not look at app's task; app may, and so may an admin.
  const id = await app.enqueue('echo', 'mine', { delayS: 3600 })
  const other = client(keys('echo-worker'))
  await assert.rejects(other.status(id), (e) => e instanceof Forbidden && /belongs to another principal/.test(e.message))
  await assert.rejects(other.cancel(id), Forbidden)
  await assert.rejects(other.result(id, { timeoutMs: 0 }), Forbidden)
  assert.equal((await app.status(id)).state, 'delayed')
  const ops = client(keys('ops'))
  assert.equal((await ops.status(id)).state, 'delayed')

  // The broker's figures need observer (or admin).
  await assert.rejects(app.queues(), (e) => e instanceof Forbidden && /app is not an observer/.test(e.message))
  assert.ok((await ops.queues()).some((row) => row.service === 'echo'))
  await ops.cancel(id)
})

// ------------------------------------------------------------ Worker

test('a Worker without keys, or with an unknown key, stops with AuthenticationFailed from start()', async () => {
  const bare = worker('echo', undefined)
  await refusedAtOnce(bare.start(), broker.endpoint, /asks for CURVE authentication/)
  assert.ok(bare.error instanceof AuthenticationFailed)
  assert.equal(bare.stopped, true)
  assert.equal(await bare.stop(), false)

  const stranger = worker('echo', keys('stranger'))
  await refusedAtOnce(stranger.start(), broker.endpoint, /refused this key/)
  assert.equal(stranger.connected, false)
})

test('a Worker may serve only its services: a READY outside them stops it with Forbidden', async () => {
  for (const [name, service] of [['echo-worker', 'billing'], ['app', 'echo']]) {
    const w = worker(service, keys(name))
    const started = performance.now()
    const err = await w.start().then(() => assert.fail('expected Forbidden'), (e) => e)
    assert.ok(err instanceof Forbidden, inspect(err))
    assert.equal(err.code, 'forbidden')
    assert.match(err.brokerMessage, new RegExp(`^${name} may not serve '${service}'$`))
    assert.ok(performance.now() - started < PROMPT_MS)
    assert.equal(w.error, err)
    assert.equal(w.stopped, true)
    assert.equal(w.stats.reconnects, 0) // stopped, never registered again
  }
})

// ------------------------------------------------------------ events

test('a Publisher with an unknown key, or with a key of another role, throws AuthenticationFailed once refused', async () => {
  for (const [credentials, reason] of [[keys('listener'), /refused this key/], [keys('stranger'), /refused this key/]]) {
    const pub = publisher(credentials)
    const started = performance.now()
    await waitUntil(() => pub.error !== null, { timeoutMs: PROMPT_MS, what: 'the refusal' })
    assert.ok(performance.now() - started < PROMPT_MS)
    await assert.rejects(pub.publish('fs.change', 'x'), (e) => e === pub.error && e instanceof AuthenticationFailed && reason.test(e.reason))
    await assert.rejects(pub.publishMany('fs.change', ['x']), AuthenticationFailed)
    assert.equal(pub.error.endpoint, broker.eventsIn)
    pub.close()
    assert.equal(pub.closed, true)
  }
})

test('a Subscriber without keys, or with a key of another role: waiting recv() and iteration throw at once', async () => {
  const bare = subscriber(['fs.'], undefined)
  await refusedAtOnce(bare.recv(), broker.eventsOut, /asks for CURVE authentication/)
  await assert.rejects(bare.recv({ timeoutMs: 10 }), AuthenticationFailed) // and every later one

  const wrongRole = subscriber(['fs.'], keys('watcher'))
  const started = performance.now()
  await assert.rejects(async () => { for await (const _ of wrongRole) {} }, (e) => e instanceof AuthenticationFailed && /refused this key/.test(e.reason)) // eslint-disable-line no-unused-vars
  assert.ok(performance.now() - started < PROMPT_MS)
  assert.throws(() => wrongRole.subscribe('fs.more'), AuthenticationFailed)
})

test('right keys: an allowed topic goes through; broker topics and ungranted prefixes never arrive', async () => {
  const listener = subscriber(['fs.', 'task.done.x', 'secret.'], keys('listener'))
  const watcher = publisher(keys('watcher'))
  const ops = publisher(keys('ops'))
  await joined(watcher, listener, 'fs.probe')
  await joined(ops, listener, 'fs.probe-ops')

  await watcher.publish('fs.change', { path: '/a' })
  const event = await listener.recv({ timeoutMs: 5000 })
  assert.equal(event.type, 'fs.change')
  assert.deepEqual(event.payload, { path: '/a' })

  // Even an admin may not publish in the broker's own topic space, and the
  // listener's 'secret.' subscription was never applied (its grants are fs., task.).
  // One connection keeps its order: once fs.after is here, the others would have been.
  await ops.publish('task.done.x', 'forged result')
  await ops.publish('secret.plans', 'x')
  await ops.publish('fs.after', 'end')
  const got = []
  for (;;) {
    const next = await listener.recv({ timeoutMs: 5000 })
    assert.ok(next !== null, `fs.after never came; got ${JSON.stringify(got)}`)
    got.push(next.type)
    if (next.type === 'fs.after') break
  }
  assert.deepEqual(got, ['fs.after'])
})

// ------------------------------------------------------------ Service

test('a Service with its keys serves a queue and is ready; without keys or outside its grants it stops with the error', async () => {
  const svc = new Service('svc', { endpoint: broker.endpoint, eventsIn: broker.eventsIn, eventsOut: broker.eventsOut, credentials: keys('svc'), logger: null })
  svc.task('svc.upper', (task) => task.payload.toString().toUpperCase()).on('svc.in', () => {})
  closers.push(() => svc.stop({ timeoutMs: 1000 }))
  assert.equal(await svc.start(), true)
  assert.equal(unpack((await client(keys('app')).request('svc.upper', 'hi'))), 'HI')

  const bare = new Service('svc', { endpoint: broker.endpoint, eventsIn: broker.eventsIn, eventsOut: broker.eventsOut, logger: null })
  bare.task('svc.upper', () => 'x')
  closers.push(() => bare.stop({ timeoutMs: 1000 }))
  await refusedAtOnce(bare.start(), broker.endpoint, /asks for CURVE authentication/)
  assert.equal(bare.error instanceof AuthenticationFailed, true)

  const outside = new Service('svc', { endpoint: broker.endpoint, eventsIn: broker.eventsIn, eventsOut: broker.eventsOut, credentials: keys('svc'), logger: null })
  outside.task('billing', () => 'x')
  await assert.rejects(outside.run({ handleSignals: false }), Forbidden)
  assert.equal(outside.stopped, true)
})

// Last: it restarts the broker with other grants.
test('a Worker refused after start() resolved (the broker came back with other grants) emits error and stops', async () => {
  const w = worker('echo', keys('echo-worker'))
  await w.start()
  const refused = new Promise((resolve) => w.once('error', resolve))
  await broker.stop()
  await broker.setAuth({ ...AUTH, principals: AUTH.principals.map((p) => p.name === 'echo-worker' ? { ...p, services: ['echo.v2'] } : p) })
  await broker.start()
  const err = await refused
  assert.ok(err instanceof Forbidden, inspect(err))
  assert.match(err.brokerMessage, /echo-worker may not serve 'echo'/)
  assert.equal(w.error, err)
  assert.equal(w.stopped, true)
})
