// Socket helpers shared by Client, Worker, Publisher and Subscriber: explicit
// high-water marks and linger on every socket, CURVE keys when given, every
// socket's handshakes watched (lib/keys.js), and clear endpoint errors.

import * as zmq from 'zeromq'
import { ZbrokerError } from './errors.js'
import { HandshakeWatch, curveOptions } from './keys.js'

export const DEFAULT_HWM = 10_000
// setTimeout's largest delay; longer ones are clamped to it (or mean "no limit").
export const MAX_TIMER_MS = 2 ** 31 - 1

const ENDPOINT_RE = /^[a-z][a-z0-9+.-]*:\/\/.+/i

/** Throws a TypeError for something that cannot be a ZeroMQ endpoint. */
export function checkEndpoint (endpoint) {
  if (typeof endpoint !== 'string' || !ENDPOINT_RE.test(endpoint)) {
    throw new TypeError(`endpoint must be a string like tcp://host:port, got ${JSON.stringify(endpoint)}`)
  }
  return endpoint
}

/**
 * A new socket of class `Kind`, connected to `endpoint`: a CURVE client of the
 * broker when `credentials` are given, its handshakes watched either way (a
 * HandshakeWatch calling `watch`'s hooks), so that a refused one is an error,
 * not a silent wait. Returns {sock, watch}; closing the socket ends the watch.
 * Sends never block: with `sendTimeout` 0 a send that would block (high-water
 * mark reached) rejects at once with EAGAIN, which callers turn into a clear error.
 */
export function connectSocket (Kind, endpoint, { hwm = DEFAULT_HWM, linger = 0, credentials = null, watch: hooks = {}, watchHandshakes = true } = {}) {
  const options = { linger }
  if (Kind !== zmq.Subscriber) Object.assign(options, { sendHighWaterMark: hwm, sendTimeout: 0 })
  if (Kind !== zmq.Publisher) options.receiveHighWaterMark = hwm
  if (credentials !== null) Object.assign(options, curveOptions(credentials))
  const sock = new Kind(options)
  // Before connect: no event missed. Not watched (watchHandshakes false), a socket
  // does not hold the process open by its event reader.
  const watch = watchHandshakes ? new HandshakeWatch(sock, endpoint, credentials !== null, hooks) : null
  try {
    sock.connect(endpoint)
  } catch (err) {
    sock.close()
    throw new ZbrokerError(`cannot connect to ${endpoint}: ${err.message}`, { cause: err })
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
