// Type declarations for the zbroker Node.js client (hand-written; the package is plain ESM).

/// <reference types="node" />

import type { EventEmitter } from 'node:events'

export const DEFAULT_ENDPOINT: 'tcp://127.0.0.1:5555'
export const DEFAULT_EVENTS_IN: 'tcp://127.0.0.1:5556'
export const DEFAULT_EVENTS_OUT: 'tcp://127.0.0.1:5557'

/** One frame: strings are sent as UTF-8. */
export type Frame = Buffer | Uint8Array | string
/** A payload or result: one frame, or an array of frames. */
export type Payload = Frame | Frame[]

/**
 * Final and non-final task states, as the broker names them (done, dead, cancelled,
 * expired and upstream_failed are final; blocked waits for the tasks it depends on).
 */
export type TaskState = 'ready' | 'delayed' | 'inflight' | 'done' | 'dead' | 'cancelled' | 'expired' | 'blocked' | 'upstream_failed'

/** The `code` of a ZBC01 ERROR answer (docs/protocol.md §11.4). */
export type BrokerErrorCode = 'bad_request' | 'not_found' | 'queue_full' | 'too_large' | 'conflict' | 'shutting_down' | 'unavailable' | 'too_many_waiters' | 'forbidden'

// ------------------------------------------------------------ errors

/** Base class of every error the library throws on purpose. */
export class ZbrokerError extends Error {
  code?: string
  /**
   * enqueueMany(), on any error after some of its messages were answered: the ids
   * stored by those earlier messages, in payload order (absent when none).
   */
  readonly enqueuedIds?: string[]
  /** enqueueMany() with `receipt: true`: the receipts of `enqueuedIds`, as it would have resolved with them. */
  readonly enqueuedReceipts?: Receipt[]
}

/** A call got no (final) answer in time. `taskId` is set when the task was enqueued. */
export class TimeoutError extends ZbrokerError {
  readonly code: 'timeout'
  /** The task's id when known: the task may still run; fetch it later with `result()`. */
  readonly taskId: string | null
  /** The task's last known state, when a state was seen. */
  readonly state: TaskState | null
  /**
   * enqueue() and request(): the idempotency key the task was sent with (yours or
   * generated). The task may or may not be stored (its message may still reach the
   * broker later): enqueue again with this key to find out, without a duplicate.
   * null for other calls.
   */
  readonly key: string | null
  /**
   * enqueueMany(): the keys of the tasks not known to be stored, in payload order:
   * those of the unanswered message and of every later one, i.e. of
   * `payloads.slice(enqueuedIds?.length ?? 0)`. null for other calls.
   */
  readonly keys: string[] | null
  /**
   * A task stream (stream(), readStream()): the offset to read on from with
   * `readStream(taskId, {offset: next})`. null for other calls.
   */
  readonly next: number | null
}

/** The object was closed before or during the call. */
export class ClosedError extends ZbrokerError {
  readonly code: 'closed'
}

/** A peer sent something that does not follow the protocol, or a reply has an unexpected shape. */
export class ProtocolError extends ZbrokerError {
  readonly code: string
  constructor (code: string, message: string)
}

/** The broker refused a ZBC01 call (ERROR). A code not in BrokerErrorCode (a newer broker's) is still a refusal of the call. */
export class BrokerError extends ZbrokerError {
  readonly code: BrokerErrorCode | (string & {})
  /** The broker's own message. */
  readonly brokerMessage: string
  constructor (code: string, message: string)
}

/** ERROR not_found: no such task (never existed, or its record lapsed after retention). */
export class TaskNotFound extends BrokerError {}

/** ERROR queue_full: the service's queue is at its cap; nothing of the call was stored. */
export class QueueFull extends BrokerError {}

/**
 * ERROR forbidden: this peer's principal may not make the call (the broker's --auth
 * file grants it no such role, service or task); nothing was done. Also what stops a
 * Worker whose READY the broker refuses (DISCONNECT "forbidden: ..."): `brokerMessage`
 * is then the broker's reason.
 */
export class Forbidden extends BrokerError {
  readonly code: 'forbidden'
}

/**
 * The broker refused this peer's CURVE handshake (an unknown key, a key whose principal
 * has no role for that endpoint, a wrong server key), or one side uses CURVE and the
 * other does not. Raised at once, never after a timeout.
 */
export class AuthenticationFailed extends ZbrokerError {
  readonly code: 'authentication_failed'
  /** The endpoint whose handshake failed. */
  /** The endpoints, comma-separated. */
  readonly endpoint: string
  /** What went wrong, as far as this side can tell. */
  readonly reason: string
  constructor (endpoint: string, reason: string)
}

/** A task ended without a result. */
export class TaskError extends ZbrokerError {
  readonly taskId: string
  readonly state: TaskState
  /** The broker's record of why (the last failure reason, say). */
  readonly error: string | null
}

/** The task failed for good (attempts used up, or NonRetryableError): it is in the dead-letter queue. */
export class TaskDead extends TaskError {}
/** The task was cancelled. */
export class TaskCancelled extends TaskError {}
/** The task's TTL passed before it started. */
export class TaskExpired extends TaskError {}
/**
 * A task it depended on (`dependsOn`) ended without a result, and it did not ask to
 * run anyway (`runAnyway`): it never ran. `error` names that dependency.
 */
export class TaskUpstreamFailed extends TaskError {}

/** Throw from a Worker handler when no further attempt can succeed (FAIL with retry: false). */
export class NonRetryableError extends Error {
  constructor (message?: string, options?: ErrorOptions)
}

