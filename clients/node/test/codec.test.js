// Pure codec tests: the bytes this package puts on the wire, checked against
// the msgpack types and frame layouts the Python broker expects.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import {
  C,
  W,
  decodeEvent,
  decodeEvents,
  decodeForWorker,
  decodeMdpReply,
  decodeZbcAnswer,
  encodeEvent,
  encodeEvents,
  mdpRequest,
  pack,
  packFloat64,
  toFrames,
  unpack,
  zbcCall,
  zbwEncode
} from '../lib/protocol.js'
import { ProtocolError, RetryLater } from '../lib/errors.js'
import { decode as libraryDecode } from '@msgpack/msgpack'

const str = (...frames) => frames.map((f) => Buffer.from(f).toString('latin1'))

test('msgpack: strings are str, buffers are bin, safe integers are int, other numbers float64', () => {
  assert.deepEqual([...pack('ab')], [0xa2, 0x61, 0x62]) // fixstr
  assert.deepEqual([...pack(Buffer.from([1, 2]))], [0xc4, 2, 1, 2]) // bin 8
  assert.deepEqual([...pack(new Uint8Array([7]))], [0xc4, 1, 7])
  assert.deepEqual([...pack(3)], [0x03]) // positive fixint
  assert.deepEqual([...pack(-5)], [0xfb]) // negative fixint
  assert.deepEqual([...pack(300)], [0xcd, 0x01, 0x2c]) // uint 16
  assert.equal(pack(1.5)[0], 0xcb) // float 64
  assert.equal(pack(Date.now() / 1000 + 0.25)[0], 0xcb)
  assert.deepEqual([...pack(true)], [0xc3])
  assert.deepEqual([...pack(null)], [0xc0])
  // undefined fields are left out, not sent as nil
  assert.deepEqual(unpack(pack({ a: 1, b: undefined })), { a: 1 })
})

test('ZBW01 frames: READY, ACK, PROGRESS, DONE, FAIL, HEARTBEAT, DISCONNECT', () => {
  const ready = zbwEncode.ready('tts', 4, ['gpu'])
  assert.deepEqual(str(...ready.slice(0, 3)), ['', 'ZBW01', '\x01'])
  assert.deepEqual(unpack(ready[3]), { service: 'tts', credit: 4, tags: ['gpu'] })
  assert.equal(ready.length, 4)
  assert.deepEqual(unpack(zbwEncode.ready('tts', 1)[3]), { service: 'tts', credit: 1 })
  const batch = zbwEncode.ready('tts', 2, [], { batch: true })[3]
  assert.deepEqual(unpack(batch), { service: 'tts', credit: 2, batch: true })
  assert.deepEqual([...batch.subarray(-7)], [0xa5, ...Buffer.from('batch'), 0xc3]) // a msgpack bool

  const ack = zbwEncode.ack([['t1', 1], ['t2', 3]])
  assert.equal(ack[2][0], W.ACK)
  assert.deepEqual(unpack(ack[3]), { tasks: [['t1', 1], ['t2', 3]] })

  const progress = zbwEncode.progress('t1', 2, [Buffer.from('50%')])
  assert.equal(progress[2][0], W.PROGRESS)
  assert.deepEqual(unpack(progress[3]), { id: 't1', attempt: 2 })
  assert.deepEqual(str(progress[4]), ['50%'])
  // the attempt (a fencing token the broker checks with `type(x) is int`) is a msgpack int
  assert.deepEqual([...progress[3]].slice(-1), [0x02])

  const done = zbwEncode.done('t1', 1, [Buffer.from('a'), Buffer.from('b')])
  assert.equal(done[2][0], W.DONE)
  assert.deepEqual(str(...done.slice(4)), ['a', 'b'])

  const dones = zbwEncode.dones([['t1', 1, [Buffer.from('a')]], ['t2', 3, []], ['t3', 1, [Buffer.from('b'), Buffer.from('c')]]])
  assert.equal(dones[2][0], W.DONES)
  assert.equal(W.DONES, 0x0b)
  assert.deepEqual(unpack(dones[3]), { tasks: [['t1', 1, 1], ['t2', 3, 0], ['t3', 1, 2]] })
  assert.deepEqual(str(...dones.slice(4)), ['a', 'b', 'c'])
  assert.throws(() => zbwEncode.dones([]), RangeError)
  assert.throws(() => zbwEncode.dones(Array.from({ length: 1025 }, (_, i) => [`t${i}`, 1, []])), /1\.\.1024/)
  assert.equal(zbwEncode.dones(Array.from({ length: 1024 }, (_, i) => [`t${i}`, 1, []])).length, 4)

  const fail = zbwEncode.fail('t1', 1, 'Error: boom', { retry: true, delayS: 2.5 })
  assert.equal(fail[2][0], W.FAIL)
  assert.deepEqual(unpack(fail[3]), { id: 't1', attempt: 1, reason: 'Error: boom', retry: true, delay_s: 2.5 })
  assert.equal(fail.length, 4)
  assert.deepEqual(unpack(zbwEncode.fail('t1', 1, 'x', { retry: false })[3]), { id: 't1', attempt: 1, reason: 'x', retry: false })

  assert.deepEqual(str(...zbwEncode.heartbeat()), ['', 'ZBW01', '\x07'])
  assert.deepEqual(unpack(zbwEncode.heartbeat({ cpu: 0.5 })[3]), { metrics: { cpu: 0.5 } })
  assert.deepEqual(str(...zbwEncode.disconnect()), ['', 'ZBW01', '\x08'])
  assert.deepEqual(unpack(zbwEncode.disconnect('bye')[3]), { reason: 'bye' })

  // TAGS (§16): the whole new list, an empty one included (it clears them)
  const tags = zbwEncode.tags(['gpu', 'model:llama3'])
  assert.deepEqual(str(...tags.slice(0, 3)), ['', 'ZBW01', '\x0e'])
  assert.equal(W.TAGS, 0x0e)
  assert.equal(tags.length, 4)
  assert.deepEqual([...tags[3]], [0x81, 0xa4, ...Buffer.from('tags'), 0x92, 0xa3, ...Buffer.from('gpu'), 0xac, ...Buffer.from('model:llama3')])
  assert.deepEqual([...zbwEncode.tags([])[3]], [0x81, 0xa4, ...Buffer.from('tags'), 0x90])
})

