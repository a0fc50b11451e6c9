// Worker: serves one service over ZBW01. Declares its concurrency as credit,
// accepts batches (READY batch: true, so the broker may send TASKS),
// acknowledges every task at once (one ACK per burst read), heartbeats on
// time, reports DONE/FAIL/PROGRESS, honours CANCEL through an AbortSignal,
// reconnects and re-registers when the broker goes silent or says
// DISCONNECT (given several brokers, also as soon as another one took over),
// and stops gracefully.
//
// Outgoing ACKs and DONEs are collected during one turn of the event loop and
// flushed together (setImmediate): the ACK first, then the results as DONES (a
// single result as a plain DONE), like the Python Worker. FAIL and PROGRESS go
// out at once, after flushing whatever was collected before them, so nothing
// about a task ever overtakes its ACK or an earlier result.
//
// Task streams (docs/protocol.md §13): a handler sends chunks with task.emit(),
// or is a generator whose yielded values are the chunks (its return value the
// result). Chunks are collected per task during one turn too and flushed after
// the ACKs and before the results, each task's as one CHUNK message (more when
// they do not fit in one): so a task's chunks always precede its DONE or FAIL
// on the one socket. CHUNK is never dropped under back-pressure (it waits in
// the outbox like a result); emit() resolves once its chunk is handed to the
// socket, and a generator is pulled on only while the outbox is empty. When
// the broker takes the attempt back, a generator is pulled no further (its
// return() runs its finally blocks) and emit() does nothing.
//
// The broker silently drops a message over its caps (--max-message-bytes,
// 16 MiB by default, and 16384 frames), which would leave the tasks it carried
// inflight for good. So DONES are split to stay within `maxMessageBytes` and
// `maxFrames`, and a result that cannot fit in any message fails its attempt
// for good (FAIL retry: false, naming the size and the cap) instead of going
// out; a PROGRESS that cannot fit is dropped.
//
// Sends never throw away an outcome. A message goes to the socket at once while
// it can take it (sendTimeout 0, after checking `writable`); once the socket is
// at its high-water mark, ACK, DONE, FAIL and DISCONNECT wait in an outbox, in
// order, and one send at a time waits for room. PROGRESS and HEARTBEAT are
// dropped instead while the outbox is not empty (PROGRESS counted in
// stats.progressDropped). The outbox only holds what concerns tasks held, so
// the credit bounds it. A result counts as handled (and a FAIL as failed) once
// it is handed to the socket; one still in the outbox when its connection is
// replaced counts in staleResultsDropped, like a result of that connection not
// yet flushed: the broker gives those attempts to someone else.
//
// After a reconnect (a restarted broker no longer knows the worker), READY
// offers the handler slots really free: concurrency less the handlers still
// running attempts of the old connection (aborted through their signal; their
// results are dropped). With none free, READY waits until one returns.
//
// Each connection has a generation number, and the worker keeps the attempts
// it holds on the current connection. A result is sent only while its attempt
// is still held: results from an older connection and results of attempts the
// broker took back are dropped here and counted, exactly like the Python Worker.
//
// setTags() changes the worker's tags (docs/protocol.md §16) without registering
// again: TAGS goes out on the current connection, in order with everything else
// (it waits in the outbox like READY under back-pressure), and every later READY
// (a reconnect) carries the tags of the moment.
//
// On a broker started with --auth, a worker whose handshake is refused
// (AuthenticationFailed, lib/keys.js) or whose READY the broker refuses
// (DISCONNECT "forbidden: ...", Forbidden) stops at once: registering again
// cannot help. start() rejects with the error, or, once it has resolved, the
// worker emits it as 'error'.

import { EventEmitter } from 'node:events'
import { ERROR_CODES, Forbidden, NonRetryableError, RetryLater } from './errors.js'
import { checkCredentials } from './keys.js'
import { makeLogger } from './logger.js'
import {
  DEFAULT_ENDPOINT,
  DEFAULT_MAX_MESSAGE_BYTES,
  EMPTY,
  FORBIDDEN_PREFIX,
  MAX_CREDIT,
  MAX_FRAMES,
  MAX_TAGS,
  MAX_WORKER_BATCH,
  MIN_MESSAGE_BYTES,
  checkMaxMessageBytes,
  decodeForWorker,
  describe,
  toFrame,
  toFrames,
  zbwEncode
} from './protocol.js'
import {
  DEFAULT_HWM,
  MAX_TIMER_MS,
  checkEndpoint,
  connectSocket,
  isClosedSocketError,
  isSendQueueFull,
  parseEndpoints,
  zmq
} from './sockets.js'

// How long a closed connection may keep trying to deliver its last messages
// (final results, DISCONNECT) after stop().
const GOODBYE_LINGER_MS = 500
// FAIL reasons and metrics travel in the metadata frame, which should stay small.
const MAX_REASON_CHARS = 2000
const MAX_METRICS_BYTES = 64 * 1024
// The broker's caps on one message, counting every frame it receives (routing
// id included): --max-message-bytes (default DEFAULT_MAX_MESSAGE_BYTES) and
// MAX_FRAMES frames, both from protocol.js.
// What a DONE, DONES or PROGRESS carries besides its results: the routing id the
// broker adds (at most 255 bytes), "", "ZBW01", the command and the metadata frame
// (map and list headers), an upper bound ...
const MESSAGE_OVERHEAD_BYTES = 512
const MESSAGE_OVERHEAD_FRAMES = 5
// ... plus, per result, its entry in the metadata ([id, attempt, n], or {id, attempt}):
// at most this many bytes besides the id itself.
const ENTRY_OVERHEAD_BYTES = 32

// What an outbox entry is, for the counters once it is sent or dropped.
const ACK = 1
const DONE = 2
const FAIL = 3
const PROGRESS = 4
const HEARTBEAT = 5
const CONTROL = 6 // READY, DISCONNECT
const CHUNK = 7
const TAGS = 8

