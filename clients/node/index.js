// zbroker: Node.js client for the zbroker task broker (7/MDP, ZBW01, ZBC01, topic events),
// and Service, which puts workers and events together into one service.

export { Client } from './lib/client.js'
export { TaskStream } from './lib/stream.js'
export { Worker } from './lib/worker.js'
export { Publisher, Subscriber } from './lib/events.js'
export { Service, SERVICE_HEARTBEAT_PREFIX } from './lib/service.js'
export { Credentials } from './lib/keys.js'
export {
  ZbrokerError,
  TimeoutError,
  ClosedError,
  ProtocolError,
  BrokerError,
  TaskNotFound,
  QueueFull,
  Forbidden,
  AuthenticationFailed,
  TaskError,
  TaskDead,
  TaskCancelled,
  TaskExpired,
  TaskUpstreamFailed,
  NonRetryableError,
  RetryLater
} from './lib/errors.js'
export { DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT, unpackResults } from './lib/protocol.js'
