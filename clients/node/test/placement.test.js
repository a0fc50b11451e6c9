// Placement and flow control (docs/protocol.md §16) end to end against a real broker:
// tasks that require, prefer and stick to workers by their tags (Worker.setTags,
// Service.setTags, the worker.tags event), concurrency keys served round robin,
// per-key limits, rates, debounce; bad options refused before anything is sent.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { Client, Publisher, Service, Subscriber } from '../index.js'
import { MAX_BURST, MAX_RATE_PER_S, MAX_SERVICE_LIMIT, MAX_TAGS, unpack } from '../lib/protocol.js'
import { sleep, startBroker } from '../testlib/broker.js'
import { workerStarter } from '../testlib/helpers.js'

let broker
let client
const workers = []

const startWorker = workerStarter(() => broker.endpoint, workers)

before(async () => {
  broker = await startBroker({ args: ['--durability', 'memory'] })
  client = new Client(broker.endpoint, { timeoutMs: 20_000 })
})

after(async () => {
  client?.close()
  await Promise.all(workers.map((w) => w.stop({ timeoutMs: 1000 })))
  await broker?.dispose()
})

// The QUEUES row of `service`.
async function row (service) {
  return (await client.queues()).find((r) => r.service === service)
}

// Pub/sub has a slow joiner: publish a probe until the subscriber gets one, so that
// its subscription has reached the broker before the events the test waits for.
async function joined (publisher, subscriber, topic) {
  for (let i = 0; i < 200; i++) {
    await publisher.publish(topic, 'probe')
    if (await subscriber.recv({ timeoutMs: 50 }) !== null) {
      while (await subscriber.recv({ timeoutMs: 20 }) !== null) {} // drain the other probes
      return
    }
  }
  throw new Error('subscription never reached the broker')
}

// A handler that records [worker name, task id, payload] in `ran`, and answers its name.
function recording (ran, name) {
  return (task) => {
    ran.push([name, task.id, task.payload.toString()])
    return name
  }
}

test('a task that requires gpu waits until a worker calls setTags([\'gpu\']), and never runs on the other worker', async (t) => {
  const sub = new Subscriber(broker.eventsOut, { topics: ['worker.tags', 'p.probe'] })
  const pub = new Publisher(broker.eventsIn, { source: 'placement-test' })
  t.after(() => { sub.close(); pub.close() })
  await joined(pub, sub, 'p.probe')
  const ran = []
  await startWorker('p.gpu', recording(ran, 'cpu'), { tags: ['cpu'] })
  const other = await startWorker('p.gpu', recording(ran, 'other'))

  // Given a task that requires gpu, enqueued before tasks that require nothing
  const id = await client.enqueue('p.gpu', 'needs a gpu', { require: ['gpu'] })
  const plain = await client.enqueueMany('p.gpu', ['a', 'b', 'c', 'd'])
  // Then the others run on both workers, and it waits, counted as unplaceable
  for (const p of plain) await client.result(p)
  assert.equal((await client.status(id)).state, 'ready')
  assert.equal((await row('p.gpu')).unplaceable, 1)
  const status = await client.status(id)
  assert.deepEqual([status.require, status.prefer, status.affinity, status.concurrencyKey], [['gpu'], [], null, null])

  // When the other worker says it has a gpu (a model loaded), without registering again
  other.setTags(['gpu', 'model:x'])
  // Then the task runs there, and only there
  assert.equal((await client.result(id)).toString(), 'other')
  assert.deepEqual(ran.filter(([, task]) => task === id), [['other', id, 'needs a gpu']])
  assert.equal(other.stats.reconnects, 0)
  assert.equal(other.stats.tagsSent, 1)
  assert.equal((await row('p.gpu')).unplaceable, 0)
  // And the broker announced the worker's new tags
  const event = await sub.recv({ timeoutMs: 5000 })
  assert.equal(event?.type, 'worker.tags')
  assert.equal(event.payload.service, 'p.gpu')
  assert.deepEqual(event.payload.tags, ['gpu', 'model:x'])
  assert.match(event.payload.worker, /^[0-9a-f]{10}$/)
})

