// Frames <-> messages for the three protocols zbroker speaks on its ROUTER
// socket (7/MDP client, ZBW01 worker, ZBC01 durable-task client) and for topic
// events. Pure functions: no sockets, no clock, no state. The reference is the
// Python codecs in zbroker/protocol/ and docs/protocol.md.

import { Decoder, Encoder } from '@msgpack/msgpack'
import { ProtocolError } from './errors.js'

export const DEFAULT_ENDPOINT = 'tcp://127.0.0.1:5555'
export const DEFAULT_EVENTS_IN = 'tcp://127.0.0.1:5556'
export const DEFAULT_EVENTS_OUT = 'tcp://127.0.0.1:5557'

export const EMPTY = Buffer.alloc(0)

// ------------------------------------------------------------------ msgpack

// Strings are packed as msgpack str, Buffer/Uint8Array as bin, safe integers as
// msgpack int and every other number as float64. Keys whose value is
// `undefined` are left out, so optional fields are simply absent.
const encoder = new Encoder({ ignoreUndefined: true })
const decoder = new Decoder()

/** msgpack-encode `value` into a Buffer (copied, so it may be kept). */
export function pack (value) {
  const bytes = encoder.encode(value)
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
}

/** Decode one msgpack value; a ProtocolError for anything that is not msgpack. */
export function unpack (frame, what = 'metadata') {
  try {
    return decoder.decode(frame)
  } catch (err) {
    throw new ProtocolError('bad_meta', `${what} is not msgpack: ${err.message}`)
  }
}

/** Decode a metadata frame that must be a msgpack map with string keys. */
export function unpackMeta (frame) {
  const meta = unpack(frame)
  if (!isPlainMap(meta)) throw new ProtocolError('bad_meta', 'metadata is not a map')
  return meta
}

function isPlainMap (value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value) &&
    !(value instanceof Uint8Array) && !(value instanceof Date)
}

/** True for a JavaScript number the broker will read as a msgpack int. */
export function isInt (value) {
  return Number.isSafeInteger(value)
}

// ------------------------------------------------------------------ frames

/**
 * One frame from what a user hands us: Buffer and Uint8Array as they are,
 * strings as UTF-8. Anything else is a TypeError naming `what`.
 */
export function toFrame (value, what = 'payload') {
  if (Buffer.isBuffer(value)) return value
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength)
  if (typeof value === 'string') return Buffer.from(value, 'utf8')
  if (value instanceof ArrayBuffer) return Buffer.from(value)
  throw new TypeError(`${what} must be a Buffer, Uint8Array or string, got ${describe(value)}`)
}

/**
 * A payload or result as a list of frames: one Buffer/Uint8Array/string is
 * one frame, an array of them is that many frames, null/undefined is none.
 */
export function toFrames (value, what = 'payload') {
  if (value === undefined || value === null) return []
  if (Array.isArray(value)) return value.map((v, i) => toFrame(v, `${what}[${i}]`))
  return [toFrame(value, what)]
}

export function describe (value) {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  if (typeof value === 'object') return value.constructor?.name ?? 'an object'
  return typeof value
}

function frameIs (frame, text) {
  return frame.length === text.length && frame.toString('latin1') === text
}

// ------------------------------------------------------------ 7/MDP client

export const MDPC01 = 'MDPC01'
export const MMI_SERVICE = 'mmi.service'

/** Client -> broker over a DEALER: ["", "MDPC01", service, body...]. */
export function mdpRequest (service, body) {
  return [EMPTY, Buffer.from(MDPC01), Buffer.from(service, 'utf8'), ...body]
}

/** Broker -> client: [service, body] or a ProtocolError. */
export function decodeMdpReply (frames) {
  if (frames.length < 3 || frames[0].length !== 0 || !frameIs(frames[1], MDPC01)) {
    throw new ProtocolError('bad_header', 'not an MDPC01 reply')
  }
  return { service: frames[2].toString('utf8'), body: frames.slice(3) }
}

// ------------------------------------------------------------ ZBW01 worker

export const ZBW01 = 'ZBW01'
export const W = Object.freeze({
  READY: 0x01,
  TASK: 0x02,
  ACK: 0x03,
  PROGRESS: 0x04,
  DONE: 0x05,
  FAIL: 0x06,
  HEARTBEAT: 0x07,
  DISCONNECT: 0x08,
  CANCEL: 0x09,
  TASKS: 0x0a,
  DONES: 0x0b
})
export const MAX_CREDIT = 10_000
export const MAX_TAGS = 32
// Entries in one DONES message (the broker refuses more); TASKS are as many as it sends.
export const MAX_WORKER_BATCH = 1024

