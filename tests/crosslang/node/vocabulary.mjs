// Prints, as one JSON object, the Node client's own copies of the protocol's
// vocabulary, for tests/crosslang/test_shared_vocabulary.py to compare with
// zbroker/protocol/ (limits.py, states.py, zbc.py, ext.py).
//
//   node vocabulary.mjs
//
// `protocol`: every export of lib/protocol.js that is a number, a string, a Set or
// an array of strings, or a frozen map of numbers or strings (Sets and arrays as
// arrays, in their order). `errorCodes`: ERROR_CODES of lib/errors.js. `taskErrors`:
// for every state, the class taskError() gives a task that ended in it.

import * as protocol from '../../../clients/node/lib/protocol.js'
import { ERROR_CODES, taskError } from '../../../clients/node/lib/errors.js'

function plain (value) {
  if (typeof value === 'number' || typeof value === 'string') return value
  if (value instanceof Set) return [...value]
  if (Array.isArray(value) && value.every((v) => typeof v === 'string')) return [...value]
  if (value !== null && typeof value === 'object' && Object.isFrozen(value) && !Buffer.isBuffer(value)) {
    const entries = Object.entries(value)
    if (entries.every(([, v]) => typeof v === 'number' || typeof v === 'string')) return Object.fromEntries(entries)
  }
  return undefined
}

const constants = {}
for (const [name, value] of Object.entries(protocol)) {
  const shown = plain(value)
  if (shown !== undefined) constants[name] = shown
}

const taskErrors = {}
for (const state of protocol.TASK_STATES) taskErrors[state] = taskError('t', state, null).constructor.name

process.stdout.write(JSON.stringify({ protocol: constants, errorCodes: { ...ERROR_CODES }, taskErrors }) + '\n')
