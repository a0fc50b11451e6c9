// A Node zbroker Worker for the cross-language tests.
//
//   node worker.mjs ENDPOINT SERVICE [MODE] [CONCURRENCY] [HEARTBEAT_MS]
//
// Prints {"event": "ready"} once the broker has greeted it, then for every attempt
// {"event": "task", id, attempt, service, frames (base64), headers, timeoutS, mode}
// before acting on it. The task header `mode` (else MODE, default "echo") says what
// the handler does:
//   echo      return the payload frames unchanged
//   progress  send PROGRESS "half way" first, then echo
//   throw     throw an Error (FAIL, retryable)
//   fatal     throw NonRetryableError (FAIL, retry: false)
//   later     throw RetryLater(0.3)
//   hold      print {"event": "holding"} and wait until the attempt is taken back
//   stream    an async generator: each payload frame is a chunk, the result
//             "<n> chunks"
//   stream-emit  task.emit() of "attempt <a>: one", then on attempt 1 a throw
//             (FAIL, retried), else "attempt <a>: two" and the result "emitted"
//   stream-hold  a generator: the chunk "first", then it waits until the attempt
//             is taken back, prints {"event": "aborted"} and is pulled no further
//             (it prints {"event": "closed"} from its finally)
// SIGTERM stops it gracefully and prints {"event": "stopped", clean}.

import { NonRetryableError, RetryLater, Worker } from '../../../clients/node/index.js'
import { b64, emit } from './io.mjs'

const [endpoint, service, defaultMode = 'echo', concurrency = '1', heartbeatMs = '200'] = process.argv.slice(2)

async function handler (task) {
  const mode = typeof task.headers.mode === 'string' ? task.headers.mode : defaultMode
  emit({
    event: 'task',
    id: task.id,
    attempt: task.attempt,
    service: task.service,
    frames: task.frames.map(b64),
    payload: b64(task.payload),
    headers: task.headers,
    timeoutS: task.timeoutS,
    mode
  })
  switch (mode) {
    case 'echo':
      return task.frames
    case 'progress':
      task.progress('half way')
      return task.frames
    case 'throw':
      throw new Error(`boom on attempt ${task.attempt}`)
    case 'fatal':
      throw new NonRetryableError('this can never work')
    case 'later':
      throw new RetryLater(0.3, 'come back later')
    case 'stream':
      return frameByFrame(task)
    case 'stream-emit':
      task.emit(`attempt ${task.attempt}: one`)
      await new Promise((resolve) => setTimeout(resolve, 10))
      if (task.attempt === 1) throw new Error('the first attempt fails after a chunk')
      await task.emit(`attempt ${task.attempt}: two`)
      return 'emitted'
    case 'stream-hold':
      return holdStreaming(task)
    case 'hold':
      emit({ event: 'holding', id: task.id, attempt: task.attempt })
      await new Promise((resolve) => task.signal.addEventListener('abort', resolve, { once: true }))
      emit({ event: 'aborted', id: task.id, attempt: task.attempt })
      throw task.signal.reason
    default:
      throw new NonRetryableError(`unknown mode ${mode}`)
  }
}

async function * frameByFrame (task) {
  for (const frame of task.frames) yield frame
  return `${task.frames.length} chunks`
}

async function * holdStreaming (task) {
  try {
    yield 'first'
    await new Promise((resolve) => task.signal.addEventListener('abort', resolve, { once: true }))
    emit({ event: 'aborted', id: task.id, attempt: task.attempt })
    yield 'never pulled'
  } finally {
    emit({ event: 'closed', id: task.id, attempt: task.attempt })
  }
}

const worker = new Worker({
  endpoint,
  service,
  handler,
  concurrency: Number(concurrency),
  heartbeatIntervalMs: Number(heartbeatMs),
  logger: { warn: (...a) => console.error('[warn]', ...a), error: (...a) => console.error('[error]', ...a) }
})
worker.on('disconnected', () => emit({ event: 'disconnected' }))
process.once('SIGTERM', async () => {
  const clean = await worker.stop({ timeoutMs: 2000 })
  emit({ event: 'stopped', clean })
  process.exit(0)
})
await worker.start()
emit({ event: 'ready', service, concurrency: worker.concurrency })