test('ZBW01: what a worker receives', () => {
  const head = [Buffer.alloc(0), Buffer.from('ZBW01')]
  const task = decodeForWorker([...head, Buffer.from([W.TASK]),
    pack({ id: 't1', attempt: 2, service: 'tts', headers: { lang: 'de' }, timeout_s: 30 }),
    Buffer.from('p1'), Buffer.from('p2')])
  assert.equal(task.type, 'task')
  assert.equal(task.id, 't1')
  assert.equal(task.attempt, 2)
  assert.deepEqual(task.headers, { lang: 'de' })
  assert.equal(task.timeoutS, 30)
  assert.deepEqual(str(...task.frames), ['p1', 'p2'])

  assert.deepEqual(decodeForWorker([...head, Buffer.from([W.HEARTBEAT])]), { type: 'heartbeat' })
  assert.deepEqual(decodeForWorker([...head, Buffer.from([W.CANCEL]), pack({ id: 't1', attempt: 2 })]),
    { type: 'cancel', id: 't1', attempt: 2 })
  assert.deepEqual(decodeForWorker([...head, Buffer.from([W.DISCONNECT]), pack({ reason: 'unknown worker' })]),
    { type: 'disconnect', reason: 'unknown worker' })
  assert.deepEqual(decodeForWorker([...head, Buffer.from([W.DISCONNECT])]), { type: 'disconnect', reason: '' })

  assert.throws(() => decodeForWorker([Buffer.alloc(0), Buffer.from('MDPW01'), Buffer.from([1])]), ProtocolError)
  assert.throws(() => decodeForWorker([...head, Buffer.from([W.TASK]), pack({ id: 't1', attempt: 1.5 })]), /integer attempt/)
  assert.throws(() => decodeForWorker([...head, Buffer.from([W.TASK]), Buffer.from([0xc1])]), ProtocolError)
  assert.throws(() => decodeForWorker([...head, Buffer.from([W.TASK]), pack([1, 2])]), /not a map/)
  assert.throws(() => decodeForWorker([...head, Buffer.from([0x42])]), /unexpected command/)
})

