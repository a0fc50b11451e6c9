// zbroker: Node.js client for the zbroker task broker (7/MDP, ZBW01, ZBC01, topic events).

export { Client } from './lib/client.js'
export { Worker } from './lib/worker.js'
export { Publisher, Subscriber } from './lib/events.js'
export {
  ZbrokerError,
  TimeoutError,
  ClosedError,
  ProtocolError,
  BrokerError,
  TaskNotFound,
  QueueFull,
  TaskError,
  TaskDead,
  TaskCancelled,
  TaskExpired,
  NonRetryableError,
  RetryLater
} from './lib/errors.js'
export { DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT } from './lib/protocol.js'