const ZBW01_FRAME = Buffer.from(ZBW01)
const commandFrames = new Map()
function commandFrame (byte) {
  let frame = commandFrames.get(byte)
  if (!frame) commandFrames.set(byte, frame = Buffer.from([byte]))
  return frame
}

function zbw (command, meta, ...rest) {
  const frames = [EMPTY, ZBW01_FRAME, commandFrame(command)]
  if (meta !== undefined) frames.push(pack(meta))
  frames.push(...rest)
  return frames
}

export const zbwEncode = {
  /** READY; `batch: true` says the worker accepts TASKS (several tasks in one message). */
  ready: (service, credit, tags = [], { batch = false } = {}) => {
    const meta = { service, credit }
    if (tags.length) meta.tags = tags
    if (batch) meta.batch = true
    return zbw(W.READY, meta)
  },
  ack: (refs) => zbw(W.ACK, { tasks: refs.map(([id, attempt]) => [id, attempt]) }),
  progress: (id, attempt, data = []) => zbw(W.PROGRESS, { id, attempt }, ...data),
  done: (id, attempt, result = []) => zbw(W.DONE, { id, attempt }, ...result),
  /** Several DONEs in one message: `results` is [[id, attempt, frames], ...], 1..MAX_WORKER_BATCH. */
  dones: (results) => {
    if (results.length < 1 || results.length > MAX_WORKER_BATCH) {
      throw new RangeError(`DONES carries 1..${MAX_WORKER_BATCH} results, got ${results.length}`)
    }
    const frames = zbw(W.DONES, { tasks: results.map(([id, attempt, result]) => [id, attempt, result.length]) })
    for (const [, , result] of results) {
      for (const frame of result) frames.push(frame)
    }
    return frames
  },
  fail: (id, attempt, reason, { retry = true, delayS } = {}) =>
    zbw(W.FAIL, delayS === undefined || delayS === null
      ? { id, attempt, reason, retry }
      : { id, attempt, reason, retry, delay_s: delayS }),
  heartbeat: (metrics) => metrics ? zbw(W.HEARTBEAT, { metrics }) : zbw(W.HEARTBEAT),
  disconnect: (reason) => reason ? zbw(W.DISCONNECT, { reason }) : zbw(W.DISCONNECT)
}

function taskRef (meta) {
  if (typeof meta.id !== 'string' || !isInt(meta.attempt)) {
    throw new ProtocolError('bad_meta', 'needs a string id and an integer attempt')
  }
  return { id: meta.id, attempt: meta.attempt }
}

// One task of a TASK meta or a TASKS entry, with its payload frames.
function taskOf (meta, frames) {
  const { id, attempt } = taskRef(meta)
  const service = meta.service ?? ''
  const headers = meta.headers ?? {}
  if (typeof service !== 'string' || !isPlainMap(headers)) {
    throw new ProtocolError('bad_meta', "TASK 'service' is a string, 'headers' a map")
  }
  const timeoutS = typeof meta.timeout_s === 'number' ? meta.timeout_s : null
  return { id, attempt, service, headers, timeoutS, frames }
}

/**
 * What a ZBW01 worker receives: {type: 'task'|'tasks'|'cancel'|'heartbeat'|'disconnect', ...}.
 * A TASKS message is {type: 'tasks', tasks: [task, ...]}, each task shaped like a
 * TASK message without its type. Throws ProtocolError for anything else.
 */