test('ZBW01: TASKS is split into its tasks by their frame counts', () => {
  const head = [Buffer.alloc(0), Buffer.from('ZBW01'), Buffer.from([W.TASKS])]
  assert.equal(W.TASKS, 0x0a)
  const message = decodeForWorker([...head,
    pack({
      tasks: [
        { id: 'a', attempt: 1, service: 'tts', n: 2 },
        { id: 'b', attempt: 3, service: 'stt', headers: { lang: 'de' }, timeout_s: 1.5, deps: ['t1', 't0'], n: 0 },
        { id: 'c', attempt: 1, n: 1 }
      ]
    }),
    Buffer.from('a1'), Buffer.from('a2'), Buffer.from('c1')])
  assert.equal(message.type, 'tasks')
  const [a, b, c] = message.tasks
  assert.equal(message.tasks.length, 3)
  assert.deepEqual({ ...a, frames: str(...a.frames) },
    { id: 'a', attempt: 1, service: 'tts', headers: {}, timeoutS: null, dependsOn: [], frames: ['a1', 'a2'] })
  assert.deepEqual(b, { id: 'b', attempt: 3, service: 'stt', headers: { lang: 'de' }, timeoutS: 1.5, dependsOn: ['t1', 't0'], frames: [] })
  assert.deepEqual({ ...c, frames: str(...c.frames) },
    { id: 'c', attempt: 1, service: '', headers: {}, timeoutS: null, dependsOn: [], frames: ['c1'] })

  const entry = (id, n) => ({ id, attempt: 1, service: 's', n })
  const bad = (meta, ...frames) => () => decodeForWorker([...head, pack(meta), ...frames.map((f) => Buffer.from(f))])
  assert.throws(() => decodeForWorker(head), /metadata frame/)
  assert.throws(bad({ tasks: [] }), /non-empty 'tasks'/)
  assert.throws(bad({ tasks: 'a' }), /non-empty 'tasks'/)
  assert.throws(bad({ tasks: [['a', 1, 0]] }), /entries are maps/)
  assert.throws(bad({ tasks: [{ id: 'a', attempt: 1 }] }), /frame count 'n'/)
  assert.throws(bad({ tasks: [entry('a', -1)] }), /frame count 'n'/)
  assert.throws(bad({ tasks: [entry('a', 1.5)] }, 'x'), /frame count 'n'/)
  assert.throws(bad({ tasks: [entry('a', 2)] }, 'x'), /do not add up/)
  assert.throws(bad({ tasks: [entry('a', 1)] }, 'x', 'y'), /do not add up/)
  assert.throws(bad({ tasks: [{ ...entry('a', 0), attempt: 1.5 }] }), /integer attempt/)
  assert.throws(bad({ tasks: [{ ...entry('a', 0), headers: 'x' }] }), /'headers' a map/)
  assert.throws(bad({ tasks: [{ ...entry('a', 0), deps: 't1' }] }), /'deps' is a list of task ids/)
  assert.throws(bad({ tasks: [{ ...entry('a', 0), deps: ['t1', 2] }] }), /'deps' is a list of task ids/)
  for (const fn of [bad({ tasks: [] }), bad({ tasks: [entry('a', 2)] }, 'x')]) {
    assert.throws(fn, (err) => err instanceof ProtocolError && err.code === 'bad_meta')
  }
})

test('ZBC01: calls carry an integer rid; answers are matched by it', () => {
  const call = zbcCall(C.ENQUEUE, { rid: 7, service: 'tts', counts: [1, 2], keys: ['a', 'b'] }, [Buffer.from('x'), Buffer.from('y'), Buffer.from('z')])
  assert.deepEqual(str(...call.slice(0, 3)), ['', 'ZBC01', '\x01'])
  assert.deepEqual(unpack(call[3]), { rid: 7, service: 'tts', counts: [1, 2], keys: ['a', 'b'] })
  assert.equal(call.length, 7)

  const head = [Buffer.alloc(0), Buffer.from('ZBC01')]
  const reply = decodeZbcAnswer([...head, Buffer.from([C.REPLY]), pack({ rid: 7, id: 't1', state: 'done' }), Buffer.from('r')])
  assert.equal(reply.rid, 7)
  assert.equal(reply.ok, true)
  assert.deepEqual(str(...reply.frames), ['r'])
  const error = decodeZbcAnswer([...head, Buffer.from([C.ERROR]), pack({ rid: 8, code: 'not_found', message: 'no task' })])
  assert.equal(error.ok, false)
  assert.equal(error.meta.code, 'not_found')
  assert.throws(() => decodeZbcAnswer([...head, Buffer.from([C.REPLY]), pack({ rid: '7' })]), /integer 'rid'/)
})

test('7/MDP: request and reply frames', () => {
  assert.deepEqual(str(...mdpRequest('echo', [Buffer.from('hi')])), ['', 'MDPC01', 'echo', 'hi'])
  const reply = decodeMdpReply([Buffer.alloc(0), Buffer.from('MDPC01'), Buffer.from('echo'), Buffer.from('HI')])
  assert.equal(reply.service, 'echo')
  assert.deepEqual(str(...reply.body), ['HI'])
  assert.throws(() => decodeMdpReply([Buffer.alloc(0), Buffer.from('MDPC02'), Buffer.from('echo')]), ProtocolError)
})

