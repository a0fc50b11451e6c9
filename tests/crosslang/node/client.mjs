// A Node zbroker Client driven by commands on stdin (see io.mjs).
//
//   node client.mjs ENDPOINT
//
// Ops: enqueue, enqueueMany, request, result, status, cancel, mdp, mmi, queues,
// queuesPage, stream, readStream (a task stream read to its end: {taskId, chunks
// (base64), attempts (of each chunk), offset, result (base64 list)}), streamSome
// (a stream left after `take` chunks: {taskId, chunks}). Payloads come
// as `frames` (base64 list; with `one: true` the single Buffer is passed instead of
// an array); results go back as base64 lists (`frames: true` on the call).

import { Client } from '../../../clients/node/index.js'
import { b64, emit, serveCommands, unb64 } from './io.mjs'

const [endpoint] = process.argv.slice(2)
const client = new Client(endpoint, { timeoutMs: 20_000, mdpTimeoutMs: 3000, retries: 0 })

function payloadOf ({ frames = [], one = false }) {
  const buffers = frames.map(unb64)
  return one ? buffers[0] : buffers
}

// STATUS as JSON: Dates become seconds since the epoch (null stays null).
function plain (value) {
  if (value instanceof Date) return value.getTime() / 1000
  if (Array.isArray(value)) return value.map(plain)
  if (value instanceof Uint8Array) return { b64: b64(value) }
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]))
  }
  return value
}

// A task stream read to its end.
async function drain (stream) {
  const chunks = []
  const attempts = []
  for await (const chunk of stream) {
    chunks.push(b64(chunk))
    attempts.push(stream.attempt)
  }
  return { taskId: stream.taskId, chunks, attempts, offset: stream.offset, result: stream.result.map(b64) }
}

serveCommands({
  enqueue: (c) => client.enqueue(c.service, payloadOf(c), c.options ?? {}),
  enqueueMany: (c) => client.enqueueMany(c.service, c.payloads.map((p) => p.map(unb64)), c.options ?? {}),
  request: async (c) => (await client.request(c.service, payloadOf(c), { ...c.options, frames: true })).map(b64),
  result: async (c) => (await client.result(c.id, { ...c.options, frames: true })).map(b64),
  status: async (c) => plain(await client.status(c.id)),
  cancel: async (c) => client.cancel(c.id),
  mdp: async (c) => (await client.mdpRequestFrames(c.service, payloadOf(c))).map(b64),
  mmi: (c) => client.mmiService(c.service),
  queues: (c) => client.queues(c.options ?? {}),
  queuesPage: (c) => client.queuesPage(c.options ?? {}),
  stream: (c) => drain(client.stream(c.service, payloadOf(c), { ...c.options, frames: true })),
  readStream: (c) => drain(client.readStream(c.id, { ...c.options, frames: true })),
  streamSome: async (c) => {
    const stream = client.stream(c.service, payloadOf(c), c.options ?? {})
    const chunks = []
    for await (const chunk of stream) {
      chunks.push(b64(chunk))
      if (chunks.length >= c.take) break // CLOSE: the task is cancelled (cancelOnAbandon)
    }
    return { taskId: stream.taskId, chunks }
  }
}, () => client.close())
emit({ event: 'ready' })
