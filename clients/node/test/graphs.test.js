// Task graphs (docs/protocol.md §15) end to end against a real broker: Node clients
// build chains and fan-ins (dependsOn, runAnyway, input, chain(), fanIn()), Node
// workers and a Service run their steps (task.dependsOn, unpackResults), and a
// failure spreads as upstream_failed (TaskUpstreamFailed). Bad options are refused
// before anything is sent; unknown dependencies by the broker.

import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import {
  BrokerError,
  Client,
  NonRetryableError,
  ProtocolError,
  Service,
  TaskDead,
  TaskError,
  TaskNotFound,
  TaskUpstreamFailed,
  unpackResults
} from '../index.js'
import { MAX_DEPENDENCIES, pack, unpack } from '../lib/protocol.js'
import { sleep, startBroker } from '../testlib/broker.js'
import { workerStarter } from '../testlib/helpers.js'

let broker
let client
const workers = []

const startWorker = workerStarter(() => broker.endpoint, workers)

before(async () => {
  broker = await startBroker({ args: ['--durability', 'memory', '--retry-base', '0.05', '--retry-max', '0.1'] })
  client = new Client(broker.endpoint, { timeoutMs: 10_000 })
})

after(async () => {
  client?.close()
  await Promise.all(workers.map((w) => w.stop({ timeoutMs: 1000 })))
  await broker?.dispose()
})

// A handler that records what each attempt got ({dependsOn, frames as strings}) in `seen`.
function recording (seen, answer) {
  return async (task) => {
    seen.push({ id: task.id, dependsOn: task.dependsOn, frames: task.frames.map(String) })
    return answer(task)
  }
}

const failing = async () => { throw new NonRetryableError('this step cannot work') }

test('chain(): three steps on three services run in order, each handed the previous result', async () => {
  // Given a chain enqueued before any of its workers is there
  const ids = await client.chain([
    ['g.stt', 'audio'],
    ['g.llm', 'summarize:'], // its own payload, then the transcript
    { service: 'g.tts' } // no payload: exactly the summary
  ], { maxAttempts: 2 })
  assert.equal(ids.length, 3)
  assert.equal(new Set(ids).size, 3)
  // Then the later steps wait, blocked on the one before
  const second = await client.status(ids[1])
  assert.equal(second.state, 'blocked')
  assert.equal(second.blockedOn, 1)
  assert.deepEqual(second.dependsOn, [ids[0]])
  assert.equal(second.input, 'result')
  assert.equal(second.runAnyway, false)
  assert.equal(second.maxAttempts, 2)
  const third = await client.status(ids[2])
  assert.equal(third.state, 'blocked')
  assert.deepEqual(third.dependsOn, [ids[1]])
  const rows = await client.queues()
  assert.equal(rows.find((r) => r.service === 'g.llm').blocked, 1)
  assert.equal(rows.find((r) => r.service === 'g.tts').blocked, 1)

  // When the workers come
  const seen = { stt: [], llm: [], tts: [] }
  await startWorker('g.stt', recording(seen.stt, (task) => `transcript of ${task.payload}`))
  await startWorker('g.llm', recording(seen.llm, (task) => ['summary', `${task.frames[0]} ${task.frames[1]}`]))
  await startWorker('g.tts', recording(seen.tts, (task) => `speech of ${task.frames.join('|')}`))

  // Then the last step's result is the chain's, and each worker saw its dependency
  assert.equal((await client.result(ids[2])).toString(), 'speech of summary|summarize: transcript of audio')
  assert.deepEqual(seen.stt, [{ id: ids[0], dependsOn: [], frames: ['audio'] }])
  assert.deepEqual(seen.llm, [{ id: ids[1], dependsOn: [ids[0]], frames: ['summarize:', 'transcript of audio'] }])
  assert.deepEqual(seen.tts, [{ id: ids[2], dependsOn: [ids[1]], frames: ['summary', 'summarize: transcript of audio'] }])
  const done = await client.status(ids[2])
  assert.equal(done.state, 'done')
  assert.equal(done.blockedOn, 0)
  assert.ok(done.history.some(([event]) => event === 'unblocked'), JSON.stringify(done.history))
})