test('Service.setTags() changes its workers\' tags: a task requiring them runs', async () => {
  const svc = new Service('placer', { endpoint: broker.endpoint, eventsIn: broker.eventsIn, eventsOut: broker.eventsOut, heartbeatMs: null, logger: null })
  svc.task('p.svc', (task) => `ran ${task.payload}`, { tags: ['cpu'] })
  svc.task('p.svc-other', () => 'other')
  await svc.start()
  try {
    const id = await client.enqueue('p.svc', 'x', { require: ['model:x'] })
    assert.equal((await client.status(id)).state, 'ready')
    assert.equal(svc.setTags(['cpu', 'model:x'], { queue: 'p.svc' }), svc)
    assert.deepEqual(svc.workers.get('p.svc').tags, ['cpu', 'model:x'])
    assert.deepEqual(svc.workers.get('p.svc-other').tags, [])
    assert.equal(unpack(await client.result(id)), 'ran x')
    svc.setTags(['all'])
    assert.deepEqual([...svc.workers.values()].map((w) => w.tags), [['all'], ['all']])
    const everywhere = await client.enqueue('p.svc-other', 'y', { require: ['all'] })
    assert.equal(unpack(await client.result(everywhere)), 'other')
    assert.throws(() => svc.setTags(['x'], { queue: 'p.unknown' }), /not served by this service/)
    assert.throws(() => svc.setTags('x'), TypeError)
    assert.throws(() => svc.task('p.late', () => null), /before the service starts/)
  } finally {
    await svc.stop({ timeoutMs: 1000 })
  }
  assert.throws(() => new Service('s').task('q', () => null, { tags: new Array(MAX_TAGS + 1).fill('t') }), RangeError)
})

test('prefer picks the worker with more of the tags; affinity keeps a key on the worker that ran it', async () => {
  const ran = []
  await startWorker('p.fit', recording(ran, 'plain'))
  await startWorker('p.fit', recording(ran, 'de'), { tags: ['de'] })
  await startWorker('p.fit', recording(ran, 'de-large'), { tags: ['de', 'large-v3'] })
  // Every worker is free each time: the best fit wins
  for (let i = 0; i < 3; i++) {
    assert.equal((await client.request('p.fit', `p${i}`, { prefer: ['de', 'large-v3'] })).toString(), 'de-large')
  }
  assert.deepEqual((await client.status((await client.enqueue('p.fit', 'x', { prefer: ['de'], receipt: true })).id)).prefer, ['de'])

  // The worker that ran the first turn of a conversation runs the rest (not the usual rotation)
  const first = (await client.request('p.fit', 'turn 0', { affinity: 'conversation:1' })).toString()
  for (let i = 1; i < 5; i++) {
    assert.equal((await client.request('p.fit', `turn ${i}`, { affinity: 'conversation:1' })).toString(), first)
  }
  const id = await client.enqueue('p.fit', 'turn 5', { affinity: 'conversation:1' })
  assert.equal((await client.result(id)).toString(), first)
  assert.equal((await client.status(id)).affinity, 'conversation:1')
})

test('concurrency keys are served round robin: key B\'s 5 tasks all start before key A\'s twentieth', async () => {
  // Given key A's 100 tasks enqueued first, then key B's 5
  const a = await client.enqueueMany('p.rr', Array.from({ length: 100 }, (_, i) => `A${i}`), { concurrencyKey: 'user:A' })
  const b = await client.enqueueMany('p.rr', Array.from({ length: 5 }, (_, i) => `B${i}`), { concurrencyKey: 'user:B' })
  assert.equal((await client.status(b[0])).concurrencyKey, 'user:B')
  // When two workers take them
  const started = []
  const byWorker = [[], []]
  const handlerOf = (mine) => async (task) => {
    started.push(task.payload.toString())
    mine.push(task.payload.toString())
    await sleep(2)
    return 'ok'
  }
  await startWorker('p.rr', handlerOf(byWorker[0]))
  await startWorker('p.rr', handlerOf(byWorker[1]))
  await Promise.all(b.map((id) => client.result(id)))
  // Then B's did not wait for A's backlog
  const lastB = started.findLastIndex((p) => p.startsWith('B'))
  const aBefore = started.slice(0, lastB).filter((p) => p.startsWith('A'))
  assert.ok(aBefore.length < 19, `${aBefore.length} of A's tasks started before B's last: ${started.slice(0, lastB + 1).join(' ')}`)
  // And within one key, each worker gets the tasks in enqueue order, every one once
  // (across the two workers, which of two tasks handed out together starts first is
  // up to their sockets, not to the broker)
  await Promise.all(a.map((id) => client.result(id)))
  const number = (p) => Number(p.slice(1))
  for (const key of ['A', 'B']) {
    for (const mine of byWorker) {
      const seen = mine.filter((p) => p.startsWith(key)).map(number)
      assert.deepEqual(seen, [...seen].sort((x, y) => x - y), `key ${key} out of order on one worker: ${seen}`)
    }
  }
  const count = { A: 100, B: 5 }
  for (const key of ['A', 'B']) {
    const all = started.filter((p) => p.startsWith(key)).map(number).sort((x, y) => x - y)
    assert.deepEqual(all, Array.from({ length: count[key] }, (_, i) => i))
  }
})

