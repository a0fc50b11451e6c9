// Socket helpers shared by Client, Worker, Publisher and Subscriber: explicit
// high-water marks and linger on every socket, CURVE keys when given, every
// socket's handshakes watched (lib/keys.js), and clear endpoint errors.

import * as zmq from 'zeromq'
import { ZbrokerError } from './errors.js'
import { HandshakeWatch, curveOptions } from './keys.js'

export const DEFAULT_HWM = 10_000
// setTimeout's largest delay; longer ones are clamped to it (or mean "no limit").
export const MAX_TIMER_MS = 2 ** 31 - 1

const ENDPOINT_RE = /^[a-z][a-z0-9+.-]*:\/\/\S+$/i

/**
 * The endpoints `value` names, in order: a string ("tcp://a:5555"), a
 * comma-separated string ("tcp://a:5555,tcp://b:5555") or an array of strings,
 * each transport://address, none twice, at least one. Throws a TypeError saying
 * what is wrong. The one rule for every constructor's endpoint options.
 */
export function parseEndpoints (value) {
  let items
  if (typeof value === 'string') {
    items = value.split(',')
  } else if (Array.isArray(value)) {
    items = value.map((item) => {
      if (typeof item !== 'string') throw new TypeError(`an endpoint must be a string, got ${JSON.stringify(item)}`)
      if (item.includes(',')) throw new TypeError(`${JSON.stringify(item)}: give several endpoints as an array or 'a,b'`)
      return item
    })
  } else {
    throw new TypeError(`endpoint must be a string like tcp://host:port ('a,b' for several) or an array of them, got ${JSON.stringify(value)}`)
  }
  const found = []
  for (const item of items) {
    const endpoint = item.trim()
    if (endpoint === '') throw new TypeError(`empty endpoint in ${JSON.stringify(value)}: expected transport://address[,transport://address]`)
    if (!ENDPOINT_RE.test(endpoint)) throw new TypeError(`endpoint must be a string like tcp://host:port, got ${JSON.stringify(endpoint)}`)
    if (found.includes(endpoint)) throw new TypeError(`${JSON.stringify(endpoint)} is given twice`)
    found.push(endpoint)
  }
  if (found.length === 0) throw new TypeError('no endpoint given')
  return found
}

/** Checks `endpoint` (one, or several: see parseEndpoints); returns them comma-separated. */
export function checkEndpoint (endpoint) {
  return parseEndpoints(endpoint).join(',')
}

/** How errors name endpoints: "no broker of the N endpoints (a, b) answered: " for several, '' for one. */
export function noBrokerPrefix (endpoint) {
  const endpoints = parseEndpoints(endpoint)
  return endpoints.length > 1 ? `no broker of the ${endpoints.length} endpoints (${endpoints.join(', ')}) answered: ` : ''
}

/**
 * A new socket of class `Kind`, connected to `endpoint`: a CURVE client of the
 * broker when `credentials` are given, its handshakes watched either way (a
 * HandshakeWatch calling `watch`'s hooks), so that a refused one is an error,
 * not a silent wait. Returns {sock, watch}; closing the socket ends the watch.
 * Sends never block: with `sendTimeout` 0 a send that would block (high-water
 * mark reached) rejects at once with EAGAIN, which callers turn into a clear error.
 *
 * `endpoint` may name several brokers (active/standby): the socket connects to all
 * of them with `immediate`, so messages are queued only to a connection whose
 * handshake completed (the active broker). Until one has, a send rejects with
 * EAGAIN: callers with several endpoints try again within their own timeouts.
 */
export function connectSocket (Kind, endpoint, { hwm = DEFAULT_HWM, linger = 0, credentials = null, watch: hooks = {}, watchHandshakes = true } = {}) {
  const endpoints = parseEndpoints(endpoint)
  const options = { linger }
  // Several brokers: queue only to a completed connection, and drop one to a frozen
  // broker (SIGSTOP, a hung host) by ZMTP heartbeats, answered by its libzmq itself.
  if (endpoints.length > 1) Object.assign(options, { immediate: true, heartbeatInterval: 1000, heartbeatTimeout: 3000 })
  if (Kind !== zmq.Subscriber) Object.assign(options, { sendHighWaterMark: hwm, sendTimeout: 0 })
  if (Kind !== zmq.Publisher) options.receiveHighWaterMark = hwm
  if (credentials !== null) Object.assign(options, curveOptions(credentials))
  const sock = new Kind(options)
  // Before connect: no event missed. Not watched (watchHandshakes false), a socket
  // does not hold the process open by its event reader.
  const watch = watchHandshakes ? new HandshakeWatch(sock, endpoints.join(','), credentials !== null, hooks, endpoints.length > 1) : null
  for (const each of endpoints) {
    try {
      sock.connect(each)
    } catch (err) {
      sock.close()
      throw new ZbrokerError(`cannot connect to ${each}: ${err.message}`, { cause: err })
    }
  }
  return { sock, watch }
}

export function isSendQueueFull (err) {
  return err?.code === 'EAGAIN'
}

export function isClosedSocketError (err) {
  return err?.code === 'EBADF' || err?.code === 'ENOTSOCK' || err?.code === 'ETERM'
}

export { zmq }