/** Throw from a Worker handler to fail this attempt and retry after `delayS` seconds. */
export class RetryLater extends Error {
  readonly delayS: number
  readonly reason: string
  constructor (delayS: number, reason?: string)
}

// ------------------------------------------------------------ keys

/**
 * CURVE keys for a broker started with --auth: the broker's public key and this
 * peer's key pair, 40 characters of Z85 each. The secret key is kept off the object.
 */
export class Credentials {
  constructor (keys: { serverKey: string, publicKey: string, secretKey: string })
  readonly serverKey: string
  readonly publicKey: string
  /**
   * From the broker's public key (its .key file, or its 40 Z85 characters) and this
   * peer's secret certificate file (NAME.key_secret, from `zbroker keys new NAME`).
   */
  static load (serverKey: string, certificate: string): Credentials
  /** From ZBROKER_SERVER_KEY and ZBROKER_KEY when both are set; null when neither is; throws for one alone. */
  static fromEnvironment (env?: Record<string, string | undefined>): Credentials | null
}

// ------------------------------------------------------------ Client

/**
 * Where a peer connects: one endpoint ("tcp://host:5555"), or several brokers of
 * which one is active, as "tcp://a:5555,tcp://b:5555" or an array. With several,
 * every socket connects to all of them and follows the active one (README,
 * "Several brokers"). A bad or empty list throws a TypeError.
 */
export type Endpoints = string | readonly string[]

export interface ClientOptions {
  /** Broker ROUTER endpoint. Default tcp://127.0.0.1:5555. */
  endpoint?: Endpoints
  /** Default time limit of ZBC01 calls (enqueue, result, request...), in ms. Default 30000; Infinity: none. */
  timeoutMs?: number
  /** Default per-attempt timeout of MDP requests, in ms. Default 5000. */
  mdpTimeoutMs?: number
  /** Default MDP resends after a timeout. Default 3. */
  retries?: number
  /** Most ZBC01 calls in flight at once. Default 10000. */
  maxPending?: number
  /** Socket high-water marks (messages). Default 10000. */
  hwm?: number
  /** Frames per message enqueueMany stays under (the broker refuses more than 16384). Default 16000, as the Python client. */
  maxFrames?: number
  /**
   * The broker's size cap per message (--max-message-bytes; set it to the broker's
   * when that is changed). enqueueMany splits batches under it, meta included; an
   * enqueue, request or batch task that cannot fit is refused before it is sent,
   * with BrokerError code 'too_large'. Default 16 MiB.
   */
  maxMessageBytes?: number
  /** CURVE keys, for a broker started with --auth. A refused handshake rejects the calls with AuthenticationFailed. */
  credentials?: Credentials | null
}

export interface CallOptions {
  /** Time limit of this call in ms (default: the client's timeoutMs; Infinity: none). */
  timeoutMs?: number
  /** Abort the call: it rejects with `signal.reason` (the task itself is not cancelled). */
  signal?: AbortSignal
}

export interface TaskOptions {
  /** -128..127, higher runs first. Default 0. */
  priority?: number
  /** Not before now + delayS seconds. */
  delayS?: number
  /** Not before this time (a Date, or seconds since the epoch). */
  notBefore?: Date | number
  /** Expire unless started within ttlS seconds of the enqueue. */
  ttlS?: number
  /** Deliveries allowed before the task is dead-lettered (1..1000). Default: the broker's (3). */
  maxAttempts?: number
  /** Run-time limit of one attempt, in seconds (the worker sees it as `task.timeoutS`). */
  timeoutS?: number
  /** Idempotency key of one task. Default: a random UUID, so resends never duplicate. */
  key?: string
  /** Free-form map handed to the worker. */
  headers?: Record<string, unknown>
  /**
   * The tasks it waits for (docs/protocol.md §15), at most 1000, each stored when
   * the call arrives: it is stored `blocked` and queued once they have all ended
   * done. An empty array is no dependency.
   */
  dependsOn?: readonly DependencyRef[]
  /** With dependsOn: run once they have all ended, whatever their state. Default false. */
  runAnyway?: boolean
  /**
   * With dependsOn: hand their results over after its payload frames. 'result' (one
   * dependency): its result frames; 'results': one more frame, read by unpackResults().
   */
  input?: 'result' | 'results' | null
  /**
   * Worker tags it needs (docs/protocol.md §16), at most 32 non-empty strings: it goes
   * only to a worker that has every one, and waits (`unplaceable` in QUEUES) while
   * none has them. An empty array is no requirement.
   */
  require?: readonly string[] | null
  /** Worker tags that make a worker a better fit (at most 32): more of them win. */
  prefer?: readonly string[] | null
  /** Sends it to the worker that last started a task of this key, while it lives (a conversation). */
  affinity?: string | null
  /** The key its service's round robin, per-key limit and per-key rate count it under (`user:42`). */
  concurrencyKey?: string | null
}

/** The options of enqueue(): those of any task, and debounceS. */
export interface EnqueueOptions extends TaskOptions {
  /**
   * With `key` (docs/protocol.md §16.3): the task waits this many seconds (> 0), and an
   * enqueue of the same key meanwhile replaces its payload and headers instead of
   * storing another task (its receipt says `replaced: true`). Not with delayS or notBefore.
   */
  debounceS?: number
}

/** A task a task depends on: its id, or the idempotency key it holds in its service. */
export type DependencyRef = string | { service: string, key: string }

