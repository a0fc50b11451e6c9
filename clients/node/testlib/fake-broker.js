// Test support: a scripted ZBW01 broker (a bare ROUTER socket), to check the
// Worker's side of the protocol message by message.

import * as zmq from 'zeromq'
import { pack, unpack } from '../lib/protocol.js'

export const CMD = { READY: 1, TASK: 2, ACK: 3, PROGRESS: 4, DONE: 5, FAIL: 6, HEARTBEAT: 7, DISCONNECT: 8, CANCEL: 9 }

export class FakeBroker {
  constructor () {
    this.router = new zmq.Router({ linger: 0 })
    this.inbox = []
    this.seq = 0
    this.waiters = new Set()
  }

  async bind () {
    await this.router.bind('tcp://127.0.0.1:*')
    this.endpoint = this.router.lastEndpoint
    this.#loop().catch(() => {})
    return this
  }

  async #loop () {
    for await (const [identity, empty, header, command, ...rest] of this.router) {
      const message = {
        seq: this.seq++,
        identity,
        empty: empty.length === 0,
        header: header.toString(),
        command: command?.[0],
        meta: rest.length > 0 ? unpack(rest[0]) : null,
        metaFrame: rest[0] ?? null,
        frames: rest.slice(1).map((f) => f.toString())
      }
      this.inbox.push(message)
      for (const wake of [...this.waiters]) wake()
    }
  }

  /** Take the first message matching `predicate` out of the inbox, waiting up to `timeoutMs`. */
  next (predicate, { timeoutMs = 5000 } = {}) {
    const take = () => {
      const i = this.inbox.findIndex(predicate)
      if (i < 0) return undefined
      return this.inbox.splice(i, 1)[0]
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
        reject(new Error(`fake broker: no matching message within ${timeoutMs}ms`))
      }, timeoutMs)
      this.waiters.add(wake)
    })
  }

  /** The first message with this command. */
  command (cmd, options) {
    return this.next((m) => m.command === cmd, options)
  }

  /** Messages with this command received so far (left in the inbox). */
  seen (cmd) {
    return this.inbox.filter((m) => m.command === cmd)
  }

  send (identity, cmd, meta, ...frames) {
    const message = [identity, '', 'ZBW01', Buffer.from([cmd])]
    if (meta !== undefined) message.push(pack(meta))
    message.push(...frames)
    return this.router.send(message)
  }

  close () {
    this.router.close()
  }
}