test('a per-key limit caps each key\'s running tasks while the other keys run', async () => {
  assert.deepEqual(await client.limit('p.keyed', 1, { perKey: true }), { service: 'p.keyed', limit: 1, perKey: true })
  let figures = await row('p.keyed')
  assert.equal(figures.key_limit, 1)
  assert.equal(figures.limit, null)
  const running = new Map()
  const most = new Map()
  let together = 0
  await startWorker('p.keyed', async (task) => {
    const key = task.payload.toString()[0]
    running.set(key, (running.get(key) ?? 0) + 1)
    most.set(key, Math.max(most.get(key) ?? 0, running.get(key)))
    together = Math.max(together, [...running.values()].reduce((x, y) => x + y, 0))
    await sleep(100)
    running.set(key, running.get(key) - 1)
    return 'ok'
  }, { concurrency: 4 })
  const ids = [
    ...await client.enqueueMany('p.keyed', ['A1', 'A2', 'A3'], { concurrencyKey: 'A' }),
    ...await client.enqueueMany('p.keyed', ['B1', 'B2', 'B3'], { concurrencyKey: 'B' })
  ]
  await Promise.all(ids.map((id) => client.result(id)))
  assert.deepEqual(Object.fromEntries(most), { A: 1, B: 1 })
  assert.equal(together, 2, 'the two keys ran side by side')

  // The service's own limit is another setting; null removes either
  assert.deepEqual(await client.limit('p.keyed', 3), { service: 'p.keyed', limit: 3, perKey: false })
  figures = await row('p.keyed')
  assert.deepEqual([figures.limit, figures.key_limit], [3, 1])
  assert.deepEqual(await client.limit('p.keyed', null, { perKey: true }), { service: 'p.keyed', limit: null, perKey: true })
  await client.limit('p.keyed', null)
  figures = await row('p.keyed')
  assert.deepEqual([figures.limit, figures.key_limit], [null, null])
})

// Each start (times in ms, in order) is within burst + rate x the time since `t0`,
// taken before the RATE was sent (the broker's bucket starts full after it).
function withinRate (starts, t0, perS, burst, what) {
  starts.forEach((at, i) => {
    const allowed = burst + perS * (at - t0) / 1000
    assert.ok(i + 1 <= allowed + 1e-9, `${what}: start ${i + 1} at ${(at - t0).toFixed(0)} ms, at most ${allowed.toFixed(2)} by then`)
  })
}

test('a rate hands out at most burst + rate x elapsed tasks, for the service or for each key', async () => {
  const t0 = performance.now()
  assert.deepEqual(await client.rate('p.rated', 5, { burst: 2 }), { service: 'p.rated', rate: 5, burst: 2, perKey: false })
  let figures = await row('p.rated')
  assert.deepEqual([figures.rate, figures.key_rate], [{ per_s: 5, burst: 2 }, null])
  const starts = []
  await startWorker('p.rated', () => { starts.push(performance.now()) }, { concurrency: 10 })
  const ids = await client.enqueueMany('p.rated', Array.from({ length: 8 }, (_, i) => `r${i}`))
  await Promise.all(ids.map((id) => client.result(id)))
  assert.equal(starts.length, 8)
  withinRate(starts, t0, 5, 2, 'service rate')

  // Per key: each key has a bucket of its own (the burst defaults to the rate rounded up)
  const t1 = performance.now()
  assert.deepEqual(await client.rate('p.key-rated', 3.5, { perKey: true }), { service: 'p.key-rated', rate: 3.5, burst: 4, perKey: true })
  const byKey = { A: [], B: [] }
  await startWorker('p.key-rated', (task) => { byKey[task.payload.toString()].push(performance.now()) }, { concurrency: 10 })
  const keyed = [
    ...await client.enqueueMany('p.key-rated', new Array(6).fill('A'), { concurrencyKey: 'A' }),
    ...await client.enqueueMany('p.key-rated', new Array(6).fill('B'), { concurrencyKey: 'B' })
  ]
  await Promise.all(keyed.map((id) => client.result(id)))
  withinRate(byKey.A, t1, 3.5, 4, 'key A')
  withinRate(byKey.B, t1, 3.5, 4, 'key B')
  figures = await row('p.key-rated')
  assert.deepEqual([figures.rate, figures.key_rate], [null, { per_s: 3.5, burst: 4 }])

  // null removes a rate
  assert.deepEqual(await client.rate('p.rated', null), { service: 'p.rated', rate: null, burst: 1, perKey: false })
  await client.rate('p.key-rated', null, { perKey: true })
  assert.equal((await row('p.rated')).rate, null)
  assert.equal((await row('p.key-rated')).key_rate, null)
})

