// Frames <-> messages for the three protocols zbroker speaks on its ROUTER
// socket (7/MDP client, ZBW01 worker, ZBC01 durable-task client) and for topic
// events. Pure functions: no sockets, no clock, no state. The reference is the
// Python codecs in zbroker/protocol/ and docs/protocol.md.
//
// The limits and state names below are copies of zbroker/protocol/limits.py and
// states.py (the reason for each limit is given there);
// tests/crosslang/test_shared_vocabulary.py fails when the two differ.

import { Encoder, ExtensionCodec } from '@msgpack/msgpack'
import { ProtocolError } from './errors.js'

export const DEFAULT_ENDPOINT = 'tcp://127.0.0.1:5555'
export const DEFAULT_EVENTS_IN = 'tcp://127.0.0.1:5556'
export const DEFAULT_EVENTS_OUT = 'tcp://127.0.0.1:5557'

export const EMPTY = Buffer.alloc(0)

// The broker's cap on one message (--max-message-bytes, default 16 MiB), counting
// every frame it receives. A Worker or Service needs room for its own metadata
// (at least MIN_MESSAGE_BYTES); a Client accepts caps down to MIN_CLIENT_MESSAGE_BYTES.
export const DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
export const MIN_MESSAGE_BYTES = 4096
export const MIN_CLIENT_MESSAGE_BYTES = 1024
// The broker's fixed cap on frames per message, counting the routing id it prepends.
export const MAX_FRAMES = 16_384
// Frames per message enqueueMany stays under by default: MAX_FRAMES less room for
// the routing id, header frames and metadata (as the Python client).
export const BATCH_FRAMES = 16_000

/**
 * `value` when it is a safe integer >= `min` (a cap the broker's
 * --max-message-bytes can match); a RangeError naming `name` otherwise.
 */
export function checkMaxMessageBytes (value, name = 'maxMessageBytes', min = MIN_MESSAGE_BYTES) {
  if (!Number.isSafeInteger(value) || value < min) {
    throw new RangeError(`${name} must be an integer >= ${min} (the broker's --max-message-bytes), got ${String(value)}`)
  }
  return value
}

// ------------------------------------------------------------------ msgpack

// Strings are packed as msgpack str, Buffer/Uint8Array as bin, safe integers as
// msgpack int and every other number as float64. Keys whose value is
// `undefined` are left out, so optional fields are simply absent.
const encoder = new Encoder({ ignoreUndefined: true })

/** msgpack-encode `value` into a Buffer (copied, so it may be kept). */
export function pack (value) {
  const bytes = encoder.encode(value)
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
}

/**
 * Decode one msgpack value; a ProtocolError for anything that is not msgpack
 * (invalid UTF-8 in a str included, as Python's decoder refuses it).
 */
export function unpack (frame, what = 'metadata') {
  try {
    return decodeMsgpack(frame)
  } catch (err) {
    throw new ProtocolError('bad_meta', `${what} is not msgpack: ${err.message}`)
  }
}

// The decoder is our own rather than @msgpack/msgpack's, which refuses a map key
// "__proto__" (valid msgpack that free-form headers and payloads may carry) and
// decodes invalid UTF-8 without complaint. Values come out as that library gives
// them: maps as plain objects (keys str or int), bin as a Buffer sharing the
// frame's memory, ints beyond 2^53 as the nearest number, ext -1 as a Date and
// other exts as ExtData. A key "__proto__" becomes an own, ordinary property
// (never the object's prototype). Nesting is capped at 1024 levels, as in
// msgpack-python.
const MAX_DEPTH = 1024
const SHORT_STR = 64 // strings up to this many bytes are tried as ASCII first
const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })
const extensions = ExtensionCodec.defaultCodec
// Recently decoded map keys of 1..16 bytes, by length: decoding a key is mostly a lookup.
const KEY_CACHE_SIZE = 16
const keyCache = Array.from({ length: 16 }, () => [])

/** Decode exactly one msgpack value from `input` (a Buffer or Uint8Array); throws on anything else. */
export function decodeMsgpack (input) {
  const buf = Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength)
  const reader = new MsgpackReader(buf)
  const value = reader.value(0)
  if (reader.pos !== buf.length) throw new RangeError(`${buf.length - reader.pos} extra byte(s) after the value`)
  return value
}