export function decodeForWorker (frames) {
  if (frames.length < 3 || frames[0].length !== 0 || !frameIs(frames[1], ZBW01)) {
    throw new ProtocolError('bad_header', 'not a ZBW01 message')
  }
  const command = frames[2].length === 1 ? frames[2][0] : -1
  switch (command) {
    case W.TASK: {
      if (frames.length < 4) throw new ProtocolError('missing_frames', 'TASK needs a metadata frame')
      return { type: 'task', ...taskOf(unpackMeta(frames[3]), frames.slice(4)) }
    }
    case W.TASKS: {
      if (frames.length < 4) throw new ProtocolError('missing_frames', 'TASKS needs a metadata frame')
      const entries = unpackMeta(frames[3]).tasks
      if (!Array.isArray(entries) || entries.length === 0) {
        throw new ProtocolError('bad_meta', "TASKS needs a non-empty 'tasks' list")
      }
      const tasks = []
      let at = 4
      for (const entry of entries) {
        if (!isPlainMap(entry)) throw new ProtocolError('bad_meta', 'TASKS entries are maps')
        const count = entry.n
        if (!isInt(count) || count < 0) throw new ProtocolError('bad_meta', "TASKS entry needs a frame count 'n'")
        if (at + count > frames.length) throw new ProtocolError('bad_meta', 'TASKS frame counts do not add up')
        tasks.push(taskOf(entry, frames.slice(at, at + count)))
        at += count
      }
      if (at !== frames.length) throw new ProtocolError('bad_meta', 'TASKS frame counts do not add up')
      return { type: 'tasks', tasks }
    }
    case W.HEARTBEAT:
      return { type: 'heartbeat' }
    case W.CANCEL:
      if (frames.length < 4) throw new ProtocolError('missing_frames', 'CANCEL needs a metadata frame')
      return { type: 'cancel', ...taskRef(unpackMeta(frames[3])) }
    case W.DISCONNECT: {
      let reason = ''
      if (frames.length > 3) {
        const value = unpackMeta(frames[3]).reason
        reason = typeof value === 'string' ? value : ''
      }
      return { type: 'disconnect', reason }
    }
    default:
      throw new ProtocolError('unknown_command', `unexpected command 0x${frames[2].toString('hex').slice(0, 16)} for a worker`)
  }
}

// ------------------------------------------------------------ ZBC01 client

export const ZBC01 = 'ZBC01'
export const C = Object.freeze({
  ENQUEUE: 0x01,
  REQUEST: 0x02,
  RESULT: 0x03,
  STATUS: 0x04,
  CANCEL: 0x05,
  DEAD: 0x06,
  REDRIVE: 0x07,
  REPLY: 0x10,
  ERROR: 0x11
})
export const MAX_BATCH = 10_000
export const MAX_WAIT_S = 24 * 3600
export const MAX_LIST = 1000
export const PRIORITY_MIN = -128
export const PRIORITY_MAX = 127
export const MAX_ATTEMPTS_LIMIT = 1000
export const FINAL_STATES = new Set(['done', 'dead', 'cancelled', 'expired'])

const ZBC01_FRAME = Buffer.from(ZBC01)

/** Client -> broker: ["", "ZBC01", command, meta, payload...]. `meta` must hold `rid`. */
export function zbcCall (command, meta, payload = []) {
  return [EMPTY, ZBC01_FRAME, commandFrame(command), pack(meta), ...payload]
}

/** Broker -> client: {rid, ok, meta, frames}, or a ProtocolError. */
export function decodeZbcAnswer (frames) {
  if (frames.length < 4 || frames[0].length !== 0 || !frameIs(frames[1], ZBC01)) {
    throw new ProtocolError('bad_header', 'not a ZBC01 answer')
  }
  const meta = unpackMeta(frames[3])
  if (!isInt(meta.rid)) throw new ProtocolError('bad_meta', "ZBC01 answer without an integer 'rid'")
  const command = frames[2].length === 1 ? frames[2][0] : -1
  if (command === C.REPLY) return { rid: meta.rid, ok: true, meta, frames: frames.slice(4) }
  if (command === C.ERROR) return { rid: meta.rid, ok: false, meta, frames: [] }
  throw new ProtocolError('unknown_command', `unexpected ZBC01 command 0x${frames[2].toString('hex').slice(0, 16)}`)
}

// ------------------------------------------------------------ topic events

export const MAX_TOPIC_BYTES = 255

/** [topic, msgpack envelope] for one event. */
export function encodeEvent ({ type, source, payload, timestamp, correlationId, replyTo }) {
  return encodeEnvelope(type, source, timestamp, 'payload', payload === undefined ? null : payload, correlationId, replyTo)
}

/**
 * [topic, msgpack envelope] for a batch: one message whose `payloads` (a
 * non-empty array) stands for one event per element, in order, all with the
 * same type, source, timestamp, correlation id and reply-to (docs/protocol.md §6).
 */
export function encodeEvents ({ type, source, payloads, timestamp, correlationId, replyTo }) {
  if (!Array.isArray(payloads)) throw new TypeError(`payloads must be an array, got ${describe(payloads)}`)
  if (payloads.length === 0) throw new RangeError('payloads must hold at least one payload')
  const data = payloads.map((p) => p === undefined ? null : p)
  return encodeEnvelope(type, source, timestamp, 'payloads', data, correlationId, replyTo)
}