test('events: [topic, envelope] with snake_case keys on the wire', () => {
  const frames = encodeEvent({ type: 'fs.change', source: 'watcher', payload: { path: '/a', raw: Buffer.from([1]) }, timestamp: 1700000000.5, correlationId: 'c1', replyTo: 'fs.ack' })
  assert.equal(frames[0].toString(), 'fs.change')
  const envelope = unpack(frames[1])
  assert.deepEqual(Object.keys(envelope).sort(), ['correlation_id', 'payload', 'reply_to', 'source', 'timestamp', 'type'])
  assert.equal(frames[1].includes(Buffer.from([0xc4, 1, 1])), true) // the Buffer travels as bin
  const event = decodeEvent(frames)
  assert.equal(event.type, 'fs.change')
  assert.equal(event.correlationId, 'c1')
  assert.equal(event.replyTo, 'fs.ack')
  assert.equal(event.timestamp, 1700000000.5)
  assert.deepEqual([...event.payload.raw], [1])
  assert.throws(() => decodeEvent([Buffer.from('x'), pack(['not', 'a', 'map'])]), /not a map/)
  assert.throws(() => decodeEvent([Buffer.from('x'), pack({ source: 's' })]), /type and source/)
  assert.throws(() => decodeEvent([Buffer.from('x')]), /2 frames/)
})

const topic = (t) => Buffer.from(t, 'utf8')

test('decodeEvents: a single event is a list of one; neither payload key is one event with a null payload', () => {
  const frames = encodeEvent({ type: 'fs.change', source: 'watcher', payload: { path: '/a' }, timestamp: 1700000000.25 })
  const events = decodeEvents(frames)
  assert.deepEqual(events, [{ topic: 'fs.change', type: 'fs.change', source: 'watcher', payload: { path: '/a' }, timestamp: 1700000000.25 }])
  assert.deepEqual(decodeEvent(frames), events[0])
  const bare = decodeEvents([topic('x.y'), pack({ type: 'x.y', source: 's', timestamp: 1 })])
  assert.deepEqual(bare, [{ topic: 'x.y', type: 'x.y', source: 's', payload: null, timestamp: 1 }])
  // an explicit nil payload, an integer timestamp, no source at all
  assert.deepEqual(decodeEvents([topic('x'), pack({ type: 'x', payload: null, timestamp: 1700000000 })]),
    [{ topic: 'x', type: 'x', source: '', payload: null, timestamp: 1700000000 }])
})

test('decodeEvents: a batch of 3 is 3 events in array order, sharing the envelope fields', () => {
  const envelope = {
    type: 'task.enqueued.tts',
    source: 'zbroker',
    timestamp: 1700000000.5,
    payloads: [{ id: 't1' }, { id: 't2' }, { id: 't3' }]
  }
  const events = decodeEvents([topic('task.enqueued.tts'), pack(envelope)])
  assert.equal(events.length, 3)
  assert.deepEqual(events.map((e) => e.payload.id), ['t1', 't2', 't3'])
  for (const e of events) {
    assert.deepEqual(Object.keys(e).sort(), ['payload', 'source', 'timestamp', 'topic', 'type'])
    assert.equal(e.topic, 'task.enqueued.tts')
    assert.equal(e.type, 'task.enqueued.tts')
    assert.equal(e.source, 'zbroker')
    assert.equal(e.timestamp, 1700000000.5)
  }
  // decodeEvent reads the single form only: a batch of several is an error, a batch of one is its event
  assert.throws(() => decodeEvent([topic('task.enqueued.tts'), pack(envelope)]), (err) => err instanceof ProtocolError && err.code === 'bad_event' && /3 events/.test(err.message))
  const one = decodeEvent([topic('a'), pack({ type: 'a', source: 's', timestamp: 2, payloads: ['only'] })])
  assert.equal(one.payload, 'only')
})