const SENT = Promise.resolve()

/**
 * True for what a handler returns to stream chunks: a generator (sync or
 * async) or any iterator object, never frames (a Buffer, a string or an array
 * of them is iterable, but has no next()).
 */
export function isChunkSource (value) {
  return value !== null && typeof value === 'object' && typeof value.next === 'function' &&
    (typeof value[Symbol.asyncIterator] === 'function' || typeof value[Symbol.iterator] === 'function')
}

const now = () => performance.now()

export class Worker extends EventEmitter {
  #endpoint
  #several // several endpoints (active/standby brokers): follow a takeover at once
  #service
  #handler
  #concurrency
  #tags
  #intervalMs
  #expiryMs
  #reconnectDelayMs
  #maxReconnectDelayMs
  #metrics
  #hwm
  #maxMessageBytes
  #maxFrames
  #credentials
  #log

  #sock = null
  #credit = 0 // declared by the current connection's READY
  #waitingLogged = false // "every handler still busy" said once per wait
  #generation = 0
  #connected = false
  #held = new Map() // task id -> attempt context, on the current connection
  #queue = [] // attempt contexts waiting for a free handler slot (bounded by the credit)
  #running = new Set()
  #acks = [] // [id, attempt] read but not yet acknowledged
  #dones = [] // [id, attempt, frames, bytes] of results not yet sent (DONE/DONES)
  #chunked = new Set() // attempt contexts with chunks emitted and not yet sent (CHUNK)
  #outbox = [] // {frames, kind, count} waiting for room in the socket, in order
  #writer = null // the socket a send is waiting on (the outbox is being drained)
  #onDrained = null
  #flushScheduled = false
  #expiresAt = 0
  #heartbeatAt = 0
  #metricsAt = 0
  #reconnectAt = null
  #backoffMs
  #timer = null

  #started = false
  #stopping = false
  #stopped = false
  #stopPromise = null
  #onIdle = null
  #registered
  #resolveRegistered
  #rejectRegistered
  #greeted = false // start() has resolved
  #error = null // what stopped the worker by itself

