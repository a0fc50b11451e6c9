// TaskStream: one task's stream of chunks as a reader gets it (docs/protocol.md
// §13), from a STREAM call (enqueue and follow) or a READ call (follow a task
// that exists). An async iterable of chunks (Buffers), then the task's result.
//
// It rides on the Client's ZBC01 channel like any call: every message it sends
// has a rid of its own, and the answers to the current rid are its. The broker
// sends at most `window` chunks beyond what MORE credited, so the chunks waiting
// here are bounded: a reader that does not read holds the broker up, never
// fills memory. A chunk is credited once the reader has taken it, in one MORE
// per half window, or per half of the chunk data the broker sends beyond its
// credit (STREAM_UNCREDITED_BYTES): a broker held by that cap (a few large
// chunks) has sent at least that much, so it never waits for a MORE that would
// come only after more chunks.
//
// After a reconnect (the connection dropped and came back) the stream goes on
// with READ from the offset after the last chunk received, or, when its
// STREAM was not accepted yet, sends the STREAM again with the same
// idempotency key. The broker has then seen the old call abandoned: with
// cancel_on_abandon it has cancelled the task, which the READ reports.
//
// Iteration ends with the chunks, then: done (the result is in `result`), or
// the error the task ended with (TaskDead, TaskCancelled, TaskExpired,
// TaskUpstreamFailed, a refusal, TimeoutError when the broker's wait_s ran out
// or the broker went silent). close() and leaving a `for await` loop end it at
// once (CLOSE; the chunks not yet taken are dropped); aborting the signal too,
// with its reason.

import { ClosedError, ProtocolError, TimeoutError, ZbrokerError, brokerError, taskError } from './errors.js'
import { C, FINAL_STATES, STREAM_CREDIT_MAX, STREAM_UNCREDITED_BYTES, zbcCall } from './protocol.js'

// How long past its wait_s a stream call may stay silent before the broker is presumed gone.
const SILENCE_GRACE_MS = 1000
// The wait_s of each call of a stream without an idle limit (timeoutMs Infinity):
// when it runs out the stream reads on from where it is, so it also notices a
// broker that is gone.
const CHAINED_WAIT_S = 60

const DONE = Object.freeze({ done: true, value: undefined })

export class TaskStream {
  #channel = null
  #link
  #what
  #meta // STREAM's: the task's options, service and follow fields
  #follow // window, attempts, cancel_on_abandon: what a READ says too
  #payload
  #key
  #waitS // the idle limit in seconds, or null: none (calls chained)
  #credit // chunks taken that one MORE credits: half the window
  #wantFrames
  #signal
  #onAbort = null

  #taskId = null
  #attempt = null
  #offset = 0
  #rid = null // the current call's
  #live = false // the current call may still send something (not ended, not closed)
  #received = 0 // the offset after the last chunk received
  #state = null // the last non-final state the broker gave
  #buffer = [] // chunks received, not yet taken: {chunk, offset, attempt, rid}
  #unreported = 0 // chunks of the current call taken and not yet credited
  #unreportedBytes = 0
  #silenceTimer = null
  #end = null // how iteration ends after the buffer: {error, next} or {next} (done); next: the stream's length
  #outcome = null // what `result` gives: {value} or {error}
  #over = false // iteration has ended (done returned or its error thrown)
  #waiters = [] // next() calls waiting: {resolve, reject}
  #accepted
  #resolveAccepted
  #rejectAccepted