test('decodeEvents: a batch with correlation_id and reply_to gives them to every event', () => {
  const events = decodeEvents([topic('job.step'), pack({ type: 'job.step', source: 'w', timestamp: 3.5, correlation_id: 'job-7', reply_to: 'job.ack', payloads: [1, null, Buffer.from([9])] })])
  assert.deepEqual(events.map((e) => [e.correlationId, e.replyTo]), [['job-7', 'job.ack'], ['job-7', 'job.ack'], ['job-7', 'job.ack']])
  assert.equal(events[0].payload, 1)
  assert.equal(events[1].payload, null)
  assert.deepEqual([...events[2].payload], [9])
  // a non-string correlation_id is ignored, not an error
  const [e] = decodeEvents([topic('a'), pack({ type: 'a', source: 's', timestamp: 1, correlation_id: 5, payloads: ['x'] })])
  assert.equal('correlationId' in e, false)
})

test('decodeEvents: a rows batch is one event per row, its payload the fields mapped to the row', () => {
  const envelope = {
    type: 'task.started.tts',
    source: 'zbroker',
    timestamp: 5.5,
    fields: ['id', 'attempt', 'worker', '__proto__'],
    rows: [['t1', 1, 'ab', null], ['t2', 2, 'cd', { polluted: true }]]
  }
  const events = decodeEvents([topic('task.started.tts'), pack(envelope)])
  assert.deepEqual(events.map((e) => [e.type, e.source, e.timestamp]), [['task.started.tts', 'zbroker', 5.5], ['task.started.tts', 'zbroker', 5.5]])
  assert.deepEqual(events.map((e) => [e.payload.id, e.payload.attempt, e.payload.worker]), [['t1', 1, 'ab'], ['t2', 2, 'cd']])
  // a field named __proto__ is an own field, never the object's prototype
  assert.deepEqual(Object.getOwnPropertyDescriptor(events[1].payload, '__proto__').value, { polluted: true })
  assert.equal(Object.getPrototypeOf(events[1].payload), Object.prototype)
  const one = decodeEvent([topic('a'), pack({ type: 'a', source: 's', timestamp: 1, fields: ['n'], rows: [[7]] })])
  assert.deepEqual(one.payload, { n: 7 })
})

test('decodeEvents: every malformed message is a bad_event ProtocolError', () => {
  const ok = { type: 'a', source: 's', timestamp: 1 }
  const cases = [
    ['one frame', [topic('a')], /2 frames/],
    ['three frames', [topic('a'), pack({ ...ok, payload: 1 }), Buffer.alloc(0)], /2 frames/],
    ['not msgpack', [topic('a'), Buffer.from([0xc1])], /not msgpack/],
    ['envelope an array', [topic('a'), pack(['not', 'a', 'map'])], /not a map/],
    ['envelope a string', [topic('a'), pack('a')], /not a map/],
    ['no type', [topic('a'), pack({ source: 's', timestamp: 1, payload: 1 })], /type and source/],
    ['type not a string', [topic('a'), pack({ ...ok, type: 7, payload: 1 })], /type and source/],
    ['source not a string', [topic('a'), pack({ ...ok, source: Buffer.from('s'), payload: 1 })], /type and source/],
    ['timestamp not a number', [topic('a'), pack({ ...ok, timestamp: '1', payload: 1 })], /timestamp/],
    ['both payload and payloads', [topic('a'), pack({ ...ok, payload: 1, payloads: [1] })], /both payload and payloads/],
    ['both, payload nil', [topic('a'), pack({ ...ok, payload: null, payloads: [1] })], /both payload and payloads/],
    ['payloads empty', [topic('a'), pack({ ...ok, payloads: [] })], /non-empty array/],
    ['payloads a map', [topic('a'), pack({ ...ok, payloads: { 0: 'x' } })], /non-empty array/],
    ['payloads a string', [topic('a'), pack({ ...ok, payloads: 'abc' })], /non-empty array/],
    ['payloads bin', [topic('a'), pack({ ...ok, payloads: Buffer.from([1, 2]) })], /non-empty array/],
    ['payloads nil', [topic('a'), pack({ ...ok, payloads: null })], /non-empty array/],
    ['rows and payload', [topic('a'), pack({ ...ok, fields: ['x'], rows: [[1]], payload: 1 })], /both payload and rows/],
    ['all three forms', [topic('a'), pack({ ...ok, fields: ['x'], rows: [[1]], payload: 1, payloads: [1] })], /payload, payloads and rows/],
    ['rows without fields', [topic('a'), pack({ ...ok, rows: [[1]] })], /fields must be a non-empty array/],
    ['fields empty', [topic('a'), pack({ ...ok, fields: [], rows: [[]] })], /fields must be a non-empty array/],
    ['a field twice', [topic('a'), pack({ ...ok, fields: ['x', 'x'], rows: [[1, 2]] })], /distinct strings/],
    ['a field not a string', [topic('a'), pack({ ...ok, fields: ['x', 3], rows: [[1, 2]] })], /distinct strings/],
    ['rows empty', [topic('a'), pack({ ...ok, fields: ['x'], rows: [] })], /rows must be a non-empty array/],
    ['a row not an array', [topic('a'), pack({ ...ok, fields: ['x'], rows: [1] })], /every row/],
    ['a short row', [topic('a'), pack({ ...ok, fields: ['x', 'y'], rows: [[1, 2], [3]] })], /every row must be an array of 2/]
  ]
  for (const [what, frames, message] of cases) {
    for (const decode of [decodeEvents, decodeEvent]) {
      assert.throws(() => decode(frames), (err) => err instanceof ProtocolError && err.code === 'bad_event' && message.test(err.message), `${decode.name}: ${what}`)
    }
  }
})

