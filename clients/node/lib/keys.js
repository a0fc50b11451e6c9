// CURVE keys for a broker started with --auth (docs/security.md), and the
// handshake watch that turns a refused authentication into an error.
//
// Every socket this package opens is watched through its event observer
// (zeromq.js `socket.events`): when the broker refuses the handshake (an
// unknown key, a key without a role for that endpoint), or one side uses CURVE
// and the other does not, the owner of the socket hears it at once and fails
// what waits on it with AuthenticationFailed, instead of waiting for a
// timeout. The Node twin of zbroker/client/keys.py.

import { existsSync, readFileSync } from 'node:fs'
import { AuthenticationFailed, ZbrokerError } from './errors.js'
import { describe } from './protocol.js'

// A CURVE key as text: 40 characters of Z85 (32 bytes).
const Z85_KEY = /^[0-9a-zA-Z.\-:+=^!/*?&<>()[\]{}@%$#]{40}$/
// Connections, in a row, that ended during the CURVE handshake without a reason
// the broker gave, before that is taken as a refusal: a wrong server key looks
// like this (the broker cannot read us and drops the connection), but so may a
// broker that dies in the middle of one handshake.
const SILENT_CLOSES = 2

// What each refusal means, in the words of zbroker/client/keys.py.
const REFUSED_KEY = 'it is unknown to the broker\'s auth file, or its principal has no role for this endpoint'
const NO_CURVE_THERE = 'the broker does not use CURVE: start it with --auth, or connect without keys'
const CURVE_WANTED = 'the broker asks for CURVE authentication: give the broker\'s public key' +
  ' and this peer\'s certificate (credentials option; docs/security.md)'
const CURVE_FAILED = 'the CURVE handshake failed: is the broker\'s public key right (its log prints' +
  ' it at start), and does the broker run with --auth?'
const CLOSED_IN_HANDSHAKE = 'the broker closed the connection during the CURVE handshake: is the' +
  ' broker\'s public key right (its log prints it at start)?'

const secrets = new WeakMap() // Credentials -> its secret key, kept off the object

/**
 * The broker's public key and this peer's key pair, each 40 characters of Z85.
 * Give the same Credentials to every Client, Worker, Publisher, Subscriber or
 * Service of one principal. The secret key is not a property: it does not show
 * in logs or JSON.
 */
export class Credentials {
  constructor ({ serverKey, publicKey, secretKey } = {}) {
    this.serverKey = checkKey(serverKey, 'serverKey')
    this.publicKey = checkKey(publicKey, 'publicKey')
    secrets.set(this, checkKey(secretKey, 'secretKey'))
    Object.freeze(this)
  }

  /**
   * From the broker's public key (the path of its .key file, or its 40
   * characters of Z85 as the broker's log prints them) and the path of this
   * peer's secret certificate (NAME.key_secret, as `zbroker keys new NAME` writes it).
   */
  static load (serverKey, certificate) {
    if (typeof serverKey !== 'string' || serverKey.length === 0) {
      throw new TypeError(`serverKey must be a .key file path or a Z85 key, got ${describe(serverKey)}`)
    }
    if (typeof certificate !== 'string' || certificate.length === 0) {
      throw new TypeError(`certificate must be the path of a .key_secret file, got ${describe(certificate)}`)
    }
    const server = Z85_KEY.test(serverKey) && !existsSync(serverKey)
      ? serverKey
      : readCertificate(serverKey).publicKey
    const { publicKey, secretKey } = readCertificate(certificate)
    if (secretKey === null) {
      throw new ZbrokerError(`${certificate} holds no secret key: give the NAME.key_secret file, not NAME.key`)
    }
    return new Credentials({ serverKey: server, publicKey, secretKey })
  }

  /**
   * From ZBROKER_SERVER_KEY (as `serverKey` of load()) and ZBROKER_KEY (a
   * .key_secret file) when both are set; null when neither is. One without
   * the other is a mistake: it throws.
   */
  static fromEnvironment (env = process.env) {
    const server = env.ZBROKER_SERVER_KEY
    const mine = env.ZBROKER_KEY
    if (!server && !mine) return null
    if (!server || !mine) throw new ZbrokerError('set both ZBROKER_SERVER_KEY and ZBROKER_KEY, or neither')
    return Credentials.load(server, mine)
  }
}

/** `value` as given, if it is Credentials, null or undefined (null then); else a TypeError. */
export function checkCredentials (value) {
  if (value === undefined || value === null) return null
  if (!(value instanceof Credentials)) {
    throw new TypeError(`credentials must be a Credentials (Credentials.load(serverKey, certificate)), got ${describe(value)}`)
  }
  return value
}

/** The socket options that make a socket a CURVE client of the broker. */
export function curveOptions (credentials) {
  return {
    curveServerKey: credentials.serverKey,
    curvePublicKey: credentials.publicKey,
    curveSecretKey: secrets.get(credentials)
  }
}

function checkKey (value, name) {
  if (typeof value !== 'string' || !Z85_KEY.test(value)) {
    // Never the value itself: it may be a secret key, slightly wrong.
    const got = typeof value !== 'string'
      ? describe(value)
      : `a string of ${value.length} characters${value.length === 40 ? ', not all of them Z85' : ''}`
    throw new TypeError(`${name} must be a CURVE key: 40 characters of Z85, got ${got}`)
  }
  return value
}

// The keys of a certificate file (pyzmq's zmq.auth format, as `zbroker keys new`
// writes it): `public-key = "..."` and, in NAME.key_secret, `secret-key = "..."`
// lines; lines starting with # are comments.
function readCertificate (path) {
  let text
  try {
    text = readFileSync(path, 'utf8')
  } catch (err) {
    throw new ZbrokerError(`cannot read certificate ${path}: ${err.code === 'ENOENT' ? 'no such file' : err.message}`, { cause: err })
  }
  let publicKey = null
  let secretKey = null
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim()
    if (line.startsWith('#')) continue
    const eq = line.indexOf('=')
    if (eq < 0) continue
    const name = line.slice(0, eq).trim()
    if (name !== 'public-key' && name !== 'secret-key') continue
    const value = line.slice(eq + 1).trim().replace(/^["']|["']$/g, '')
    if (!Z85_KEY.test(value)) throw new ZbrokerError(`cannot read certificate ${path}: its ${name} is not 40 characters of Z85`)
    if (name === 'public-key') publicKey ??= value
    else secretKey ??= value
  }
  if (publicKey === null) throw new ZbrokerError(`cannot read certificate ${path}: no public-key line (is it a zbroker keys file?)`)
  return { publicKey, secretKey }
}

/**
 * Watches the handshakes of one socket through its event observer, from before
 * it connects until it closes (the observer ends with the socket: closing the
 * socket is all it takes). The first refusal becomes `failure`, an
 * AuthenticationFailed, and is handed to `onFailure`; `onHandshake` and
 * `onDisconnect` hear every successful handshake and every lost connection
 * (`onDisconnect(wasUp)`: whether its handshake had completed).
 *
 * Connected to several brokers, `onTakeover` hears, once, that a connection
 * whose handshake had completed was lost and that handshakes completed twice or
 * more over the socket's life (see `tookOver`).
 */
export class HandshakeWatch {
  #endpoint
  #curve
  #hooks
  #shaking = false // connected, handshake not done yet
  #silentCloses = 0
  #several // connected to several brokers: a silent close is a frozen or stepping-down one
  #up = new Set() // endpoints whose current connection completed its handshake
  #tookOverSaid = false
  failure = null
  handshakes = 0 // completed so far, every endpoint together
  disconnects = 0 // connections lost after their handshake completed, every endpoint together

  constructor (sock, endpoint, curve, hooks = {}, several = false) {
    this.#endpoint = endpoint
    this.#curve = curve
    this.#several = several
    this.#hooks = hooks
    this.#read(sock.events) // an observer of its own (zeromq.js makes one per socket, on first use)
  }

  async #read (observer) {
    try {
      for await (const event of observer) this.#take(event)
    } catch {
      // The socket was closed under a pending read: nothing more to watch.
    }
  }

  #take (event) {
    switch (event.type) {
      case 'connect':
        this.#shaking = true
        break
      case 'handshake':
        this.#shaking = false
        this.#silentCloses = 0
        this.handshakes++
        this.#up.add(event.address)
        this.#call('onHandshake')
        this.#checkTakeover()
        break
      case 'handshake:error:auth':
        this.#fail(`the broker refused this key (ZAP status ${event.error?.status ?? 'unknown'}): ${REFUSED_KEY}`)
        break
      case 'handshake:error:protocol':
        if (event.error?.code === 'ERR_ZMTP_MECHANISM_MISMATCH') this.#fail(this.#curve ? NO_CURVE_THERE : CURVE_WANTED)
        else this.#fail(this.#curve ? CURVE_FAILED : CURVE_WANTED)
        break
      case 'handshake:error:other': // the connection broke during the handshake (EPIPE, ECONNRESET...)
        this.#closedInHandshake()
        break
      case 'disconnect': {
        this.#closedInHandshake()
        const wasUp = this.#up.delete(event.address)
        if (wasUp) this.disconnects++
        this.#call('onDisconnect', wasUp)
        this.#checkTakeover()
        break
      }
    }
  }

  /**
   * Whether, on a socket connected to several brokers, a connection was lost after
   * its handshake and handshakes completed twice or more over the socket's life,
   * in either order: another broker is up besides the one that went away (a standby
   * took over), or the same one came back; either knows nothing of what was said on
   * the lost connection. Two brokers both up, none lost (a group's endpoints mixed
   * with another broker's), do not count. The twin of took_over in
   * zbroker/client/keys.py, counting only a connection lost after its own handshake.
   */
  /** How many connections are up now (their handshake completed, not lost since). */
  get up () {
    return this.#up.size
  }

  get tookOver () {
    return this.#several && this.disconnects >= 1 && this.handshakes >= 2
  }

  #checkTakeover () {
    if (this.#tookOverSaid || !this.tookOver) return
    this.#tookOverSaid = true
    this.#call('onTakeover')
  }

  // A connection that ended before its handshake did, with no reason given: a
  // CURVE peer counts them (a wrong server key); without CURVE it is only a
  // lost connection (the broker stopped at that moment), which reconnects.
  #closedInHandshake () {
    if (!this.#shaking) return
    this.#shaking = false // one count per connection: its error, then its disconnect
    if (this.#curve && !this.#several && ++this.#silentCloses >= SILENT_CLOSES) this.#fail(CLOSED_IN_HANDSHAKE)
  }

  #fail (reason) {
    if (this.failure !== null) return
    this.failure = new AuthenticationFailed(this.#endpoint, reason)
    this.#call('onFailure', this.failure)
  }

  #call (hook, ...args) {
    const fn = this.#hooks[hook]
    if (fn === undefined) return
    try {
      fn(...args)
    } catch (err) {
      queueMicrotask(() => { throw err }) // a bug in the owner: never lost in the watch's loop
    }
  }
}
