// Test support: a real `zbroker start` process on free loopback ports.
//
// The Python interpreter is $ZBROKER_PYTHON when set, else <repo>/.venv/bin/python
// (created by `python3 dev.py test`). Each broker runs in a temporary working
// directory (so any default data directory lands there) and logs to a file that
// is printed when it fails to start. Every broker still running when the test
// process exits is killed.

import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import * as zmq from 'zeromq'

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
const live = new Set()

function killAll () {
  for (const child of live) {
    try { child.kill('SIGKILL') } catch {}
  }
}
process.on('exit', killAll)
// Interrupted (Ctrl-C, a runner giving up): no broker outlives the test process.
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    killAll()
    process.kill(process.pid, signal)
  })
}

export function pythonPath () {
  const python = process.env.ZBROKER_PYTHON || join(REPO, '.venv', 'bin', 'python')
  if (!existsSync(python)) {
    throw new Error(`no Python for the broker at ${python}: run \`python3 dev.py test\` once in ${REPO}, or set ZBROKER_PYTHON`)
  }
  return python
}

export function freePort () {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Poll `predicate` (sync or async) until it is truthy; throw with `what` at the deadline. */
export async function waitUntil (predicate, { timeoutMs = 10_000, stepMs = 20, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await predicate()) return
    if (Date.now() > deadline) throw new Error(`${what} not met within ${timeoutMs}ms`)
    await sleep(stepMs)
  }
}

export class BrokerProcess {
  constructor ({ heartbeatInterval = 0.2, args = [] } = {}) {
    this.heartbeatInterval = heartbeatInterval
    this.extraArgs = args
    this.dir = mkdtempSync(join(tmpdir(), 'zbroker-node-test-'))
    this.logPath = join(this.dir, 'broker.log')
    this.child = null
    this.starts = 0
  }

  async #ports () {
    if (this.endpoint) return
    const [a, b, c] = [await freePort(), await freePort(), await freePort()]
    this.endpoint = `tcp://127.0.0.1:${a}`
    this.eventsIn = `tcp://127.0.0.1:${b}`
    this.eventsOut = `tcp://127.0.0.1:${c}`
  }

  /** Start (or start again, on the same ports) and wait until an MMI query is answered. */
  async start () {
    await this.#ports()
    const log = openSync(this.logPath, 'a')
    const env = { ...process.env, PYTHONUNBUFFERED: '1' }
    for (const name of Object.keys(env)) if (name.startsWith('ZBROKER_') && name !== 'ZBROKER_PYTHON') delete env[name]
    const child = spawn(pythonPath(), [
      '-m', 'zbroker', 'start',
      '--bind', this.endpoint,
      '--events-in', this.eventsIn,
      '--events-out', this.eventsOut,
      '--heartbeat-interval', String(this.heartbeatInterval),
      '--log-level', 'debug',
      ...this.extraArgs
    ], { cwd: this.dir, env, stdio: ['ignore', log, log] })
    closeSync(log)
    this.child = child
    this.starts++
    live.add(child)
    child.on('exit', () => live.delete(child))
    await this.#waitReady()
    return this
  }

  async #waitReady (timeoutMs = 20_000) {
    const deadline = Date.now() + timeoutMs
    while (Date.now() < deadline) {
      if (this.child.exitCode !== null || this.child.signalCode !== null) {
        throw new Error(`broker exited (${this.child.exitCode ?? this.child.signalCode}):\n${this.log()}`)
      }
      const sock = new zmq.Dealer({ linger: 0 })
      try {
        sock.connect(this.endpoint)
        await sock.send(['', 'MDPC01', 'mmi.service', 'ping'])
        const answered = await Promise.race([
          sock.receive().then(() => true, () => false),
          sleep(200).then(() => false)
        ])
        if (answered) return
      } finally {
        sock.close()
      }
    }
    throw new Error(`broker not ready within ${timeoutMs}ms:\n${this.log()}`)
  }

  #waitExit (timeoutMs) {
    const child = this.child
    if (child === null || child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true)
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs)
      child.once('exit', () => {
        clearTimeout(timer)
        resolve(true)
      })
    })
  }

  /** SIGKILL: the broker does no cleanup of any kind. */
  async kill () {
    if (this.child === null) return
    this.child.kill('SIGKILL')
    await this.#waitExit(10_000)
    this.child = null
  }

  /** SIGTERM, then SIGKILL if it has not stopped within 10 s. */
  async stop () {
    if (this.child === null) return
    this.child.kill('SIGTERM')
    if (!(await this.#waitExit(10_000))) {
      this.child.kill('SIGKILL')
      await this.#waitExit(5000)
    }
    this.child = null
  }

  /** Stop and remove the working directory. */
  async dispose () {
    await this.stop()
    rmSync(this.dir, { recursive: true, force: true })
  }

  log () {
    try {
      return readFileSync(this.logPath, 'utf8')
    } catch {
      return ''
    }
  }
}

/** A started broker; call `dispose()` in `after`. */
export async function startBroker (options) {
  const broker = new BrokerProcess(options)
  try {
    await broker.start()
  } catch (err) {
    await broker.dispose()
    throw err
  }
  return broker
}

/** Does this broker answer ZBC01 calls? (A STATUS of an unknown id answers not_found.) */
export async function brokerSpeaksZbc01 (endpoint, timeoutMs = 1500) {
  const { pack, unpack } = await import('../lib/protocol.js')
  const sock = new zmq.Dealer({ linger: 0 })
  try {
    sock.connect(endpoint)
    await sock.send(['', 'ZBC01', Buffer.from([0x04]), pack({ rid: 1, id: 'probe' })])
    const frames = await Promise.race([sock.receive(), sleep(timeoutMs).then(() => null)])
    return frames !== null && frames.length >= 4 && frames[1].toString() === 'ZBC01' && unpack(frames[3]).rid === 1
  } catch {
    return false
  } finally {
    sock.close()
  }
}

export const quietLogger = null