  /**
   * Made by Client.stream() and Client.readStream(), never directly. `open(link)`
   * attaches the stream's channel handle and returns the channel (it throws when
   * the client is closed or has too many calls in flight).
   */
  constructor (open, spec) {
    this.#what = spec.what
    this.#meta = spec.meta
    this.#follow = spec.follow
    this.#payload = spec.payload ?? []
    this.#key = spec.key ?? null
    this.#waitS = spec.waitS
    this.#credit = Math.ceil(spec.follow.window / 2)
    this.#wantFrames = spec.frames === true
    this.#signal = spec.signal ?? null
    this.#accepted = new Promise((resolve, reject) => {
      this.#resolveAccepted = resolve
      this.#rejectAccepted = reject
    })
    this.#accepted.catch(() => {}) // awaiting it is optional: iteration reports the same error
    if (spec.command === C.READ) {
      this.#taskId = spec.taskId
      this.#received = this.#offset = spec.offset
      this.#resolveAccepted(spec.taskId)
    }
    // What the channel sees of this stream: as a call (client.js Call) does.
    this.#link = {
      what: spec.what,
      sent: new Map(), // rid -> command, of the call that may still be answered
      answered: (answer) => this.#onAnswer(answer),
      reconnected: () => this.#onReconnect(),
      reject: (err) => this.#fail(err),
      later: (fn, ms) => setTimeout(fn, ms)
    }
    if (this.#signal?.aborted) {
      this.#abandon(this.#signal.reason)
      return
    }
    try {
      this.#channel = open(this.#link)
    } catch (err) {
      this.#fail(err)
      return
    }
    if (this.#signal) {
      this.#onAbort = () => this.#abandon(this.#signal.reason)
      this.#signal.addEventListener('abort', this.#onAbort, { once: true })
    }
    if (spec.command === C.STREAM) this.#call(C.STREAM, this.#meta, this.#payload)
    else this.#read()
  }

  /** The task's id: known from the start for readStream(), once accepted for stream(); null before. */
  get taskId () { return this.#taskId }
  /** Resolves with the task's id once the broker has stored it (at once for readStream()); rejects if the stream ends first. */
  get accepted () { return this.#accepted }
  /** The attempt that sent the last chunk taken; null before the first. A higher one than before: a new attempt started over. */
  get attempt () { return this.#attempt }
  /** The offset of the next chunk: after the last one taken (at the end, the stream's length). */
  get offset () { return this.#offset }

  /**
   * The task's result (a Buffer; with `frames: true` every result frame), once
   * iteration has ended. Throws what the stream ended with when the task did not
   * end done (TaskDead, TimeoutError...), and a ZbrokerError when read before the
   * end, or after close() before the result came.
   */
  get result () {
    if (this.#end === null || this.#buffer.length > 0) {
      throw new ZbrokerError(`${this.#what}: the result is known once the iteration has ended (iterate the stream to its end first)`)
    }
    if (this.#outcome.error !== undefined) throw this.#outcome.error
    return this.#outcome.value
  }

  [Symbol.asyncIterator] () { return this }

  /** The next chunk: {value: Buffer, done: false}, then {done: true}; rejects with what ended the stream otherwise. */
  next () {
    if (this.#waiters.length === 0 && this.#buffer.length > 0) return Promise.resolve(this.#take())
    if (this.#over) return Promise.resolve(DONE)
    return new Promise((resolve, reject) => {
      this.#waiters.push({ resolve, reject })
      this.#deliver()
    })
  }

  /** What leaving a `for await` loop calls: close(). */
  return () {
    this.close()
    return Promise.resolve(DONE)
  }

  /**
   * Stop reading: CLOSE ends the call at the broker (which then cancels the task
   * if the stream asked cancelOnAbandon and the task has not ended), chunks not
   * yet taken are dropped, and iteration ends (done). Safe to call at any time.
   */
  close () {
    this.#abandon(null)
  }

  [Symbol.dispose] () { this.close() }

  // ------------------------------------------------------------ calls

  // A new call (the stream's first, or a READ that goes on from where it is):
  // the previous one's answers are late from now on.
  #call (command, meta, payload = []) {
    this.#forgetCall()
    const waitS = this.#waitS ?? CHAINED_WAIT_S
    const rid = this.#channel.rid(this.#link)
    this.#link.sent.set(rid, command)
    this.#rid = rid
    this.#live = true
    this.#channel.send(this.#link, zbcCall(command, { ...meta, wait_s: waitS, rid }, payload))
    this.#listen()
  }

  #read () {
    this.#call(C.READ, { id: this.#taskId, offset: this.#received, ...this.#follow })
  }

  #forgetCall () {
    if (this.#rid !== null) {
      this.#link.sent.delete(this.#rid)
      this.#channel.answeredFully(this.#rid)
    }
    this.#live = false
    this.#unreported = 0
    this.#unreportedBytes = 0
  }

  #send (command, meta) {
    this.#channel.send(this.#link, zbcCall(command, { ...meta, rid: this.#rid }))
  }

  #onReconnect () {
    if (this.#end !== null) return
    if (this.#taskId === null) this.#call(C.STREAM, this.#meta, this.#payload) // the same key: never a second task
    else this.#read()
  }

  // ------------------------------------------------------------ answers

  #onAnswer (answer) {
    if (this.#end !== null || answer.rid !== this.#rid) {
      this.#channel.stats.lateAnswers++ // a call this stream has left behind
      return
    }
    this.#listen() // the broker is there
    try {
      if (!answer.ok) return this.#finish({ error: brokerError(answer.meta.code, answer.meta.message) })
      if (answer.chunks) return this.#onChunks(answer)
      if (Object.hasOwn(answer.meta, 'ids')) return this.#onAccepted(answer)
      this.#onReply(answer)
    } catch (err) {
      this.#fail(err, { close: true })
    }
  }

  #onAccepted (answer) {
    const ids = answer.meta.ids
    if (!Array.isArray(ids) || ids.length !== 1 || typeof ids[0] !== 'string') {
      throw new ProtocolError('bad_reply', 'expected 1 task id in the acceptance of a STREAM')
    }
    if (this.#taskId !== null) return
    this.#taskId = ids[0]
    this.#resolveAccepted(ids[0])
  }

  #onChunks (answer) {
    const { id, offset, attempt } = answer.meta
    if (this.#taskId === null) { // chunks come after the acceptance; should one not, it names the task too
      this.#taskId = id
      this.#resolveAccepted(id)
    }
    let frames = answer.frames
    let at = offset
    if (at < this.#received) { // chunks this stream has already: credit them at once, keep the rest
      const repeated = Math.min(frames.length, this.#received - at)
      this.#unreported += repeated
      frames = frames.slice(repeated)
      at += repeated
    }
    for (const chunk of frames) this.#buffer.push({ chunk, offset: at++, attempt, rid: answer.rid })
    this.#received = Math.max(this.#received, at)
    this.#deliver()
  }

  #onReply (answer) {
    const { state, error } = answer.meta
    const id = typeof answer.meta.id === 'string' ? answer.meta.id : this.#taskId
    const next = Number.isSafeInteger(answer.meta.next) && answer.meta.next >= 0 ? answer.meta.next : this.#received
    if (this.#taskId === null) {
      this.#taskId = id
      this.#resolveAccepted(id)
    }
    if (state === 'done') {
      if (this.#wantFrames) return this.#finish({ value: answer.frames }, next)
      if (answer.frames.length > 1) {
        return this.#finish({ error: new ProtocolError('reply_frames', `task ${id} has a result of ${answer.frames.length} frames: pass {frames: true}`) }, next)
      }
      return this.#finish({ value: answer.frames[0] ?? Buffer.alloc(0) }, next)
    }
    if (FINAL_STATES.has(state)) return this.#finish({ error: taskError(id, state, error) }, next)
    if (typeof state !== 'string') throw new ProtocolError('bad_reply', 'a stream\'s final answer without a state')
    this.#state = state
    this.#received = Math.max(this.#received, next)
    if (this.#waitS === null) return this.#read() // no idle limit: read on from where it is
    this.#finish({
      error: new TimeoutError(
        `${this.#what}: nothing came within wait_s ${this.#waitS}s (task ${id} is ${state}); read on with readStream(${JSON.stringify(id)}, {offset: ${next}})`,
        { taskId: id, state, next })
    }, next)
  }

  // ------------------------------------------------------------ iteration

  // Hand chunks, then the end, to the next() calls waiting.
  #deliver () {
    while (this.#waiters.length > 0) {
      if (this.#buffer.length > 0) {
        this.#waiters.shift().resolve(this.#take())
      } else if (this.#end !== null) {
        const waiter = this.#waiters.shift()
        if (!this.#over && this.#end.error !== undefined) {
          this.#over = true
          waiter.reject(this.#end.error)
        } else {
          this.#over = true
          waiter.resolve(DONE)
        }
      } else {
        return
      }
    }
  }

  #take () {
    const { chunk, offset, attempt, rid } = this.#buffer.shift()
    this.#attempt = attempt
    this.#offset = offset + 1
    if (this.#buffer.length === 0 && this.#end !== null) this.#offset = Math.max(this.#offset, this.#end.next ?? 0)
    if (rid === this.#rid && this.#live) {
      this.#unreported++
      this.#unreportedBytes += chunk.length
      if (this.#unreported >= this.#credit || this.#unreportedBytes >= STREAM_UNCREDITED_BYTES / 2) this.#more()
    }
    if (this.#buffer.length === 0) this.#listen() // waiting on the broker again (below)
    return { value: chunk, done: false }
  }

  // MORE for the chunks of the current call taken so far.
  #more () {
    while (this.#live && this.#unreported > 0) {
      const credit = Math.min(this.#unreported, STREAM_CREDIT_MAX)
      this.#unreported -= credit
      this.#send(C.MORE, { credit })
    }
    this.#unreportedBytes = 0
  }

  // The broker answers a stream call at least every wait_s (a chunk, or the REPLY
  // saying the task's state), unless this reader holds it up by not taking chunks.
  // Silence for longer while nothing waits here to be taken: the broker is gone.
  #listen () {
    clearTimeout(this.#silenceTimer)
    this.#silenceTimer = null
    if (!this.#live) return
    const limitMs = (this.#waitS ?? CHAINED_WAIT_S) * 1000 + SILENCE_GRACE_MS
    this.#silenceTimer = setTimeout(() => {
      this.#silenceTimer = null
      if (this.#buffer.length > 0) return this.#listen() // the reader is behind: the broker may wait for its MORE
      const known = this.#taskId === null ? '' : ` (task ${this.#taskId}${this.#state ? `, ${this.#state}` : ''})`
      const hint = this.#taskId === null
        ? `; the task may or may not be stored: stream it again with key ${JSON.stringify(this.#key)} to find out without a duplicate`
        : `; read on with readStream(${JSON.stringify(this.#taskId)}, {offset: ${this.#received}})`
      this.#fail(new TimeoutError(`${this.#what}: nothing from the broker for ${limitMs}ms${known}${hint}`, {
        taskId: this.#taskId,
        state: this.#state,
        key: this.#taskId === null ? this.#key : null,
        next: this.#received
      }))
    }, limitMs)
  }

  // ------------------------------------------------------------ endings

  // The broker ended the call: its final REPLY, or an ERROR. `next` is the stream's length.
  #finish (outcome, next = this.#received) {
    if (this.#end !== null) return
    this.#forgetCall()
    this.#settle(outcome.error === undefined ? { next } : { error: outcome.error, next }, outcome)
  }

  // The stream fails on this side (the client closed, a send failed, the broker
  // went silent, a malformed answer): chunks received are still handed out
  // first. `close`: the broker may still be sending, so CLOSE the call.
  #fail (error, { close = false } = {}) {
    if (this.#end !== null) return
    if (close && this.#live) this.#send(C.CLOSE, {})
    this.#forgetCall()
    this.#settle({ error, next: this.#received }, { error })
  }

  // close() (`reason` null) or the signal aborted: CLOSE, the chunks not taken
  // are dropped, and the next() calls waiting end at once.
  #abandon (reason) {
    if (this.#live && this.#channel !== null) this.#send(C.CLOSE, {})
    this.#buffer = []
    if (this.#end === null) {
      this.#forgetCall()
      const error = reason === null
        ? new ClosedError(`${this.#what}: the stream was closed before the task's result came`)
        : reason
      this.#settle(reason === null ? { next: this.#received } : { error: reason, next: this.#received }, { error })
    } else if (reason === null && this.#end.error !== undefined) {
      this.#end = { next: this.#end.next } // closed: iteration ends without the error; `result` still has it
    }
    if (reason === null) this.#over = true
    this.#deliver()
  }

  #settle (end, outcome) {
    this.#end = end
    this.#outcome = outcome
    clearTimeout(this.#silenceTimer)
    this.#silenceTimer = null
    if (this.#taskId === null) this.#rejectAccepted(outcome.error ?? new ProtocolError('bad_reply', 'no task id'))
    if (this.#onAbort !== null) {
      this.#signal.removeEventListener('abort', this.#onAbort)
      this.#onAbort = null
    }
    if (this.#channel !== null) this.#channel.forget(this.#link)
    if (this.#buffer.length === 0) this.#offset = Math.max(this.#offset, end.next)
    this.#deliver()
  }
}