test('debounce: three enqueues of one key are one task, run once with the last payload', async () => {
  const ran = []
  await startWorker('p.debounce', (task) => {
    ran.push({ payload: task.payload.toString(), headers: task.headers })
    return `indexed ${task.payload}`
  })
  const options = { key: 'file:/tmp/a.txt', debounceS: 1, receipt: true }
  const first = await client.enqueue('p.debounce', 'v1', options)
  const second = await client.enqueue('p.debounce', 'v2', { ...options, headers: { rev: 2 } })
  const third = await client.enqueue('p.debounce', 'v3', { ...options, headers: { rev: 3 } })
  assert.deepEqual(first, { id: first.id, existing: false })
  assert.deepEqual(second, { id: first.id, existing: true, replaced: true })
  assert.deepEqual(third, { id: first.id, existing: true, replaced: true })
  const waiting = await client.status(first.id)
  assert.equal(waiting.state, 'delayed')
  assert.ok(waiting.notBefore instanceof Date)
  assert.equal((await client.result(first.id)).toString(), 'indexed v3')
  await sleep(200)
  assert.deepEqual(ran, [{ payload: 'v3', headers: { rev: 3 } }])

  // Once the task has run, the key moves on: the next debounced enqueue stores a new task
  const later = await client.enqueue('p.debounce', 'v4', options)
  assert.notEqual(later.id, first.id)
  assert.deepEqual(later, { id: later.id, existing: false })
  assert.equal((await client.result(later.id)).toString(), 'indexed v4')
  assert.deepEqual(ran.map((r) => r.payload), ['v3', 'v4'])
})