/** A step of chain() or a part of fanIn(): a service and a payload (none: an empty payload). */
export type GraphStep =
  | readonly [service: string, payload?: Payload | null]
  | { service: string, payload?: Payload | null }

/** Options of chain() and fanIn(): applied to every task (they set dependsOn and input themselves). */
export type GraphOptions = Omit<TaskOptions, 'key' | 'dependsOn' | 'runAnyway' | 'input'> & CallOptions

/**
 * The frame `input: 'results'` appends to a task's payload: each dependency's result
 * frames (Buffers sharing `frame`'s memory), in dependsOn order, or null for one that
 * did not end done. ProtocolError (code 'bad_results') for any other frame.
 */
export function unpackResults (frame: Buffer | Uint8Array): Array<Buffer[] | null>

export interface BatchOptions extends Omit<TaskOptions, 'key'> {
  /** One idempotency key (or null: generated) per task. */
  keys?: Array<string | null>
}

/**
 * What enqueue() and enqueueMany() resolve with under `{receipt: true}`: the
 * task id, and whether the idempotency key matched a task the broker already
 * held (queued, running, dead, or finished and still retained), so that
 * nothing new was stored and `id` is that task's.
 *
 * `existing` is only ever true for a key the caller gave (`key`, or a
 * non-null `keys[i]`). A generated key is random, so a match on it can only be
 * this call's own first send, after the client resent the call because the
 * answer was lost (a reconnect): it stays false. With a caller's key the same
 * resend is ambiguous: `existing: true` may then mean that the call's own
 * first send stored the task (like a NATS JetStream duplicate ack).
 */
export interface Receipt {
  id: string
  existing: boolean
  /**
   * Present (true) only when a `debounceS` enqueue replaced the payload (and headers)
   * of the task still waiting under its key (`id`, with `existing` true) instead of
   * storing another; absent on every other receipt.
   */
  replaced?: true
}

export interface ReceiptOption {
  /** Resolve with a Receipt ({id, existing}, and replaced after a debounce) per task instead of the id string. Default false. */
  receipt?: boolean
}

export interface ResultOptions extends CallOptions {
  /** Resolve with every result frame (Buffer[]) instead of the one-frame result. */
  frames?: boolean
}

export interface MdpOptions {
  /** Per-attempt timeout in ms (default: the client's mdpTimeoutMs). */
  timeoutMs?: number
  /** Resends on fresh sockets after a timeout (default: the client's retries). */
  retries?: number
  signal?: AbortSignal
}

/** What the broker knows about a task (STATUS). Times are Dates; notBefore is null when unset. */
export interface TaskStatus {
  id: string
  service: string
  state: TaskState
  attempt: number
  /** Attempts cut short by the broker stopping or dying, not charged against maxAttempts. */
  uncharged: number
  maxAttempts: number
  priority: number
  createdAt: Date
  notBefore: Date | null
  expiresAt: Date | null
  timeoutS: number | null
  key: string | null
  headers: Record<string, unknown>
  error: string | null
  finishedAt: Date | null
  keepUntil: Date | null
  /** The length of the task's stream (§13): its chunks, over all attempts. */
  streamChunks: number
  /** The bytes of the task's stream. */
  streamBytes: number
  /** The ids of the tasks it depends on (§15), in the enqueue's order; [] without. */
  dependsOn: string[]
  /** How many of them have not ended yet; 0 once it left `blocked`. */
  blockedOn: number
  runAnyway: boolean
  input: 'result' | 'results' | null
  /** Worker tags it requires (§16); [] without. */
  require: string[]
  /** Worker tags it prefers; [] without. */
  prefer: string[]
  affinity: string | null
  concurrencyKey: string | null
  /** [event, epoch seconds, details...], oldest first (see docs/protocol.md §11.3). */
  history: Array<[string, number, ...unknown[]]>
  [key: string]: unknown
}

export interface DeadLetter {
  id: string
  seq: number
  attempt: number
  error: string | null
  createdAt: Date
  finishedAt: Date | null
  [key: string]: unknown
}

/** A service's figures as QUEUES gives them (docs/protocol.md §11.3), snake_case as on the wire. */
export interface QueueRow {
  service: string
  ready: number
  delayed: number
  /** Tasks waiting for the tasks they depend on (§15). */
  blocked: number
  inflight: number
  dead: number
  done: number
  requests: number
  workers: number
  credit: number
  credit_in_use: number
  oldest_age_s: number
  paused: boolean
  limit: number | null
  /** The per-key LIMIT (§16): tasks of each concurrency key its workers hold at most. */
  key_limit: number | null
  /** Ready tasks (of its window) whose required tags no registered worker has. */
  unplaceable: number
  /** The service's RATE, and the per-key one (§16.3). */
  rate: RateFigures | null
  key_rate: RateFigures | null
  [field: string]: unknown
}

/** A RATE as QUEUES shows it: tasks per second, and the bucket's size. */
export interface RateFigures {
  per_s: number
  burst: number
}

export interface LimitOptions extends CallOptions {
  /** A cap on each concurrency key's tasks at the workers (§16.2), not on the service's. Default false. */
  perKey?: boolean
}

export interface RateOptions extends LimitOptions {
  /** Tokens the bucket holds, 1..1000000: tasks handed out at once. Default: the rate rounded up, at least 1. */
  burst?: number | null
}

/** The broker's answer to limit(). */
export interface LimitResult {
  service: string
  limit: number | null
  perKey: boolean
}