test('encodeEvents: a batch envelope with payloads and a float64 timestamp, round trip', () => {
  const frames = encodeEvents({ type: 'fs.change', source: 'watcher', payloads: [{ path: '/a' }, 'two', Buffer.from([3]), undefined], timestamp: 1700000000, correlationId: 'c1', replyTo: 'fs.ack' })
  assert.equal(frames.length, 2)
  assert.equal(frames[0].toString(), 'fs.change')
  const envelope = unpack(frames[1])
  assert.deepEqual(Object.keys(envelope).sort(), ['correlation_id', 'payloads', 'reply_to', 'source', 'timestamp', 'type'])
  // a whole second still travels as float64, exactly as encodeEvent does it
  const at = frames[1].indexOf(Buffer.from([0xa9, ...Buffer.from('timestamp')]))
  assert.deepEqual([...frames[1].subarray(at + 10, at + 19)], [...encodeEvent({ type: 'x', source: '', timestamp: 1700000000 })[1].subarray(-9)])
  assert.equal(frames[1][at + 10], 0xcb)
  const events = decodeEvents(frames)
  assert.deepEqual(events.map((e) => e.payload), [{ path: '/a' }, 'two', events[2].payload, null])
  assert.deepEqual([...events[2].payload], [3])
  for (const e of events) {
    assert.equal(e.type, 'fs.change')
    assert.equal(e.source, 'watcher')
    assert.equal(e.timestamp, 1700000000)
    assert.equal(e.correlationId, 'c1')
    assert.equal(e.replyTo, 'fs.ack')
  }
  // optional fields are left out when there is none
  const plain = unpack(encodeEvents({ type: 'a', source: 's', payloads: [1], timestamp: 1.5 })[1])
  assert.deepEqual(plain, { type: 'a', source: 's', payloads: [1], timestamp: 1.5 })
  assert.throws(() => encodeEvents({ type: 'a', source: 's', payloads: [], timestamp: 1 }), RangeError)
  assert.throws(() => encodeEvents({ type: 'a', source: 's', payloads: 'abc', timestamp: 1 }), TypeError)
  assert.throws(() => encodeEvents({ type: 'a', source: 's', payloads: undefined, timestamp: 1 }), TypeError)
})

test('payload conversion: Buffer, Uint8Array, string, arrays of them', () => {
  assert.deepEqual(toFrames(undefined), [])
  assert.deepEqual(str(...toFrames('hé')), ['h\xc3\xa9'])
  assert.deepEqual(str(...toFrames([new Uint8Array([65]), 'B'])), ['A', 'B'])
  assert.throws(() => toFrames(42, 'payload'), /payload must be a Buffer, Uint8Array or string, got number/)
  assert.throws(() => toFrames([{}], 'result'), /result\[0\]/)
})

test('RetryLater needs a finite non-negative delay', () => {
  assert.equal(new RetryLater(2).delayS, 2)
  assert.throws(() => new RetryLater(-1), RangeError)
  assert.throws(() => new RetryLater(Infinity), RangeError)
})

// ------------------------------------------------------------ the msgpack decoder

const utf8str = (bytes) => Buffer.concat([Buffer.from([0xa0 | bytes.length]), Buffer.from(bytes)])
const envelopeWith = (pairs) => Buffer.concat([Buffer.from([0x80 | (pairs.length / 2)]), ...pairs])