test('fanIn(): a Service joins every part\'s result, in the order of the parts', async () => {
  // Given parts on two services, the earlier ones finishing last
  await startWorker('g.part-a', async (task) => {
    await sleep(20 * (5 - Number(task.payload)))
    return `a${task.payload}`
  }, { concurrency: 4 })
  await startWorker('g.part-b', (task) => [`b${task.payload}`, 'second frame'], { concurrency: 4 })
  const joins = []
  const svc = new Service('joiner', { endpoint: broker.endpoint, eventsIn: broker.eventsIn, eventsOut: broker.eventsOut, heartbeatMs: null, logger: null })
  svc.task('g.join', (task) => {
    const results = unpackResults(task.frames.at(-1))
    joins.push({ dependsOn: task.dependsOn, header: task.frames.slice(0, -1).map(String) })
    return { parts: results.map((frames) => frames.map(String)) }
  })
  await svc.start()
  try {
    // When they are fanned in (consecutive parts of one service go in one batch)
    const calls = client.stats.calls
    const ids = await client.fanIn(
      [['g.part-a', '1'], ['g.part-a', '2'], { service: 'g.part-b', payload: '3' }, ['g.part-a', '4']],
      ['g.join', 'header'])
    assert.equal(client.stats.calls - calls, 4, 'a batch of two, then one, one, and the join')
    assert.equal(ids.length, 5)
    // Then the joining task's result is the whole's, its input in the parts' order
    assert.deepEqual(unpack(await client.result(ids[4])), {
      parts: [['a1'], ['a2'], ['b3', 'second frame'], ['a4']]
    })
    assert.deepEqual(joins, [{ dependsOn: ids.slice(0, 4), header: ['header'] }])
    const joined = await client.status(ids[4])
    assert.deepEqual(joined.dependsOn, ids.slice(0, 4))
    assert.equal(joined.input, 'results')
  } finally {
    await svc.stop({ timeoutMs: 1000 })
  }
})

test('a failed step ends every later step of a chain upstream_failed: TaskUpstreamFailed', async () => {
  const seen = []
  await startWorker('g.breaks', failing)
  await startWorker('g.after', recording(seen, (task) => task.frames))
  const ids = await client.chain([['g.breaks', 'x'], ['g.after', 'y'], ['g.after', 'z']])
  await assert.rejects(client.result(ids[0]), TaskDead)
  for (const [i, upstream, state] of [[1, ids[0], 'dead'], [2, ids[1], 'upstream_failed']]) {
    const err = await client.result(ids[i]).then(() => null, (e) => e)
    assert.ok(err instanceof TaskUpstreamFailed, String(err))
    assert.ok(err instanceof TaskError)
    assert.equal(err.taskId, ids[i])
    assert.equal(err.state, 'upstream_failed')
    assert.equal(err.error, `dependency ${upstream} ended ${state}`)
    assert.equal((await client.status(ids[i])).state, 'upstream_failed')
  }
  assert.deepEqual(seen, [], 'the later steps never ran')

  // And a task enqueued behind the failed one ends at once, in request() and stream() too
  await assert.rejects(client.request('g.after', 'late', { dependsOn: [ids[2]], timeoutMs: 5000 }), TaskUpstreamFailed)
  const stream = client.stream('g.after', 'late', { dependsOn: [ids[0]], input: 'result' })
  await assert.rejects(async () => { for await (const chunk of stream) assert.fail(`unexpected chunk ${chunk}`) }, TaskUpstreamFailed)
  assert.deepEqual(seen, [])
})

test('runAnyway: the dependent runs when its dependencies ended, a failed one\'s input null', async () => {
  await startWorker('g.ok', (task) => `ok ${task.payload}`)
  await startWorker('g.fails', failing)
  const got = []
  await startWorker('g.anyway', (task) => {
    got.push({ dependsOn: task.dependsOn, results: unpackResults(task.frames.at(-1)) })
    return 'ran anyway'
  })
  const good = await client.enqueue('g.ok', 'one')
  const bad = await client.enqueue('g.fails', 'two')
  const id = await client.enqueue('g.anyway', [], { dependsOn: [good, bad], runAnyway: true, input: 'results' })
  assert.equal((await client.result(id)).toString(), 'ran anyway')
  assert.equal(got.length, 1)
  assert.deepEqual(got[0].dependsOn, [good, bad])
  assert.deepEqual(got[0].results.map((r) => r === null ? null : r.map(String)), [['ok one'], null])
  assert.equal((await client.status(id)).runAnyway, true)
})