/** The broker's answer to rate(). */
export interface RateResult {
  service: string
  /** Tasks per second; null: none. */
  rate: number | null
  burst: number
  perKey: boolean
}

export interface QueuesPage {
  queues: QueueRow[]
  /** Pass as `after` for the next page; null on the last page. */
  next: string | null
}

export interface DeadLetterPage {
  tasks: DeadLetter[]
  /** Pass as `after` for the next page; null on the last page. */
  next: number | null
}

/** Options of schedule() (docs/protocol.md §17): its rule, and what each firing's task gets. */
export interface ScheduleOptions extends CallOptions {
  /** Fire every so many seconds (a whole number, at least 1); or give `cron`. */
  everyS?: number
  /** Fire at the instants of a five-field cron expression; or give `everyS`. */
  cron?: string
  /** With `cron`: the IANA time zone it is read in (default UTC). */
  tz?: string
  priority?: number
  ttlS?: number
  maxAttempts?: number
  timeoutS?: number
  headers?: Record<string, unknown>
}

/** A schedule as the broker keeps it (docs/protocol.md §17). */
export interface Schedule {
  name: string
  service: string
  everyS: number | null
  cron: string | null
  tz: string | null
  priority: number
  ttlS: number | null
  maxAttempts: number | null
  timeoutS: number | null
  headers: Record<string, unknown>
  payloadBytes: number
  createdAt: Date
  /** Its next firing. */
  nextAt: Date
  /** The instant of its last firing (not when it ran); null before the first. */
  lastAt: Date | null
  /** The task its last firing enqueued. */
  lastId: string | null
  fired: number
  /** Why its last firing was refused (it is tried again), if it was. */
  error: string | null
}

export interface CancelResult {
  id: string
  state: 'cancelled'
  /** The state before the cancel (null if unknown: a resent cancel found it already cancelled). */
  was: TaskState | null
}

/** Options of a task stream, stream() and readStream() (docs/protocol.md §13). */
export interface FollowOptions {
  /**
   * Chunks the broker may send beyond those this reader has taken (1..10000, default
   * 256): what waits here unread. The client credits them (MORE) as they are taken.
   */
  window?: number
  /** 'current': skip chunks of attempts older than the task's current one. Default 'all'. */
  attempts?: 'all' | 'current'
  /**
   * Cancel the task when the stream is left before the task ended (a loop left
   * early, close(), the signal aborted, the connection lost). Default true for
   * stream(), false for readStream().
   */
  cancelOnAbandon?: boolean
  /**
   * The idle limit in seconds (the broker's wait_s, at most 86400): with nothing
   * sent for that long the stream ends with TimeoutError (taskId, state, next).
   * Default: timeoutMs in seconds; with timeoutMs Infinity, none.
   */
  waitS?: number
  /** The idle limit in ms when waitS is not given (default: the client's timeoutMs); Infinity: none. */
  timeoutMs?: number
  /** Aborting it closes the stream (CLOSE): iteration rejects with `signal.reason`. */
  signal?: AbortSignal
  /** `result` is every result frame (Buffer[]) instead of the one-frame result. */
  frames?: boolean
}

export interface ReadStreamOptions extends FollowOptions {
  /** The first chunk wanted. Default 0. */
  offset?: number
}

/**
 * A task's stream as a reader gets it: an async iterable of its chunks (Buffers),
 * in order, then the task's result. The iteration throws what the task ended with
 * otherwise (TaskDead, TaskCancelled, TaskExpired, TaskUpstreamFailed, a BrokerError, TimeoutError).
 * Leaving a `for await` loop early, close() and the signal end it (CLOSE).
 */
export class TaskStream<R = Buffer> implements AsyncIterableIterator<Buffer> {
  private constructor ()
  /** The task's id; null until the broker accepted a stream() (readStream(): from the start). */
  readonly taskId: string | null
  /** Resolves with the task's id once the broker has stored it; rejects if the stream ends first. */
  readonly accepted: Promise<string>
  /** The attempt that sent the last chunk taken (null before the first): a higher one started over. */
  readonly attempt: number | null
  /** The offset of the next chunk: after the last one taken (at the end, the stream's length). */
  readonly offset: number
  /**
   * The task's result once iteration has ended. Throws what the stream ended with
   * instead, and a ZbrokerError before the end or after close() before the result came.
   */
  readonly result: R
  next (): Promise<IteratorResult<Buffer, undefined>>
  /** Leaving a loop early: close(). */
  return (): Promise<IteratorResult<Buffer, undefined>>
  [Symbol.asyncIterator] (): this
  /** Stop reading: CLOSE (cancels the task if cancelOnAbandon), chunks not taken dropped, iteration done. */
  close (): void
  [Symbol.dispose] (): void
}

export interface ClientStats {
  calls: number
  /** Calls sent again after a reconnect. */
  resends: number
  /**
   * Answers that settled nothing: for calls that had ended (timed out, aborted), or
   * superseded (the second answer to a call whose message reached the broker twice,
   * an older message's refusal or wait while a newer one of the call is out).
   */
  lateAnswers: number
  /** Broker messages that could not be decoded (dropped). */
  malformed: number
  mdpRequests: number
  mdpResends: number
  mdpTimeouts: number
}

export class Client {
  constructor (endpoint?: Endpoints, options?: Omit<ClientOptions, 'endpoint'>)
  constructor (options?: ClientOptions)
  /** The endpoints, comma-separated. */
  readonly endpoint: string
  readonly closed: boolean
  readonly stats: ClientStats

