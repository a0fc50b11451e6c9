// JSON-lines plumbing shared by the cross-language test scripts: one JSON object per
// line on stdout; commands {cmd, op, ...} read from stdin, answered with {cmd, ok, value}
// or {cmd, ok: false, error}. Bytes travel as base64 strings.

import { createInterface } from 'node:readline'

export const b64 = (bytes) => Buffer.from(bytes).toString('base64')
export const unb64 = (text) => Buffer.from(text, 'base64')

export function emit (message) {
  process.stdout.write(JSON.stringify(message) + '\n')
}

/** The parts of an error a test may check. */
export function describeError (err) {
  return {
    name: err?.constructor?.name ?? typeof err,
    message: String(err?.message ?? err),
    code: err?.code ?? null,
    taskId: err?.taskId ?? null,
    state: err?.state ?? null,
    error: err?.error ?? null
  }
}

/**
 * Run `handlers[op](command)` for every command line on stdin, concurrently (a long
 * wait does not hold up the next command); `onEnd` runs when stdin closes.
 */
export function serveCommands (handlers, onEnd) {
  const lines = createInterface({ input: process.stdin })
  lines.on('line', (line) => {
    if (!line.trim()) return
    const command = JSON.parse(line)
    const handler = handlers[command.op]
    const run = handler ? Promise.resolve().then(() => handler(command)) : Promise.reject(new Error(`unknown op ${command.op}`))
    run.then(
      (value) => emit({ cmd: command.cmd, ok: true, value: value ?? null }),
      (err) => emit({ cmd: command.cmd, ok: false, error: describeError(err) })
    )
  })
  lines.on('close', () => { Promise.resolve(onEnd?.()).then(() => process.exit(0)) })
}