  constructor (options = {}) {
    super()
    const {
      endpoint = DEFAULT_ENDPOINT,
      service,
      handler,
      concurrency = 1,
      tags = [],
      heartbeatIntervalMs = 2500,
      liveness = 3,
      reconnectDelayMs = 100,
      maxReconnectDelayMs = 2500,
      metrics,
      hwm = DEFAULT_HWM,
      maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
      maxFrames = MAX_FRAMES,
      credentials,
      logger
    } = options
    if (typeof service !== 'string' || service.length === 0) throw new TypeError('Worker needs a service name (non-empty string)')
    if (service.startsWith('mmi.')) throw new RangeError('services starting with "mmi." are answered by the broker itself')
    if (typeof handler !== 'function') throw new TypeError('Worker needs a handler function')
    if (!Number.isSafeInteger(concurrency) || concurrency < 1 || concurrency > MAX_CREDIT) {
      throw new RangeError(`concurrency must be an integer 1..${MAX_CREDIT}`)
    }
    checkTags(tags)
    if (typeof heartbeatIntervalMs !== 'number' || !(heartbeatIntervalMs >= 1) || !Number.isFinite(heartbeatIntervalMs)) {
      throw new RangeError('heartbeatIntervalMs must be a finite number >= 1')
    }
    if (!Number.isSafeInteger(liveness) || liveness < 1) throw new RangeError('liveness must be an integer >= 1')
    if (!(reconnectDelayMs > 0 && reconnectDelayMs <= maxReconnectDelayMs && Number.isFinite(maxReconnectDelayMs))) {
      throw new RangeError('need 0 < reconnectDelayMs <= maxReconnectDelayMs')
    }
    if (metrics !== undefined && metrics !== null && typeof metrics !== 'function') {
      throw new TypeError('metrics must be a function returning a plain object')
    }
    checkMaxMessageBytes(maxMessageBytes, 'maxMessageBytes', MIN_MESSAGE_BYTES)
    if (!Number.isSafeInteger(maxFrames) || maxFrames < MESSAGE_OVERHEAD_FRAMES + 1) {
      throw new RangeError(`maxFrames must be an integer >= ${MESSAGE_OVERHEAD_FRAMES + 1} (the broker's frame cap, ${MAX_FRAMES})`)
    }
    this.#endpoint = checkEndpoint(endpoint)
    this.#several = parseEndpoints(endpoint).length > 1
    this.#service = service
    this.#handler = handler
    this.#concurrency = concurrency
    this.#tags = [...tags]
    this.#intervalMs = heartbeatIntervalMs
    this.#expiryMs = heartbeatIntervalMs * liveness
    this.#reconnectDelayMs = reconnectDelayMs
    this.#maxReconnectDelayMs = maxReconnectDelayMs
    this.#backoffMs = reconnectDelayMs
    this.#metrics = metrics ?? null
    this.#hwm = hwm
    this.#maxMessageBytes = maxMessageBytes
    this.#maxFrames = maxFrames
    this.#credentials = checkCredentials(credentials)
    this.#log = makeLogger(logger, 'worker')
    this.#registered = new Promise((resolve, reject) => {
      this.#resolveRegistered = () => {
        this.#greeted = true
        resolve()
      }
      this.#rejectRegistered = reject
    })
    /** Counters since creation; they only grow. */
    this.stats = {
      received: 0, // attempts pushed to this worker (a TASK, or an entry of TASKS)
      acked: 0, // attempts acknowledged
      handled: 0, // results sent (a DONE, or an entry of DONES)
      failed: 0, // FAIL sent
      cancelled: 0, // attempts the broker took back (CANCEL) while held
      notStarted: 0, // attempts never handed to the handler: cancelled, stale, or stopping
      staleResultsDropped: 0, // results not sent: attempt taken back or connection replaced
      tooLarge: 0, // results over maxMessageBytes/maxFrames: failed for good instead (also in failed)
      progressSent: 0, // PROGRESS handed to the socket
      progressDropped: 0, // PROGRESS not sent: back-pressure, too large, or connection replaced
      chunksSent: 0, // stream chunks handed to the socket (CHUNK)
      chunksDropped: 0, // chunks not sent: the attempt taken back, or the connection replaced
      reconnects: 0, // connections opened after the first one
      malformed: 0, // broker messages that could not be decoded
      metricsErrors: 0,
      brokerStopping: 0, // STOPPING notices: the broker was stopping (a restart, say)
      tagsSent: 0 // TAGS handed to the socket (setTags)
    }
  }

  get service () { return this.#service }
  get endpoint () { return this.#endpoint }
  get concurrency () { return this.#concurrency }
  /** The worker's tags (a copy): those of the constructor, or of the last setTags(). */
  get tags () { return [...this.#tags] }
  /**
   * The credit the current connection declared: concurrency less the handlers
   * still running attempts of an older connection when it registered.
   */
  get credit () { return this.#credit }
  /** True once the broker has greeted the current connection, until it is lost. */
  get connected () { return this.#connected }
  /** How many handler calls are running now. */
  get running () { return this.#running.size }
  /** True once stop() was called, or the worker stopped by itself: no new task starts. */
  get stopping () { return this.#stopping }
  /** True once the worker has stopped: its socket is closed. */
  get stopped () { return this.#stopped }
  /**
   * What stopped the worker by itself (AuthenticationFailed: the broker refused
   * its keys; Forbidden: it may not serve its service), or null.
   */
  get error () { return this.#error }

  /**
   * Connect and register (READY). Resolves once the broker has greeted this
   * worker (or once it is stopped first). Rejects with AuthenticationFailed or
   * Forbidden when the broker refuses it first: the worker has then stopped.
   * A Worker runs once.
   */
  start () {
    if (this.#started) throw new Error('a Worker runs only once; create a new one')
    if (this.#stopping) throw new Error('this Worker was stopped before it started; create a new one')
    this.#started = true
    this.#open()
    return this.#registered
  }

  /**
   * Stop gracefully: no new task starts; running handlers get up to
   * `timeoutMs` to finish and their results are sent; then DISCONNECT (the
   * broker requeues whatever this worker held but did not finish). Handlers
   * still running then are aborted through their signal and their results
   * dropped. Resolves true if every running handler finished in time.
   * Do not await it inside a handler (it would wait for that handler).
   */
  stop ({ timeoutMs = 10_000 } = {}) {
    if (this.#stopPromise === null) {
      this.#stopping = true
      this.#stopPromise = this.#shutdown(timeoutMs)
    }
    return this.#stopPromise
  }

  // The broker refused this worker for good (its keys, or the service): stop now,
  // nothing can be delivered any more. Running handlers are aborted, the attempts
  // held go back to the broker with the connection. The caller hears `err` from
  // start(), or as 'error' once start() has resolved.
  #fail (err) {
    if (this.#stopping) return
    this.#error = err
    this.#stopping = true
    this.#stopPromise = Promise.resolve(false)
    this.#log.error(`worker ${JSON.stringify(this.#service)} stops: ${err.message}`)
    this.stats.notStarted += this.#queue.length
    this.#queue = []
    for (const ctx of this.#running) this.#abort(ctx, 'the broker refused this worker')
    this.#drop({ disconnect: false })
    this.#stopped = true
    clearTimeout(this.#timer)
    this.#timer = null
    if (this.#greeted) {
      // Like any EventEmitter's 'error': without a listener it is thrown (the process ends).
      process.nextTick(() => this.emit('error', err))
    } else {
      this.#rejectRegistered(err)
    }
  }

  async [Symbol.asyncDispose] () { await this.stop() }

  /**
   * Change the worker's tags (a model loaded or unloaded; at most MAX_TAGS
   * strings, [] clears them) without registering again (docs/protocol.md §16):
   * the broker places tasks that `require` or `prefer` tags by these from now on.
   * Sent as TAGS on the current connection; a later READY (a reconnect) carries
   * them too. Before start() the first READY carries them; once the worker is
   * stopping nothing is sent.
   */
  setTags (tags) {
    checkTags(tags)
    this.#tags = [...tags]
    if (this.#sock === null || this.#stopping) return
    this.#send(zbwEncode.tags(this.#tags), TAGS)
  }

  async #shutdown (timeoutMs) {
    if (!this.#started) {
      this.#stopped = true
      this.#resolveRegistered()
      return true
    }
    this.stats.notStarted += this.#queue.length
    this.#queue = [] // still held: our DISCONNECT hands them back to the broker
    const deadline = now() + timeoutMs
    const clean = await this.#waitIdle(timeoutMs)
    if (!clean) {
      this.#log.warn(`worker ${JSON.stringify(this.#service)}: ${this.#running.size} handler(s) still running after ${timeoutMs}ms; abandoning them`)
      for (const ctx of this.#running) this.#abort(ctx, 'the worker is stopping')
    }
    this.#flush() // the last ACKs and results go out before DISCONNECT
    this.#send(zbwEncode.disconnect('worker stopping'), CONTROL) // behind them, waiting for room like them
    // Hand all of it to the socket within the time left (at least the goodbye
    // linger), which then has the linger to deliver it.
    await this.#waitDrained(Math.max(GOODBYE_LINGER_MS, deadline - now()))
    this.#drop({ disconnect: false, lingerMs: GOODBYE_LINGER_MS })
    this.#stopped = true
    clearTimeout(this.#timer)
    this.#timer = null
    this.#resolveRegistered()
    return clean
  }

  #waitDrained (timeoutMs) {
    if (this.#outbox.length === 0 || this.#sock === null) return Promise.resolve(true)
    return waitForHook((hook) => { this.#onDrained = hook }, timeoutMs)
  }

  #waitIdle (timeoutMs) {
    if (this.#running.size === 0) return Promise.resolve(true)
    return waitForHook((hook) => { this.#onIdle = hook }, timeoutMs)
  }

  // ------------------------------------------------------------ connection

  #open () {
    const credit = this.#concurrency - this.#running.size
    if (credit < 1) { // a READY must offer at least 1: wait for a handler to return
      if (!this.#waitingLogged) {
        this.#waitingLogged = true
        this.#log.info(`worker ${JSON.stringify(this.#service)}: all ${this.#concurrency} handlers still run attempts the broker took back; registering again when one returns`)
      }
      this.#reconnectAfter(this.#reconnectDelayMs)
      return
    }
    this.#waitingLogged = false
    if (this.#generation > 0) this.stats.reconnects++
    this.#generation++
    const generation = this.#generation
    let sock
    try {
      ({ sock } = connectSocket(zmq.Dealer, this.#endpoint, {
        hwm: this.#hwm,
        credentials: this.#credentials,
        watch: {
          onFailure: (err) => {
            if (generation === this.#generation && this.#sock === sock) this.#fail(err)
          },
          ...(this.#several && {
            onTakeover: () => {
              if (generation === this.#generation && this.#sock === sock) this.#registerAgain('its broker went and another handshake completed')
            }
          })
        }
      }))
    } catch (err) {
      this.#log.error(`worker ${JSON.stringify(this.#service)}: ${err.message}`)
      this.#reconnectAfter(this.#nextBackoff())
      return
    }
    this.#sock = sock
    this.#connected = false
    const t = now()
    this.#expiresAt = t + this.#expiryMs
    this.#heartbeatAt = t + this.#intervalMs
    this.#reconnectAt = null
    this.#credit = credit
    this.#send(zbwEncode.ready(this.#service, credit, this.#tags, { batch: true }), CONTROL)
    this.#log.debug(`worker ${JSON.stringify(this.#service)}: READY (credit ${credit}, batch) sent to ${this.#endpoint} (connection ${generation})`)
    this.#read(sock, generation)
    this.#arm()
  }

  // Connected to several brokers, the connection in use was lost and another
  // handshake completed (lib/keys.js, HandshakeWatch.tookOver): another broker took
  // over, or the same one came back, and it knows nothing of this worker. Register
  // with it now, on a new connection, instead of after `liveness` heartbeats of
  // silence; the attempts held were the old broker's (dropped, like at any reconnect).
  #registerAgain (why) {
    if (this.#stopping) return // no new READY; the stop's DISCONNECT ends this connection
    this.#log.info(`worker ${JSON.stringify(this.#service)}: ${why}: registering again`)
    this.#drop({ disconnect: false })
    this.#open()
  }

  async #read (sock, generation) {
    try {
      for await (const frames of sock) {
        if (generation !== this.#generation || this.#sock !== sock) return
        try {
          this.#onMessage(frames)
        } catch (err) {
          this.#log.error(`worker ${JSON.stringify(this.#service)}: error while handling a broker message`, err)
        }
      }
    } catch (err) {
      if (generation === this.#generation && this.#sock === sock && !this.#stopped) {
        this.#log.warn(`worker ${JSON.stringify(this.#service)}: connection failed (${err.message}), reconnecting`)
        this.#drop({ disconnect: false })
        this.#reconnectAfter(this.#nextBackoff())
      }
    }
  }

  // Close the current connection; the broker hands its attempts to someone else.
  #drop ({ disconnect, reason = '', lingerMs = 0 }) {
    const sock = this.#sock
    if (sock === null) return
    const wasConnected = this.#connected
    this.#connected = false
    // A best-effort goodbye: only if it can leave now (not behind a blocked outbox).
    if (disconnect && this.#outbox.length === 0) this.#sendNow(sock, zbwEncode.disconnect(reason))
    this.#sock = null
    for (const item of this.#outbox) this.#lost(item) // never handed to the socket: the broker gives those attempts to someone else
    this.#outbox = []
    this.#writer = null
    if (this.#onDrained !== null) this.#onDrained()
    sock.linger = lingerMs
    sock.close()
    this.#acks = []
    this.stats.staleResultsDropped += this.#dones.length // the broker hands those attempts to someone else
    this.#dones = []
    for (const ctx of this.#chunked) this.#dropChunks(ctx)
    this.#chunked.clear()
    this.stats.notStarted += this.#queue.length
    this.#queue = []
    const held = [...this.#held.values()]
    this.#held.clear()
    for (const ctx of held) this.#abort(ctx, 'the connection to the broker was replaced')
    if (wasConnected) this.emit('disconnected')
  }

  #reconnectAfter (delayMs) {
    this.#reconnectAt = now() + delayMs
    this.#arm()
  }

  #nextBackoff () {
    const delay = this.#backoffMs
    this.#backoffMs = Math.min(2 * delay, this.#maxReconnectDelayMs)
    return delay
  }

  // Send `frames` on the current connection, in order with everything sent
  // before. `kind` says what the counters make of it (`count` results or acks).
  // ACK, CHUNK, DONE, FAIL and READY are never dropped while the connection
  // lasts: when the socket has no room they wait in the outbox. PROGRESS and
  // HEARTBEAT are dropped instead (false). True once sent or queued. `onSent` is
  // called once the message is handed to the socket, or lost with its connection.
  #send (frames, kind = CONTROL, count = 1, onSent = null) {
    const sock = this.#sock
    if (sock === null) {
      if (kind === PROGRESS) this.stats.progressDropped++
      else if (kind === CHUNK) this.stats.chunksDropped += count
      if (onSent) onSent()
      return false
    }
    if (this.#outbox.length === 0 && this.#sendNow(sock, frames)) {
      this.#sent({ kind, count, onSent })
    } else if (kind === PROGRESS || kind === HEARTBEAT) {
      if (kind === PROGRESS) this.stats.progressDropped++
      return false // advisory: not worth waiting for
    } else {
      this.#outbox.push({ frames, kind, count, onSent })
      if (this.#writer !== sock) this.#drain(sock)
    }
    if (this.#metrics === null) this.#heartbeatAt = now() + this.#intervalMs
    return true
  }

  // Hand `frames` to the socket if it has room now. The socket's sendTimeout is
  // 0, so a send either queues at once or fails; `writable` (ZMQ_EVENTS) says
  // beforehand which, so nothing is lost to an EAGAIN seen too late.
  #sendNow (sock, frames) {
    try {
      if (!sock.writable) return false
      sock.send(frames).catch((err) => this.#sendFailed(err))
      return true
    } catch (err) { // the socket is closed
      this.#sendFailed(err)
      return false
    }
  }

  #sendFailed (err) {
    if (isClosedSocketError(err)) return
    this.#log.error(`worker ${JSON.stringify(this.#service)}: a message to the broker was lost: ${err.message}${isSendQueueFull(err) ? ' (send queue full)' : ''}`)
  }

  // Drain the outbox of `sock` in order: at once while the socket has room,
  // else waiting for room with one send (sendTimeout -1 for it alone). Ends
  // when the outbox is empty or the connection is replaced (#drop has then
  // counted what was left as dropped).
  async #drain (sock) {
    this.#writer = sock
    try {
      while (this.#sock === sock && this.#outbox.length > 0) {
        const item = this.#outbox[0]
        if (!this.#sendNow(sock, item.frames)) {
          let failed = null
          sock.sendTimeout = -1
          try {
            await sock.send(item.frames)
          } catch (err) {
            failed = err
          } finally {
            if (!sock.closed) sock.sendTimeout = 0
          }
          if (this.#sock !== sock) return // closed while waiting: #drop counted the outbox
          if (failed !== null) {
            // Not expected of a Dealer with no send timeout; the liveness timer replaces a broken connection.
            this.#log.error(`worker ${JSON.stringify(this.#service)}: a message to the broker was lost: ${failed.message}`)
            this.#outbox.shift()
            this.#lost(item)
            continue
          }
        }
        this.#outbox.shift()
        this.#sent(item)
      }
    } finally {
      if (this.#writer === sock) {
        this.#writer = null
        if (this.#outbox.length === 0 && this.#onDrained !== null) this.#onDrained()
      }
    }
  }

  #sent ({ kind, count, onSent }) {
    if (kind === ACK) this.stats.acked += count
    else if (kind === DONE) this.stats.handled += count
    else if (kind === FAIL) this.stats.failed += count
    else if (kind === PROGRESS) this.stats.progressSent += count
    else if (kind === CHUNK) this.stats.chunksSent += count
    else if (kind === TAGS) this.stats.tagsSent += count
    if (onSent) onSent()
  }

  #lost ({ kind, count, onSent }) {
    if (kind === DONE || kind === FAIL) this.stats.staleResultsDropped += count
    else if (kind === PROGRESS) this.stats.progressDropped += count
    else if (kind === CHUNK) this.stats.chunksDropped += count
    if (onSent) onSent()
  }

  // ------------------------------------------------------------ timers

  #arm () {
    if (this.#stopped) return
    clearTimeout(this.#timer)
    let due
    if (this.#sock !== null) due = Math.min(this.#heartbeatAt, this.#expiresAt)
    else if (this.#reconnectAt !== null && !this.#stopping) due = this.#reconnectAt
    else return
    this.#timer = setTimeout(() => this.#tick(), Math.max(0, Math.ceil(due - now())))
  }

  #tick () {
    this.#timer = null
    if (this.#stopped) return
    const t = now()
    if (this.#sock === null) {
      if (this.#reconnectAt !== null && t >= this.#reconnectAt && !this.#stopping) {
        this.#open()
        return
      }
    } else if (t >= this.#expiresAt) {
      this.#log.warn(`worker ${JSON.stringify(this.#service)}: nothing heard from ${this.#endpoint} for ${this.#expiryMs}ms, reconnecting`)
      // The broker is most likely gone: do not let a goodbye linger.
      this.#drop({ disconnect: true, reason: 'broker silent', lingerMs: 0 })
      this.#reconnectAfter(this.#nextBackoff())
      return
    } else if (t >= this.#heartbeatAt) {
      this.#heartbeat()
    }
    this.#arm()
  }

  #heartbeat () {
    const t = now()
    let frames = null
    if (this.#metrics !== null && t >= this.#metricsAt) {
      this.#metricsAt = t + this.#intervalMs
      frames = this.#heartbeatWithMetrics()
    }
    this.#send(frames ?? zbwEncode.heartbeat(), HEARTBEAT)
    this.#heartbeatAt = t + this.#intervalMs
  }

  #heartbeatWithMetrics () {
    try {
      const metrics = this.#metrics()
      if (metrics === null || typeof metrics !== 'object' || Array.isArray(metrics)) {
        throw new TypeError(`metrics() returned ${describe(metrics)}, expected a plain object`)
      }
      const frames = zbwEncode.heartbeat(metrics)
      const limit = Math.min(MAX_METRICS_BYTES, this.#maxMessageBytes - MESSAGE_OVERHEAD_BYTES)
      if (frames.length > 3 && frames[3].length > limit) {
        throw new RangeError(`metrics exceed ${limit} bytes packed`)
      }
      return frames
    } catch (err) {
      this.stats.metricsErrors++
      this.#log.warn(`worker ${JSON.stringify(this.#service)}: metrics failed (${err.message}); heartbeat sent without metrics`)
      return null
    }
  }

  // ------------------------------------------------------------ broker messages

  #onMessage (frames) {
    this.#expiresAt = now() + this.#expiryMs
    let message
    try {
      message = decodeForWorker(frames)
    } catch (err) {
      this.stats.malformed++
      this.#log.warn(`worker ${JSON.stringify(this.#service)}: dropped a malformed message: ${err.message}`)
      return
    }
    if (message.type === 'disconnect') {
      if (message.reason.startsWith(FORBIDDEN_PREFIX)) {
        // The broker's auth file does not let this key serve the service:
        // registering again cannot help.
        this.#fail(new Forbidden(ERROR_CODES.FORBIDDEN, message.reason.slice(FORBIDDEN_PREFIX.length).trim()))
        return
      }
      this.#log.info(`worker ${JSON.stringify(this.#service)}: broker sent DISCONNECT (${message.reason || 'no reason given'}), re-registering`)
      this.#drop({ disconnect: false })
      this.#reconnectAfter(this.#nextBackoff())
      return
    }
    if (!this.#connected) {
      this.#connected = true
      this.#backoffMs = this.#reconnectDelayMs
      this.emit('connected')
      this.#resolveRegistered()
    }
    if (message.type === 'task') this.#onTask(message)
    else if (message.type === 'tasks') {
      for (const task of message.tasks) this.#onTask(task)
    } else if (message.type === 'cancel') this.#onCancel(message)
    else if (message.type === 'stopping') this.#onStopping(message)
    else this.#heartbeat() // answer at the broker's pace, whatever our own interval
  }

  #onTask (message) {
    this.stats.received++
    this.#acks.push([message.id, message.attempt]) // every task read in this turn goes into one ACK
    this.#scheduleFlush()
    const controller = new AbortController()
    const ctx = {
      id: message.id,
      attempt: message.attempt,
      generation: this.#generation,
      controller,
      task: null,
      chunks: [], // frames emitted, not yet sent
      chunksSent: null, // {promise, resolve}: settled once the chunks collected now are handed to the socket
      reported: false // its outcome (result or failure) is on its way to the broker
    }
    ctx.task = Object.freeze({
      id: message.id,
      attempt: message.attempt,
      service: message.service,
      payload: message.frames[0] ?? EMPTY,
      frames: message.frames,
      headers: message.headers,
      timeoutS: message.timeoutS,
      dependsOn: message.dependsOn,
      signal: controller.signal,
      progress: (data) => this.#progress(ctx, data),
      emit: (chunk) => this.#emit(ctx, chunk)
    })
    const previous = this.#held.get(message.id)
    if (previous !== undefined) this.#abort(previous, 'the task was delivered again') // that attempt is over
    this.#held.set(message.id, ctx)
    if (this.#stopping) {
      this.stats.notStarted++ // held until our DISCONNECT hands it back
      return
    }
    this.#queue.push(ctx)
    this.#pump()
  }

  // The broker is stopping: no task comes on this connection any more; results of
  // the attempts held still count if they arrive within its drain. Once it has
  // gone, the usual silence detection reconnects (to the restarted broker).
  #onStopping (message) {
    this.stats.brokerStopping++
    this.#log.info(`worker ${JSON.stringify(this.#service)}: the broker is stopping; it takes results for ${message.drainS}s more (${this.#held.size} held)`)
  }

  #onCancel (message) {
    const ctx = this.#held.get(message.id)
    if (ctx === undefined || ctx.attempt !== message.attempt) return // our result crossed the CANCEL
    this.#held.delete(message.id)
    this.stats.cancelled++
    const why = message.reason ? `the broker took this attempt back: ${message.reason}` : 'the broker took this attempt back'
    this.#log.info(`worker ${JSON.stringify(this.#service)}: ${why} (task ${ctx.id} attempt ${ctx.attempt})`)
    this.#abort(ctx, why)
  }

  #abort (ctx, why) {
    if (!ctx.controller.signal.aborted) ctx.controller.abort(new DOMException(why, 'AbortError'))
  }

  #scheduleFlush () {
    if (this.#flushScheduled) return
    this.#flushScheduled = true
    setImmediate(() => {
      this.#flushScheduled = false
      this.#flush()
    })
  }

  // Send what was collected: the ACK first, then each task's chunks (CHUNK), then
  // the results (one DONES, or a DONE for a single one). Called before anything
  // else goes out about a task.
  // The results go in as few messages as the broker's caps allow: at most
  // MAX_WORKER_BATCH results, maxMessageBytes bytes and maxFrames frames each.
  // Each result was checked to fit alone (#call).
  #flush () {
    const byteBudget = this.#maxMessageBytes - MESSAGE_OVERHEAD_BYTES
    if (this.#acks.length > 0) {
      const acks = this.#acks
      this.#acks = []
      // One ACK, unless its metadata alone would pass the byte cap (a huge credit, a small cap).
      let start = 0
      let bytes = 0
      for (let i = 0; i < acks.length; i++) {
        const cost = Buffer.byteLength(acks[i][0], 'utf8') + ENTRY_OVERHEAD_BYTES
        if (i > start && bytes + cost > byteBudget) {
          this.#send(zbwEncode.ack(acks.slice(start, i)), ACK, i - start)
          start = i
          bytes = 0
        }
        bytes += cost
      }
      this.#send(zbwEncode.ack(start === 0 ? acks : acks.slice(start)), ACK, acks.length - start)
    }
    if (this.#chunked.size > 0) {
      const chunked = this.#chunked
      this.#chunked = new Set()
      for (const ctx of chunked) this.#sendChunks(ctx)
    }
    if (this.#dones.length > 0) {
      const dones = this.#dones
      this.#dones = []
      const frameBudget = this.#maxFrames - MESSAGE_OVERHEAD_FRAMES
      let start = 0
      while (start < dones.length) {
        let end = start
        let bytes = 0
        let frames = 0
        while (end < dones.length && end - start < MAX_WORKER_BATCH) {
          const [, , result, size] = dones[end]
          if (end > start && (bytes + size > byteBudget || frames + result.length > frameBudget)) break
          bytes += size
          frames += result.length
          end++
        }
        if (end - start === 1) {
          const [id, attempt, result] = dones[start]
          this.#send(zbwEncode.done(id, attempt, result), DONE, 1)
        } else {
          this.#send(zbwEncode.dones(start === 0 && end === dones.length ? dones : dones.slice(start, end)), DONE, end - start)
        }
        start = end
      }
    }
  }

  // Null when `frames` (a result or PROGRESS data of task `id`, `size` bytes in
  // all) fit in one message the broker accepts; else a readable reason naming size and caps.
  #tooLarge (what, id, frames, size) {
    const maxBytes = this.#maxMessageBytes - MESSAGE_OVERHEAD_BYTES - ENTRY_OVERHEAD_BYTES - Buffer.byteLength(id, 'utf8')
    const maxFrames = this.#maxFrames - MESSAGE_OVERHEAD_FRAMES
    if (size <= maxBytes && frames.length <= maxFrames) return null
    return `${what} too large: ${size} bytes in ${frames.length} frame${frames.length === 1 ? '' : 's'}; ` +
      `one message to the broker carries at most ${maxBytes} bytes and ${maxFrames} frames of it ` +
      `(maxMessageBytes ${this.#maxMessageBytes}, maxFrames ${this.#maxFrames}: the broker drops larger messages, see its --max-message-bytes)`
  }

  #holds (ctx) {
    return this.#sock !== null && ctx.generation === this.#generation && this.#held.get(ctx.id) === ctx
  }

  #progress (ctx, data) {
    const frames = toFrames(data, 'progress data')
    if (!this.#holds(ctx)) return false // advisory: dropped once the attempt is no longer held
    const tooLarge = this.#tooLarge('progress data', ctx.id, frames, frameBytes(frames))
    if (tooLarge !== null) {
      this.stats.progressDropped++
      this.#log.warn(`worker ${JSON.stringify(this.#service)}: PROGRESS of task ${ctx.id} attempt ${ctx.attempt} dropped: ${tooLarge}`)
      return false
    }
    this.#flush() // never ahead of this task's ACK, nor of results finished before it
    return this.#send(zbwEncode.progress(ctx.id, ctx.attempt, frames), PROGRESS) // false if dropped under back-pressure
  }

  // task.emit(chunk): one chunk of the task's stream, sent with the others of this
  // turn. Resolves once handed to the socket (at once when dropped: the attempt is
  // no longer held). A chunk that is not a frame, or cannot fit in any message,
  // throws NonRetryableError: no attempt could send it.
  #emit (ctx, chunk) {
    let frame
    try {
      frame = toFrame(chunk, 'a stream chunk')
    } catch (err) {
      throw new NonRetryableError(err.message)
    }
    if (!this.#holds(ctx)) {
      this.stats.chunksDropped++
      return SENT
    }
    const tooLarge = this.#tooLarge('stream chunk', ctx.id, [frame], frame.length)
    if (tooLarge !== null) {
      this.stats.tooLarge++
      throw new NonRetryableError(tooLarge)
    }
    ctx.chunks.push(frame)
    if (ctx.chunksSent === null) {
      let resolve
      const promise = new Promise((r) => { resolve = r })
      ctx.chunksSent = { promise, resolve }
    }
    this.#chunked.add(ctx)
    this.#scheduleFlush()
    return ctx.chunksSent.promise
  }

  // The chunks `ctx` collected, as CHUNK messages within the broker's caps (each
  // chunk was checked to fit alone), or dropped when the attempt is no longer held.
  #sendChunks (ctx) {
    const { chunks, chunksSent } = ctx
    ctx.chunks = []
    ctx.chunksSent = null
    if (chunks.length === 0) return chunksSent?.resolve()
    // Held still, or its outcome reported after them on this connection (the broker drops a stale CHUNK).
    if (this.#sock === null || ctx.generation !== this.#generation || !(ctx.reported || this.#held.get(ctx.id) === ctx)) {
      this.stats.chunksDropped += chunks.length
      return chunksSent?.resolve()
    }
    const byteBudget = this.#maxMessageBytes - MESSAGE_OVERHEAD_BYTES - ENTRY_OVERHEAD_BYTES - Buffer.byteLength(ctx.id, 'utf8')
    const frameBudget = this.#maxFrames - MESSAGE_OVERHEAD_FRAMES
    let start = 0
    while (start < chunks.length) {
      let end = start
      let bytes = 0
      while (end < chunks.length && (end === start || (end - start < frameBudget && bytes + chunks[end].length <= byteBudget))) {
        bytes += chunks[end].length
        end++
      }
      const last = end === chunks.length
      const frames = start === 0 && last ? chunks : chunks.slice(start, end)
      this.#send(zbwEncode.chunk(ctx.id, ctx.attempt, frames), CHUNK, frames.length, last ? chunksSent?.resolve : null)
      start = end
    }
  }

  #dropChunks (ctx) {
    this.stats.chunksDropped += ctx.chunks.length
    ctx.chunks = []
    ctx.chunksSent?.resolve()
    ctx.chunksSent = null
  }

  // ------------------------------------------------------------ running handlers

  #pump () {
    while (this.#running.size < this.#concurrency && this.#queue.length > 0) {
      const ctx = this.#queue.shift()
      if (this.#stopping || ctx.controller.signal.aborted || ctx.generation !== this.#generation) {
        this.stats.notStarted++
        continue
      }
      this.#run(ctx).catch((err) => this.#log.error('worker internal error', err))
    }
  }

  async #run (ctx) {
    this.#running.add(ctx)
    let outcome
    try {
      outcome = await this.#call(ctx)
    } finally {
      this.#running.delete(ctx)
    }
    this.#report(ctx, outcome)
    if (this.#running.size === 0 && this.#onIdle !== null) this.#onIdle()
    this.#pump()
  }

  async #call (ctx) {
    let result
    try {
      const handler = this.#handler
      result = await handler(ctx.task)
      if (isChunkSource(result)) result = await this.#pull(ctx, result)
    } catch (err) {
      return this.#failure(ctx, err)
    }
    let frames
    try {
      frames = toFrames(result, 'handler result')
    } catch (err) {
      this.#log.error(`handler for service ${JSON.stringify(this.#service)}, task ${ctx.id} attempt ${ctx.attempt}: ${err.message} (failed for good)`)
      return { frames: null, reason: truncate(err.message), retry: false }
    }
    // A DONE the broker would drop leaves the task inflight for good: fail it readably instead.
    const size = frameBytes(frames)
    const tooLarge = this.#tooLarge('result', ctx.id, frames, size)
    if (tooLarge !== null) {
      this.stats.tooLarge++
      this.#log.error(`handler for service ${JSON.stringify(this.#service)}, task ${ctx.id} attempt ${ctx.attempt}: ${tooLarge} (failed for good)`)
      return { frames: null, reason: truncate(tooLarge), retry: false }
    }
    return { frames, size }
  }

  // Run a generator handler: each value it yields is a chunk, the value it returns
  // the result. It is pulled one value at a time, and only while the outbox is
  // empty (back-pressure). Once the attempt is taken back it is pulled no further:
  // its return() runs its finally blocks, and the attempt ends with the abort.
  async #pull (ctx, source) {
    const signal = ctx.controller.signal
    try {
      for (;;) {
        if (signal.aborted) throw signal.reason
        const step = await source.next()
        if (step.done) return step.value
        let value = step.value
        if (value !== null && typeof value === 'object' && typeof value.then === 'function') value = await value // a sync generator's promise
        const sent = this.#emit(ctx, value)
        if (this.#outbox.length > 0) await sent
      }
    } catch (err) {
      try {
        await source.return?.()
      } catch {} // it failed already; what ends the attempt is `err`
      throw err
    }
  }

  #failure (ctx, err) {
    const reason = truncate(reasonOf(err))
    const where = `handler for service ${JSON.stringify(this.#service)}, task ${ctx.id} attempt ${ctx.attempt}`
    if (ctx.controller.signal.aborted) {
      this.#log.debug(`${where}: ended after the attempt was taken back: ${reason}`)
      return { frames: null, reason, retry: true }
    }
    if (err instanceof RetryLater) {
      this.#log.info(`${where}: retry in ${err.delayS}s (${reason})`)
      return { frames: null, reason, retry: true, delayS: err.delayS }
    }
    const retry = !(err instanceof NonRetryableError)
    this.#log.error(`${where} failed${retry ? '' : ' (not retryable)'}:`, err)
    return { frames: null, reason, retry }
  }

  #report (ctx, outcome) {
    if (!this.#holds(ctx)) {
      this.stats.staleResultsDropped++
      this.#log.info(`worker ${JSON.stringify(this.#service)}: dropped the result of task ${ctx.id} attempt ${ctx.attempt}: ${ctx.controller.signal.aborted ? 'the attempt was taken back' : 'connection replaced'}`)
      return
    }
    this.#held.delete(ctx.id)
    ctx.reported = true // its chunks still waiting go out, ahead of this outcome
    if (outcome.frames !== null) {
      // Results finished in this turn leave together, after the ACKs read before them.
      // Its cost in a DONES: its frames (sized once, in #call) and its entry in the metadata.
      const cost = outcome.size + Buffer.byteLength(ctx.id, 'utf8') + ENTRY_OVERHEAD_BYTES
      this.#dones.push([ctx.id, ctx.attempt, outcome.frames, cost])
      if (this.#dones.length >= MAX_WORKER_BATCH) this.#flush()
      else this.#scheduleFlush()
    } else {
      this.#flush() // the ACK and the DONEs collected so far go out before this FAIL
      this.#send(zbwEncode.fail(ctx.id, ctx.attempt, outcome.reason, { retry: outcome.retry, delayS: outcome.delayS }), FAIL, 1)
    }
  }
}

/** Worker tags: an array of at most MAX_TAGS strings; a TypeError or RangeError otherwise. */
export function checkTags (tags) {
  if (!Array.isArray(tags)) throw new TypeError(`tags must be an array of strings, got ${describe(tags)}`)
  const i = tags.findIndex((t) => typeof t !== 'string')
  if (i >= 0) throw new TypeError(`tags must be an array of strings: tags[${i}] is ${describe(tags[i])}`)
  if (tags.length > MAX_TAGS) throw new RangeError(`at most ${MAX_TAGS} tags, got ${tags.length}`)
}

function reasonOf (err) {
  if (err instanceof Error) return err.message ? `${err.name}: ${err.message}` : err.name
  try {
    return `thrown: ${String(err)}`
  } catch {
    return 'thrown: <unprintable>'
  }
}

function frameBytes (frames) {
  let n = 0
  for (const frame of frames) n += frame.length
  return n
}

function truncate (text) {
  return text.length > MAX_REASON_CHARS ? text.slice(0, MAX_REASON_CHARS) : text
}

// Resolves true once the hook installed with `setHook` is called, or false after
// `timeoutMs`; either way the hook is removed again (set to null).
function waitForHook (setHook, timeoutMs) {
  return new Promise((resolve) => {
    const settle = (ok) => {
      clearTimeout(timer)
      setHook(null)
      resolve(ok)
    }
    const timer = setTimeout(settle, Math.min(Math.max(0, timeoutMs), MAX_TIMER_MS), false)
    setHook(() => settle(true))
  })
}