  /** Enqueue one durable task; resolves with its id once the broker has committed it. */
  enqueue (service: string, payload: Payload, options?: EnqueueOptions & CallOptions & { receipt?: false }): Promise<string>
  /** Enqueue one durable task; resolves with {id, existing} (and replaced: true after a debounce) once the broker has committed it. */
  enqueue (service: string, payload: Payload, options: EnqueueOptions & CallOptions & { receipt: true }): Promise<Receipt>
  enqueue (service: string, payload: Payload, options: EnqueueOptions & CallOptions & ReceiptOption): Promise<string | Receipt>
  /**
   * Enqueue a batch (as few messages as the broker's caps allow); one id per payload, in order.
   * If a later message is refused, the error's `enqueuedIds` (string[]) lists the tasks stored
   * by the earlier ones, and with `receipt: true` its `enqueuedReceipts` (Receipt[]) too.
   */
  enqueueMany (service: string, payloads: Payload[], options?: BatchOptions & CallOptions & { receipt?: false }): Promise<string[]>
  /** Enqueue a batch; one {id, existing} per payload, in order. */
  enqueueMany (service: string, payloads: Payload[], options: BatchOptions & CallOptions & { receipt: true }): Promise<Receipt[]>
  enqueueMany (service: string, payloads: Payload[], options: BatchOptions & CallOptions & ReceiptOption): Promise<string[] | Receipt[]>
  /**
   * Enqueue tasks that run one after the other: each step waits for the one before
   * and is handed its result frames after its own payload (`input: 'result'`).
   * Resolves with their ids in order; the last one's result is the chain's. A step
   * that fails for good ends the later ones `upstream_failed`.
   */
  chain (steps: readonly GraphStep[], options?: GraphOptions): Promise<string[]>
  /**
   * Enqueue `parts` (1..1000, side by side), then `then`, which waits for them all and
   * is handed one more frame with every part's result frames (`input: 'results'`,
   * read by unpackResults()). Resolves with the parts' ids and, last, the joining task's.
   */
  fanIn (parts: readonly GraphStep[], then: GraphStep, options?: GraphOptions): Promise<string[]>
  /** Enqueue one task and wait for its result; resumes by task id after a reconnect. */
  request (service: string, payload: Payload, options?: TaskOptions & CallOptions & { frames?: false }): Promise<Buffer>
  request (service: string, payload: Payload, options: TaskOptions & CallOptions & { frames: true }): Promise<Buffer[]>
  /**
   * Enqueue one task and follow its stream (STREAM): its chunks as its workers send
   * them, then its result. cancelOnAbandon defaults to true.
   */
  stream (service: string, payload: Payload, options?: TaskOptions & FollowOptions & { frames?: false }): TaskStream<Buffer>
  stream (service: string, payload: Payload, options: TaskOptions & FollowOptions & { frames: true }): TaskStream<Buffer[]>
  /** Follow the stream of task `id` from `offset` (READ). cancelOnAbandon defaults to false. */
  readStream (id: string, options?: ReadStreamOptions & { frames?: false }): TaskStream<Buffer>
  readStream (id: string, options: ReadStreamOptions & { frames: true }): TaskStream<Buffer[]>
  /** Wait up to timeoutMs for task `id` to end (0: answer now) and resolve with its result. */
  result (id: string, options?: CallOptions & { frames?: false }): Promise<Buffer>
  result (id: string, options: CallOptions & { frames: true }): Promise<Buffer[]>
  status (id: string, options?: CallOptions): Promise<TaskStatus>
  cancel (id: string, options?: CallOptions): Promise<CancelResult>
  deadLetters (service: string, options?: CallOptions & { limit?: number, after?: number | null }): Promise<DeadLetterPage>
  iterDeadLetters (service: string, options?: CallOptions & { limit?: number, after?: number | null }): AsyncGenerator<DeadLetter, void, undefined>
  /** One page of services (1..1000, default 1000) after the one named `after`, in name order. */
  queuesPage (options?: CallOptions & { limit?: number, after?: string | null }): Promise<QueuesPage>
  /** Every service's queue figures, fetched page after page (`limit` services per call). */
  queues (options?: CallOptions & { limit?: number }): Promise<QueueRow[]>
  /**
   * Dead letters back to the queue (up to 10000 of them, or those in `ids`); resolves with the
   * ids moved. At most 10000 ids per call: a longer list is a RangeError, and nothing is sent.
   */
  redrive (service: string, ids?: string[] | null, options?: CallOptions): Promise<string[]>
  redrive (service: string, options: CallOptions): Promise<string[]>
  /**
   * Have the broker enqueue `payload` to `service` every `everyS` seconds or at `cron`
   * instants, until unschedule(name); a schedule of the same name is replaced.
   */
  schedule (name: string, service: string, payload: Payload | undefined, options: ScheduleOptions): Promise<Schedule>
  /** Every schedule the broker keeps, by name. */
  schedules (options?: CallOptions): Promise<Schedule[]>
  /** Remove a schedule: true, or false when there was none. */
  unschedule (name: string, options?: CallOptions): Promise<boolean>
  /**
   * At most `limit` (1..1000000) tasks and requests of `service` at its workers together;
   * null: none. With `perKey`, at most `limit` tasks of each concurrency key instead (§16.2).
   * Kept in the broker's journal.
   */
  limit (service: string, limit: number | null, options?: LimitOptions): Promise<LimitResult>
  /**
   * Hand out at most `perS` (0 < perS <= 1000000) tasks of `service` per second, in bursts
   * of up to `burst`; null: none. With `perKey`, for each concurrency key instead (§16.3).
   * Kept in the broker's journal.
   */
  rate (service: string, perS: number | null, options?: RateOptions): Promise<RateResult>

