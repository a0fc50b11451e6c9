// Topic events: a Publisher's PUB socket connects to the broker's XSUB
// endpoint, a Subscriber's SUB socket to its XPUB endpoint. An event is two
// frames: the topic (= event type) and a msgpack envelope, whose `payloads`
// may carry a batch of events of one type (docs/protocol.md §6); a Subscriber
// hands those out one by one.
//
// With `credentials` both are CURVE clients of a broker started with --auth.
// Either way their handshakes are watched (lib/keys.js): once the broker has
// refused one, the socket closes and publish() and recv() throw
// AuthenticationFailed (recv() calls waiting reject with it at once).

import { ClosedError, ZbrokerError } from './errors.js'
import { checkCredentials } from './keys.js'
import {
  DEFAULT_EVENTS_IN,
  DEFAULT_EVENTS_OUT,
  MAX_TOPIC_BYTES,
  decodeEvents,
  describe,
  encodeEvent,
  encodeEvents
} from './protocol.js'
import { DEFAULT_HWM, checkEndpoint, connectSocket, isClosedSocketError, zmq } from './sockets.js'

function parseArgs (endpointOrOptions, options) {
  return typeof endpointOrOptions === 'string' || Array.isArray(endpointOrOptions)
    ? { ...options, endpoint: endpointOrOptions }
    : { ...(endpointOrOptions ?? {}) }
}

function checkOptionalString (value, name) {
  if (value !== undefined && value !== null && typeof value !== 'string') {
    throw new TypeError(`${name} must be a string, got ${describe(value)}`)
  }
}

/**
 * Publishes events. PUB sockets have no delivery guarantee: events published
 * before the connection (and the subscriptions flowing back over it) is up
 * are lost (the ZeroMQ "slow joiner"), and past `hwm` queued events the
 * newest are dropped instead of blocking. Anything that must not be lost is a
 * task, not an event.
 */
export class Publisher {
  #sock
  #source
  #closed = false
  #error = null

  /** new Publisher(endpoint?, {source, hwm, credentials}) or new Publisher({endpoint, source, hwm, credentials}). */
  constructor (endpointOrOptions, options = {}) {
    const { endpoint: given = DEFAULT_EVENTS_IN, source = '', hwm = DEFAULT_HWM, credentials } = parseArgs(endpointOrOptions, options)
    const endpoint = checkEndpoint(given) // one, or several brokers' as 'a,b' or an array
    if (typeof source !== 'string') throw new TypeError('source must be a string')
    const keys = checkCredentials(credentials)
    this.endpoint = endpoint
    this.#source = source
    this.published = 0
    // Watched only with keys: a publisher without them is often a short script that
    // publishes and exits without close(), which a watch would keep alive.
    this.#sock = connectSocket(zmq.Publisher, endpoint, { hwm, credentials: keys, watchHandshakes: keys !== null, watch: { onFailure: (err) => this.#failed(err) } }).sock
  }

