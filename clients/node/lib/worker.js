// Worker: serves one service over ZBW01. Declares its concurrency as credit,
// accepts batches (READY batch: true, so the broker may send TASKS),
// acknowledges every task at once (one ACK per burst read), heartbeats on
// time, reports DONE/FAIL/PROGRESS, honours CANCEL through an AbortSignal,
// reconnects and re-registers when the broker goes silent or says
// DISCONNECT, and stops gracefully.
//
// Outgoing ACKs and DONEs are collected during one turn of the event loop and
// flushed together (setImmediate): the ACK first, then the results as one
// DONES (a single result as a plain DONE), like the Python Worker. FAIL and
// PROGRESS go out at once, after flushing whatever was collected before them,
// so nothing about a task ever overtakes its ACK or an earlier result.
//
// Each connection has a generation number, and the worker keeps the attempts
// it holds on the current connection. A result is sent only while its attempt
// is still held: results from an older connection and results of attempts the
// broker took back are dropped here and counted, exactly like the Python Worker.

import { EventEmitter } from 'node:events'
import { NonRetryableError, RetryLater } from './errors.js'
import { makeLogger } from './logger.js'
import {
  DEFAULT_ENDPOINT,
  EMPTY,
  MAX_CREDIT,
  MAX_TAGS,
  MAX_WORKER_BATCH,
  decodeForWorker,
  describe,
  toFrames,
  zbwEncode
} from './protocol.js'
import {
  DEFAULT_HWM,
  checkEndpoint,
  connectSocket,
  isClosedSocketError,
  isSendQueueFull,
  zmq
} from './sockets.js'

// How long a closed connection may keep trying to deliver its last messages
// (final results, DISCONNECT) after stop().
const GOODBYE_LINGER_MS = 500
// FAIL reasons and metrics travel in the metadata frame, which should stay small.
const MAX_REASON_CHARS = 2000
const MAX_METRICS_BYTES = 64 * 1024

const noop = () => {}

const now = () => performance.now()

export class Worker extends EventEmitter {
  #endpoint
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
  #log