test('msgpack decoder: every type decodes as @msgpack/msgpack decodes it', () => {
  const values = [
    null, true, false, 0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, Number.MAX_SAFE_INTEGER,
    -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, Number.MIN_SAFE_INTEGER,
    0.5, -1.25, 1e300, Number.MIN_VALUE, Date.now() / 1000,
    '', 'a', 'x'.repeat(31), 'x'.repeat(32), 'x'.repeat(255), 'x'.repeat(256), 'x'.repeat(65535), 'x'.repeat(65536),
    'héllo wörld', '日本語', '😀 emoji', 'é'.repeat(40), 'mixed ascii then é'.repeat(10), '\u0000nul',
    Buffer.alloc(0), Buffer.from([1, 2, 3]), Buffer.alloc(300, 7), Buffer.alloc(70_000, 9),
    [], [1, 'two', [3, [4]]], Array.from({ length: 16 }, (_, i) => i), Array.from({ length: 70_000 }, (_, i) => i % 3),
    {}, { a: 1, b: { c: [null, { d: 'e' }] } }, Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`k${i}`, i])),
    Object.fromEntries(Array.from({ length: 70_000 }, (_, i) => [`key-${i}`, i])),
    { 1: 'numeric key', 'a long key of more than sixteen bytes': 1, ключ: 'non-ASCII key' },
    new Date(1_700_000_000_123)
  ]
  for (const value of values) {
    const bytes = pack(value)
    assert.deepEqual(unpack(bytes), libraryDecode(bytes), `value ${String(value).slice(0, 40)}`)
  }
  // ints beyond 2^53 come out as the nearest number, as before
  const u64 = Buffer.from([0xcf, 0x00, 0x20, 0, 0, 0, 0, 0, 1])
  const i64 = Buffer.from([0xd3, 0xff, 0xdf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
  assert.equal(unpack(u64), libraryDecode(u64))
  assert.equal(unpack(i64), libraryDecode(i64))
  // float 32, and an ext type that is not a timestamp
  const f32 = Buffer.from([0xca, 0x3f, 0xc0, 0, 0])
  assert.equal(unpack(f32), 1.5)
  const ext = Buffer.from([0xd4, 0x05, 0x2a])
  assert.deepEqual(unpack(ext), libraryDecode(ext))
  // the same key bytes decode to the same string every time (the key cache):
  // 40 distinct keys of one length (3 bytes), more than its 16 slots per
  // length, decoded over and over, so entries are evicted and keys come back
  for (let i = 0; i < 200; i++) {
    const key = `k${String((i * 7) % 40).padStart(2, '0')}`
    assert.deepEqual(unpack(pack({ [key]: i })), { [key]: i })
  }
  // and cached keys that differ in a single byte are not mistaken for one another
  assert.deepEqual(unpack(pack({ k00: 1, k01: 2, k10: 3 })), { k00: 1, k01: 2, k10: 3 })
})

test('msgpack decoder: a "__proto__" key is an own property in answers, TASKs and events; nothing is polluted', () => {
  const headers = JSON.parse('{"__proto__": {"polluted": true}, "reply_to": "a"}')
  const check = (object, what) => {
    assert.ok(Object.hasOwn(object, '__proto__'), what)
    assert.deepEqual(Object.getOwnPropertyDescriptor(object, '__proto__').value, { polluted: true }, what)
    assert.equal(Object.getPrototypeOf(object), Object.prototype, what)
    assert.deepEqual(Object.keys(object), ['__proto__', 'reply_to'], what)
    assert.equal(object.polluted, undefined, what)
  }
  check(unpack(pack(headers)), 'unpack')
  const head = [Buffer.alloc(0), Buffer.from('ZBC01')]
  const answer = decodeZbcAnswer([...head, Buffer.from([C.REPLY]), pack({ rid: 1, task: { id: 't1', headers } })])
  check(answer.meta.task.headers, 'ZBC01 answer')
  const task = decodeForWorker([Buffer.alloc(0), Buffer.from('ZBW01'), Buffer.from([W.TASK]), pack({ id: 't1', attempt: 1, service: 's', headers })])
  check(task.headers, 'TASK')
  const [event] = decodeEvents([Buffer.from('a'), pack({ type: 'a', source: 's', timestamp: 1.5, payload: headers })])
  check(event.payload, 'event payload')
  // at the top level of a meta frame too: the fields the code reads are unaffected
  const meta = unpack(pack(JSON.parse('{"__proto__": {"rid": 9}, "rid": 1}')))
  assert.equal(meta.rid, 1)
  assert.equal(Object.getPrototypeOf(meta), Object.prototype)
})

