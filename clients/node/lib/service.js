// Service: one object that turns a set of functions into a zbroker service,
// the Node twin of the Python `zbroker.client.Service`.
//
// Built only from this package's own pieces, never from sockets of its own:
// one Worker per task queue (svc.task), whose handler is the user's function
// wrapped so that its result becomes the task's result frame and, optionally,
// an event; one Subscriber for every topic prefix (svc.on), read by one loop
// that calls the handlers one event at a time, in order of arrival; one
// Publisher for result events, heartbeats and svc.publish().
//
// An exception in an event handler is logged and counted and never stops the
// service; a task handler's failure is the Worker's business (FAIL, retries,
// dead letters). stop() lets running handlers finish within the grace period,
// then closes everything; the publisher lingers so that the last results and
// events still leave.
//
// With `credentials` every socket of the service authenticates as one principal
// (it needs the worker, publisher and subscriber roles its queues and topics use).
// When the broker refuses it (AuthenticationFailed from any socket, Forbidden for a
// queue), the whole service stops and run() and start() reject with that error,
// like the Python Service, rather than look alive and not serve.

import { hostname } from 'node:os'
import { randomBytes } from 'node:crypto'
import { AuthenticationFailed, ClosedError, Forbidden, NonRetryableError } from './errors.js'
import { checkCredentials } from './keys.js'
import { makeLogger } from './logger.js'
import {
  DEFAULT_ENDPOINT,
  DEFAULT_EVENTS_IN,
  DEFAULT_EVENTS_OUT,
  MAX_CREDIT,
  MAX_TOPIC_BYTES,
  checkMaxMessageBytes,
  describe,
  pack
} from './protocol.js'
import { MAX_TIMER_MS, checkEndpoint } from './sockets.js'
import { Publisher, Subscriber } from './events.js'
import { Worker, checkTags, isChunkSource } from './worker.js'

// Topics of the client libraries' own events (a convention, not the broker's:
// see docs/protocol.md §6.2). Each is followed by the service's name.
export const SERVICE_HEARTBEAT_PREFIX = 'service.heartbeat.'
export const SERVICE_PROBE_PREFIX = 'service.probe.'

// How often the subscription probe goes out until it comes back.
const PROBE_EVERY_MS = 50
// How long the last events may take to leave when the publisher closes.
const PUBLISH_LINGER_MS = 1000
const READY_POLL_MS = 20

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

// A result or stream chunk of a Service handler as {frame, payload}: a
// Buffer/Uint8Array is the frame as it is, anything else (strings too; undefined
// as nil) one msgpack frame; `payload` is what a result event carries.
function encodeValue (value, what) {
  if (value instanceof Uint8Array) {
    const frame = Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength)
    return { frame, payload: frame }
  }
  const payload = value === undefined ? null : value
  try {
    return { frame: pack(payload), payload }
  } catch (err) {
    throw new NonRetryableError(`${what} (${describe(value)}) cannot be packed with msgpack: ${err.message}`)
  }
}

// The broker refused a socket or a queue (not an ordinary failure of one call).
function isRefusal (err) {
  return err instanceof AuthenticationFailed || err instanceof Forbidden
}

function checkTopic (topic, what) {
  if (typeof topic !== 'string') throw new TypeError(`${what} must be a string topic, got ${describe(topic)}`)
  const bytes = Buffer.byteLength(topic, 'utf8')
  if (bytes === 0 || bytes > MAX_TOPIC_BYTES) throw new RangeError(`${what} must be 1..${MAX_TOPIC_BYTES} bytes of UTF-8`)
}

/** Resolves with the promise's value, or with `fallback` after `ms` (the timer never outlives it). */
function within (promise, ms, fallback) {
  let timer
  const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(fallback), Math.min(Math.max(0, ms), MAX_TIMER_MS)) })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

export class Service {
  #name
  #endpoint
  #eventsIn
  #eventsOut
  #heartbeatMs
  #graceMs
  #logger
  #credentials
  #log