  #sock = null
  #generation = 0
  #connected = false
  #held = new Map() // task id -> attempt context, on the current connection
  #queue = [] // attempt contexts waiting for a free handler slot (bounded by the credit)
  #running = new Set()
  #acks = [] // [id, attempt] read but not yet acknowledged
  #dones = [] // [id, attempt, frames] of results not yet sent (DONE/DONES)
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
      logger
    } = options
    if (typeof service !== 'string' || service.length === 0) throw new TypeError('Worker needs a service name (non-empty string)')
    if (service.startsWith('mmi.')) throw new RangeError('services starting with "mmi." are answered by the broker itself')
    if (typeof handler !== 'function') throw new TypeError('Worker needs a handler function')
    if (!Number.isSafeInteger(concurrency) || concurrency < 1 || concurrency > MAX_CREDIT) {
      throw new RangeError(`concurrency must be an integer 1..${MAX_CREDIT}`)
    }
    if (!Array.isArray(tags) || !tags.every((t) => typeof t === 'string')) throw new TypeError('tags must be an array of strings')
    if (tags.length > MAX_TAGS) throw new RangeError(`at most ${MAX_TAGS} tags`)
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
    this.#endpoint = checkEndpoint(endpoint)
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
    this.#log = makeLogger(logger, 'worker')
    this.#registered = new Promise((resolve) => { this.#resolveRegistered = resolve })
    /** Counters since creation; they only grow. */
    this.stats = {
      received: 0, // attempts pushed to this worker (a TASK, or an entry of TASKS)
      acked: 0, // attempts acknowledged
      handled: 0, // results sent (a DONE, or an entry of DONES)
      failed: 0, // FAIL sent
      cancelled: 0, // attempts the broker took back (CANCEL) while held
      notStarted: 0, // attempts never handed to the handler: cancelled, stale, or stopping
      staleResultsDropped: 0, // results not sent: attempt taken back or connection replaced
      progressSent: 0,
      reconnects: 0, // connections opened after the first one
      malformed: 0, // broker messages that could not be decoded
      metricsErrors: 0
    }
  }

  get service () { return this.#service }
  get endpoint () { return this.#endpoint }
  get concurrency () { return this.#concurrency }
  /** True once the broker has greeted the current connection, until it is lost. */
  get connected () { return this.#connected }
  /** How many handler calls are running now. */
  get running () { return this.#running.size }
  /** True once stop() was called: no new task starts. */
  get stopping () { return this.#stopping }

  /**
   * Connect and register (READY). Resolves once the broker has greeted this
   * worker (or once it is stopped first); never rejects. A Worker runs once.
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

  async [Symbol.asyncDispose] () { await this.stop() }

  async #shutdown (timeoutMs) {
    if (!this.#started) {
      this.#stopped = true
      this.#resolveRegistered()
      return true
    }
    this.stats.notStarted += this.#queue.length
    this.#queue = [] // still held: our DISCONNECT hands them back to the broker
    const clean = await this.#waitIdle(timeoutMs)
    if (!clean) {
      this.#log.warn(`worker ${JSON.stringify(this.#service)}: ${this.#running.size} handler(s) still running after ${timeoutMs}ms; abandoning them`)
      for (const ctx of this.#running) this.#abort(ctx, 'the worker is stopping')
    }
    this.#flush() // the last ACKs and results go out before DISCONNECT
    this.#drop({ disconnect: true, reason: 'worker stopping', lingerMs: GOODBYE_LINGER_MS })
    this.#stopped = true
    clearTimeout(this.#timer)
    this.#timer = null
    this.#resolveRegistered()
    return clean
  }

  #waitIdle (timeoutMs) {
    if (this.#running.size === 0) return Promise.resolve(true)
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#onIdle = null
        resolve(false)
      }, Math.min(Math.max(0, timeoutMs), 2 ** 31 - 1))
      this.#onIdle = () => {
        clearTimeout(timer)
        this.#onIdle = null
        resolve(true)
      }
    })
  }

  // ------------------------------------------------------------ connection

  #open () {
    if (this.#generation > 0) this.stats.reconnects++
    this.#generation++
    const generation = this.#generation
    let sock
    try {
      sock = connectSocket(zmq.Dealer, this.#endpoint, { hwm: this.#hwm })
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
    this.#send(zbwEncode.ready(this.#service, this.#concurrency, this.#tags, { batch: true }))
    this.#log.debug(`worker ${JSON.stringify(this.#service)}: READY (credit ${this.#concurrency}, batch) sent to ${this.#endpoint} (connection ${generation})`)
    this.#read(sock, generation)
    this.#arm()
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
    if (disconnect) sock.send(zbwEncode.disconnect(reason)).catch(noop)
    this.#sock = null
    sock.linger = disconnect ? lingerMs : 0
    sock.close()
    this.#acks = []
    this.stats.staleResultsDropped += this.#dones.length // the broker hands those attempts to someone else
    this.#dones = []
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

  #send (frames) {
    const sock = this.#sock
    if (sock === null) return false
    sock.send(frames).catch((err) => {
      if (isSendQueueFull(err)) {
        // Only when the broker has been unreachable long enough to fill the pipe;
        // the liveness timer replaces this connection anyway.
        this.#log.warn(`worker ${JSON.stringify(this.#service)}: send queue to the broker full, message dropped`)
      } else if (!isClosedSocketError(err)) {
        this.#log.warn(`worker ${JSON.stringify(this.#service)}: send failed: ${err.message}`)
      }
    })
    if (this.#metrics === null) this.#heartbeatAt = now() + this.#intervalMs
    return true
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
    this.#send(frames ?? zbwEncode.heartbeat())
    this.#heartbeatAt = t + this.#intervalMs
  }

  #heartbeatWithMetrics () {
    try {
      const metrics = this.#metrics()
      if (metrics === null || typeof metrics !== 'object' || Array.isArray(metrics)) {
        throw new TypeError(`metrics() returned ${describe(metrics)}, expected a plain object`)
      }
      const frames = zbwEncode.heartbeat(metrics)
      if (frames.length > 3 && frames[3].length > MAX_METRICS_BYTES) {
        throw new RangeError(`metrics exceed ${MAX_METRICS_BYTES} bytes packed`)
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
    else this.#heartbeat() // answer at the broker's pace, whatever our own interval
  }

  #onTask (message) {
    this.stats.received++
    this.#acks.push([message.id, message.attempt]) // every task read in this turn goes into one ACK
    this.#scheduleFlush()
    const controller = new AbortController()
    const ctx = { id: message.id, attempt: message.attempt, generation: this.#generation, controller, task: null }
    ctx.task = Object.freeze({
      id: message.id,
      attempt: message.attempt,
      service: message.service,
      payload: message.frames[0] ?? EMPTY,
      frames: message.frames,
      headers: message.headers,
      timeoutS: message.timeoutS,
      signal: controller.signal,
      progress: (data) => this.#progress(ctx, data)
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

  #onCancel (message) {
    const ctx = this.#held.get(message.id)
    if (ctx === undefined || ctx.attempt !== message.attempt) return // our result crossed the CANCEL
    this.#held.delete(message.id)
    this.stats.cancelled++
    this.#log.info(`worker ${JSON.stringify(this.#service)}: the broker took back task ${ctx.id} attempt ${ctx.attempt}`)
    this.#abort(ctx, 'the broker took this attempt back')
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

  // Send what was collected: the ACK first, then the results (one DONES, or a
  // DONE for a single one). Called before anything else goes out about a task.
  #flush () {
    if (this.#acks.length > 0) {
      const acks = this.#acks
      this.#acks = []
      if (this.#send(zbwEncode.ack(acks))) this.stats.acked += acks.length
    }
    if (this.#dones.length > 0) {
      const dones = this.#dones
      this.#dones = []
      this.stats.handled += dones.length // counted before sending, so whoever gets a result sees the count
      if (dones.length === 1) {
        const [id, attempt, frames] = dones[0]
        this.#send(zbwEncode.done(id, attempt, frames))
      } else {
        this.#send(zbwEncode.dones(dones))
      }
    }
  }

  #holds (ctx) {
    return this.#sock !== null && ctx.generation === this.#generation && this.#held.get(ctx.id) === ctx
  }

  #progress (ctx, data) {
    const frames = toFrames(data, 'progress data')
    if (!this.#holds(ctx)) return false // advisory: dropped once the attempt is no longer held
    this.#flush() // never ahead of this task's ACK, nor of results finished before it
    this.stats.progressSent++
    return this.#send(zbwEncode.progress(ctx.id, ctx.attempt, frames))
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
    } catch (err) {
      return this.#failure(ctx, err)
    }
    try {
      return { frames: toFrames(result, 'handler result') }
    } catch (err) {
      this.#log.error(`handler for service ${JSON.stringify(this.#service)}, task ${ctx.id} attempt ${ctx.attempt}: ${err.message} (failed for good)`)
      return { frames: null, reason: truncate(err.message), retry: false }
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
    if (outcome.frames !== null) {
      // Results finished in this turn leave together, after the ACKs read before them.
      this.#dones.push([ctx.id, ctx.attempt, outcome.frames])
      if (this.#dones.length >= MAX_WORKER_BATCH) this.#flush()
      else this.#scheduleFlush()
    } else {
      this.#flush() // the ACK and the DONEs collected so far go out before this FAIL
      this.stats.failed++
      this.#send(zbwEncode.fail(ctx.id, ctx.attempt, outcome.reason, { retry: outcome.retry, delayS: outcome.delayS }))
    }
  }
}

function reasonOf (err) {
  if (err instanceof Error) return err.message ? `${err.name}: ${err.message}` : err.name
  try {
    return `thrown: ${String(err)}`
  } catch {
    return 'thrown: <unprintable>'
  }
}

function truncate (text) {
  return text.length > MAX_REASON_CHARS ? text.slice(0, MAX_REASON_CHARS) : text
}
