// Test support: a scripted ZBC01 broker (a bare ROUTER socket), to check the
// Client's side of the protocol message by message. Each message received is
// {identity, header, command, meta, frames (as strings), bytes}.

import * as zmq from 'zeromq'
import { pack, unpack } from '../lib/protocol.js'
import { sleep } from './broker.js'

const REPLY = 0x10
const ERROR = 0x11
const CHUNKS = 0x12

export class FakeZbcBroker {
  constructor () {
    this.inbox = []
    this.waiters = new Set()
  }

  async bind (endpoint = 'tcp://127.0.0.1:*') {
    this.router = new zmq.Router({ linger: 0 })
    for (let i = 0; ; i++) {
      try {
        await this.router.bind(endpoint)
        break
      } catch (err) {
        if (i > 50) throw err
        await sleep(50) // the port of a just-closed socket may take a moment
      }
    }
    this.endpoint = this.router.lastEndpoint
    this.#loop(this.router).catch(() => {})
    return this
  }

  async #loop (router) {
    for await (const message of router) {
      const [identity, , header, command, meta, ...frames] = message
      // `bytes`: the whole message as the broker counts it against its cap, routing id included
      const bytes = message.reduce((n, f) => n + f.length, 0)
      this.inbox.push({ identity, header: header.toString(), command: command[0], meta: unpack(meta), frames: frames.map(String), bytes })
      for (const wake of [...this.waiters]) wake()
    }
  }

  next (command, timeoutMs = 5000, match = () => true) {
    const take = () => {
      const i = this.inbox.findIndex((m) => m.command === command && match(m))
      return i < 0 ? undefined : this.inbox.splice(i, 1)[0]
    }
    const found = take()
    if (found) return Promise.resolve(found)
    return new Promise((resolve, reject) => {
      const wake = () => {
        const m = take()
        if (m) {
          this.waiters.delete(wake)
          clearTimeout(timer)
          resolve(m)
        }
      }
      const timer = setTimeout(() => {
        this.waiters.delete(wake)
        reject(new Error(`fake broker: no call ${command} within ${timeoutMs}ms`))
      }, timeoutMs)
      this.waiters.add(wake)
    })
  }

  reply (call, meta, ...frames) {
    return this.router.send([call.identity, '', 'ZBC01', Buffer.from([REPLY]), pack({ ...meta, rid: call.meta.rid }), ...frames])
  }

  /** CHUNKS of stream call `call`: `meta` is {id, offset, attempt}, then one frame per chunk. */
  chunks (call, meta, ...frames) {
    return this.router.send([call.identity, '', 'ZBC01', Buffer.from([CHUNKS]), pack({ ...meta, rid: call.meta.rid }), ...frames])
  }

  error (call, code, message) {
    return this.router.send([call.identity, '', 'ZBC01', Buffer.from([ERROR]), pack({ rid: call.meta.rid, code, message })])
  }

  close () { this.router.close() }
}