  #queues = new Map() // name -> { name, handler, concurrency, publish, tags }
  #topics = [] // { prefix, handler }, in registration order
  #workers = new Map()
  #publisher = null
  #subscriber = null
  #probeTopic = null
  #probed = false
  #probeTimer = null
  #heartbeatTimer = null
  #eventLoop = null

  #maxMessageBytes
  #started = false
  #startedAt = 0
  #stopRequested = false
  #stopping = false
  #stopped = false
  #cleanStop = null
  #error = null // what stopped the service by itself
  #stopPromise = null
  #finished
  #resolveFinished

  /**
   * new Service(name, { endpoint, eventsIn, eventsOut, heartbeatMs, graceMs, maxMessageBytes, credentials, logger }).
   * heartbeatMs 0 or null: no heartbeats. graceMs: how long stop() lets running handlers finish.
   * maxMessageBytes: the broker's --max-message-bytes, handed to the workers (default theirs).
   * credentials: CURVE keys (a Credentials) for every socket, for a broker started with --auth.
   */
  constructor (name, options = {}) {
    const {
      endpoint = DEFAULT_ENDPOINT,
      eventsIn = DEFAULT_EVENTS_IN,
      eventsOut = DEFAULT_EVENTS_OUT,
      heartbeatMs = 5000,
      graceMs = 10_000,
      maxMessageBytes,
      credentials,
      logger
    } = options
    if (typeof name !== 'string' || name.length === 0) throw new TypeError('a Service needs a name (non-empty string)')
    if (Buffer.byteLength(`${SERVICE_HEARTBEAT_PREFIX}${name}.00000000`, 'utf8') > MAX_TOPIC_BYTES) {
      throw new RangeError(`service name too long for an event topic (${MAX_TOPIC_BYTES} bytes)`)
    }
    if (heartbeatMs !== null && (typeof heartbeatMs !== 'number' || !(heartbeatMs >= 0) || !Number.isFinite(heartbeatMs))) {
      throw new RangeError('heartbeatMs must be a finite number >= 0, or null')
    }
    if (typeof graceMs !== 'number' || !(graceMs >= 0) || !Number.isFinite(graceMs)) {
      throw new RangeError('graceMs must be a finite number >= 0')
    }
    if (maxMessageBytes !== undefined) checkMaxMessageBytes(maxMessageBytes, 'maxMessageBytes')
    this.#name = name
    this.#endpoint = checkEndpoint(endpoint)
    this.#eventsIn = checkEndpoint(eventsIn)
    this.#eventsOut = checkEndpoint(eventsOut)
    this.#heartbeatMs = heartbeatMs || null
    this.#graceMs = graceMs
    this.#maxMessageBytes = maxMessageBytes
    this.#credentials = checkCredentials(credentials)
    this.#logger = logger
    this.#log = makeLogger(logger, 'service')
    this.#finished = new Promise((resolve) => { this.#resolveFinished = resolve })
    /** Counters since start; they only grow. */
    this.stats = {
      tasksDone: 0, // task handler calls that returned a usable result
      tasksFailed: 0, // task handler calls that threw or returned something unusable
      eventsHandled: 0, // event handler calls that returned
      eventsFailed: 0, // event handler calls that threw (logged, never fatal)
      resultsPublished: 0, // result events handed to the publisher
      publishErrors: 0, // result events and heartbeats that could not be published
      heartbeats: 0 // heartbeat events handed to the publisher
    }
  }

  // ------------------------------------------------------------ registration

