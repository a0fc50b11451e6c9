// Client: durable tasks over ZBC01 (enqueue, request, result, task streams, status, cancel,
// dead letters) on one multiplexed DEALER, and plain 7/MDP requests (Lazy
// Pirate: one fresh DEALER per attempt).

import { randomUUID } from 'node:crypto'
import {
  ClosedError,
  ERROR_CODES,
  ProtocolError,
  TimeoutError,
  ZbrokerError,
  brokerError,
  taskError
} from './errors.js'
import {
  BATCH_FRAMES,
  C,
  DEFAULT_ENDPOINT,
  DEFAULT_MAX_MESSAGE_BYTES,
  FINAL_STATES,
  INPUTS,
  MAX_ATTEMPTS_LIMIT,
  MAX_BATCH,
  MAX_BURST,
  MAX_DEPENDENCIES,
  MAX_LIST,
  MAX_QUEUES_PAGE,
  MAX_SCHEDULE_INTERVAL_S,
  MAX_SCHEDULE_NAME_BYTES,
  MAX_SCHEDULE_PAYLOAD_BYTES,
  MAX_RATE_PER_S,
  MAX_SERVICE_LIMIT,
  MAX_TAGS,
  MAX_WAIT_S,
  MIN_SCHEDULE_INTERVAL_S,
  MIN_CLIENT_MESSAGE_BYTES,
  MMI_SERVICE,
  PRIORITY_MAX,
  PRIORITY_MIN,
  STREAM_WINDOW_DEFAULT,
  STREAM_WINDOW_MAX,
  checkMaxMessageBytes,
  decodeMdpReply,
  decodeZbcAnswer,
  describe,
  isInt,
  mdpRequest,
  pack,
  toFrames,
  zbcCall
} from './protocol.js'
import { checkCredentials } from './keys.js'
import { TaskStream } from './stream.js'
import {
  DEFAULT_HWM,
  MAX_TIMER_MS,
  checkEndpoint,
  connectSocket,
  isClosedSocketError,
  isSendQueueFull,
  noBrokerPrefix,
  zmq
} from './sockets.js'

// The longest single RESULT wait asked of the broker; longer waits are chained,
// so a waiter also notices a broker that was replaced meanwhile.
const WAIT_CHUNK_S = 60
// How long past its wait a RESULT call may take to be answered before it times out.
const RESULT_GRACE_MS = 1000
// Pause before asking again for a result that is not ready yet.
const REPOLL_MS = 20
// A connection whose handshake the broker refuses loses its queue at once, so a
// send can fail (EAGAIN) just before the socket's observer reports why: a send
// that fails so before any handshake succeeded waits this long for that report.
const REFUSAL_GRACE_MS = 50
// How often a send no connection could take yet (several endpoints, no broker's
// handshake completed) is tried again, within the call's own timeout.
const SEND_RETRY_MS = 20
// What an ENQUEUE message carries besides payload frames: the routing id the
// broker's ROUTER adds, "", "ZBC01", the command and the meta frame. The broker
// counts all of them against its frame cap (MAX_FRAMES per message).
const ZBC_OVERHEAD_FRAMES = 5
// The bytes of a ZBC01 message besides meta and payload, as the broker counts
// them against --max-message-bytes: the routing id its ROUTER adds (5 bytes),
// "", "ZBC01" and the command byte.
const ZBC_HEADER_BYTES = 5 + 0 + 5 + 1
// The largest rid, as packed into meta when a message's size is worked out in advance.
const RID_BOUND = Number.MAX_SAFE_INTEGER

const TIME_FIELDS = new Set(['created_at', 'not_before', 'expires_at', 'finished_at', 'keep_until'])

export class Client {
  #endpoint
  #timeoutMs
  #mdpTimeoutMs
  #retries
  #hwm
  #channel = null
  #maxPending
  #maxFrames
  #maxMessageBytes
  #credentials
  #mdpAttempts = new Set() // closers of MDP attempts in progress
  #closed = false

  /**
   * new Client(endpoint?, options?) or new Client({endpoint, ...options}).
   * Options: timeoutMs (30000: default limit of ZBC01 calls), mdpTimeoutMs
   * (5000: per attempt), retries (3: MDP resends), maxPending (10000 calls in
   * flight), hwm (10000 messages), maxFrames (16000) and maxMessageBytes (16 MiB):
   * the broker's caps, which enqueueMany() splits batches to respect;
   * credentials (a Credentials: CURVE keys for a broker started with --auth).
   */
  constructor (endpointOrOptions, options = {}) {
    const opts = typeof endpointOrOptions === 'string' || Array.isArray(endpointOrOptions)
      ? { ...options, endpoint: endpointOrOptions }
      : { ...(endpointOrOptions ?? {}) }
    this.#endpoint = checkEndpoint(opts.endpoint ?? DEFAULT_ENDPOINT)
    this.#timeoutMs = checkTimeout(opts.timeoutMs ?? 30_000, 'timeoutMs')
    this.#mdpTimeoutMs = checkTimeout(opts.mdpTimeoutMs ?? 5000, 'mdpTimeoutMs', { positive: true })
    this.#retries = checkInt(opts.retries ?? 3, 'retries', 0, 1000)
    this.#maxPending = checkInt(opts.maxPending ?? 10_000, 'maxPending', 1, 1_000_000)
    this.#hwm = checkInt(opts.hwm ?? DEFAULT_HWM, 'hwm', 1, 10_000_000)
    this.#maxFrames = checkInt(opts.maxFrames ?? BATCH_FRAMES, 'maxFrames', ZBC_OVERHEAD_FRAMES + 1, 1_000_000)
    this.#maxMessageBytes = checkMaxMessageBytes(opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES, 'maxMessageBytes', MIN_CLIENT_MESSAGE_BYTES)
    this.#credentials = checkCredentials(opts.credentials)
    /** Counters since creation; they only grow. */
    this.stats = {
      calls: 0, // ZBC01 calls made
      resends: 0, // ZBC01 messages sent again after a reconnect
      lateAnswers: 0, // answers that settled nothing: for calls that had ended (timed out, aborted), or superseded (below)
      malformed: 0, // messages from the broker that could not be decoded
      mdpRequests: 0,
      mdpResends: 0,
      mdpTimeouts: 0
    }
  }

  get endpoint () { return this.#endpoint }
  get closed () { return this.#closed }

  // ------------------------------------------------------------ ZBC01

  /**
   * Enqueue one durable task; resolves with its id once the broker has
   * committed it. An idempotency key is generated when none is given, so a
   * resend after a lost answer never enqueues twice. With `{receipt: true}`
   * it resolves with `{id, existing}` instead: `existing` is true when the
   * broker stored nothing because a task of the service already held the
   * caller's `key` (the id is that task's); never true for a generated key.
   * `debounceS` (with `key`, docs/protocol.md §16.3): the task waits that long,
   * and an enqueue of the same key meanwhile replaces its payload and headers
   * instead of storing another task (its receipt then also has `replaced: true`).
   */
  async enqueue (service, payload, options = {}) {
    const meta = taskMeta(options, 1, { extra: ENQUEUE_ONE_OPTIONS })
    const receipt = checkReceipt(options)
    const own = callerKeys(options, 1)
    meta.service = checkService(service)
    const frames = toFrames(payload)
    const what = `ENQUEUE to ${JSON.stringify(service)}`
    this.#checkMessage(what, meta, frames)
    const answer = await this.#call({
      what,
      options,
      key: meta.key,
      start: (ctl) => ctl.send(C.ENQUEUE, meta, frames),
      answer: replyOrError
    })
    const [receipt0] = receipts(answer, own)
    return receipt ? receipt0 : receipt0.id
  }

