// Every error this package throws on purpose is a ZbrokerError; the two
// classes at the end are thrown by worker handlers, never by the library.

/** Base class of every error the library throws on purpose. */
export class ZbrokerError extends Error {
  constructor (message, options) {
    super(message, options)
    this.name = new.target.name
  }
}

/**
 * A call got no (final) answer in time. `taskId` is set when a task id is known.
 * An enqueue or request that timed out may still have stored its task (its
 * message may reach the broker later still): `key` (enqueue, request) or `keys`
 * (enqueueMany: the tasks not known to be stored, in order) hold the
 * idempotency keys it was sent with, so enqueueing again with them finds out,
 * without a duplicate, whether the task was stored. A task stream (§13) that
 * timed out sets `next`, the offset to resume from with readStream().
 */
export class TimeoutError extends ZbrokerError {
  constructor (message, { taskId = null, state = null, key = null, keys = null, next = null } = {}) {
    super(message)
    this.code = 'timeout'
    this.taskId = taskId
    this.state = state
    this.key = key
    this.keys = keys
    this.next = next
  }
}

/** The Client, Worker, Publisher or Subscriber was closed (before or during the call). */
export class ClosedError extends ZbrokerError {
  constructor (message = 'closed') {
    super(message)
    this.code = 'closed'
  }
}

/** A peer sent something that does not follow the protocol (dropped and counted, rarely thrown). */
export class ProtocolError extends ZbrokerError {
  constructor (code, message) {
    super(message)
    this.code = code
  }
}

// The `code` of a ZBC01 ERROR answer (docs/protocol.md §11.4; zbroker/protocol/zbc.py E_*).
// A code not listed here is still a refusal of the call.
export const ERROR_CODES = Object.freeze({
  BAD_REQUEST: 'bad_request',
  NOT_FOUND: 'not_found',
  QUEUE_FULL: 'queue_full',
  TOO_LARGE: 'too_large',
  CONFLICT: 'conflict',
  SHUTTING_DOWN: 'shutting_down',
  UNAVAILABLE: 'unavailable',
  TOO_MANY_WAITERS: 'too_many_waiters',
  FORBIDDEN: 'forbidden'
})

/** The broker refused a ZBC01 call: ERROR {code, message}. */
export class BrokerError extends ZbrokerError {
  constructor (code, message) {
    super(message ? `${code}: ${message}` : code)
    this.code = code
    this.brokerMessage = message
  }
}

/** ERROR not_found: no such task (never existed, or its record lapsed). */
export class TaskNotFound extends BrokerError {}

/** ERROR queue_full: the service's queue is at its cap; nothing was enqueued. */
export class QueueFull extends BrokerError {}

/**
 * ERROR forbidden: this peer's principal may not make the call (the broker's
 * --auth file grants it no such role, service or task); nothing was done. A
 * Worker the broker will not let serve its service stops with it too.
 */
export class Forbidden extends BrokerError {}

/**
 * The broker refused this peer's CURVE handshake (an unknown key, or a key
 * whose principal has no role for that endpoint), or the two sides do not
 * speak the same security mechanism: nothing can be sent until the keys are
 * right. `endpoint` is the address it happened on; `reason` says which, as
 * far as this side can tell.
 */
export class AuthenticationFailed extends ZbrokerError {
  constructor (endpoint, reason) {
    super(`authentication with ${endpoint} failed: ${reason}`)
    this.code = 'authentication_failed'
    this.endpoint = endpoint
    this.reason = reason
  }
}

/** A task ended without a result. `state` is dead, cancelled, expired or upstream_failed; `error` the broker's text. */
export class TaskError extends ZbrokerError {
  constructor (taskId, state, error) {
    super(`task ${taskId} ${state}${error ? `: ${error}` : ''}`)
    this.taskId = taskId
    this.state = state
    this.error = error ?? null
  }
}

/** The task failed for good (attempts used up, or a non-retryable failure): it is a dead letter. */
export class TaskDead extends TaskError {}

/** The task was cancelled. */
export class TaskCancelled extends TaskError {}

/** The task's TTL ran out before it started. */
export class TaskExpired extends TaskError {}

/**
 * A task it depended on (`dependsOn`, docs/protocol.md §15) ended without a result,
 * and it did not ask to run anyway: it never ran. `error` names that dependency.
 */
export class TaskUpstreamFailed extends TaskError {}

const brokerErrors = {
  [ERROR_CODES.NOT_FOUND]: TaskNotFound,
  [ERROR_CODES.QUEUE_FULL]: QueueFull,
  [ERROR_CODES.FORBIDDEN]: Forbidden
}

/** The error for a ZBC01 ERROR answer. */
export function brokerError (code, message) {
  const Cls = brokerErrors[code] ?? BrokerError
  return new Cls(String(code ?? 'unknown'), String(message ?? ''))
}

// One class per failed state (protocol.js FAILED_STATES).
const taskErrors = { dead: TaskDead, cancelled: TaskCancelled, expired: TaskExpired, upstream_failed: TaskUpstreamFailed }

/** The error for a task that reached a final state other than done. */
export function taskError (taskId, state, error) {
  const Cls = taskErrors[state] ?? TaskError
  return new Cls(taskId, state, typeof error === 'string' ? error : error == null ? null : JSON.stringify(error))
}

// -------------------------------------------- thrown by handlers

/** Throw from a Worker handler when no further attempt can succeed: FAIL with retry false. */
export class NonRetryableError extends Error {
  constructor (message, options) {
    super(message, options)
    this.name = 'NonRetryableError'
  }
}

/** Throw from a Worker handler to fail this attempt and ask for a retry after `delayS` seconds. */
export class RetryLater extends Error {
  constructor (delayS, reason = '') {
    if (typeof delayS !== 'number' || !Number.isFinite(delayS) || delayS < 0) {
      throw new RangeError('RetryLater needs a finite delayS of zero or more seconds')
    }
    super(reason || `retry in ${delayS}s`)
    this.name = 'RetryLater'
    this.delayS = delayS
    this.reason = reason
  }
}