  get closed () { return this.#closed }
  /** The AuthenticationFailed that ended this publisher's connection, or null. */
  get error () { return this.#error }

  // Nothing published can reach the broker: stop trying (its socket would retry the
  // refused handshake forever), and let every later publish() throw the reason.
  #failed (err) {
    if (this.#closed || this.#error !== null) return
    this.#error = err
    this.#sock.close()
  }

  /**
   * Publish one event with topic `type`; resolves with the event as sent.
   * `payload` is anything msgpack can carry (Buffers travel as bin, strings as str).
   */
  async publish (type, payload = null, { source, correlationId, replyTo } = {}) {
    this.#check(type, source, correlationId, replyTo)
    const event = {
      type,
      source: source ?? this.#source,
      payload,
      timestamp: Date.now() / 1000,
      ...(correlationId != null && { correlationId }),
      ...(replyTo != null && { replyTo })
    }
    await this.#send(type, () => encodeEvent(event))
    this.published++
    return event
  }

  /**
   * Publish a batch: one message carrying one event per element of `payloads`
   * (a non-empty array), in order, all with topic `type`, the same source,
   * correlation id, reply-to and timestamp. Subscribers of this package (and of
   * the Python client) receive them as separate events. Resolves with the
   * events as sent, an array shaped like publish()'s result; `published`
   * grows by their number.
   */
  async publishMany (type, payloads, { source, correlationId, replyTo } = {}) {
    this.#check(type, source, correlationId, replyTo)
    if (!Array.isArray(payloads)) throw new TypeError(`payloads must be an array, got ${describe(payloads)}`)
    if (payloads.length === 0) throw new RangeError('payloads must hold at least one payload')
    const common = {
      type,
      source: source ?? this.#source,
      timestamp: Date.now() / 1000,
      ...(correlationId != null && { correlationId }),
      ...(replyTo != null && { replyTo })
    }
    const list = [...payloads]
    await this.#send(type, () => encodeEvents({ ...common, payloads: list }))
    this.published += list.length
    return list.map((payload) => ({
      type: common.type,
      source: common.source,
      payload: payload === undefined ? null : payload,
      timestamp: common.timestamp,
      ...(correlationId != null && { correlationId }),
      ...(replyTo != null && { replyTo })
    }))
  }

  #check (type, source, correlationId, replyTo) {
    if (this.#closed) throw new ClosedError('publisher is closed')
    if (this.#error !== null) throw this.#error
    if (typeof type !== 'string') throw new TypeError(`event type must be a string, got ${describe(type)}`)
    const topicBytes = Buffer.byteLength(type, 'utf8')
    if (topicBytes === 0 || topicBytes > MAX_TOPIC_BYTES) throw new RangeError(`event type must be 1..${MAX_TOPIC_BYTES} bytes of UTF-8`)
    checkOptionalString(source, 'source')
    checkOptionalString(correlationId, 'correlationId')
    checkOptionalString(replyTo, 'replyTo')
  }

  async #send (type, encode) {
    let frames
    try {
      frames = encode()
    } catch (err) {
      throw new TypeError(`event payload cannot be encoded as msgpack: ${err.message}`)
    }
    try {
      await this.#sock.send(frames)
    } catch (err) {
      if (this.#error !== null && !this.#closed) throw this.#error
      if (isClosedSocketError(err)) throw new ClosedError('publisher is closed')
      throw new ZbrokerError(`publishing ${JSON.stringify(type)}: ${err.message}`, { cause: err })
    }
  }

  /**
   * Close the socket. Events not yet sent are discarded at once, unless
   * `lingerMs` gives them that long to leave (in the background; the process
   * waits for them at exit).
   */
  close ({ lingerMs = 0 } = {}) {
    if (this.#closed) return
    if (typeof lingerMs !== 'number' || !(lingerMs >= 0) || !Number.isFinite(lingerMs)) {
      throw new RangeError('lingerMs must be a finite number >= 0')
    }
    this.#closed = true
    if (this.#error !== null) return // closed when the handshake was refused
    this.#sock.linger = Math.ceil(lingerMs)
    this.#sock.close()
  }

  [Symbol.dispose] () { this.close() }
}

/**
 * Receives events whose type starts with one of `topics` (every event when
 * none is given). Iterate it with `for await`; `recv({timeoutMs})` takes one
 * event. A batch message is handed out as its events, one at a time, in
 * order. `received` counts the events handed out; messages that cannot be
 * decoded are dropped and counted in `dropped`.
 */
export class Subscriber {
  #sock
  #closed = false
  #error = null
  #receiving = false
  #queue = [] // decoded events not yet handed out, from #head on, oldest first (the rest
  #head = 0 //   of a batch, or what arrived after its recv() gave up)
  #waiters = [] // recv() calls waiting, oldest first; only while #queue is empty
  #forget = null // removes the constructor signal's listener

  /** new Subscriber(endpoint?, {topics, hwm, signal, credentials}) or new Subscriber({endpoint, topics, hwm, signal, credentials}). */
  constructor (endpointOrOptions, options = {}) {
    const { endpoint: given = DEFAULT_EVENTS_OUT, topics = [''], hwm = DEFAULT_HWM, signal, credentials } = parseArgs(endpointOrOptions, options)
    const endpoint = checkEndpoint(given) // one, or several brokers' as 'a,b' or an array
    const list = typeof topics === 'string' ? [topics] : topics
    if (!Array.isArray(list) || !list.every((t) => typeof t === 'string')) throw new TypeError('topics must be an array of strings')
    const keys = checkCredentials(credentials)
    this.endpoint = endpoint
    this.received = 0
    this.dropped = 0
    this.#sock = connectSocket(zmq.Subscriber, endpoint, { hwm, credentials: keys, watch: { onFailure: (err) => this.#failed(err) } }).sock
    this.subscribe(...(list.length ? list : ['']))
    if (signal) {
      if (signal.aborted) {
        this.close()
      } else {
        const onAbort = () => this.close()
        signal.addEventListener('abort', onAbort, { once: true })
        this.#forget = () => signal.removeEventListener('abort', onAbort)
      }
    }
  }

  get closed () { return this.#closed }
  /** The AuthenticationFailed that ended this subscriber's connection, or null. */
  get error () { return this.#error }

  // No event can come any more: the recv() calls waiting reject with the reason at
  // once, and so does every later one; the socket closes (it would retry forever).
  // Events already received are still handed out first.
  #failed (err) {
    if (this.#closed || this.#error !== null) return
    this.#error = err
    this.#sock.close()
    for (const w of this.#waiters.splice(0)) w.fail(err)
  }

  /** Also receive events whose type starts with each prefix ("" means every event). */
  subscribe (...prefixes) {
    if (this.#closed) throw new ClosedError('subscriber is closed')
    if (this.#error !== null) throw this.#error
    for (const p of prefixes) {
      if (typeof p !== 'string') throw new TypeError('topic prefixes are strings')
      this.#sock.subscribe(p)
    }
  }

  /** Undo earlier subscribe() calls. */
  unsubscribe (...prefixes) {
    if (this.#closed) throw new ClosedError('subscriber is closed')
    if (this.#error !== null) throw this.#error
    for (const p of prefixes) {
      if (typeof p !== 'string') throw new TypeError('topic prefixes are strings')
      this.#sock.unsubscribe(p)
    }
  }

  /**
   * The next event; null if none came within `timeoutMs` (default: wait
   * forever), or if the subscriber was closed meanwhile. Rejects with the
   * signal's reason when `signal` aborts.
   */
  async recv ({ timeoutMs, signal } = {}) {
    if (this.#closed) throw new ClosedError('subscriber is closed')
    signal?.throwIfAborted()
    if (this.#head < this.#queue.length) return this.#take()
    if (this.#error !== null) throw this.#error
    const deadline = timeoutMs === undefined ? Infinity : performance.now() + timeoutMs
    return this.#next(deadline, signal)
  }

  // Waits for the next event (the queue is empty): resolves with it, or null
  // at the deadline or at close().
  #next (deadline, signal) {
    return new Promise((resolve, reject) => {
      let timer = null
      const done = (settle, value) => {
        clearTimeout(timer)
        signal?.removeEventListener('abort', onAbort)
        const i = this.#waiters.indexOf(waiter)
        if (i >= 0) this.#waiters.splice(i, 1)
        settle(value)
      }
      const waiter = {
        deliver: (event) => done(resolve, event),
        fail: (err) => done(reject, err),
        close: () => done(resolve, null)
      }
      const onAbort = () => done(reject, signal.reason)
      if (deadline !== Infinity) timer = setTimeout(() => done(resolve, null), Math.max(0, deadline - performance.now()))
      signal?.addEventListener('abort', onAbort, { once: true })
      this.#waiters.push(waiter)
      this.#receive()
    })
  }

  // One receive() at a time (zeromq allows no more), and only while a recv()
  // waits. A message's events go to the waiting recv() calls in order; what
  // is left (the rest of a batch, or a message that arrived after its recv()
  // gave up) is queued for the next ones, so nothing is lost to a timeout.
  #receive () {
    if (this.#receiving || this.#closed || this.#waiters.length === 0) return
    this.#receiving = true
    this.#sock.receive().then(
      (frames) => {
        this.#receiving = false
        if (this.#closed) return
        try {
          for (const event of decodeEvents(frames)) this.#queue.push(event)
        } catch {
          this.dropped++
        }
        while (this.#head < this.#queue.length && this.#waiters.length > 0) {
          this.#waiters.shift().deliver(this.#take())
        }
        this.#receive()
      },
      (err) => {
        this.#receiving = false
        if (this.#error !== null) return // #failed has told the waiters
        const waiters = this.#waiters.splice(0)
        const closed = this.#closed || isClosedSocketError(err)
        const error = new ZbrokerError(`receiving an event: ${err.message}`, { cause: err })
        for (const w of waiters) closed ? w.close() : w.fail(error)
      }
    )
  }

  // The oldest queued event (there is one), counted as received.
  #take () {
    const event = this.#queue[this.#head]
    this.#queue[this.#head++] = undefined
    if (this.#head === this.#queue.length) {
      this.#queue = []
      this.#head = 0
    } else if (this.#head >= 1024 && this.#head * 2 >= this.#queue.length) {
      this.#queue = this.#queue.slice(this.#head)
      this.#head = 0
    }
    this.received++
    return event
  }

  /** Yields events as they arrive until close() (or the constructor's signal). */
  async * [Symbol.asyncIterator] () {
    while (!this.#closed) {
      const event = await this.recv()
      if (event === null) return
      yield event
    }
  }

  close () {
    if (this.#closed) return
    this.#closed = true
    this.#forget?.()
    if (this.#error === null) this.#sock.close()
    this.#queue = []
    this.#head = 0
    for (const w of this.#waiters.splice(0)) w.close()
  }

  [Symbol.dispose] () { this.close() }
}