class MsgpackReader {
  constructor (buf) {
    this.buf = buf
    this.pos = 0
  }

  // Step over `n` bytes; their offset.
  take (n) {
    const start = this.pos
    if (start + n > this.buf.length) throw new RangeError('truncated msgpack data')
    this.pos = start + n
    return start
  }

  value (depth) {
    const buf = this.buf
    if (this.pos >= buf.length) throw new RangeError('truncated msgpack data')
    const b = buf[this.pos++]
    if (b < 0x80) return b
    if (b >= 0xe0) return b - 0x100
    if (b < 0x90) return this.map(b & 0x0f, depth)
    if (b < 0xa0) return this.array(b & 0x0f, depth)
    if (b < 0xc0) return this.str(b & 0x1f)
    let at
    switch (b) {
      case 0xc0: return null
      case 0xc2: return false
      case 0xc3: return true
      case 0xc4: at = this.take(1); return this.bin(buf[at])
      case 0xc5: at = this.take(2); return this.bin(buf.readUInt16BE(at))
      case 0xc6: at = this.take(4); return this.bin(buf.readUInt32BE(at))
      case 0xc7: at = this.take(1); return this.ext(buf[at])
      case 0xc8: at = this.take(2); return this.ext(buf.readUInt16BE(at))
      case 0xc9: at = this.take(4); return this.ext(buf.readUInt32BE(at))
      case 0xca: at = this.take(4); return buf.readFloatBE(at)
      case 0xcb: at = this.take(8); return buf.readDoubleBE(at)
      case 0xcc: at = this.take(1); return buf[at]
      case 0xcd: at = this.take(2); return buf.readUInt16BE(at)
      case 0xce: at = this.take(4); return buf.readUInt32BE(at)
      case 0xcf: at = this.take(8); return buf.readUInt32BE(at) * 4294967296 + buf.readUInt32BE(at + 4)
      case 0xd0: at = this.take(1); return buf.readInt8(at)
      case 0xd1: at = this.take(2); return buf.readInt16BE(at)
      case 0xd2: at = this.take(4); return buf.readInt32BE(at)
      case 0xd3: at = this.take(8); return buf.readInt32BE(at) * 4294967296 + buf.readUInt32BE(at + 4)
      case 0xd4: return this.ext(1)
      case 0xd5: return this.ext(2)
      case 0xd6: return this.ext(4)
      case 0xd7: return this.ext(8)
      case 0xd8: return this.ext(16)
      case 0xd9: at = this.take(1); return this.str(buf[at])
      case 0xda: at = this.take(2); return this.str(buf.readUInt16BE(at))
      case 0xdb: at = this.take(4); return this.str(buf.readUInt32BE(at))
      case 0xdc: at = this.take(2); return this.array(buf.readUInt16BE(at), depth)
      case 0xdd: at = this.take(4); return this.array(buf.readUInt32BE(at), depth)
      case 0xde: at = this.take(2); return this.map(buf.readUInt16BE(at), depth)
      case 0xdf: at = this.take(4); return this.map(buf.readUInt32BE(at), depth)
      default: throw new RangeError('0xc1 is not a msgpack type')
    }
  }

  str (n) {
    const start = this.take(n)
    const end = start + n
    const buf = this.buf
    if (n <= SHORT_STR) {
      let out = ''
      for (let i = start; i < end; i++) {
        const c = buf[i]
        if (c >= 0x80) return decodeUtf8(buf, start, end)
        out += String.fromCharCode(c)
      }
      return out
    }
    return decodeUtf8(buf, start, end)
  }