test('bad placement and flow-control options are refused before anything is sent', async () => {
  const calls = client.stats.calls
  const refused = [
    [{ require: 'gpu' }, TypeError, /require must be an array of tags/],
    [{ require: ['gpu', ''] }, TypeError, /require\[1\] must be a non-empty string/],
    [{ prefer: [7] }, TypeError, /prefer\[0\] must be a non-empty string/],
    [{ require: new Array(MAX_TAGS + 1).fill('t') }, RangeError, /require takes at most 32 tags/],
    [{ prefer: new Array(MAX_TAGS + 1).fill('t') }, RangeError, /prefer takes at most 32 tags/],
    [{ affinity: '' }, TypeError, /affinity must be a non-empty string/],
    [{ affinity: 5 }, TypeError, /affinity must be a non-empty string/],
    [{ concurrencyKey: '' }, TypeError, /concurrencyKey must be a non-empty string/],
    [{ concurrencyKey: ['user:1'] }, TypeError, /concurrencyKey must be a non-empty string/]
  ]
  for (const [options, Cls, message] of refused) {
    const what = JSON.stringify(options).slice(0, 60)
    await assert.rejects(client.enqueue('p.never', 'x', options), (err) => err instanceof Cls && message.test(err.message), what)
    await assert.rejects(client.request('p.never', 'x', options), Cls, what)
    await assert.rejects(client.enqueueMany('p.never', ['x'], options), Cls, what)
    assert.throws(() => client.stream('p.never', 'x', options), Cls, what)
    await assert.rejects(client.chain([['p.never', 'x']], options), Cls, what)
  }
  // debounceS: enqueue() alone, with a key, positive, not with a delay
  for (const [options, Cls, message] of [
    [{ key: 'k', debounceS: 0 }, RangeError, /debounceS must be a positive finite number/],
    [{ key: 'k', debounceS: -1 }, RangeError, /debounceS/],
    [{ key: 'k', debounceS: NaN }, RangeError, /debounceS/],
    [{ key: 'k', debounceS: Infinity }, RangeError, /debounceS/],
    [{ key: 'k', debounceS: '1' }, RangeError, /debounceS/],
    [{ key: 'k', debounceS: null }, RangeError, /debounceS/],
    [{ debounceS: 1 }, TypeError, /debounceS needs a key/],
    [{ keys: ['k'], debounceS: 1 }, TypeError, /debounceS needs a key/],
    [{ key: 'k', debounceS: 1, delayS: 1 }, TypeError, /debounceS or a delay/],
    [{ key: 'k', debounceS: 1, notBefore: new Date() }, TypeError, /debounceS or a delay/]
  ]) {
    await assert.rejects(client.enqueue('p.never', 'x', options), (err) => err instanceof Cls && message.test(err.message), JSON.stringify(options))
  }
  const onlyEnqueue = /debounceS is an option of enqueue\(\) only/
  await assert.rejects(client.enqueueMany('p.never', ['x'], { keys: ['k'], debounceS: 1 }), onlyEnqueue)
  await assert.rejects(client.request('p.never', 'x', { key: 'k', debounceS: 1 }), onlyEnqueue)
  assert.throws(() => client.stream('p.never', 'x', { key: 'k', debounceS: 1 }), onlyEnqueue)
  await assert.rejects(client.chain([['p.never', 'x']], { debounceS: 1 }), onlyEnqueue)
  await assert.rejects(client.fanIn([['p.never', 'x']], ['p.never'], { debounceS: 1 }), onlyEnqueue)

  // limit() and rate()
  for (const [call, Cls, message] of [
    [() => client.limit('p.never', 0), RangeError, /limit must be an integer 1\.\.1000000/],
    [() => client.limit('p.never', 1.5), RangeError, /limit/],
    [() => client.limit('p.never', MAX_SERVICE_LIMIT + 1), RangeError, /limit/],
    [() => client.limit('p.never', '2'), RangeError, /limit/],
    [() => client.limit('p.never'), TypeError, /needs the limit.*or null for none/],
    [() => client.limit('p.never', 1, { perKey: 'yes' }), TypeError, /perKey must be a boolean/],
    [() => client.limit('p.never', 1, { per_key: true }), TypeError, /unknown option "per_key" of limit\(\)/],
    [() => client.limit('', 1), TypeError, /service must be a non-empty string/],
    [() => client.limit('mmi.service', 1), RangeError, /mmi\./],
    [() => client.rate('p.never', 0), RangeError, /rate must be a number of tasks per second in \(0, 1000000\]/],
    [() => client.rate('p.never', -1), RangeError, /rate/],
    [() => client.rate('p.never', MAX_RATE_PER_S * 2), RangeError, /rate/],
    [() => client.rate('p.never', NaN), RangeError, /rate/],
    [() => client.rate('p.never', Infinity), RangeError, /rate/],
    [() => client.rate('p.never', '5'), RangeError, /rate/],
    [() => client.rate('p.never'), RangeError, /or null for none/],
    [() => client.rate('p.never', 1, { burst: 0 }), RangeError, /burst must be an integer 1\.\.1000000/],
    [() => client.rate('p.never', 1, { burst: 1.5 }), RangeError, /burst/],
    [() => client.rate('p.never', 1, { burst: MAX_BURST + 1 }), RangeError, /burst/],
    [() => client.rate('p.never', 1, { perKey: 1 }), TypeError, /perKey must be a boolean/],
    [() => client.rate('p.never', 1, { perS: 1 }), TypeError, /unknown option "perS" of rate\(\)/]
  ]) {
    await assert.rejects(call(), (err) => err instanceof Cls && message.test(err.message), String(call))
  }
  assert.equal(client.stats.calls, calls, 'nothing was sent')
  assert.equal(await row('p.never'), undefined)

  // The largest values pass, and the broker takes them
  assert.deepEqual(await client.rate('p.extremes', MAX_RATE_PER_S, { burst: MAX_BURST }), { service: 'p.extremes', rate: MAX_RATE_PER_S, burst: MAX_BURST, perKey: false })
  assert.deepEqual(await client.limit('p.extremes', MAX_SERVICE_LIMIT, { perKey: true }), { service: 'p.extremes', limit: MAX_SERVICE_LIMIT, perKey: true })
  const tags = Array.from({ length: MAX_TAGS }, (_, i) => `tag-${i}`)
  const id = await client.enqueue('p.extremes', 'x', { require: tags, prefer: tags })
  assert.deepEqual((await client.status(id)).require, tags)
  await client.cancel(id)
  await client.rate('p.extremes', null)
  await client.limit('p.extremes', null, { perKey: true })
})