  /** Plain 7/MDP request; the reply must be one frame. */
  mdpRequest (service: string, body: Payload, options?: MdpOptions): Promise<Buffer>
  /** Plain 7/MDP request; every reply frame. */
  mdpRequestFrames (service: string, body: Payload, options?: MdpOptions): Promise<Buffer[]>
  /** 8/MMI: is a worker for `service` registered now? */
  mmiService (service: string, options?: MdpOptions): Promise<boolean>

  /** Close every socket; waiting calls reject with ClosedError. */
  close (): void
  [Symbol.dispose] (): void
}

// ------------------------------------------------------------ Worker

/** One attempt of a task, as the handler gets it. */
export interface Task {
  readonly id: string
  /** 1 for the first delivery; the broker's fencing token. */
  readonly attempt: number
  readonly service: string
  /** The first payload frame (empty when there is none). */
  readonly payload: Buffer
  readonly frames: Buffer[]
  readonly headers: Record<string, unknown>
  /** Run-time limit of this attempt in seconds, when the task has one. */
  readonly timeoutS: number | null
  /**
   * The ids of the tasks it depended on (`dependsOn`), in the enqueue's order; []
   * without. Read their results with a Client's result(), or have them handed over (`input`).
   */
  readonly dependsOn: string[]
  /** Aborted when the broker takes the attempt back (CANCEL), the connection is replaced, or stop() gives up on it. */
  readonly signal: AbortSignal
  /**
   * Send PROGRESS (renews the lease), with optional data frames. False when it
   * is not sent: the attempt is no longer held, the data cannot fit in one
   * message (maxMessageBytes, maxFrames), or the socket is backed up (PROGRESS
   * is dropped under back-pressure, counted in stats.progressDropped).
   */
  progress (data?: Payload): boolean
  /**
   * Append one chunk to the task's stream (§13); the chunks of one turn of the
   * event loop go together, before the result. Resolves once handed to the socket
   * (await it to be slowed down by a broker that reads slower). Once the attempt
   * is no longer held (the broker took it back, the connection was replaced, the
   * result is out), a no-op that resolves at once. Throws NonRetryableError for a
   * chunk that is not a frame or cannot fit in a message.
   */
  emit (chunk: Frame): Promise<void>
}

/** What a handler may return: the result (frames; undefined/null: no frames). */
export type HandlerResult = Payload | null | undefined | void
/**
 * A generator as a handler's stream: each value it yields is a chunk (a promise of
 * one, for a sync generator), the value it returns the result.
 */
export type ChunkSource<C = Frame, R = HandlerResult> =
  | AsyncIterator<C, R, undefined> & AsyncIterable<C>
  | Iterator<C | Promise<C>, R, undefined> & Iterable<C | Promise<C>>
/**
 * A handler returns the result or throws to fail the attempt; or it streams: an
 * (async) generator function, its yielded values the chunks, its return value the result.
 */
export type Handler = (task: Task) => HandlerResult | Promise<HandlerResult> | ChunkSource

export interface Logger {
  debug?: (...args: unknown[]) => void
  info?: (...args: unknown[]) => void
  warn?: (...args: unknown[]) => void
  error?: (...args: unknown[]) => void
}

export interface WorkerOptions {
  endpoint?: Endpoints
  service: string
  handler: Handler
  /** Tasks held and run at once (the credit declared to the broker), 1..10000. Default 1. */
  concurrency?: number
  /** Capabilities (at most 32). */
  tags?: string[]
  /** Heartbeat interval in ms. Default 2500. */
  heartbeatIntervalMs?: number
  /** Silent intervals after which the broker is presumed gone. Default 3. */
  liveness?: number
  /** First reconnect delay in ms, doubling up to maxReconnectDelayMs. Defaults 100 and 2500. */
  reconnectDelayMs?: number
  maxReconnectDelayMs?: number
  /** Called at most once per interval; the map goes out with a heartbeat. */
  metrics?: () => Record<string, unknown>
  /** Send and receive high-water marks, in messages. Default 10000. */
  hwm?: number
  /**
   * The broker's --max-message-bytes (default 16 MiB, at least 4096): no message
   * goes out larger. Results are split across DONES to fit; a result that cannot
   * fit alone fails its attempt for good (FAIL retry: false, reason naming size and cap).
   */
  maxMessageBytes?: number
  /** The broker's frame cap per message, routing id included. Default 16384. */
  maxFrames?: number
  /** Where warnings and errors go (default: console for warn/error); null: silent. */
  logger?: Logger | null
  /** CURVE keys, for a broker started with --auth. */
  credentials?: Credentials | null
}

