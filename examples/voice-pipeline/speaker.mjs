// speaker: serves the `tts` task queue and publishes `speech.done`.
//
// A stand-in for a text-to-speech model: it "speaks" a transcript by writing
// a real, playable WAV file into the outbox, one short beep per letter (the
// pitch follows the letter, spaces are silence). Deterministic, and written
// to a hidden temporary file then renamed into place, so a task that runs
// twice (at-least-once delivery) leaves one complete file, never a torn one.

import { rename, writeFile, mkdir } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Service } from '../../clients/node/index.js'

const env = process.env
const OUTBOX = resolve(env.VOICE_OUTBOX ?? 'outbox')
const WORK_MS = 1000 * Number(env.VOICE_WORK_S ?? '0.3') // the model's thinking time

const svc = new Service('speaker', {
  endpoint: env.ZBROKER_ENDPOINT, // undefined: the defaults of `zbroker start`
  eventsIn: env.ZBROKER_EVENTS_IN,
  eventsOut: env.ZBROKER_EVENTS_OUT
})

svc.task('tts', async (task) => {
  const job = JSON.parse(task.payload.toString()) // {flow, name, text}, from the coordinator
  await sleep(WORK_MS, null, { signal: task.signal }) // aborts if the broker takes the task back
  const wav = synthesize(job.text)
  const output = `${job.name}.wav`
  const partial = join(OUTBOX, `.${output}.${process.pid}.partial`)
  await writeFile(partial, wav)
  await rename(partial, join(OUTBOX, output))
  console.log(`${job.flow} ${task.id} attempt ${task.attempt}: ${output} (${wav.length} bytes)`)
  return { flow: job.flow, name: job.name, output, bytes: wav.length } // result and event
}, { publish: 'speech.done' })

/** 8 kHz, 8-bit mono PCM: 60 ms per character, a tone for letters and digits. */
function synthesize (text) {
  const rate = 8000
  const perChar = 480
  const samples = Buffer.alloc(text.length * perChar, 128) // 128: silence
  for (let i = 0; i < text.length; i++) {
    const ch = text[i].toLowerCase()
    if (!/^[a-z0-9]$/.test(ch)) continue
    const hz = 220 + (ch.charCodeAt(0) % 36) * 20
    for (let s = 0; s < perChar - 80; s++) { // 10 ms of silence between beeps
      samples[i * perChar + s] = 128 + Math.round(60 * Math.sin((2 * Math.PI * hz * s) / rate))
    }
  }
  const header = Buffer.alloc(44)
  header.write('RIFF', 0)
  header.writeUInt32LE(36 + samples.length, 4)
  header.write('WAVEfmt ', 8)
  header.writeUInt32LE(16, 16) // fmt chunk size
  header.writeUInt16LE(1, 20) // PCM
  header.writeUInt16LE(1, 22) // mono
  header.writeUInt32LE(rate, 24)
  header.writeUInt32LE(rate, 28) // bytes per second
  header.writeUInt16LE(1, 32) // block align
  header.writeUInt16LE(8, 34) // bits per sample
  header.write('data', 36)
  header.writeUInt32LE(samples.length, 40)
  return Buffer.concat([header, samples])
}

await mkdir(OUTBOX, { recursive: true })
svc.waitReady().then((ready) => { if (ready) console.log('ready: serving tts') })
await svc.run() // until SIGINT/SIGTERM; a running task finishes first
