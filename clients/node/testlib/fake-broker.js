// Test support: a scripted ZBW01 broker (a bare ROUTER socket), to check the
// Worker's side of the protocol message by message.

import * as zmq from 'zeromq'
import { pack, unpack } from '../lib/protocol.js'

export const CMD = { READY: 1, TASK: 2, ACK: 3, PROGRESS: 4, DONE: 5, FAIL: 6, HEARTBEAT: 7, DISCONNECT: 8, CANCEL: 9, TASKS: 10, DONES: 11, STOPPING: 12, CHUNK: 13, TAGS: 14 }

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

  /**
   * The next `count` results, whether they came as DONE or inside DONES:
   * [{id, attempt, frames, seq, batch}], in the order they were sent; `batch`
   * is how many results the message carrying it held.
   */
  async results (count, options) {
    const out = []
    while (out.length < count) {
      const m = await this.next((x) => x.command === CMD.DONE || x.command === CMD.DONES, options)
      if (m.command === CMD.DONE) {
        out.push({ id: m.meta.id, attempt: m.meta.attempt, frames: m.frames, seq: m.seq, batch: 1 })
        continue
      }
      let at = 0
      for (const [id, attempt, n] of m.meta.tasks) {
        out.push({ id, attempt, frames: m.frames.slice(at, at + n), seq: m.seq, batch: m.meta.tasks.length })
        at += n
      }
      if (at !== m.frames.length) throw new Error('fake broker: DONES frame counts do not add up')
    }
    return out
  }

  /** One TASKS message: `tasks` is [{id, attempt, service, headers?, timeout_s?, frames: [...]}]. */
  sendTasks (identity, tasks) {
    const entries = tasks.map(({ frames = [], ...entry }) => ({ ...entry, n: frames.length }))
    return this.send(identity, CMD.TASKS, { tasks: entries }, ...tasks.flatMap((task) => task.frames ?? []))
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