export interface WorkerStats {
  received: number
  acked: number
  handled: number
  failed: number
  cancelled: number
  notStarted: number
  /** Results not sent: attempt taken back, or connection replaced before they left. */
  staleResultsDropped: number
  /** Results over maxMessageBytes/maxFrames, failed for good instead (also counted in failed). */
  tooLarge: number
  /** PROGRESS handed to the socket. */
  progressSent: number
  /** PROGRESS not sent: back-pressure, too large, or connection replaced. */
  progressDropped: number
  /** Stream chunks handed to the socket (CHUNK). */
  chunksSent: number
  /** Chunks not sent: the attempt was no longer held, or the connection was replaced. */
  chunksDropped: number
  /**
   * Connections opened after the first one: after silence, a DISCONNECT, or (given
   * several endpoints) a takeover by another broker.
   */
  reconnects: number
  malformed: number
  metricsErrors: number
  /** STOPPING notices: the broker said it was stopping (a restart, say). */
  brokerStopping: number
  /** TAGS handed to the socket (setTags). */
  tagsSent: number
}

/**
 * Serves one service over ZBW01. Emits 'connected' and 'disconnected', and 'error'
 * (AuthenticationFailed or Forbidden) when the broker refuses it after start()
 * resolved: the worker has then stopped. Like any EventEmitter's, an 'error' with
 * no listener is thrown.
 */
export class Worker extends EventEmitter {
  constructor (options: WorkerOptions)
  readonly service: string
  /** The endpoints, comma-separated. */
  readonly endpoint: string
  readonly concurrency: number
  /** Its tags (a copy): the constructor's, or the last setTags()'s. */
  readonly tags: string[]
  /** Credit the current connection declared: concurrency less handlers still running attempts of an older one. */
  readonly credit: number
  readonly connected: boolean
  readonly running: number
  readonly stopping: boolean
  /** The worker has stopped (stop(), or the broker refused it). */
  readonly stopped: boolean
  /** What stopped the worker by itself (AuthenticationFailed, Forbidden), or null. */
  readonly error: AuthenticationFailed | Forbidden | null
  readonly stats: WorkerStats
  /**
   * Connect and register; resolves once greeted by the broker (or stopped). Rejects with
   * AuthenticationFailed or Forbidden when the broker refuses the worker first (it has then stopped).
   */
  start (): Promise<void>
  /** Graceful stop; resolves true if every running handler finished within timeoutMs (default 10000). */
  stop (options?: { timeoutMs?: number }): Promise<boolean>
  /**
   * Change its tags (at most 32; [] clears them) without registering again (TAGS, §16):
   * tasks that require or prefer tags are placed by these from now on; a reconnect's
   * READY carries them too.
   */
  setTags (tags: readonly string[]): void
  [Symbol.asyncDispose] (): Promise<void>
}

// ------------------------------------------------------------ events

export interface Event<P = unknown> {
  /** Frame 0 as received (equal to `type`). */
  topic?: string
  type: string
  source: string
  payload: P
  /** Seconds since the epoch, at publication. */
  timestamp: number
  correlationId?: string
  replyTo?: string
}

export interface PublishOptions {
  source?: string
  correlationId?: string
  replyTo?: string
}

export interface PublisherOptions {
  endpoint?: Endpoints
  /** The default `source` of its events. */
  source?: string
  hwm?: number
  /** CURVE keys, for a broker started with --auth. */
  credentials?: Credentials | null
}

/** Publishes events. Once the broker has refused its handshake, publish() throws AuthenticationFailed. */
export class Publisher {
  constructor (endpoint?: Endpoints, options?: Omit<PublisherOptions, 'endpoint'>)
  constructor (options?: PublisherOptions)
  /** The endpoints, comma-separated. */
  readonly endpoint: string
  readonly closed: boolean
  /** The AuthenticationFailed that ended its connection, or null. */
  readonly error: AuthenticationFailed | null
  /**
   * Events handed to the socket (a batch counts its events), including those the PUB
   * socket then drops (at its high-water mark, or while not connected): ZeroMQ
   * pub/sub never tells, so this is not a count of events delivered.
   */
  published: number
  /** Publish one event; payload is anything msgpack carries (Buffers as bin). */
  publish<P = unknown> (type: string, payload?: P, options?: PublishOptions): Promise<Event<P>>
  /**
   * Publish a batch of events of one type as one message (`payloads`, protocol §6):
   * one event per element, in order, sharing source, timestamp, correlationId and
   * replyTo. Resolves with the events as sent; `published` grows by their number.
   * TypeError when `payloads` is not an array, RangeError when it is empty.
   */
  publishMany<P = unknown> (type: string, payloads: readonly P[], options?: PublishOptions): Promise<Array<Event<P>>>
  /** Close; events not yet sent are discarded, unless `lingerMs` (default 0) gives them time to leave. */
  close (options?: { lingerMs?: number }): void
  [Symbol.dispose] (): void
}

export interface SubscriberOptions {
  endpoint?: Endpoints
  /** Topic prefixes; default [''] (everything). */
  topics?: string[] | string
  hwm?: number
  /** Closing signal: aborting it closes the subscriber and ends iteration. */
  signal?: AbortSignal
  /** CURVE keys, for a broker started with --auth. */
  credentials?: Credentials | null
}

/** Receives events. Once the broker has refused its handshake, recv() and iteration throw AuthenticationFailed. */
export class Subscriber implements AsyncIterable<Event> {
  constructor (endpoint?: Endpoints, options?: Omit<SubscriberOptions, 'endpoint'>)
  constructor (options?: SubscriberOptions)
  /** The endpoints, comma-separated. */
  readonly endpoint: string
  readonly closed: boolean
  /** The AuthenticationFailed that ended its connection, or null. */
  readonly error: AuthenticationFailed | null
  /** Events handed out (each event of a batch counts). */
  received: number
  /** Messages dropped because they could not be decoded. */
  dropped: number
  subscribe (...prefixes: string[]): void
  unsubscribe (...prefixes: string[]): void
  /** The next event (a batch is handed out one event at a time), or null at the timeout or when closed meanwhile. */
  recv (options?: { timeoutMs?: number, signal?: AbortSignal }): Promise<Event | null>
  [Symbol.asyncIterator] (): AsyncIterator<Event>
  close (): void
  [Symbol.dispose] (): void
}

