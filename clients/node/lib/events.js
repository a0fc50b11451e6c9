// Topic events: a Publisher's PUB socket connects to the broker's XSUB
// endpoint, a Subscriber's SUB socket to its XPUB endpoint. An event is two
// frames: the topic (= event type) and a msgpack envelope.

import { ClosedError, ZbrokerError } from './errors.js'
import {
  DEFAULT_EVENTS_IN,
  DEFAULT_EVENTS_OUT,
  MAX_TOPIC_BYTES,
  decodeEvent,
  describe,
  encodeEvent
} from './protocol.js'
import { DEFAULT_HWM, checkEndpoint, connectSocket, isClosedSocketError, zmq } from './sockets.js'

function parseArgs (endpointOrOptions, options) {
  return typeof endpointOrOptions === 'string'
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

  /** new Publisher(endpoint?, {source, hwm}) or new Publisher({endpoint, source, hwm}). */
  constructor (endpointOrOptions, options = {}) {
    const { endpoint = DEFAULT_EVENTS_IN, source = '', hwm = DEFAULT_HWM } = parseArgs(endpointOrOptions, options)
    checkEndpoint(endpoint)
    if (typeof source !== 'string') throw new TypeError('source must be a string')
    this.endpoint = endpoint
    this.#source = source
    this.published = 0
    this.#sock = connectSocket(zmq.Publisher, endpoint, { hwm })
  }

  get closed () { return this.#closed }

  /**
   * Publish one event with topic `type`; resolves with the event as sent.
   * `payload` is anything msgpack can carry (Buffers travel as bin, strings as str).
   */
  async publish (type, payload = null, { source, correlationId, replyTo } = {}) {
    if (this.#closed) throw new ClosedError('publisher is closed')
    if (typeof type !== 'string') throw new TypeError(`event type must be a string, got ${describe(type)}`)
    const topicBytes = Buffer.byteLength(type, 'utf8')
    if (topicBytes === 0 || topicBytes > MAX_TOPIC_BYTES) throw new RangeError(`event type must be 1..${MAX_TOPIC_BYTES} bytes of UTF-8`)
    checkOptionalString(source, 'source')
    checkOptionalString(correlationId, 'correlationId')
    checkOptionalString(replyTo, 'replyTo')
    const event = {
      type,
      source: source ?? this.#source,
      payload,
      timestamp: Date.now() / 1000,
      ...(correlationId != null && { correlationId }),
      ...(replyTo != null && { replyTo })
    }
    let frames
    try {
      frames = encodeEvent(event)
    } catch (err) {
      throw new TypeError(`event payload cannot be encoded as msgpack: ${err.message}`)
    }
    try {
      await this.#sock.send(frames)
    } catch (err) {
      if (isClosedSocketError(err)) throw new ClosedError('publisher is closed')
      throw new ZbrokerError(`publishing ${JSON.stringify(type)}: ${err.message}`, { cause: err })
    }
    this.published++
    return event
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
    this.#sock.linger = Math.ceil(lingerMs)
    this.#sock.close()
  }

  [Symbol.dispose] () { this.close() }
}

/**
 * Receives events whose type starts with one of `topics` (every event when
 * none is given). Iterate it with `for await`; `recv({timeoutMs})` takes one
 * event. Events that cannot be decoded are dropped and counted in `dropped`.
 */
export class Subscriber {
  #sock
  #closed = false
  #receiving = false
  #stash = null // frames that arrived after their recv() gave up
  #waiters = [] // recv() calls waiting, oldest first
  #forget = null // removes the constructor signal's listener

  /** new Subscriber(endpoint?, {topics, hwm, signal}) or new Subscriber({endpoint, topics, hwm, signal}). */
  constructor (endpointOrOptions, options = {}) {
    const { endpoint = DEFAULT_EVENTS_OUT, topics = [''], hwm = DEFAULT_HWM, signal } = parseArgs(endpointOrOptions, options)
    checkEndpoint(endpoint)
    const list = typeof topics === 'string' ? [topics] : topics
    if (!Array.isArray(list) || !list.every((t) => typeof t === 'string')) throw new TypeError('topics must be an array of strings')
    this.endpoint = endpoint
    this.received = 0
    this.dropped = 0
    this.#sock = connectSocket(zmq.Subscriber, endpoint, { hwm })
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

  /** Also receive events whose type starts with each prefix ("" means every event). */
  subscribe (...prefixes) {
    if (this.#closed) throw new ClosedError('subscriber is closed')
    for (const p of prefixes) {
      if (typeof p !== 'string') throw new TypeError('topic prefixes are strings')
      this.#sock.subscribe(p)
    }
  }

  /** Undo earlier subscribe() calls. */
  unsubscribe (...prefixes) {
    if (this.#closed) throw new ClosedError('subscriber is closed')
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
    const deadline = timeoutMs === undefined ? Infinity : performance.now() + timeoutMs
    for (;;) {
      const frames = await this.#next(deadline, signal)
      if (frames === null) return null
      let event
      try {
        event = decodeEvent(frames)
      } catch {
        this.dropped++
        continue
      }
      this.received++
      return event
    }
  }

  #next (deadline, signal) {
    if (this.#closed) return Promise.resolve(null)
    if (this.#stash !== null) {
      const frames = this.#stash
      this.#stash = null
      return Promise.resolve(frames)
    }
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
        deliver: (frames) => done(resolve, frames),
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

  // One receive() at a time (zeromq allows no more); what arrives when no
  // recv() waits any more is kept for the next one, so nothing is lost to a timeout.
  #receive () {
    if (this.#receiving || this.#closed || this.#waiters.length === 0) return
    this.#receiving = true
    this.#sock.receive().then(
      (frames) => {
        this.#receiving = false
        const waiter = this.#waiters.shift()
        if (waiter) waiter.deliver(frames)
        else this.#stash = frames
        this.#receive()
      },
      (err) => {
        this.#receiving = false
        const waiters = this.#waiters.splice(0)
        const closed = this.#closed || isClosedSocketError(err)
        const error = new ZbrokerError(`receiving an event: ${err.message}`, { cause: err })
        for (const w of waiters) closed ? w.close() : w.fail(error)
      }
    )
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
    this.#sock.close()
    for (const w of this.#waiters.splice(0)) w.close()
  }

  [Symbol.dispose] () { this.close() }
}