  // A map key: a fixstr of 1..16 bytes through the key cache, anything else as a value.
  key (depth) {
    const buf = this.buf
    const b = this.pos < buf.length ? buf[this.pos] : 0
    if (b < 0xa1 || b > 0xb0) return this.value(depth)
    const n = b & 0x1f
    const start = this.pos + 1
    const end = start + n
    if (end > buf.length) throw new RangeError('truncated msgpack data')
    const records = keyCache[n - 1]
    next: for (let r = 0; r < records.length; r++) {
      const bytes = records[r].bytes
      for (let j = 0; j < n; j++) if (bytes[j] !== buf[start + j]) continue next
      this.pos = end
      return records[r].str
    }
    this.pos = start
    const str = this.str(n) // validated: only valid UTF-8 is cached
    const record = { bytes: Uint8Array.prototype.slice.call(buf, start, end), str }
    if (records.length < KEY_CACHE_SIZE) records.push(record)
    else records[(Math.random() * KEY_CACHE_SIZE) | 0] = record
    return str
  }

  bin (n) {
    const start = this.take(n)
    return this.buf.subarray(start, start + n)
  }

  ext (n) {
    const type = this.buf.readInt8(this.take(1))
    const start = this.take(n)
    return extensions.decode(this.buf.subarray(start, start + n), type, undefined)
  }

  array (n, depth) {
    if (depth >= MAX_DEPTH) throw new RangeError(`msgpack data nested deeper than ${MAX_DEPTH} levels`)
    if (n > this.buf.length - this.pos) throw new RangeError('truncated msgpack data') // 1+ byte per element
    const out = new Array(n)
    for (let i = 0; i < n; i++) out[i] = this.value(depth + 1)
    return out
  }

  map (n, depth) {
    if (depth >= MAX_DEPTH) throw new RangeError(`msgpack data nested deeper than ${MAX_DEPTH} levels`)
    if (n * 2 > this.buf.length - this.pos) throw new RangeError('truncated msgpack data') // 2+ bytes per entry
    const out = {}
    for (let i = 0; i < n; i++) {
      const key = this.key(depth + 1)
      if (typeof key !== 'string' && typeof key !== 'number') {
        throw new TypeError(`a map key must be a str or an int, got ${key === null ? 'nil' : describe(key)}`)
      }
      const value = this.value(depth + 1)
      if (key === '__proto__') {
        // Assigning would set the object's prototype: define an own property instead.
        Object.defineProperty(out, key, { value, writable: true, enumerable: true, configurable: true })
      } else {
        out[key] = value
      }
    }
    return out
  }
}

function decodeUtf8 (buf, start, end) {
  try {
    return strictUtf8.decode(buf.subarray(start, end))
  } catch {
    throw new TypeError('a str is not valid UTF-8')
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
  DONES: 0x0b,
  STOPPING: 0x0c,
  CHUNK: 0x0d,
  TAGS: 0x0e
})
export const MAX_CREDIT = 10_000
export const MAX_TAGS = 32
// Entries in one DONES message (the broker refuses more); TASKS are as many as it sends.
export const MAX_WORKER_BATCH = 1024
// How the reason of a DISCONNECT begins when an authenticating broker (--auth) will
// not let this worker's key serve the service: the worker stops instead of
// registering again (zbroker/protocol/access.py FORBIDDEN_PREFIX).
export const FORBIDDEN_PREFIX = 'forbidden:'

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
  /** TAGS: the worker's tags from now on, replacing those of its READY (§16; [] clears them). */
  tags: (tags) => zbw(W.TAGS, { tags }),
  ack: (refs) => zbw(W.ACK, { tasks: refs.map(([id, attempt]) => [id, attempt]) }),
  progress: (id, attempt, data = []) => zbw(W.PROGRESS, { id, attempt }, ...data),
  /** CHUNK: `chunks` (one or more frames) appended in order to the task's stream (§13). */
  chunk: (id, attempt, chunks) => zbw(W.CHUNK, { id, attempt }, ...chunks),
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
  // `deps` (§15): the ids of the tasks it depended on, in the enqueue's order; absent without.
  const deps = meta.deps ?? []
  if (!Array.isArray(deps) || !deps.every((d) => typeof d === 'string')) {
    throw new ProtocolError('bad_meta', "TASK 'deps' is a list of task ids")
  }
  return { id, attempt, service, headers, timeoutS, dependsOn: deps, frames }
}