test('enqueueMany() and request() take dependencies, by id or by {service, key}', async () => {
  await startWorker('g.source', (task) => `source ${task.payload}`)
  await startWorker('g.copy', (task) => task.frames)
  const first = await client.enqueue('g.source', 'a', { key: 'rec-42' })
  // Every task of a batch shares the dependencies
  const copies = await client.enqueueMany('g.copy', [['x'], ['y']], { dependsOn: [{ service: 'g.source', key: 'rec-42' }], input: 'result' })
  for (const [id, own] of [[copies[0], 'x'], [copies[1], 'y']]) {
    assert.deepEqual((await client.result(id, { frames: true })).map(String), [own, 'source a'])
    assert.deepEqual((await client.status(id)).dependsOn, [first], 'named by key, known by id')
  }
  const answer = await client.request('g.copy', [], { dependsOn: [copies[1]], input: 'result', frames: true })
  assert.deepEqual(answer.map(String), ['y', 'source a'])
})

test('the broker refuses unknown and repeated dependencies, readably, and stores nothing', async () => {
  const known = await client.enqueue('g.refused', 'a')
  const unknown = await client.enqueue('g.refused', 'b', { dependsOn: ['no-such-task'] }).then(() => null, (e) => e)
  assert.ok(unknown instanceof TaskNotFound, String(unknown))
  assert.equal(unknown.code, 'not_found')
  assert.match(unknown.message, /depends_on\[0\]: no task/)
  assert.match(unknown.message, /no-such-task/)
  const byKey = await client.enqueue('g.refused', 'c', { dependsOn: [known, { service: 'g.refused', key: 'never-used' }] }).then(() => null, (e) => e)
  assert.ok(byKey instanceof TaskNotFound, String(byKey))
  assert.match(byKey.message, /depends_on\[1\]/)
  const twice = await client.enqueue('g.refused', 'd', { dependsOn: [known, known] }).then(() => null, (e) => e)
  assert.ok(twice instanceof BrokerError, String(twice))
  assert.equal(twice.code, 'bad_request')
  // Its own key names a task that does not exist yet: no cycle can be built
  const self = await client.enqueue('g.refused', 'e', { key: 'me', dependsOn: [{ service: 'g.refused', key: 'me' }] }).then(() => null, (e) => e)
  assert.ok(self instanceof TaskNotFound, String(self))
  const row = (await client.queues()).find((r) => r.service === 'g.refused')
  assert.equal(row.ready + row.blocked, 1, 'only the first task is stored')
})