function encodeEnvelope (type, source, timestamp, key, data, correlationId, replyTo) {
  const topic = Buffer.from(type, 'utf8')
  // The envelope is a map built pair by pair so that `timestamp` is always a msgpack
  // float64, as the protocol says, even when it falls on a whole second (the generic
  // encoder would pack 1700000000 as an integer).
  const pairs = [
    pack('type'), pack(type),
    pack('source'), pack(source),
    pack(key), pack(data),
    pack('timestamp'), packFloat64(timestamp)
  ]
  if (correlationId !== undefined && correlationId !== null) pairs.push(pack('correlation_id'), pack(correlationId))
  if (replyTo !== undefined && replyTo !== null) pairs.push(pack('reply_to'), pack(replyTo))
  return [topic, Buffer.concat([Buffer.from([0x80 | (pairs.length / 2)]), ...pairs])]
}

/** `x` as a msgpack float64 (0xcb and 8 bytes, big-endian). */
export function packFloat64 (x) {
  if (typeof x !== 'number') throw new TypeError(`expected a number, got ${typeof x}`)
  const out = Buffer.alloc(9)
  out[0] = 0xcb
  out.writeDoubleBE(x, 1)
  return out
}

/**
 * [topic, envelope] of one event -> event object; a ProtocolError for anything
 * else, a batch of several events included (decodeEvents reads both forms).
 */
export function decodeEvent (frames) {
  const events = decodeEvents(frames)
  if (events.length !== 1) throw new ProtocolError('bad_event', `the envelope holds ${events.length} events`)
  return events[0]
}

/**
 * The payloads of a `rows` batch (protocol §6): one object per row, mapping each
 * of `fields` to the row's value at its position.
 */
function rowsToPayloads (fields, rows) {
  if (!Array.isArray(fields) || fields.length === 0) {
    throw new ProtocolError('bad_event', 'fields must be a non-empty array of field names')
  }
  if (!fields.every((name) => typeof name === 'string') || new Set(fields).size !== fields.length) {
    throw new ProtocolError('bad_event', 'fields must be distinct strings')
  }
  if (!Array.isArray(rows) || rows.length === 0) {
    throw new ProtocolError('bad_event', 'rows must be a non-empty array (one row per event)')
  }
  return rows.map((row) => {
    if (!Array.isArray(row) || row.length !== fields.length) {
      throw new ProtocolError('bad_event', `every row must be an array of ${fields.length} values, one per field`)
    }
    // fromEntries makes own properties, so a field named __proto__ is just a field
    return Object.fromEntries(fields.map((name, i) => [name, row[i]]))
  })
}

/**
 * [topic, envelope] -> its events, in order: one for a `payload` envelope (or
 * one with none of the keys, its payload null), one per element of a `payloads`
 * batch, one per row of a `rows` batch (its payload an object of `fields`).
 * A message that breaks docs/protocol.md §6 is a ProtocolError.
 */
export function decodeEvents (frames) {
  if (frames.length !== 2) throw new ProtocolError('bad_event', `an event has 2 frames, got ${frames.length}`)
  const envelope = unpack(frames[1], 'event envelope')
  if (!isPlainMap(envelope)) throw new ProtocolError('bad_event', 'envelope is not a map')
  const { type, source = '', timestamp = 0 } = envelope
  if (typeof type !== 'string' || typeof source !== 'string') {
    throw new ProtocolError('bad_event', 'type and source must be strings')
  }
  if (typeof timestamp !== 'number') throw new ProtocolError('bad_event', 'timestamp must be a number')
  let payloads
  const forms = ['payload', 'payloads', 'rows'].filter((key) => Object.hasOwn(envelope, key))
  if (forms.length > 1) {
    const which = forms.length === 2 ? `both ${forms[0]} and ${forms[1]}` : 'payload, payloads and rows'
    throw new ProtocolError('bad_event', `envelope holds ${which}: one is allowed`)
  }
  if (forms[0] === 'rows') {
    payloads = rowsToPayloads(envelope.fields, envelope.rows)
  } else if (forms[0] === 'payloads') {
    payloads = envelope.payloads
    if (!Array.isArray(payloads) || payloads.length === 0) {
      throw new ProtocolError('bad_event', 'payloads must be a non-empty array')
    }
  } else {
    payloads = [envelope.payload === undefined ? null : envelope.payload]
  }
  const topic = frames[0].toString('utf8')
  const correlationId = typeof envelope.correlation_id === 'string' ? envelope.correlation_id : undefined
  const replyTo = typeof envelope.reply_to === 'string' ? envelope.reply_to : undefined
  return payloads.map((payload) => {
    const event = { topic, type, source, payload, timestamp }
    if (correlationId !== undefined) event.correlationId = correlationId
    if (replyTo !== undefined) event.replyTo = replyTo
    return event
  })
}