/**
 * What a ZBW01 worker receives: {type: 'task'|'tasks'|'cancel'|'heartbeat'|'disconnect'|'stopping', ...}.
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
    case W.CANCEL: {
      if (frames.length < 4) throw new ProtocolError('missing_frames', 'CANCEL needs a metadata frame')
      const meta = unpackMeta(frames[3])
      const cancel = { type: 'cancel', ...taskRef(meta) }
      // `reason` is optional (§13: the task's stream passed the broker's caps); absent when empty.
      if (typeof meta.reason === 'string' && meta.reason !== '') cancel.reason = meta.reason
      return cancel
    }
    case W.DISCONNECT: {
      let reason = ''
      if (frames.length > 3) {
        const value = unpackMeta(frames[3]).reason
        reason = typeof value === 'string' ? value : ''
      }
      return { type: 'disconnect', reason }
    }
    case W.STOPPING: {
      if (frames.length < 4) throw new ProtocolError('missing_frames', 'STOPPING needs a metadata frame')
      const drainS = unpackMeta(frames[3]).drain_s
      if (typeof drainS !== 'number' || !(drainS >= 0) || !Number.isFinite(drainS)) {
        throw new ProtocolError('bad_meta', "STOPPING needs a finite 'drain_s' >= 0")
      }
      return { type: 'stopping', drainS }
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
  QUEUES: 0x08,
  LIMIT: 0x0e,
  STREAM: 0x12,
  READ: 0x13,
  MORE: 0x14,
  CLOSE: 0x15,
  // Recurring tasks (§17), admin calls.
  SCHEDULE: 0x16,
  SCHEDULES: 0x17,
  UNSCHEDULE: 0x18,
  RATE: 0x19,
  // Broker -> client (bytes are per direction: 0x12 from the broker is CHUNKS).
  REPLY: 0x10,
  ERROR: 0x11,
  CHUNKS: 0x12
})
export const MAX_BATCH = 10_000
export const MAX_WAIT_S = 24 * 3600
export const MAX_LIST = 1000
export const MAX_QUEUES_PAGE = 1000
export const PRIORITY_MIN = -128
export const PRIORITY_MAX = 127
export const MAX_ATTEMPTS_LIMIT = 1000
// Placement and flow control (§16): the largest LIMIT of a service (or of each of its
// concurrency keys), and the largest RATE (tasks per second) and burst.
export const MAX_SERVICE_LIMIT = 1_000_000
export const MAX_RATE_PER_S = 1_000_000
export const MAX_BURST = 1_000_000
// Task streams (§13): chunks a STREAM or READ call may be sent beyond what MORE
// credited (`window`: the default and the most a call may ask), and the most one
// MORE may credit.
export const STREAM_WINDOW_DEFAULT = 256
export const STREAM_WINDOW_MAX = 10_000
export const STREAM_CREDIT_MAX = 10_000
// Chunk data the broker sends a call beyond its credit, whatever the window (one
// chunk always goes): a reader credits what it consumed before it reaches this.
export const STREAM_UNCREDITED_BYTES = 4 * 1024 * 1024
// Recurring tasks (§17): a schedule's name (bytes of UTF-8), its interval (whole
// seconds) and its payload (bytes, every frame).
export const MAX_SCHEDULE_NAME_BYTES = 128
export const MIN_SCHEDULE_INTERVAL_S = 1
export const MAX_SCHEDULE_INTERVAL_S = 366 * 86400
export const MAX_SCHEDULE_PAYLOAD_BYTES = 64 * 1024

// Task graphs (§15): the most tasks one task may depend on (`depends_on`), and what
// it may be handed of their results (`input`): the result frames of its one
// dependency, or one msgpack frame listing every dependency's (see unpackResults).
export const MAX_DEPENDENCIES = 1000
export const INPUTS = Object.freeze(['result', 'results'])

// Task states as the broker names them (ZBC01 answers), in zbroker.protocol.states'
// order; those a task never leaves; and those of them without a result (a client
// waiting for the result rejects with the state's TaskError instead).
export const TASK_STATES = Object.freeze(['ready', 'delayed', 'inflight', 'done', 'dead', 'cancelled', 'expired', 'blocked', 'upstream_failed'])
export const FINAL_STATES = new Set(['done', 'dead', 'cancelled', 'expired', 'upstream_failed'])
export const FAILED_STATES = new Set(['dead', 'cancelled', 'expired', 'upstream_failed'])

const ZBC01_FRAME = Buffer.from(ZBC01)

/** Client -> broker: ["", "ZBC01", command, meta, payload...]. `meta` must hold `rid`. */
export function zbcCall (command, meta, payload = []) {
  return [EMPTY, ZBC01_FRAME, commandFrame(command), pack(meta), ...payload]
}