  /**
   * Serve task queue `queue` with `handler(task)`, a Worker handler (sync or
   * async, task.progress, task.signal, NonRetryableError, RetryLater). It may
   * return any value msgpack can pack: a Buffer/Uint8Array is the task's
   * result as it is, anything else (strings included) one msgpack frame.
   * With `publish`, each result is also published as an event of that topic
   * (correlationId = the task id, replyTo = the task's `reply_to` header).
   * Returns the service, so calls chain.
   */
  task (queue, handler, { concurrency = 1, publish = null, tags = [] } = {}) {
    this.#checkNotStarted()
    if (typeof queue !== 'string' || queue.length === 0) throw new TypeError('a task queue name is a non-empty string')
    if (queue.startsWith('mmi.')) throw new RangeError('services starting with "mmi." are answered by the broker itself')
    if (this.#queues.has(queue)) throw new Error(`queue ${JSON.stringify(queue)} is already served by this service`)
    if (typeof handler !== 'function') throw new TypeError('a task handler is a function')
    if (!Number.isSafeInteger(concurrency) || concurrency < 1 || concurrency > MAX_CREDIT) {
      throw new RangeError(`concurrency must be an integer 1..${MAX_CREDIT}`)
    }
    if (publish !== null && publish !== undefined) checkTopic(publish, 'publish')
    checkTags(tags)
    this.#queues.set(queue, { name: queue, handler, concurrency, publish: publish ?? null, tags: [...tags] })
    return this
  }

  /**
   * Call `handler(event)` (sync or async) for every event whose type starts
   * with `prefix` ('' matches every event). Events are handled one at a time,
   * in order of arrival; one matching several prefixes goes to each matching
   * handler in registration order. Returns the service, so calls chain.
   */
  on (prefix, handler) {
    this.#checkNotStarted()
    if (typeof prefix !== 'string') throw new TypeError('a topic prefix is a string')
    if (Buffer.byteLength(prefix, 'utf8') > MAX_TOPIC_BYTES) throw new RangeError(`a topic prefix has at most ${MAX_TOPIC_BYTES} bytes`)
    if (typeof handler !== 'function') throw new TypeError('an event handler is a function')
    this.#topics.push({ prefix, handler })
    return this
  }

  /**
   * Change the tags of the workers of every task queue, or of `queue` alone
   * (docs/protocol.md §16): Worker.setTags() on each (TAGS), without registering
   * again; before start(), the tags their READY will carry. Returns the service.
   */
  setTags (tags, { queue } = {}) {
    checkTags(tags)
    if (queue !== undefined && !this.#queues.has(queue)) throw new Error(`queue ${JSON.stringify(queue)} is not served by this service`)
    for (const q of this.#queues.values()) {
      if (queue !== undefined && q.name !== queue) continue
      q.tags = [...tags]
      this.#workers.get(q.name)?.setTags(tags)
    }
    return this
  }

  // ------------------------------------------------------------ state

  get name () { return this.#name }
  /** The task queues served, in registration order. */
  get queues () { return [...this.#queues.keys()] }
  /** The topic prefixes subscribed to, each once, in registration order. */
  get topics () { return [...new Set(this.#topics.map((t) => t.prefix))] }
  /** The Worker of each queue, once started (their `stats` and `connected`). */
  get workers () { return new Map(this.#workers) }
  /** True once stop() was called (or a signal came). */
  get stopping () { return this.#stopRequested || this.#stopping }
  /** True once the shutdown is complete: every socket is closed. */
  get stopped () { return this.#stopped }
  /** After the shutdown: true if every running handler finished within graceMs. */
  get cleanStop () { return this.#cleanStop }
  /**
   * What stopped the service by itself (AuthenticationFailed or Forbidden: the
   * broker refused one of its sockets or queues), or null; run() rejects with it.
   */
  get error () { return this.#error }

  /**
   * True while running with every worker registered and the subscriptions in
   * place: the service has received an event it published itself (a probe on
   * `service.probe.<name>.<nonce>`), so its subscriber and publisher are both
   * connected to the bus.
   */
  get ready () {
    if (!this.#started || this.stopping) return false
    if (this.#probeTopic !== null && !this.#probed) return false
    for (const worker of this.#workers.values()) if (!worker.connected) return false
    return true
  }

  // ------------------------------------------------------------ lifecycle

  /**
   * Start serving; resolves true once ready, false if stopped first. Rejects with
   * the error when the broker refuses the service first (see `error`). A Service runs once.
   */
  async start () {
    this.#begin()
    const ready = await this.waitReady()
    if (!ready && this.#error !== null) throw this.#error
    return ready
  }

  /**
   * Start, serve until stop(), SIGINT, SIGTERM or `signal` aborts, then shut
   * down cleanly. Resolves with cleanStop; rejects with `error` when the service
   * stopped because the broker refused it. After the first SIGINT/SIGTERM the
   * process's own handling is back, so a second one ends the process.
   */
  async run ({ signal, handleSignals = true } = {}) {
    this.#begin()
    const onSignal = () => {
      forget()
      this.stop()
    }
    const onAbort = () => this.stop()
    const forget = () => {
      process.off('SIGINT', onSignal)
      process.off('SIGTERM', onSignal)
      signal?.removeEventListener('abort', onAbort)
    }
    if (handleSignals) {
      process.on('SIGINT', onSignal)
      process.on('SIGTERM', onSignal)
    }
    if (signal?.aborted) this.stop()
    else signal?.addEventListener('abort', onAbort, { once: true })
    try {
      await this.#finished
    } finally {
      forget()
    }
    if (this.#error !== null) throw this.#error
    return this.#cleanStop
  }

  /** Resolves true once ready; false at the timeout (default: none) or when stopped first. */
  async waitReady ({ timeoutMs = Infinity, signal } = {}) {
    const deadline = performance.now() + timeoutMs
    for (;;) {
      if (this.ready) return true
      if (this.stopping || this.#stopped || performance.now() >= deadline) return false
      signal?.throwIfAborted()
      await sleep(READY_POLL_MS)
    }
  }

  /**
   * Stop gracefully: no task or event starts any more, running handlers get
   * up to `timeoutMs` (default graceMs) to finish and their results go out,
   * then every socket closes. Resolves true if every handler finished in time.
   * Idempotent. Do not await it inside a handler (it would wait for that handler).
   */
  stop ({ timeoutMs = this.#graceMs } = {}) {
    this.#stopRequested = true
    if (this.#stopPromise === null) this.#stopPromise = this.#shutdown(timeoutMs)
    return this.#stopPromise
  }

  async [Symbol.asyncDispose] () { await this.stop() }

  /**
   * Publish an event with this service's name as its source. Works from
   * start until the shutdown closes the publisher (after the last handlers
   * finished); rejects before that with an Error and after with ClosedError.
   */
  async publish (type, payload = null, { correlationId, replyTo } = {}) {
    const publisher = this.#publisher
    if (publisher === null) {
      if (this.#started) throw new ClosedError(`service ${JSON.stringify(this.#name)} has stopped`)
      throw new Error(`service ${JSON.stringify(this.#name)} has not started`)
    }
    return publisher.publish(type, payload, { correlationId, replyTo })
  }

  /** The payload of this service's next heartbeat event (snake_case keys, as from Python). */
  heartbeatPayload () {
    const s = this.stats
    return {
      name: this.#name,
      pid: process.pid,
      host: hostname(),
      uptime_s: this.#started ? Math.round(performance.now() - this.#startedAt) / 1000 : 0,
      tasks_done: s.tasksDone,
      tasks_failed: s.tasksFailed,
      events_handled: s.eventsHandled,
      events_failed: s.eventsFailed,
      queues: this.queues,
      topics: this.topics
    }
  }

  // The broker refused a socket or a queue of the service: nothing it could do
  // would help, and a service that no longer serves a queue must not look alive.
  #fail (err) {
    if (this.#error !== null || this.#stopPromise !== null) return
    this.#error = err
    this.#log.error(`service ${JSON.stringify(this.#name)} stops: ${err.message}`)
    this.stop()
  }

  #checkNotStarted () {
    if (this.#started) throw new Error('register tasks and topics before the service starts')
  }

  #begin () {
    if (this.#started) throw new Error('a Service runs only once; create a new one')
    if (this.#stopRequested) throw new Error('this Service was stopped before it started; create a new one')
    this.#started = true
    this.#startedAt = performance.now()
    const credentials = this.#credentials
    this.#publisher = new Publisher(this.#eventsIn, { source: this.#name, credentials })
    if (this.#topics.length > 0) {
      this.#probeTopic = `${SERVICE_PROBE_PREFIX}${this.#name}.${randomBytes(4).toString('hex')}`
      this.#subscriber = new Subscriber(this.#eventsOut, { topics: [...this.topics, this.#probeTopic], credentials })
    }
    for (const q of this.#queues.values()) {
      this.#workers.set(q.name, new Worker({
        endpoint: this.#endpoint,
        service: q.name,
        handler: this.#taskHandler(q),
        concurrency: q.concurrency,
        tags: q.tags,
        ...(this.#maxMessageBytes === undefined ? {} : { maxMessageBytes: this.#maxMessageBytes }),
        credentials,
        logger: this.#logger
      }))
    }
    for (const worker of this.#workers.values()) {
      // A worker the broker refuses stops by itself: before its greeting start()
      // rejects, after it the worker emits 'error'. Either way the service stops.
      worker.on('error', (err) => this.#fail(err))
      worker.start().catch((err) => this.#fail(err))
    }
    if (this.#subscriber !== null) {
      this.#probe()
      this.#probeTimer = setInterval(() => this.#probe(), PROBE_EVERY_MS)
      this.#eventLoop = this.#handleEvents().catch((err) => {
        if (isRefusal(err)) return this.#fail(err)
        this.#log.error(`service ${JSON.stringify(this.#name)}: the event loop failed`, err)
      })
    }
    if (this.#heartbeatMs !== null) {
      this.#heartbeat()
      this.#heartbeatTimer = setInterval(() => this.#heartbeat(), this.#heartbeatMs)
    }
    this.#log.info(`service ${JSON.stringify(this.#name)} started: queues ${JSON.stringify(this.queues)}, topics ${JSON.stringify(this.topics)}`)
  }

  async #shutdown (timeoutMs) {
    if (!this.#started) {
      this.#stopped = true
      this.#cleanStop = true
      this.#resolveFinished()
      return true
    }
    this.#stopping = true
    this.#log.info(`service ${JSON.stringify(this.#name)} stopping`)
    clearInterval(this.#heartbeatTimer)
    clearInterval(this.#probeTimer)
    // Wakes the event loop; an event handler still running finishes first.
    this.#subscriber?.close()
    const [workersClean, eventsClean] = await Promise.all([
      Promise.all([...this.#workers.values()].map((w) => w.stop({ timeoutMs }))),
      this.#eventLoop === null ? true : within(this.#eventLoop.then(() => true), timeoutMs, false)
    ])
    if (!eventsClean) this.#log.warn(`service ${JSON.stringify(this.#name)}: an event handler is still running after ${timeoutMs}ms; abandoning it`)
    const clean = eventsClean && workersClean.every(Boolean)
    const publisher = this.#publisher
    this.#publisher = null
    publisher.close({ lingerMs: PUBLISH_LINGER_MS })
    this.#cleanStop = clean
    this.#stopped = true
    this.#log.info(`service ${JSON.stringify(this.#name)} stopped (${clean ? 'clean' : 'abandoned'})`)
    this.#resolveFinished()
    return clean
  }

  // ------------------------------------------------------------ tasks

  // The Worker handler of queue `q`: the user's handler, its result (and its
  // stream's chunks, emitted or yielded) encoded as frames, the result published.
  #taskHandler (q) {
    return async (workerTask) => {
      // Chunks are encoded like results: a Buffer/Uint8Array as it is, anything else msgpack.
      const task = Object.freeze({ ...workerTask, emit: (chunk) => workerTask.emit(encodeValue(chunk, 'a stream chunk').frame) })
      let result
      try {
        result = await q.handler(task)
      } catch (err) {
        this.stats.tasksFailed++
        throw err
      }
      if (isChunkSource(result)) return this.#streamOf(q, task, result)
      return this.#finishTask(q, task, result)
    }
  }

  // A generator handler's values as chunk frames, then its result's frame (the
  // Worker pulls it, and closes it when the attempt is taken back).
  async * #streamOf (q, task, source) {
    let result
    let open = true // the source may still run: close it when leaving early
    try {
      for (;;) {
        let step
        try {
          step = await source.next()
        } catch (err) {
          open = false
          throw err
        }
        if (step.done) {
          open = false
          result = step.value
          break
        }
        yield encodeValue(await step.value, 'a stream chunk').frame // a sync generator may yield promises
      }
    } catch (err) {
      this.stats.tasksFailed++
      throw err
    } finally {
      if (open) await source.return?.() // left early: a chunk that failed, or the attempt taken back
    }
    return await this.#finishTask(q, task, result)
  }

  async #finishTask (q, task, result) {
    let encoded
    try {
      encoded = encodeValue(result, 'the result')
    } catch (err) {
      this.stats.tasksFailed++
      throw err
    }
    this.stats.tasksDone++
    // An attempt the broker took back has its result dropped: so is its event.
    if (q.publish !== null && !task.signal.aborted) await this.#publishResult(q.publish, task, encoded.payload)
    return encoded.frame
  }

  async #publishResult (topic, task, payload) {
    const replyTo = typeof task.headers?.reply_to === 'string' ? task.headers.reply_to : undefined
    try {
      await this.publish(topic, payload, { correlationId: task.id, replyTo })
    } catch (err) {
      // The task succeeded and its result goes to the broker all the same.
      if (isRefusal(err)) this.#fail(err)
      this.stats.publishErrors++
      this.#log.warn(`service ${JSON.stringify(this.#name)}: the result of task ${task.id} could not be published on ${JSON.stringify(topic)}: ${err.message}`)
      return
    }
    this.stats.resultsPublished++
  }

  // ------------------------------------------------------------ events

  async #handleEvents () {
    const sub = this.#subscriber
    while (!this.#stopping) {
      let event
      try {
        event = await sub.recv()
      } catch (err) {
        if (err instanceof ClosedError) break
        throw err
      }
      if (event === null || this.#stopping) break
      if (event.type === this.#probeTopic) {
        if (!this.#probed) {
          this.#probed = true
          clearInterval(this.#probeTimer)
          sub.unsubscribe(event.type)
          this.#log.debug(`service ${JSON.stringify(this.#name)}: subscriptions in place`)
        }
        continue
      }
      for (const topic of this.#topics) {
        if (event.type.startsWith(topic.prefix)) await this.#callEventHandler(topic, event)
      }
    }
  }

  async #callEventHandler (topic, event) {
    try {
      await topic.handler(event)
    } catch (err) {
      this.stats.eventsFailed++
      this.#log.error(`service ${JSON.stringify(this.#name)}: handler for ${JSON.stringify(topic.prefix)} failed on event ${JSON.stringify(event.type)}:`, err)
      return
    }
    this.stats.eventsHandled++
  }

  #probe () {
    // Dropped by our own PUB socket until our subscription has reached it.
    if (this.#probed || this.#publisher === null) return
    this.#publisher.publish(this.#probeTopic, { pid: process.pid }).catch((err) => {
      if (isRefusal(err)) this.#fail(err)
    })
  }

  // ------------------------------------------------------------ heartbeats

  #heartbeat () {
    if (this.#publisher === null) return
    this.#publisher.publish(SERVICE_HEARTBEAT_PREFIX + this.#name, this.heartbeatPayload()).then(
      () => { this.stats.heartbeats++ },
      (err) => {
        if (isRefusal(err)) return this.#fail(err)
        this.stats.publishErrors++
        this.#log.warn(`service ${JSON.stringify(this.#name)}: heartbeat not published: ${err.message}`)
      }
    )
  }
}