// ------------------------------------------------------------ Service

/** Topic prefix of service heartbeats: `service.heartbeat.<name>` (a client-library convention). */
export const SERVICE_HEARTBEAT_PREFIX: 'service.heartbeat.'

export interface ServiceOptions {
  /** Broker ROUTER endpoint, for the workers. Default tcp://127.0.0.1:5555. */
  endpoint?: Endpoints
  /** Broker XSUB endpoint, for the publisher. Default tcp://127.0.0.1:5556. */
  eventsIn?: Endpoints
  /** Broker XPUB endpoint, for the subscriber. Default tcp://127.0.0.1:5557. */
  eventsOut?: Endpoints
  /** Interval of the `service.heartbeat.<name>` events in ms. Default 5000; 0 or null: none. */
  heartbeatMs?: number | null
  /** How long stop() (and a signal) lets running handlers finish, in ms. Default 10000. */
  graceMs?: number
  /** The broker's --max-message-bytes, given to the service's workers (default: the Worker's, 16 MiB). */
  maxMessageBytes?: number
  /** Where the service and its workers log (default: console for warn/error); null: silent. */
  logger?: Logger | null
  /** CURVE keys for every socket of the service (one principal), for a broker started with --auth. */
  credentials?: Credentials | null
}

export interface ServiceTaskOptions {
  /** Tasks of this queue run at once (the worker's credit), 1..10000. Default 1. */
  concurrency?: number
  /** Publish each result as an event of this topic (correlationId = task id, replyTo = the task's `reply_to` header). */
  publish?: string | null
  /** The worker's tags. */
  tags?: string[]
}

/** The task a Service handler gets: its chunks are encoded like its results. */
export interface ServiceTask extends Omit<Task, 'emit'> {
  /** A chunk: a Buffer/Uint8Array as it is, anything else packed with msgpack (see Task.emit). */
  emit (chunk: unknown): Promise<void>
}

/**
 * A task handler of a Service: returns anything msgpack can pack (a Buffer/Uint8Array
 * is the result as it is); a generator yields chunks encoded the same way.
 */
export type ServiceTaskHandler = (task: ServiceTask) => unknown
/** An event handler of a Service; what it throws is logged and counted, never fatal. */
export type EventHandler = (event: Event) => unknown

export interface ServiceStats {
  tasksDone: number
  tasksFailed: number
  eventsHandled: number
  eventsFailed: number
  resultsPublished: number
  publishErrors: number
  heartbeats: number
}

/** The payload of a `service.heartbeat.<name>` event (snake_case: the same from Python and Node). */
export interface ServiceHeartbeat {
  name: string
  pid: number
  host: string
  uptime_s: number
  tasks_done: number
  tasks_failed: number
  events_handled: number
  events_failed: number
  queues: string[]
  topics: string[]
}

/** Task queues, topic handlers, result events, heartbeats and a clean stop, in one object. */
export class Service {
  constructor (name: string, options?: ServiceOptions)
  readonly name: string
  readonly queues: string[]
  readonly topics: string[]
  /** The Worker of each queue, once started. */
  readonly workers: Map<string, Worker>
  /** Every worker registered and the subscriptions in place. */
  readonly ready: boolean
  readonly stopping: boolean
  readonly stopped: boolean
  /** After the shutdown: true if every running handler finished within graceMs. */
  readonly cleanStop: boolean | null
  /** What stopped the service by itself (the broker refused one of its sockets or queues), or null. */
  readonly error: AuthenticationFailed | Forbidden | null
  readonly stats: ServiceStats
  /** Serve task queue `queue`; chainable. */
  task (queue: string, handler: ServiceTaskHandler, options?: ServiceTaskOptions): this
  /** Handle events whose type starts with `prefix` ('' for all); chainable. */
  on (prefix: string, handler: EventHandler): this
  /**
   * Change the tags of every queue's worker, or of `queue`'s alone (Worker.setTags: TAGS,
   * §16); before start(), the tags their READY will carry. Chainable.
   */
  setTags (tags: readonly string[], options?: { queue?: string }): this
  /** Start; resolves true once ready, false if stopped first; rejects with `error` if the broker refused it first. */
  start (): Promise<boolean>
  /**
   * Start and serve until stop(), SIGINT/SIGTERM (unless handleSignals is false) or `signal`; resolves with
   * cleanStop, or rejects with `error` when the broker refused the service.
   */
  run (options?: { signal?: AbortSignal, handleSignals?: boolean }): Promise<boolean | null>
  /** Resolves true once ready; false at the timeout or when stopped first. */
  waitReady (options?: { timeoutMs?: number, signal?: AbortSignal }): Promise<boolean>
  /** Graceful stop; resolves true if every running handler finished within timeoutMs (default graceMs). */
  stop (options?: { timeoutMs?: number }): Promise<boolean>
  /** Publish an event with the service's name as source. */
  publish<P = unknown> (type: string, payload?: P, options?: { correlationId?: string, replyTo?: string }): Promise<Event<P>>
  heartbeatPayload (): ServiceHeartbeat
  [Symbol.asyncDispose] (): Promise<void>
}