test('bad graph options are refused before anything is sent', async () => {
  const calls = client.stats.calls
  const refused = [
    [{ dependsOn: 'task-id' }, TypeError, /dependsOn must be an array/],
    [{ dependsOn: [''] }, TypeError, /dependsOn\[0\] must be a task id/],
    [{ dependsOn: ['t', 7] }, TypeError, /dependsOn\[1\]/],
    [{ dependsOn: [{ service: 's' }] }, TypeError, /\{service, key\}/],
    [{ dependsOn: [{ service: 's', key: '' }] }, TypeError, /\{service, key\}/],
    [{ dependsOn: [{ service: 's', key: 'k', id: 'x' }] }, TypeError, /nothing else/],
    [{ dependsOn: [['s', 'k']] }, TypeError, /dependsOn\[0\]/],
    [{ dependsOn: new Array(MAX_DEPENDENCIES + 1).fill('t') }, RangeError, /at most 1000 dependencies/],
    [{ dependsOn: ['t'], runAnyway: 'yes' }, TypeError, /runAnyway must be a boolean/],
    [{ dependsOn: ['t'], input: 'all' }, TypeError, /input must be one of 'result', 'results'/],
    [{ runAnyway: true }, TypeError, /need dependsOn/],
    [{ input: 'results' }, TypeError, /need dependsOn/],
    [{ dependsOn: [], input: 'results' }, TypeError, /need dependsOn/],
    [{ dependsOn: ['a', 'b'], input: 'result' }, RangeError, /exactly one dependency/]
  ]
  for (const [options, Cls, message] of refused) {
    await assert.rejects(client.enqueue('g.never', 'x', options), (err) => err instanceof Cls && message.test(err.message), JSON.stringify(options).slice(0, 80))
    await assert.rejects(client.request('g.never', 'x', options), Cls)
    await assert.rejects(client.enqueueMany('g.never', ['x'], options), Cls)
    assert.throws(() => client.stream('g.never', 'x', options), Cls)
  }
  // chain() and fanIn() set dependsOn and input themselves, and resolve with ids
  for (const options of [{ dependsOn: ['t'] }, { input: 'result' }, { key: 'k' }, { keys: ['k'] }, { runAnyway: true }, { receipt: true }]) {
    const name = Object.keys(options)[0]
    const message = new RegExp(`takes no key, runAnyway nor receipt: got option ${name}$`)
    await assert.rejects(client.chain([['g.never', 'x']], options), (err) => err instanceof TypeError && message.test(err.message))
    await assert.rejects(client.fanIn([['g.never', 'x']], ['g.never'], options), (err) => err instanceof TypeError && message.test(err.message))
  }
  await assert.rejects(client.chain('g.never'), /steps must be an array/)
  await assert.rejects(client.chain([['g.never', 'x'], ['', 'y']]), /chain\(\): steps\[1\]: service must be a non-empty string/)
  await assert.rejects(client.chain([['g.never', 'x'], 'g.never']), /steps\[1\] must be a \[service, payload\] pair/)
  await assert.rejects(client.chain([['g.never', 7]]), /steps\[0\]: payload must be a Buffer/)
  await assert.rejects(client.chain([{ service: 'g.never', paylod: 'x' }]), /steps\[0\] takes service and payload, not "paylod"/)
  await assert.rejects(client.chain([['g.never', 'x']], { priority: 1000 }), RangeError)
  await assert.rejects(client.fanIn([], ['g.never']), /needs at least one part/)
  await assert.rejects(client.fanIn(new Array(MAX_DEPENDENCIES + 1).fill(['g.never', 'x']), ['g.never']), /at most 1000 parts/)
  await assert.rejects(client.fanIn([['g.never', 'x']], 'g.never'), /then must be a \[service, payload\] pair/)
  await assert.rejects(client.fanIn([['g.never', 'x']], ['', 'x']), /fanIn\(\): then: service must be/)
  assert.equal(client.stats.calls, calls, 'nothing was sent')
  assert.equal((await client.queues()).find((r) => r.service === 'g.never'), undefined)
})

test('a chain that fails half way tells which steps are stored', async () => {
  const small = new Client(broker.endpoint, { timeoutMs: 10_000, maxMessageBytes: 4096 })
  try {
    const err = await small.chain([['g.half', 'a'], ['g.half', 'b'], ['g.half', Buffer.alloc(8192)]]).then(() => null, (e) => e)
    assert.ok(err instanceof BrokerError, String(err))
    assert.equal(err.code, 'too_large')
    assert.equal(err.enqueuedIds.length, 2)
    const second = await small.status(err.enqueuedIds[1])
    assert.deepEqual(second.dependsOn, [err.enqueuedIds[0]])
  } finally {
    small.close()
  }
})

test('unpackResults() reads the results frame, and nothing else', () => {
  const frame = pack([[Buffer.from('a'), Buffer.alloc(0)], null, []])
  assert.deepEqual(unpackResults(frame).map((r) => r === null ? null : r.map(String)), [['a', ''], null, []])
  assert.deepEqual(unpackResults(new Uint8Array(pack([]))), [])
  for (const bad of [pack('x'), pack([['not bin']]), pack([1]), pack({ 0: [] }), Buffer.from([0xc1])]) {
    assert.throws(() => unpackResults(bad), (err) => err instanceof ProtocolError && err.code === 'bad_results')
  }
  assert.throws(() => unpackResults('results'), TypeError)
  assert.throws(() => unpackResults(null), TypeError)
})

test('a blocked task can be cancelled: its dependents end upstream_failed', async () => {
  const first = await client.enqueue('g.idle', 'nobody serves this')
  const blocked = await client.enqueue('g.idle', 'w', { dependsOn: [first] })
  const dependent = await client.enqueue('g.idle', 'v', { dependsOn: [blocked] })
  assert.equal((await client.status(blocked)).state, 'blocked')
  const cancelled = await client.cancel(blocked)
  assert.equal(cancelled.was, 'blocked')
  const err = await client.result(dependent, { timeoutMs: 5000 }).then(() => null, (e) => e)
  assert.ok(err instanceof TaskUpstreamFailed, String(err))
  assert.equal(err.error, `dependency ${blocked} ended cancelled`)
  assert.equal((await client.status(first)).state, 'ready', 'a dependency is not touched by its dependents')
  await client.cancel(first)
})