test('msgpack decoder: invalid UTF-8 and other broken input are refused, as Python refuses them', () => {
  const refused = [
    ['a lone continuation byte', utf8str([0x80])],
    ['a truncated sequence', utf8str([0x61, 0xe2, 0x82])],
    ['an overlong encoding', utf8str([0xc0, 0x80])],
    ['an encoded surrogate', utf8str([0xed, 0xa0, 0x80])],
    ['beyond U+10FFFF', utf8str([0xf4, 0x90, 0x80, 0x80])],
    ['0xff', utf8str([0xff, 0xfe])],
    ['a long string with one bad byte', Buffer.concat([Buffer.from([0xd9, 200]), Buffer.alloc(199, 0x61), Buffer.from([0xff])])],
    ['a bad map key', Buffer.concat([Buffer.from([0x81]), utf8str([0x6b, 0xff]), Buffer.from([0x01])])],
    ['a nil map key', Buffer.from([0x81, 0xc0, 0x01])],
    ['trailing bytes', Buffer.from([0x01, 0x02])],
    ['a truncated str', Buffer.from([0xa5, 0x61])],
    ['a truncated array', Buffer.from([0xdd, 0xff, 0xff, 0xff, 0xff])],
    ['a truncated map', Buffer.from([0xdf, 0xff, 0xff, 0xff, 0xff, 0x01])],
    ['0xc1', Buffer.from([0xc1])],
    ['nothing', Buffer.alloc(0)],
    ['nesting deeper than 1024', Buffer.concat([Buffer.alloc(5000, 0x91), Buffer.from([0x01])])]
  ]
  for (const [what, bytes] of refused) {
    assert.throws(() => unpack(bytes), (err) => err instanceof ProtocolError && err.code === 'bad_meta', what)
  }
  // valid input near those edges decodes
  assert.equal(unpack(pack('\uFEFFbom kept')), '\uFEFFbom kept')
  assert.equal(unpack(utf8str([0xf4, 0x8f, 0xbf, 0xbf])), '\u{10FFFF}')
  assert.equal(unpack(utf8str([0xef, 0xbf, 0xbd])), '\uFFFD') // U+FFFD itself is a valid character
  let nested = 1
  for (let i = 0; i < 1000; i++) nested = [nested]
  assert.deepEqual(unpack(Buffer.concat([Buffer.alloc(1000, 0x91), Buffer.from([0x01])])), nested)
})

test('decodeEvents: the timestamp must be a finite number below 2^53; invalid UTF-8 is a bad_event', () => {
  const event = (timestamp) => [Buffer.from('a'), envelopeWith([pack('type'), pack('a'), pack('source'), pack('s'), pack('payload'), pack(1), pack('timestamp'), timestamp])]
  const bad = {
    NaN: packFloat64(NaN),
    Infinity: packFloat64(Infinity),
    '-Infinity': packFloat64(-Infinity),
    'uint64 2^64-1': Buffer.from([0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
    'uint64 2^53': Buffer.from([0xcf, 0x00, 0x20, 0, 0, 0, 0, 0, 0]),
    'int64 -2^53': Buffer.from([0xd3, 0xff, 0xe0, 0, 0, 0, 0, 0, 0]),
    'a str': pack('1700000000'),
    nil: pack(null)
  }
  for (const [what, timestamp] of Object.entries(bad)) {
    assert.throws(() => decodeEvents(event(timestamp)), (err) => err instanceof ProtocolError && err.code === 'bad_event' && /timestamp/.test(err.message), what)
  }
  for (const timestamp of [1_700_000_000, 1_700_000_000.25, 0, -1.5, 2 ** 53 - 1]) {
    assert.equal(decodeEvent(event(packFloat64(timestamp))).timestamp, timestamp)
    if (Number.isInteger(timestamp)) assert.equal(decodeEvent(event(pack(timestamp))).timestamp, timestamp)
  }
  const badUtf8 = [
    ['in the type', envelopeWith([pack('type'), utf8str([0xff]), pack('source'), pack('s'), pack('timestamp'), packFloat64(1.5)])],
    ['in the source', envelopeWith([pack('type'), pack('a'), pack('source'), utf8str([0xc3]), pack('timestamp'), packFloat64(1.5)])],
    ['in the payload', envelopeWith([pack('type'), pack('a'), pack('source'), pack('s'), pack('payload'), utf8str([0xed, 0xb0, 0x80]), pack('timestamp'), packFloat64(1.5)])]
  ]
  for (const [what, envelope] of badUtf8) {
    assert.throws(() => decodeEvents([Buffer.from('a'), envelope]), (err) => err instanceof ProtocolError && err.code === 'bad_event' && /UTF-8/.test(err.message), what)
  }
})