  /**
   * Enqueue a batch; resolves with one id per payload, in order (with
   * `{receipt: true}`: one `{id, existing}` per payload, as enqueue()). The
   * batch goes in as few ENQUEUE messages as the broker's caps allow (each
   * one journal commit): at most 10000 tasks, `maxFrames` frames and
   * `maxMessageBytes` bytes per message, meta included. A payload too large
   * for any message refuses the whole batch before anything is sent. If a
   * later message is refused, the tasks of the earlier ones stay stored: the
   * error's `enqueuedIds` lists them (and with `receipt`, `enqueuedReceipts`
   * their receipts); a TimeoutError's `keys` are those of the tasks after them.
   */
  async enqueueMany (service, payloads, options = {}) {
    if (!Array.isArray(payloads)) throw new TypeError('payloads must be an array (one payload per task)')
    if (payloads.length === 0) return []
    const meta = taskMeta(options, payloads.length, { batch: true, extra: ENQUEUE_OPTIONS })
    const receipt = checkReceipt(options)
    const own = callerKeys(options, payloads.length, { batch: true })
    meta.service = checkService(service)
    const perTask = payloads.map((p, i) => toFrames(p, `payloads[${i}]`))
    // What each message will weigh, meta included: the shared part (with empty
    // keys and counts, the largest rid and room for both arrays' headers to
    // grow to 5 bytes), then per task its key, its count and its frames.
    const baseBytes = ZBC_HEADER_BYTES + pack({ ...meta, keys: [], counts: [], rid: RID_BOUND }).length + 8
    const taskBytes = perTask.map((f, i) => packedStrBytes(meta.keys[i]) + packedUintBytes(f.length) + frameBytes(f))
    const chunks = [...this.#batches(perTask, taskBytes, baseBytes)]
    for (const [start, end] of chunks) {
      // Only a task alone can be over the cap: refuse the batch before sending any of it.
      if (end - start === 1) this.#checkSize(`ENQUEUE of payloads[${start}] to ${JSON.stringify(service)}`, baseBytes + taskBytes[start])
    }
    const ids = []
    const done = [] // receipts, in payload order
    for (const [start, end] of chunks) {
      const chunk = perTask.slice(start, end)
      const chunkMeta = { ...meta, keys: meta.keys.slice(start, end), counts: chunk.map((f) => f.length) }
      const frames = chunk.flat()
      try {
        const answer = await this.#call({
          what: `ENQUEUE of ${chunk.length} task${chunk.length === 1 ? '' : 's'} to ${JSON.stringify(service)}`,
          options,
          keys: () => meta.keys.slice(start), // for a TimeoutError: this message's tasks and those not sent yet
          start: (ctl) => ctl.send(C.ENQUEUE, chunkMeta, frames),
          answer: replyOrError
        })
        // `existing` indexes are relative to this message's chunk.
        const chunkReceipts = receipts(answer, own.slice(start, end))
        done.push(...chunkReceipts)
        ids.push(...chunkReceipts.map((r) => r.id))
      } catch (err) {
        if (ids.length > 0 && err && typeof err === 'object') {
          err.enqueuedIds = ids
          if (receipt) err.enqueuedReceipts = done
        }
        throw err
      }
    }
    return receipt ? done : ids
  }

  // [start, end) ranges of tasks, each range fitting one ENQUEUE message: its
  // message weighs `baseBytes` plus `taskBytes[i]` per task. A task too large
  // for any message is a range of its own.
  * #batches (perTask, taskBytes, baseBytes) {
    const maxPayloadFrames = Math.max(1, this.#maxFrames - ZBC_OVERHEAD_FRAMES)
    let start = 0
    while (start < perTask.length) {
      let end = start
      let frames = 0
      let bytes = baseBytes
      while (end < perTask.length && end - start < MAX_BATCH) {
        const taskFrames = perTask[end].length
        if (end > start && (frames + taskFrames > maxPayloadFrames || bytes + taskBytes[end] > this.#maxMessageBytes)) break
        frames += taskFrames
        bytes += taskBytes[end]
        end++
      }
      yield [start, end]
      start = end
    }
  }

  /**
   * Enqueue tasks that run one after the other (docs/protocol.md §15): each step
   * waits for the one before it and is handed its result. Resolves with their ids
   * in order; the last one's result is the chain's (`result(ids.at(-1))`).
   *
   * `steps` are `[service, payload]` pairs (or `{service, payload}` objects). The
   * first step's payload is its payload; a later step's (null, undefined or [] for
   * none) is followed by the previous step's result frames, which the broker hands
   * over when that step is done (`input: 'result'`). A step that fails for good
   * ends every step after it `upstream_failed` (TaskUpstreamFailed). `options`
   * (the task options but dependsOn, runAnyway, input and key, which the chain
   * sets; and timeoutMs, signal, per ENQUEUE) apply to every step. Each step is
   * one ENQUEUE: if a later one fails, the steps before stay stored, and the
   * error's `enqueuedIds` lists them.
   */
  async chain (steps, options = {}) {
    const parts = graphSteps(steps, 'steps', 'chain()')
    const base = graphOptions(options, 'chain()')
    const ids = []
    for (const [service, payload] of parts) {
      const step = ids.length === 0 ? base : { ...base, dependsOn: [ids.at(-1)], input: 'result' }
      ids.push(await withEnqueued(ids, () => this.enqueue(service, payload, step)))
    }
    return ids
  }

  /**
   * Enqueue `parts` (they run side by side), then one task that waits for them all
   * and is handed every result (docs/protocol.md §15). Resolves with the parts' ids
   * in order and, last, the joining task's, whose result is the whole's
   * (`result(ids.at(-1))`).
   *
   * `parts` are 1..1000 `[service, payload]` pairs (or `{service, payload}`
   * objects); consecutive parts of one service go in one enqueueMany(). `then` is
   * the joining task's `[service, payload]`: its payload (null for none) is
   * followed by one frame listing each part's result frames, in order
   * (`input: 'results'`; unpackResults() reads it). If a part fails for good, the
   * joining task ends `upstream_failed`. `options` apply to every task, as in
   * chain(). If a later enqueue fails, the tasks stored before stay stored, and
   * the error's `enqueuedIds` lists them.
   */
  async fanIn (parts, then, options = {}) {
    const tasks = graphSteps(parts, 'parts', 'fanIn()')
    if (tasks.length === 0) throw new RangeError('fanIn() needs at least one part')
    if (tasks.length > MAX_DEPENDENCIES) {
      throw new RangeError(`fanIn() takes at most ${MAX_DEPENDENCIES} parts (a task's dependencies), got ${tasks.length}`)
    }
    const [[joinService, joinPayload]] = graphSteps([then], 'then', 'fanIn()')
    const base = graphOptions(options, 'fanIn()')
    const ids = []
    for (let start = 0; start < tasks.length;) {
      const service = tasks[start][0]
      let end = start
      while (end < tasks.length && tasks[end][0] === service) end++
      const payloads = tasks.slice(start, end).map(([, payload]) => payload)
      ids.push(...await withEnqueued(ids, () => this.enqueueMany(service, payloads, base)))
      start = end
    }
    const joined = { ...base, dependsOn: [...ids], input: 'results' }
    ids.push(await withEnqueued(ids, () => this.enqueue(joinService, joinPayload, joined)))
    return ids
  }

  // A message over the broker's size cap is refused here, never sent: the
  // broker would answer too_large, or, past four times its cap, drop the
  // connection, which the client would open again and resend on, forever.
  // `meta` (with `extra` and any rid) and `frames` as one message: packed and
  // measured only when a cheap upper bound on its size is not already within the cap.
  #checkMessage (what, meta, frames, extra = undefined) {
    const payloadBytes = frameBytes(frames)
    if (messageBound(meta, payloadBytes) <= this.#maxMessageBytes) return
    this.#checkSize(what, messageBytes(extra === undefined ? meta : { ...meta, ...extra }, payloadBytes))
  }

  #checkSize (what, bytes) {
    if (bytes > this.#maxMessageBytes) {
      throw brokerError(ERROR_CODES.TOO_LARGE, `${what}: a message of ${bytes} bytes is over the cap of ${this.#maxMessageBytes} (maxMessageBytes); not sent`)
    }
  }

  /**
   * Enqueue one task and wait for its result (ZBC01 REQUEST). Resolves with
   * the result (a Buffer; `{frames: true}` gives every result frame); rejects
   * with TaskDead, TaskCancelled, TaskExpired or TaskUpstreamFailed when the task ends otherwise,
   * and with TimeoutError (its `taskId` set when the task was enqueued) after
   * `timeoutMs`. After a reconnect to the broker it resumes waiting by task id.
   */
  async request (service, payload, options = {}) {
    const meta = taskMeta(options, 1)
    meta.service = checkService(service)
    const frames = toFrames(payload)
    const wantFrames = options.frames === true
    const what = `REQUEST to ${JSON.stringify(service)}`
    this.#checkMessage(what, meta, frames, { wait_s: 0.5 })
    const ask = (ctl) => {
      // Hold the call at the broker for as long as we wait (its default is 300 s).
      if (ctl.remainingMs() !== Infinity) meta.wait_s = waitSeconds(ctl, MAX_WAIT_S)
      ctl.send(C.REQUEST, meta, frames) // the same idempotency key every time: never a second task
    }
    return this.#call({
      what,
      options,
      graceMs: RESULT_GRACE_MS,
      key: meta.key,
      start: ask,
      answer: (ctl, answer, sent) => {
        if (!answer.ok) return ctl.reject(errorOf(answer))
        if (sent.command === C.REQUEST && Object.hasOwn(answer.meta, 'ids')) {
          // An acceptance. Once the task's id is known, another one is a copy's
          // (the REQUEST was sent again after a reconnect, and libzmq delivered the
          // first one too): the task is the same, and its wait is already on.
          if (ctl.taskId !== null) return ctl.superseded()
          ctl.taskId = taskIds(answer, 1)[0]
          // The key matched a stored task, which may have ended already: ask
          // for its result rather than wait for the REQUEST's own answer.
          if (Array.isArray(answer.meta.existing) && answer.meta.existing.length > 0) {
            ctl.send(C.RESULT, { id: ctl.taskId, wait_s: waitSeconds(ctl) })
          }
          return // committed; the final answer follows
        }
        onResultAnswer(ctl, answer, wantFrames, sent)
      },
      resend: (ctl) => {
        if (ctl.taskId === null) ask(ctl)
        else ctl.send(C.RESULT, { id: ctl.taskId, wait_s: waitSeconds(ctl) })
      }
    })
  }

  /**
   * Enqueue one task and follow its stream (STREAM, docs/protocol.md §13): a
   * TaskStream, an async iterable of the chunks its workers send (Buffers), in
   * order, then its result in `stream.result`. Takes request()'s options, and
   * `window`, `attempts`, `cancelOnAbandon` (default true: leaving the loop early
   * cancels the task), `waitS` (the idle limit; default `timeoutMs` in seconds).
   */
  stream (service, payload, options = {}) {
    const follow = followOptions(options, { cancelOnAbandon: true })
    const meta = taskMeta(follow.rest, 1)
    meta.service = checkService(service)
    Object.assign(meta, follow.meta)
    const frames = toFrames(payload)
    const what = `STREAM to ${JSON.stringify(service)}`
    this.#checkMessage(what, meta, frames, { wait_s: 0.5 })
    return this.#stream({ ...follow, what, command: C.STREAM, meta, follow: follow.meta, payload: frames, key: meta.key })
  }

  /**
   * Follow the stream of task `id`, which exists (READ, §13), from `offset`
   * (default 0): a TaskStream like stream()'s. `cancelOnAbandon` defaults to false.
   */
  readStream (id, options = {}) {
    checkTaskId(id)
    const follow = followOptions(options, { cancelOnAbandon: false, read: true })
    for (const name of Object.keys(follow.rest)) {
      throw new TypeError(`unknown option ${JSON.stringify(name)} of readStream(); known: ${[...READ_OPTIONS].join(', ')}`)
    }
    return this.#stream({ ...follow, what: `READ of the stream of task ${id}`, command: C.READ, follow: follow.meta, taskId: id })
  }

  #stream (spec) {
    if (this.#closed) throw new ClosedError('client is closed')
    this.stats.calls++
    const timeoutMs = spec.timeoutMs === undefined ? this.#timeoutMs : checkTimeout(spec.timeoutMs, 'timeoutMs')
    // The idle limit: waitS, else the call's timeoutMs; none (calls chained) when that is Infinity.
    let waitS = spec.waitS
    if (waitS === undefined) waitS = timeoutMs >= MAX_TIMER_MS ? null : Math.min(timeoutMs / 1000, MAX_WAIT_S)
    return new TaskStream((link) => this.#channelFor().attach(link), { ...spec, waitS })
  }

  /**
   * The result of task `id`: waits up to `timeoutMs` for it to end (0: answer
   * with what is there now). Rejects like request(), and with TaskNotFound.
   */
  async result (id, options = {}) {
    checkTaskId(id)
    const wantFrames = options.frames === true
    const ask = (ctl) => ctl.send(C.RESULT, { id, wait_s: waitSeconds(ctl) })
    return this.#call({
      what: `RESULT of task ${id}`,
      options,
      graceMs: RESULT_GRACE_MS,
      taskId: id,
      start: ask,
      resend: ask,
      answer: (ctl, answer, sent) => {
        if (!answer.ok) return ctl.reject(errorOf(answer))
        onResultAnswer(ctl, answer, wantFrames, sent)
      }
    })
  }

  /** Everything the broker knows about task `id` (keys in camelCase, times as Date). */
  async status (id, options = {}) {
    checkTaskId(id)
    const answer = await this.#call({
      what: `STATUS of task ${id}`,
      options,
      taskId: id,
      start: (ctl) => ctl.send(C.STATUS, { id }),
      answer: replyOrError
    })
    const task = answer.meta.task
    if (task === null || typeof task !== 'object') throw new ProtocolError('bad_reply', 'STATUS reply without a task map')
    return withTaskDefaults(camelTask(task))
  }

  /** Cancel task `id`: resolves {id, state: 'cancelled', was}; BrokerError 'conflict' when it had already ended. */
  async cancel (id, options = {}) {
    checkTaskId(id)
    let conflict = null
    const answer = await this.#call({
      what: `CANCEL of task ${id}`,
      options,
      taskId: id,
      start: (ctl) => ctl.send(C.CANCEL, { id }),
      answer: (ctl, answer, sent) => {
        if (sent.command === C.STATUS) {
          // A resent CANCEL was refused: did an earlier one (lost answer) do it?
          const task = answer.ok ? answer.meta.task : null
          if (task && task.state === 'cancelled') return ctl.resolve({ meta: { id, state: 'cancelled', was: null } })
          return ctl.reject(conflict)
        }
        // A CANCEL's answer (an earlier copy's success may still come after the STATUS went out).
        if (!answer.ok && answer.meta.code === ERROR_CODES.CONFLICT && ctl.resent) {
          conflict = errorOf(answer)
          return ctl.send(C.STATUS, { id })
        }
        replyOrError(ctl, answer)
      }
    })
    const { state = 'cancelled', was = null } = answer.meta
    return { id, state, was }
  }

  /**
   * One page of the dead letters of `service`: {tasks, next}. Pass
   * `{after: page.next}` for the following page; `next` is null on the last.
   */
  async deadLetters (service, options = {}) {
    const meta = { service: checkService(service) }
    if (options.limit !== undefined) meta.limit = checkInt(options.limit, 'limit', 1, MAX_LIST)
    if (options.after !== undefined && options.after !== null) meta.after = checkInt(options.after, 'after', Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER)
    const answer = await this.#call({
      what: `DEAD of ${JSON.stringify(service)}`,
      options,
      start: (ctl) => ctl.send(C.DEAD, meta),
      answer: replyOrError
    })
    const tasks = answer.meta.tasks
    if (!Array.isArray(tasks)) throw new ProtocolError('bad_reply', 'DEAD reply without a tasks list')
    return { tasks: tasks.map(camelTask), next: isInt(answer.meta.next) ? answer.meta.next : null }
  }

  /** Every dead letter of `service`, page after page. */
  async * iterDeadLetters (service, options = {}) {
    let after = options.after ?? null
    for (;;) {
      const page = await this.deadLetters(service, { ...options, after })
      yield * page.tasks
      if (page.next === null || page.tasks.length === 0) return
      after = page.next
    }
  }

  /**
   * One page of the broker's services and their queue figures, in name order:
   * {queues: [{service, ready, delayed, inflight, dead, ...}], next}. Pass
   * `{after: page.next}` for the following page; `next` is null on the last.
   */
  async queuesPage (options = {}) {
    const meta = { limit: checkInt(options.limit ?? MAX_QUEUES_PAGE, 'limit', 1, MAX_QUEUES_PAGE) }
    if (options.after !== undefined && options.after !== null) {
      if (typeof options.after !== 'string') throw new TypeError('after must be a service name')
      meta.after = options.after
    }
    const answer = await this.#call({
      what: 'QUEUES',
      options,
      start: (ctl) => ctl.send(C.QUEUES, meta),
      answer: replyOrError
    })
    const queues = answer.meta.queues
    if (!Array.isArray(queues)) throw new ProtocolError('bad_reply', 'QUEUES reply without a queues list')
    const next = answer.meta.next
    return { queues, next: typeof next === 'string' ? next : null }
  }

  /** Every service's queue figures (QUEUES), page after page; each page is exact when read. */
  async queues (options = {}) {
    const rows = []
    let after = null
    for (;;) {
      const page = await this.queuesPage({ ...options, after })
      rows.push(...page.queues)
      if (page.next === null || page.queues.length === 0) return rows
      after = page.next
    }
  }

  /** Put dead letters of `service` back in its queue (all of them, or those in `ids`); resolves with the ids moved. */
  async redrive (service, ids, options = {}) {
    if (ids !== undefined && ids !== null && !Array.isArray(ids) && typeof ids === 'object') {
      options = ids // redrive(service, options)
      ids = undefined
    }
    const meta = { service: checkService(service) }
    if (ids !== undefined && ids !== null) {
      if (!Array.isArray(ids) || !ids.every((i) => typeof i === 'string')) throw new TypeError('ids must be an array of task id strings')
      if (ids.length > MAX_BATCH) throw new RangeError(`at most ${MAX_BATCH} ids per call`)
      meta.ids = ids
    }
    const answer = await this.#call({
      what: `REDRIVE of ${JSON.stringify(service)}`,
      options,
      start: (ctl) => ctl.send(C.REDRIVE, meta),
      answer: replyOrError
    })
    const moved = answer.meta.ids
    if (!Array.isArray(moved)) throw new ProtocolError('bad_reply', 'REDRIVE reply without an ids list')
    return moved
  }

  // ------------------------------------------------------------ recurring tasks (§17)

  /**
   * Have the broker enqueue `payload` to `service` every `everyS` seconds (a
   * whole number >= 1), or at the instants of `cron` (five fields, in UTC or in
   * the IANA time zone `tz`), until unschedule(name). Resolves with the schedule
   * (see schedules()). Kept in the broker's journal; each firing is an ordinary
   * task keyed `schedule:<name>:<instant>`, so a broker restart neither skips nor
   * repeats one. A schedule of the same name is replaced (the same definition
   * again changes nothing). Options of each firing's task: priority, ttlS,
   * maxAttempts, timeoutS, headers. A bad cron or zone: BrokerError bad_request.
   */
  async schedule (name, service, payload, options = {}) {
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object')
    for (const key of Object.keys(options)) {
      if (!SCHEDULE_OPTIONS.has(key)) throw new TypeError(`unknown option ${JSON.stringify(key)}; known: ${[...SCHEDULE_OPTIONS].join(', ')}`)
    }
    const { everyS, cron, tz, ...taskOptions } = options
    delete taskOptions.timeoutMs
    delete taskOptions.signal
    const meta = taskMeta({ ...taskOptions, key: 'x' }, 1)
    delete meta.key // each firing's key is the broker's: schedule:<name>:<instant>
    meta.name = checkScheduleName(name)
    meta.service = checkService(service)
    if ((everyS === undefined) === (cron === undefined)) throw new TypeError('give exactly one of everyS and cron')
    if (everyS !== undefined) {
      if (tz !== undefined) throw new TypeError('tz goes with cron only: an interval is the same in any zone')
      meta.every_s = checkInt(everyS, 'everyS', MIN_SCHEDULE_INTERVAL_S, MAX_SCHEDULE_INTERVAL_S)
    } else {
      if (typeof cron !== 'string' || cron.trim().length === 0) throw new TypeError('cron must be a cron expression (a string)')
      meta.cron = cron
      if (tz !== undefined) {
        if (typeof tz !== 'string' || tz.length === 0) throw new TypeError('tz must be an IANA time zone name')
        meta.tz = tz
      }
    }
    const frames = toFrames(payload)
    if (frameBytes(frames) > MAX_SCHEDULE_PAYLOAD_BYTES) throw new RangeError(`a schedule's payload is at most ${MAX_SCHEDULE_PAYLOAD_BYTES} bytes`)
    const answer = await this.#call({
      what: `SCHEDULE ${JSON.stringify(name)}`,
      options,
      start: (ctl) => ctl.send(C.SCHEDULE, meta, frames),
      answer: replyOrError
    })
    return camelSchedule(answer.meta.schedule)
  }

  /**
   * Every schedule the broker keeps, by name: [{name, service, everyS, cron, tz,
   * priority, ttlS, maxAttempts, timeoutS, headers, payloadBytes, createdAt,
   * nextAt, lastAt, lastId, fired, error}] (times as Dates; lastAt, the instant
   * of its last firing, null before the first; error: why its last firing was
   * refused, if it was).
   */
  async schedules (options = {}) {
    const answer = await this.#call({
      what: 'SCHEDULES',
      options,
      start: (ctl) => ctl.send(C.SCHEDULES, {}),
      answer: replyOrError
    })
    const views = answer.meta.schedules
    if (!Array.isArray(views)) throw new ProtocolError('bad_reply', 'SCHEDULES reply without a schedules list')
    return views.map(camelSchedule)
  }

  /**
   * Remove schedule `name`: resolves true, or false when there was none (so a
   * resend is harmless). Firings already enqueued stay.
   */
  async unschedule (name, options = {}) {
    checkScheduleName(name)
    try {
      await this.#call({
        what: `UNSCHEDULE ${JSON.stringify(name)}`,
        options,
        start: (ctl) => ctl.send(C.UNSCHEDULE, { name }),
        answer: replyOrError
      })
    } catch (err) {
      if (err?.code === ERROR_CODES.NOT_FOUND) return false
      throw err
    }
    return true
  }

  /**
   * At most `n` (1..1000000) tasks and requests of `service` at its workers
   * together, whatever their credit (LIMIT, an admin call); `null` removes the
   * limit. With `{perKey: true}`, at most `n` tasks of each of its concurrency
   * keys instead (docs/protocol.md §16.2), beside the service's own limit. Kept in
   * the broker's journal: it holds across a restart. Lowering it takes nothing
   * back from workers. Resolves with the broker's answer `{service, limit, perKey}`.
   */
  async limit (service, n, options = {}) {
    checkAdminOptions(options, LIMIT_OPTIONS, 'limit()')
    if (n === undefined) throw new TypeError(`limit() needs the limit: an integer 1..${MAX_SERVICE_LIMIT}, or null for none`)
    const meta = { service: checkService(service), limit: n === null ? null : checkInt(n, 'limit', 1, MAX_SERVICE_LIMIT) }
    if (checkPerKey(options)) meta.per_key = true
    const answer = await this.#call({
      what: `LIMIT of ${JSON.stringify(service)}`,
      options,
      start: (ctl) => ctl.send(C.LIMIT, meta),
      answer: replyOrError
    })
    const { limit = null, per_key: perKey = false } = answer.meta
    return { service: answerService(answer, 'LIMIT'), limit, perKey }
  }

  /**
   * Hand out at most `perS` tasks (and MDP requests) of `service` per second
   * (RATE, an admin call; docs/protocol.md §16.3): a token bucket holding `burst`
   * tokens (default: `perS` rounded up, at least 1) that refills at `perS` per
   * second. `perS` is in (0, 1000000]; `null` removes the rate. With
   * `{perKey: true}` the bucket is per concurrency key instead, beside the
   * service's own. Kept in the broker's journal (a restart keeps it, with a full
   * bucket). Resolves with the broker's answer `{service, rate, burst, perKey}`.
   */
  async rate (service, perS, options = {}) {
    checkAdminOptions(options, RATE_OPTIONS, 'rate()')
    const meta = { service: checkService(service), rate: perS === null ? null : checkRate(perS) }
    if (options.burst !== undefined && options.burst !== null) meta.burst = checkInt(options.burst, 'burst', 1, MAX_BURST)
    if (checkPerKey(options)) meta.per_key = true
    const answer = await this.#call({
      what: `RATE of ${JSON.stringify(service)}`,
      options,
      start: (ctl) => ctl.send(C.RATE, meta),
      answer: replyOrError
    })
    const { rate = null, burst = null, per_key: perKey = false } = answer.meta
    return { service: answerService(answer, 'RATE'), rate, burst, perKey }
  }

  #call (spec) {
    if (this.#closed) return Promise.reject(new ClosedError('client is closed'))
    const channel = this.#channelFor()
    this.stats.calls++
    const timeoutMs = spec.options.timeoutMs === undefined
      ? this.#timeoutMs
      : checkTimeout(spec.options.timeoutMs, 'timeoutMs')
    return channel.call(spec, timeoutMs, spec.options.signal)
  }

  #channelFor () {
    if (this.#channel === null) {
      // A channel whose handshake was refused has failed its calls and closed: the
      // next call opens a new one (and hears the broker's verdict again at once).
      const channel = new Channel(this.#endpoint, this.#hwm, this.#maxPending, this.stats, this.#credentials, () => {
        if (this.#channel === channel) this.#channel = null
      })
      this.#channel = channel
    }
    return this.#channel
  }

  // ------------------------------------------------------------ 7/MDP

  /**
   * A plain 7/MDP request; resolves with the one-frame reply as a Buffer.
   * `timeoutMs` is per attempt; after `retries` resends on fresh sockets it
   * rejects with TimeoutError. MDP requests are not durable.
   */
  async mdpRequest (service, body, options = {}) {
    const frames = await this.mdpRequestFrames(service, body, options)
    if (frames.length !== 1) throw new ProtocolError('reply_frames', `expected a one-frame reply, got ${frames.length} frames: use mdpRequestFrames`)
    return frames[0]
  }

  /** Like mdpRequest, with a body of several frames allowed and every reply frame returned. */
  async mdpRequestFrames (service, body, options = {}) {
    if (this.#closed) throw new ClosedError('client is closed')
    checkService(service, { mmi: true })
    const timeoutMs = options.timeoutMs === undefined
      ? this.#mdpTimeoutMs
      : checkTimeout(options.timeoutMs, 'timeoutMs', { positive: true })
    const retries = options.retries === undefined ? this.#retries : checkInt(options.retries, 'retries', 0, 1000)
    const message = mdpRequest(service, toFrames(body, 'body'))
    options.signal?.throwIfAborted()
    this.stats.mdpRequests++
    for (let attempt = 1; ; attempt++) {
      const reply = await this.#mdpAttempt(service, message, Math.min(timeoutMs, MAX_TIMER_MS), options.signal)
      if (reply !== null) return reply
      if (attempt > retries) {
        this.stats.mdpTimeouts++
        throw new TimeoutError(`${noBrokerPrefix(this.#endpoint)}no reply from service ${JSON.stringify(service)} within ${timeoutMs}ms per attempt after ${attempt} attempt${attempt === 1 ? '' : 's'}`)
      }
      this.stats.mdpResends++
    }
  }

  /** 8/MMI: true when a worker for `service` is registered with the broker now. */
  async mmiService (service, options = {}) {
    const [code] = await this.mdpRequestFrames(MMI_SERVICE, [checkService(service)], options)
    const text = code?.toString('latin1')
    if (text === '200') return true
    if (text === '404') return false
    throw new ProtocolError('mmi_status', `unexpected mmi.service status ${JSON.stringify(text)}`)
  }

  // One Lazy Pirate attempt on its own socket: the body frames, or null at the
  // deadline. A refused handshake rejects it with AuthenticationFailed at once.
  #mdpAttempt (service, message, timeoutMs, signal) {
    const hooks = {}
    const several = this.#endpoint.includes(',')
    const { sock } = connectSocket(zmq.Dealer, this.#endpoint, { hwm: this.#hwm, credentials: this.#credentials, watch: hooks })
    return new Promise((resolve, reject) => {
      let settled = false
      const finish = (settle, value) => {
        if (settled) return
        settled = true
        clearTimeout(timer)
        signal?.removeEventListener('abort', onAbort)
        this.#mdpAttempts.delete(onClose)
        sock.close() // a late reply to this attempt can never be read now
        settle(value)
      }
      const timer = setTimeout(() => finish(resolve, null), timeoutMs)
      const onAbort = () => finish(reject, signal.reason)
      const onClose = () => finish(reject, new ClosedError('client closed during the request'))
      hooks.onFailure = (err) => finish(reject, err)
      signal?.addEventListener('abort', onAbort, { once: true })
      this.#mdpAttempts.add(onClose)
      const exchange = async () => {
        // Several endpoints: no connection may take it yet (immediate); try again
        // until this attempt's timer ends it.
        for (;;) {
          try {
            await sock.send(message)
            break
          } catch (err) {
            if (settled || !several || !isSendQueueFull(err)) throw err
            await new Promise((resolve) => setTimeout(resolve, SEND_RETRY_MS))
            if (settled) return
          }
        }
        for await (const frames of sock) {
          let reply
          try {
            reply = decodeMdpReply(frames)
          } catch {
            this.stats.malformed++
            continue
          }
          if (reply.service !== service) {
            this.stats.malformed++
            continue
          }
          return finish(resolve, reply.body)
        }
      }
      exchange().catch((err) => {
        const fail = () => finish(reject, socketError(err, `MDP request to ${JSON.stringify(service)}`))
        if (settled) return
        if (isSendQueueFull(err)) setTimeout(fail, REFUSAL_GRACE_MS) // a refusal reported meanwhile wins
        else fail()
      })
    })
  }

  // ------------------------------------------------------------ lifetime

  /** Close every socket; calls still waiting reject with ClosedError. Safe to call twice. */
  close () {
    if (this.#closed) return
    this.#closed = true
    for (const closeAttempt of [...this.#mdpAttempts]) closeAttempt()
    this.#channel?.close()
    this.#channel = null
  }

  [Symbol.dispose] () { this.close() }
}

// ------------------------------------------------------------ the ZBC01 channel

// One DEALER socket, many calls in flight. Every message a call sends has a rid
// of its own, so each answer tells which message of which call it answers. When
// the connection drops and comes back (a broker restart, say), every call still
// waiting sends again: idempotency keys make that safe for enqueues, and waits
// resume by task id.
//
// A message sent again may reach the broker twice: libzmq keeps what was queued
// while the connection was down (or not yet written when it dropped) and
// delivers it on the next connection, besides the copy sent after the
// reconnect. Each copy is answered. So a call settles on the first answer that
// says something final; an ERROR for a message that a newer one of the same
// call has superseded is ignored (the newer one is answered too), and so is a
// second acceptance of a REQUEST whose task id is known.
//
// When the broker refuses the socket's handshake (lib/keys.js), every call
// waiting rejects with AuthenticationFailed at once and the channel closes
// (`onFailed` tells the client, whose next call opens a new one).
class Channel {
  #sock
  #pending = new Map() // rid -> Call: every message sent and not yet fully answered
  #calls = new Set() // the calls in flight
  #nextRid = 1
  #maxPending
  #stats
  #onFailed
  #lost = false
  #handshaken = false // a handshake has succeeded on this channel
  #failure = null
  #closed = false
  #several
  #watch = null // the socket's HandshakeWatch (lib/keys.js)

  constructor (endpoint, hwm, maxPending, stats, credentials, onFailed) {
    this.endpoint = endpoint
    this.#several = endpoint.includes(',')
    this.#maxPending = maxPending
    this.#stats = stats
    this.#onFailed = onFailed
    const { sock, watch } = connectSocket(zmq.Dealer, endpoint, {
      hwm,
      credentials,
      watch: {
        onDisconnect: (wasUp) => this.#disconnected(wasUp),
        onHandshake: () => this.#reconnected(),
        onFailure: (err) => this.#failed(err)
      }
    })
    this.#sock = sock
    this.#watch = watch
    this.#read().catch(() => {}) // #read handles its own errors
  }

  #disconnected (wasUp) {
    // Several brokers: another one's connection may be up already (a standby took
    // over before this one was found lost, as with a frozen broker): what was sent
    // on the lost connection goes again now, to it. Else at the next handshake.
    if (wasUp && this.#several && this.#watch !== null && this.#watch.up > 0) this.#resendAll()
    else this.#lost = true
  }

  #reconnected () {
    this.#handshaken = true
    if (!this.#lost) return
    this.#resendAll()
  }

  #resendAll () {
    this.#lost = false
    for (const call of [...this.#calls]) {
      this.#stats.resends++
      call.reconnected()
    }
  }

  #failed (err) {
    if (this.#closed) return
    this.#failure = err
    this.#onFailed()
    this.#closed = true
    this.#sock.close()
    this.#failAll(err)
  }

  get stats () { return this.#stats }

  call (spec, timeoutMs, signal) {
    if (this.#calls.size >= this.#maxPending) {
      return Promise.reject(new ZbrokerError(`too many calls in flight (maxPending ${this.#maxPending})`))
    }
    if (signal?.aborted) return Promise.reject(signal.reason)
    const call = new Call(this, spec, timeoutMs, signal)
    this.#calls.add(call)
    return call.run()
  }

  /**
   * Take in a call that drives itself (a TaskStream's handle: answered,
   * reconnected, reject, later, sent); returns the channel.
   */
  attach (link) {
    if (this.#closed) throw this.#failure ?? new ClosedError('client is closed')
    if (this.#calls.size >= this.#maxPending) throw new ZbrokerError(`too many calls in flight (maxPending ${this.#maxPending})`)
    this.#calls.add(link)
    return this
  }

  /** A new rid for a message of `call`. */
  rid (call) {
    const rid = this.#nextRid++
    this.#pending.set(rid, call)
    return rid
  }

  /** The message with this rid will not be answered again. */
  answeredFully (rid) { this.#pending.delete(rid) }

  send (call, frames) {
    this.#sock.send(frames).catch((err) => {
      if (isSendQueueFull(err) && this.#several && !this.#closed) {
        // No broker's handshake has completed yet (immediate): try again, within
        // the call's own deadline, until one has.
        call.later(() => { if (!call.done && !this.#closed) this.send(call, frames) }, SEND_RETRY_MS)
      } else if (isSendQueueFull(err)) {
        const full = () => call.reject(this.#failure ?? new ZbrokerError(`${call.what}: send queue to the broker is full (is the broker reachable?)`))
        if (this.#handshaken) full()
        else call.later(full, REFUSAL_GRACE_MS) // a refused handshake, reported meanwhile, wins
      } else {
        call.reject(this.#failure ?? socketError(err, call.what))
      }
    })
  }

  forget (call) {
    this.#calls.delete(call)
    for (const rid of call.sent.keys()) this.#pending.delete(rid)
  }

  async #read () {
    try {
      for await (const frames of this.#sock) {
        let answer
        try {
          answer = decodeZbcAnswer(frames)
        } catch {
          this.#stats.malformed++
          continue
        }
        const call = this.#pending.get(answer.rid)
        if (call === undefined) this.#stats.lateAnswers++
        else call.answered(answer)
      }
    } catch (err) {
      if (!this.#closed) this.#failAll(socketError(err, 'reading answers'))
    }
  }

  #failAll (err) {
    for (const call of [...this.#calls]) call.reject(err)
  }

  close () {
    if (this.#closed) return
    this.#closed = true
    this.#sock.close()
    this.#failAll(new ClosedError('client closed while the call was waiting'))
  }
}

// One call in flight: the messages it sent, timers, abort listener and what to do with answers.
class Call {
  constructor (channel, spec, timeoutMs, signal) {
    this.channel = channel
    this.spec = spec
    this.what = spec.what
    this.signal = signal
    this.timeoutMs = timeoutMs
    this.deadline = timeoutMs >= MAX_TIMER_MS ? Infinity : Date.now() + timeoutMs
    this.taskId = spec.taskId ?? null
    this.state = null // last non-final state seen, for TimeoutError
    this.resent = false
    this.sent = new Map() // rid -> command, of the messages that may still be answered
    this.latest = null // rid of the newest message
    this.last = null // {command, meta, payload} of the newest message
    this.timers = new Set()
    this.done = false
  }

  run () {
    return new Promise((resolve, reject) => {
      this._resolve = resolve
      this._reject = reject
      if (this.deadline !== Infinity) {
        this.later(() => this.timedOut(), Math.min(this.timeoutMs + (this.spec.graceMs ?? 0), MAX_TIMER_MS))
      }
      if (this.signal) {
        this.onAbort = () => this.reject(this.signal.reason)
        this.signal.addEventListener('abort', this.onAbort, { once: true })
      }
      try {
        this.spec.start(this)
      } catch (err) {
        this.reject(err)
      }
    })
  }

  send (command, meta, payload = []) {
    if (this.done) return
    this.last = { command, meta, payload }
    this.#transmit()
  }

  /** Send the newest message again, under a new rid. */
  resendLast () {
    if (this.done || this.last === null) return
    this.#transmit()
  }

  #transmit () {
    const { command, meta, payload } = this.last
    const rid = this.channel.rid(this)
    this.sent.set(rid, command)
    this.latest = rid
    this.channel.send(this, zbcCall(command, { ...meta, rid }, payload))
  }

  remainingMs () { return this.deadline - Date.now() }

  later (fn, ms) {
    const timer = setTimeout(() => {
      this.timers.delete(timer)
      fn()
    }, ms)
    this.timers.add(timer)
  }

  answered (answer) {
    if (this.done) return
    if (answer.chunks) { // only a stream call is sent chunks
      this.channel.stats.malformed++
      return
    }
    const command = this.sent.get(answer.rid)
    const latest = answer.rid === this.latest
    // Every message is answered once, but a REQUEST twice: its acceptance, then its end.
    if (!(command === C.REQUEST && answer.ok && Object.hasOwn(answer.meta, 'ids'))) {
      this.sent.delete(answer.rid)
      this.channel.answeredFully(answer.rid)
    }
    // An older message refused while a newer one of the call is out (a copy sent
    // after a reconnect, or the next step): that one answers for the call.
    if (!answer.ok && !latest) return this.superseded()
    try {
      this.spec.answer(this, answer, { command, latest })
    } catch (err) {
      this.reject(err)
    }
  }

  /** An answer that settles nothing: a newer message of this call answers for it. */
  superseded () { this.channel.stats.lateAnswers++ }

  reconnected () {
    if (this.done) return
    this.resent = true
    if (this.spec.resend) this.spec.resend(this)
    else this.resendLast()
  }

  timedOut () {
    const state = this.state ? ` (state: ${this.state})` : ''
    const task = this.taskId ? ` for task ${this.taskId}` : ''
    const key = this.spec.key ?? null
    const keys = this.spec.keys ? this.spec.keys() : null
    let hint = ''
    if (this.taskId === null && key !== null) {
      hint = `; the task may or may not be stored: send it again with key ${JSON.stringify(key)} to find out without a duplicate`
    } else if (keys !== null) {
      hint = '; its tasks may or may not be stored: enqueue them again with the same keys (the error\'s keys) to find out without duplicates'
    }
    this.reject(new TimeoutError(`${noBrokerPrefix(this.channel.endpoint)}${this.what}: no answer${task} within ${this.timeoutMs}ms${state}${hint}`, { taskId: this.taskId, state: this.state, key, keys }))
  }

  #finish () {
    this.done = true
    for (const timer of this.timers) clearTimeout(timer)
    this.timers.clear()
    if (this.onAbort) this.signal.removeEventListener('abort', this.onAbort)
    this.channel.forget(this)
  }

  resolve (value) {
    if (this.done) return
    this.#finish()
    this._resolve(value)
  }

  reject (err) {
    if (this.done) return
    this.#finish()
    this._reject(err)
  }
}

// ------------------------------------------------------------ answer handling

function errorOf (answer) {
  return brokerError(answer.meta.code, answer.meta.message)
}

function replyOrError (ctl, answer) {
  if (answer.ok) ctl.resolve(answer)
  else ctl.reject(errorOf(answer))
}

function taskIds (answer, n) {
  const ids = answer.meta.ids
  if (!Array.isArray(ids) || ids.length !== n || !ids.every((i) => typeof i === 'string')) {
    throw new ProtocolError('bad_reply', `expected ${n} task id${n === 1 ? '' : 's'} in the reply`)
  }
  return ids
}

// The `existing` (or `replaced`) indexes of an ENQUEUE answer for `n` tasks
// (empty when absent): an array of distinct integers in [0, n), or the answer is malformed.
function existingIndexes (answer, n, name = 'existing') {
  const existing = answer.meta[name]
  if (existing === undefined || existing === null) return new Set()
  const set = Array.isArray(existing) ? new Set(existing) : null
  if (set === null || set.size !== existing.length || !existing.every((i) => isInt(i) && i >= 0 && i < n)) {
    throw new ProtocolError('bad_reply', `'${name}' in the reply must list distinct task indexes 0..${n - 1}`)
  }
  return set
}

// {id, existing} per task of an ENQUEUE answer; `own[i]` tells whether task
// i's key is the caller's. A generated key is random: if the broker matched
// it, the match is this call's own earlier send (a resend after a lost
// answer), so it is not reported as existing. `replaced: true` is added to the
// receipt it concerns alone (every other receipt keeps its shape): a `debounceS`
// enqueue (always with the caller's key) replaced the payload of the waiting task.
function receipts (answer, own) {
  const ids = taskIds(answer, own.length)
  const existing = existingIndexes(answer, own.length)
  const replaced = existingIndexes(answer, own.length, 'replaced')
  return ids.map((id, i) => replaced.has(i)
    ? { id, existing: existing.has(i) && own[i], replaced: true }
    : { id, existing: existing.has(i) && own[i] })
}

// The bytes of the ZBC01 message carrying `meta` (with any rid) and frames of
// `payloadBytes` in all, as the broker counts them.
function messageBytes (meta, payloadBytes) {
  return ZBC_HEADER_BYTES + pack({ ...meta, rid: RID_BOUND }).length + payloadBytes
}

// Room, in a bound on a message's size, for every meta field of an enqueue or
// request but its strings and headers: a few numbers, map keys, a rid, wait_s.
const META_SLACK_BYTES = 64 * 1024

// An upper bound, without packing, on messageBytes(meta, payloadBytes) for a
// task meta with no headers nor dependencies (Infinity with them: those are measured): its
// strings (keys, tags, affinity, concurrency key) at most 3 bytes of UTF-8 per
// UTF-16 unit plus a 5-byte str header.
function messageBound (meta, payloadBytes) {
  if (meta.headers !== undefined || meta.depends_on !== undefined) return Infinity
  let strings = 0
  for (const text of [meta.service, meta.key, ...(meta.keys ?? []), ...(meta.require ?? []), ...(meta.prefer ?? []), meta.affinity, meta.concurrency_key]) {
    if (text !== undefined) strings += 3 * text.length + 5
  }
  return ZBC_HEADER_BYTES + META_SLACK_BYTES + strings + payloadBytes
}

function frameBytes (frames) {
  let n = 0
  for (const frame of frames) n += frame.length
  return n
}

// The packed size of a msgpack str / of an unsigned int.
function packedStrBytes (text) {
  const n = Buffer.byteLength(text, 'utf8')
  return n + (n < 32 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : 5)
}

function packedUintBytes (n) {
  return n < 128 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : n < 2 ** 32 ? 5 : 9
}

function waitSeconds (ctl, chunkS = WAIT_CHUNK_S) {
  const remaining = ctl.remainingMs()
  if (remaining === Infinity) return chunkS
  return Math.max(0, Math.min(remaining / 1000, chunkS, MAX_WAIT_S))
}

// A RESULT-shaped answer {id, state, error?} + result frames: settle the call,
// or ask again while time remains. `sent` tells which message it answers.
function onResultAnswer (ctl, answer, wantFrames, sent) {
  const { state, error } = answer.meta
  const id = typeof answer.meta.id === 'string' ? answer.meta.id : ctl.taskId
  if (state === 'done') {
    if (wantFrames) return ctl.resolve(answer.frames)
    if (answer.frames.length > 1) {
      return ctl.reject(new ProtocolError('reply_frames', `task ${id} has a result of ${answer.frames.length} frames: pass {frames: true}`))
    }
    return ctl.resolve(answer.frames[0] ?? Buffer.alloc(0))
  }
  if (FINAL_STATES.has(state)) return ctl.reject(taskError(id, state, error))
  if (typeof state !== 'string') return ctl.reject(new ProtocolError('bad_reply', 'result answer without a state'))
  ctl.state = state
  if (ctl.taskId === null) ctl.taskId = id
  if (ctl.remainingMs() <= 0) return ctl.timedOut()
  // Ask again only when this answers the newest wait of the call; an older one's
  // end (a copy, or the REQUEST's own wait after a RESULT went out) changes nothing.
  if (!sent.latest) return ctl.superseded()
  ctl.later(() => ctl.send(C.RESULT, { id: ctl.taskId, wait_s: waitSeconds(ctl) }), REPOLL_MS)
}

function camelTask (task) {
  if (task === null || typeof task !== 'object' || Array.isArray(task)) return task
  const out = {}
  for (const [key, value] of Object.entries(task)) {
    const camel = key.replace(/_([a-z])/g, (_, c) => c.toUpperCase())
    if (TIME_FIELDS.has(key) && typeof value === 'number') {
      // not_before 0 is the broker's "no earliest start"
      out[camel] = key === 'not_before' && value === 0 ? null : new Date(value * 1000)
    } else if (camel === '__proto__') {
      Object.defineProperty(out, camel, { value, writable: true, enumerable: true, configurable: true })
    } else {
      out[camel] = value
    }
  }
  return out
}

// A schedule map of a SCHEDULE or SCHEDULES answer, camelCased, times as Dates.
function camelSchedule (view) {
  if (view === null || typeof view !== 'object' || Array.isArray(view) || typeof view.name !== 'string') {
    throw new ProtocolError('bad_reply', 'a schedule in the reply is not a map with a name')
  }
  const date = (seconds) => (typeof seconds === 'number' ? new Date(seconds * 1000) : null)
  return {
    name: view.name,
    service: view.service,
    everyS: view.every_s ?? null,
    cron: view.cron ?? null,
    tz: view.tz ?? null,
    priority: view.priority ?? 0,
    ttlS: view.ttl_s ?? null,
    maxAttempts: view.max_attempts ?? null,
    timeoutS: view.timeout_s ?? null,
    headers: view.headers ?? {},
    payloadBytes: view.payload_bytes ?? 0,
    createdAt: date(view.created_at),
    nextAt: date(view.next_at),
    lastAt: date(view.last_at),
    lastId: view.last_id ?? null,
    fired: view.fired ?? 0,
    error: view.error ?? null
  }
}

function checkScheduleName (name) {
  if (typeof name !== 'string' || name.length === 0 || Buffer.byteLength(name, 'utf8') > MAX_SCHEDULE_NAME_BYTES) {
    throw new TypeError(`a schedule name must be a string of 1..${MAX_SCHEDULE_NAME_BYTES} bytes, got ${describe(name)}`)
  }
  return name
}

// The fields of the task map (§15, §16) that a broker older than them leaves out,
// as a task without dependencies or placement rules has them.
const TASK_DEFAULTS = Object.freeze({ dependsOn: [], blockedOn: 0, runAnyway: false, input: null, require: [], prefer: [], affinity: null, concurrencyKey: null })

function withTaskDefaults (status) {
  for (const [name, value] of Object.entries(TASK_DEFAULTS)) {
    if (status[name] === undefined) status[name] = Array.isArray(value) ? [] : value
  }
  return status
}

// The `service` of a LIMIT or RATE answer.
function answerService (answer, what) {
  const { service } = answer.meta
  if (typeof service !== 'string') throw new ProtocolError('bad_reply', `${what} reply without a service`)
  return service
}

// ------------------------------------------------------------ validation

function checkService (service, { mmi = false } = {}) {
  if (typeof service !== 'string' || service.length === 0) {
    throw new TypeError(`service must be a non-empty string, got ${describe(service)}`)
  }
  if (!mmi && service.startsWith('mmi.')) throw new RangeError('services starting with "mmi." are answered by the broker itself')
  return service
}

function checkTaskId (id) {
  if (typeof id !== 'string' || id.length === 0) throw new TypeError(`task id must be a non-empty string, got ${describe(id)}`)
}

function checkInt (value, name, lo, hi) {
  if (!isInt(value) || value < lo || value > hi) throw new RangeError(`${name} must be an integer ${lo}..${hi}, got ${String(value)}`)
  return value
}

function checkNumber (value, name, { positive = false } = {}) {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0 || (positive && value === 0)) {
    throw new RangeError(`${name} must be a ${positive ? 'positive' : 'non-negative'} finite number, got ${String(value)}`)
  }
  return value
}

function checkTimeout (value, name, { positive = false } = {}) {
  if (value === Infinity) return MAX_TIMER_MS
  checkNumber(value, name, { positive })
  return Math.min(value, MAX_TIMER_MS)
}

// Task options (camelCase) -> ZBC01 meta (snake_case), validated as the broker would.
const TASK_OPTIONS = new Set(['priority', 'delayS', 'notBefore', 'ttlS', 'maxAttempts', 'timeoutS', 'key', 'keys', 'headers', 'dependsOn', 'runAnyway', 'input', 'require', 'prefer', 'affinity', 'concurrencyKey', 'timeoutMs', 'signal', 'frames'])
// Options of enqueue() and enqueueMany() only; debounceS of enqueue() alone (one task, with a key).
const ENQUEUE_OPTIONS = new Set(['receipt'])
const ENQUEUE_ONE_OPTIONS = new Set([...ENQUEUE_OPTIONS, 'debounceS'])
const NO_OPTIONS = new Set()
const SCHEDULE_OPTIONS = new Set(['everyS', 'cron', 'tz', 'priority', 'ttlS', 'maxAttempts', 'timeoutS', 'headers', 'timeoutMs', 'signal'])

// Options of the admin calls limit() and rate().
const LIMIT_OPTIONS = new Set(['perKey', 'timeoutMs', 'signal'])
const RATE_OPTIONS = new Set(['burst', ...LIMIT_OPTIONS])

function checkAdminOptions (options, known, method) {
  if (options === null || typeof options !== 'object') throw new TypeError('options must be an object')
  for (const name of Object.keys(options)) {
    if (!known.has(name)) throw new TypeError(`unknown option ${JSON.stringify(name)} of ${method}; known: ${[...known].join(', ')}`)
  }
}

function checkPerKey (options) {
  if (options.perKey !== undefined && typeof options.perKey !== 'boolean') {
    throw new TypeError(`perKey must be a boolean, got ${describe(options.perKey)}`)
  }
  return options.perKey === true
}

// A RATE's tasks per second: a number in (0, MAX_RATE_PER_S].
function checkRate (perS) {
  if (typeof perS !== 'number' || !(perS > 0 && perS <= MAX_RATE_PER_S)) {
    throw new RangeError(`rate must be a number of tasks per second in (0, ${MAX_RATE_PER_S}], or null for none, got ${typeof perS === 'number' ? perS : describe(perS)}`)
  }
  return perS
}

// The options of a task stream, checked: {meta (window, attempts, cancel_on_abandon),
// offset (READ), waitS, timeoutMs, signal, frames, rest}; `rest` holds the
// other options (stream(): the task options, checked by taskMeta).
const FOLLOW_OPTIONS = new Set(['window', 'attempts', 'cancelOnAbandon', 'waitS'])
const READ_OPTIONS = new Set([...FOLLOW_OPTIONS, 'offset', 'timeoutMs', 'signal', 'frames'])

function followOptions (options, { cancelOnAbandon, read = false }) {
  if (options === null || typeof options !== 'object') throw new TypeError('options must be an object')
  const { window = STREAM_WINDOW_DEFAULT, attempts = 'all', waitS, offset, ...rest } = options
  if (options.cancelOnAbandon !== undefined && typeof options.cancelOnAbandon !== 'boolean') {
    throw new TypeError(`cancelOnAbandon must be a boolean, got ${describe(options.cancelOnAbandon)}`)
  }
  if (attempts !== 'all' && attempts !== 'current') throw new TypeError(`attempts must be 'all' or 'current', got ${JSON.stringify(attempts)}`)
  const meta = {
    window: checkInt(window, 'window', 1, STREAM_WINDOW_MAX),
    attempts,
    cancel_on_abandon: options.cancelOnAbandon ?? cancelOnAbandon
  }
  delete rest.cancelOnAbandon
  if (read) {
    delete rest.timeoutMs
    delete rest.signal
    delete rest.frames
  } else if (offset !== undefined) {
    throw new TypeError('offset is an option of readStream(): a new task\'s stream starts at 0')
  }
  return {
    meta,
    offset: read ? checkInt(offset ?? 0, 'offset', 0, Number.MAX_SAFE_INTEGER) : 0,
    waitS: waitS === undefined ? undefined : Math.min(checkNumber(waitS, 'waitS'), MAX_WAIT_S),
    timeoutMs: options.timeoutMs,
    signal: options.signal,
    frames: options.frames === true,
    rest
  }
}

// `batch`: an enqueueMany() (keys, one per task, even for one task).
function taskMeta (options, nTasks, { batch = false, extra = NO_OPTIONS } = {}) {
  if (options === null || typeof options !== 'object') throw new TypeError('options must be an object')
  for (const name of Object.keys(options)) {
    if (!TASK_OPTIONS.has(name) && !extra.has(name)) {
      if (name === 'debounceS') throw new TypeError('debounceS is an option of enqueue() only: one task, with a key')
      throw new TypeError(`unknown option ${JSON.stringify(name)}; known: ${[...TASK_OPTIONS, ...extra].join(', ')}`)
    }
  }
  const meta = {}
  if (options.priority !== undefined) meta.priority = checkInt(options.priority, 'priority', PRIORITY_MIN, PRIORITY_MAX)
  if (options.delayS !== undefined && options.notBefore !== undefined) throw new TypeError('give delayS or notBefore, not both')
  if (options.delayS !== undefined) meta.delay_s = checkNumber(options.delayS, 'delayS')
  if (options.notBefore !== undefined) {
    const nb = options.notBefore instanceof Date ? options.notBefore.getTime() / 1000 : options.notBefore
    meta.not_before = checkNumber(nb, 'notBefore (a Date or seconds since the epoch)')
  }
  if (options.ttlS !== undefined) meta.ttl_s = checkNumber(options.ttlS, 'ttlS')
  if (options.maxAttempts !== undefined) meta.max_attempts = checkInt(options.maxAttempts, 'maxAttempts', 1, MAX_ATTEMPTS_LIMIT)
  if (options.timeoutS !== undefined) meta.timeout_s = checkNumber(options.timeoutS, 'timeoutS', { positive: true })
  if (options.headers !== undefined) {
    const h = options.headers
    if (h === null || typeof h !== 'object' || Array.isArray(h)) throw new TypeError('headers must be a plain object')
    meta.headers = h
  }
  dependencyMeta(options, meta)
  placementMeta(options, meta)
  // An idempotency key for every task: a resend after a lost answer never enqueues twice.
  if (!batch && nTasks === 1 && options.keys === undefined) {
    if (options.key !== undefined && (typeof options.key !== 'string' || options.key.length === 0)) {
      throw new TypeError('key must be a non-empty string')
    }
    meta.key = options.key ?? randomUUID()
  } else {
    if (options.key !== undefined) throw new TypeError('key is for one task: give keys (one per task) for a batch')
    const keys = options.keys ?? new Array(nTasks).fill(null)
    if (!Array.isArray(keys) || keys.length !== nTasks) throw new TypeError(`keys must list one key (or null) per task: ${nTasks}`)
    meta.keys = keys.map((k, i) => {
      if (k === null || k === undefined) return randomUUID()
      if (typeof k !== 'string' || k.length === 0) throw new TypeError(`keys[${i}] must be a non-empty string or null`)
      return k
    })
  }
  if (options.debounceS !== undefined) {
    meta.debounce_s = checkNumber(options.debounceS, 'debounceS', { positive: true })
    if (options.key === undefined) throw new TypeError('debounceS needs a key: the enqueues of that key replace the waiting task\'s payload')
    if (options.delayS !== undefined || options.notBefore !== undefined) throw new TypeError('give debounceS or a delay (delayS, notBefore), not both')
  }
  return meta
}

// require, prefer, affinity and concurrencyKey (docs/protocol.md §16) -> require,
// prefer, affinity and concurrency_key in `meta`, checked as the Python client's
// TaskOptions: require and prefer arrays of at most MAX_TAGS non-empty strings
// (none when empty or null), affinity and concurrencyKey non-empty strings (none
// when null).
function placementMeta (options, meta) {
  for (const name of ['require', 'prefer']) {
    const tags = options[name]
    if (tags === undefined || tags === null) continue
    if (!Array.isArray(tags)) throw new TypeError(`${name} must be an array of tags (strings), got ${describe(tags)}`)
    if (tags.length > MAX_TAGS) throw new RangeError(`${name} takes at most ${MAX_TAGS} tags, got ${tags.length}`)
    tags.forEach((tag, i) => {
      if (typeof tag !== 'string' || tag.length === 0) {
        throw new TypeError(`${name}[${i}] must be a non-empty string, got ${typeof tag === 'string' ? '""' : describe(tag)}`)
      }
    })
    if (tags.length > 0) meta[name] = [...tags]
  }
  for (const [name, wire] of [['affinity', 'affinity'], ['concurrencyKey', 'concurrency_key']]) {
    const value = options[name]
    if (value === undefined || value === null) continue
    if (typeof value !== 'string' || value.length === 0) {
      throw new TypeError(`${name} must be a non-empty string, got ${typeof value === 'string' ? '""' : describe(value)}`)
    }
    meta[wire] = value
  }
}

// dependsOn, runAnyway and input (docs/protocol.md §15) -> depends_on, run_anyway
// and input in `meta`, checked as the Python client's TaskOptions: dependsOn an
// array of at most MAX_DEPENDENCIES task ids or {service, key} (none when empty);
// runAnyway a boolean; input 'result' (exactly one dependency) or 'results';
// neither of them without dependencies. Unknown or repeated tasks are the broker's
// to refuse (not_found, bad_request).
function dependencyMeta (options, meta) {
  const { dependsOn, runAnyway, input } = options
  const deps = []
  if (dependsOn !== undefined && dependsOn !== null) {
    if (!Array.isArray(dependsOn)) {
      throw new TypeError(`dependsOn must be an array of task ids or {service, key} objects, got ${describe(dependsOn)}`)
    }
    if (dependsOn.length > MAX_DEPENDENCIES) {
      throw new RangeError(`dependsOn takes at most ${MAX_DEPENDENCIES} dependencies, got ${dependsOn.length}`)
    }
    dependsOn.forEach((ref, i) => deps.push(dependencyRef(ref, i)))
  }
  if (runAnyway !== undefined && typeof runAnyway !== 'boolean') {
    throw new TypeError(`runAnyway must be a boolean, got ${describe(runAnyway)}`)
  }
  if (input !== undefined && input !== null && !INPUTS.includes(input)) {
    throw new TypeError(`input must be one of ${INPUTS.map((i) => `'${i}'`).join(', ')}, got ${typeof input === 'string' ? JSON.stringify(input) : describe(input)}`)
  }
  const hasInput = input !== undefined && input !== null
  if (deps.length === 0 && (runAnyway === true || hasInput)) throw new TypeError('runAnyway and input need dependsOn')
  if (input === 'result' && deps.length !== 1) {
    throw new RangeError(`input 'result' takes exactly one dependency, got ${deps.length} (input 'results' takes any number)`)
  }
  if (deps.length === 0) return
  meta.depends_on = deps
  if (runAnyway === true) meta.run_anyway = true
  if (hasInput) meta.input = input
}

// One entry of dependsOn as the wire has it: a task id, or {service, key} naming
// the task that holds that idempotency key in that service.
function dependencyRef (ref, i) {
  if (typeof ref === 'string' && ref.length > 0) return ref
  if (ref !== null && typeof ref === 'object' && !Array.isArray(ref)) {
    const names = Object.keys(ref)
    const { service, key } = ref
    if (names.length === 2 && typeof service === 'string' && service.length > 0 && typeof key === 'string' && key.length > 0) {
      return { service, key }
    }
  }
  const shown = typeof ref === 'string' ? '""' : ref !== null && typeof ref === 'object' && !Array.isArray(ref) ? JSON.stringify(ref) : describe(ref)
  throw new TypeError(`dependsOn[${i}] must be a task id (a non-empty string) or {service, key} (non-empty strings, nothing else), got ${shown}`)
}

// The [service, payload] pairs of chain() steps or fanIn() parts (`what`), checked
// before anything is sent: each a [service, payload] array or {service, payload}.
function graphSteps (steps, what, method) {
  if (!Array.isArray(steps)) throw new TypeError(`${method}: ${what} must be an array of [service, payload] pairs`)
  return steps.map((step, i) => {
    const name = what === 'then' ? 'then' : `${what}[${i}]`
    let service, payload
    if (Array.isArray(step) && (step.length === 1 || step.length === 2)) {
      [service, payload] = step
    } else if (step !== null && typeof step === 'object' && !Array.isArray(step) && !(step instanceof Uint8Array)) {
      const other = Object.keys(step).find((k) => k !== 'service' && k !== 'payload')
      if (other !== undefined) throw new TypeError(`${method}: ${name} takes service and payload, not ${JSON.stringify(other)}`)
      service = step.service
      payload = step.payload
    } else {
      throw new TypeError(`${method}: ${name} must be a [service, payload] pair or {service, payload}, got ${describe(step)}`)
    }
    try {
      checkService(service)
      toFrames(payload)
    } catch (err) {
      throw new err.constructor(`${method}: ${name}: ${err.message}`)
    }
    return [service, payload ?? []]
  })
}

// The options chain() and fanIn() apply to every task: the task options but those
// they set themselves, and the call options.
const GRAPH_SET = ['dependsOn', 'runAnyway', 'input', 'key', 'keys', 'receipt']
function graphOptions (options, method) {
  if (options === null || typeof options !== 'object') throw new TypeError('options must be an object')
  for (const name of GRAPH_SET) {
    if (options[name] !== undefined) {
      throw new TypeError(`${method} sets dependsOn and input itself, and takes no key, runAnyway nor receipt: got option ${name}`)
    }
  }
  taskMeta(options, 1) // every other option checked before anything is sent
  return options
}

// `enqueue()` (a promise of an id or of ids); on failure, the error tells which
// tasks of the graph were stored before (its `enqueuedIds`, with any of the call's own).
async function withEnqueued (ids, enqueue) {
  try {
    return await enqueue()
  } catch (err) {
    if (err && typeof err === 'object' && (ids.length > 0 || err.enqueuedIds)) {
      err.enqueuedIds = [...ids, ...(err.enqueuedIds ?? [])]
    }
    throw err
  }
}

// Per task, whether its idempotency key is the caller's (true) or generated
// (false); as taskMeta chooses them, after it has validated the options.
function callerKeys (options, nTasks, { batch = false } = {}) {
  if (!batch && nTasks === 1 && options.keys === undefined) return [options.key !== undefined]
  const keys = options.keys ?? new Array(nTasks).fill(null)
  return keys.map((k) => k !== null && k !== undefined)
}

function checkReceipt (options) {
  if (options.receipt !== undefined && typeof options.receipt !== 'boolean') {
    throw new TypeError(`receipt must be a boolean, got ${describe(options.receipt)}`)
  }
  return options.receipt === true
}

function socketError (err, what) {
  if (isClosedSocketError(err)) return new ClosedError(`${what}: socket closed`)
  if (err instanceof ZbrokerError) return err
  return new ZbrokerError(`${what}: ${err?.message ?? err}`, { cause: err })
}
