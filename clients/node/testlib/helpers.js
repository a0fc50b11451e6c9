// Test support shared by the test files: a promise resolved from outside, and
// Workers on a test broker that the file stops in its `after`.

import { Worker } from '../index.js'

/** A promise and the function that resolves it. */
export function deferred () {
  let resolve
  const promise = new Promise((r) => { resolve = r })
  return { promise, resolve }
}

/**
 * A startWorker(service, handler, options?) for a test file: each call starts a
 * quiet Worker (heartbeat every 200 ms) on `endpoint()` (read at each call, as
 * the broker starts in `before`) and adds it to `workers`, for the file to stop.
 */
export function workerStarter (endpoint, workers) {
  return async function startWorker (service, handler, options = {}) {
    const worker = new Worker({ endpoint: endpoint(), service, handler, heartbeatIntervalMs: 200, logger: null, ...options })
    workers.push(worker)
    await worker.start()
    return worker
  }
}