/**
 * Broker -> client: {rid, ok, meta, frames}, or a ProtocolError. A CHUNKS message
 * of a stream call (§13) is {rid, ok: true, chunks: true, meta, frames}: its meta
 * checked to hold the task's `id`, the first chunk's `offset` and the `attempt`.
 */
export function decodeZbcAnswer (frames) {
  if (frames.length < 4 || frames[0].length !== 0 || !frameIs(frames[1], ZBC01)) {
    throw new ProtocolError('bad_header', 'not a ZBC01 answer')
  }
  const meta = unpackMeta(frames[3])
  if (!isInt(meta.rid)) throw new ProtocolError('bad_meta', "ZBC01 answer without an integer 'rid'")
  const command = frames[2].length === 1 ? frames[2][0] : -1
  if (command === C.REPLY) return { rid: meta.rid, ok: true, meta, frames: frames.slice(4) }
  if (command === C.ERROR) return { rid: meta.rid, ok: false, meta, frames: [] }
  if (command === C.CHUNKS) {
    if (typeof meta.id !== 'string' || !isInt(meta.offset) || meta.offset < 0 || !isInt(meta.attempt)) {
      throw new ProtocolError('bad_meta', "CHUNKS needs a string 'id', an integer 'offset' >= 0 and an integer 'attempt'")
    }
    return { rid: meta.rid, ok: true, chunks: true, meta, frames: frames.slice(4) }
  }
  throw new ProtocolError('unknown_command', `unexpected ZBC01 command 0x${frames[2].toString('hex').slice(0, 16)}`)
}

/**
 * The frame `input: 'results'` appends to a task's payload (docs/protocol.md §15.3):
 * each dependency's result frames (Buffers sharing `frame`'s memory), in
 * `dependsOn` order, or null for one that did not end done (`runAnyway`). A
 * ProtocolError for a frame that is not such a list.
 */
export function unpackResults (frame) {
  if (!(frame instanceof Uint8Array)) throw new TypeError(`a results frame is a Buffer or Uint8Array, got ${describe(frame)}`)
  let results
  try {
    results = decodeMsgpack(frame)
  } catch (err) {
    throw new ProtocolError('bad_results', `not a results frame: not msgpack (${err.message})`)
  }
  if (!Array.isArray(results) || !results.every((r) => r === null || (Array.isArray(r) && r.every((f) => Buffer.isBuffer(f))))) {
    throw new ProtocolError('bad_results', 'not a results frame: a msgpack list of lists of bin or nil')
  }
  return results
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
  let envelope
  try {
    envelope = decodeMsgpack(frames[1])
  } catch (err) {
    throw new ProtocolError('bad_event', `event envelope is not msgpack: ${err.message}`)
  }
  if (!isPlainMap(envelope)) throw new ProtocolError('bad_event', 'envelope is not a map')
  const { type, source = '', timestamp = 0 } = envelope
  if (typeof type !== 'string' || typeof source !== 'string') {
    throw new ProtocolError('bad_event', 'type and source must be strings')
  }
  if (typeof timestamp !== 'number') throw new ProtocolError('bad_event', 'timestamp must be a number')
  // Finite, as §6 says. An int of 2^53 or more cannot be held exactly: Python reads
  // it as infinite and drops the event, and so do we (a float that large, a date
  // past the year 285 million, cannot be told from one once decoded).
  if (!Number.isFinite(timestamp) || (Number.isInteger(timestamp) && Math.abs(timestamp) >= 2 ** 53)) {
    throw new ProtocolError('bad_event', 'timestamp must be a finite number')
  }
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
