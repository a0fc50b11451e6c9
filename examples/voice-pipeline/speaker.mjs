// speaker: serves the `tts` task queue and publishes `speech.done`; serves the
// `reply-tts` queue, speaking the LLM's answer as it streams, and publishes `reply.done`.
//
// A stand-in for a text-to-speech model: it "speaks" a transcript by writing
// a real, playable WAV file into the outbox, one short beep per letter (the
// pitch follows the letter, spaces are silence). Deterministic, and written
// to a hidden temporary file then renamed into place, so a task that runs
// twice (at-least-once delivery) leaves one complete file, never a torn one.
//
// A `tts` task depends on the flow's `stt` task (docs/protocol.md §15): its payload
// is its job, {flow, name}, then the transcript, the stt task's result, which the
// broker appends once that task is done (`input: 'result'`). The transcriber's
// Python Service packed that result with msgpack: it is read with the msgpack
// package the Node client depends on.
//
// A `reply-tts` task names an `llm` task. The speaker reads that task's stream
// (client.readStream) while the LLM produces it and turns each token into beeps
// at once, appending them to a hidden file: the first audio comes with the
// first token, not after the whole answer. When the stream ends, the WAV
// header gets its sizes and the file is renamed to `<name>.reply.wav`.
//
// An interruption cancels the `reply-tts` task (the coordinator does that).
// The handler's `task.signal` aborts, which is the stream's `signal` too: the
// stream is closed at once and the speaker stops. It then cancels the LLM task
// itself, so the LLM stops generating, and drops the partial audio. It does
// not read with `cancelOnAbandon`, on purpose: that would also cancel the LLM
// when the speaker is merely killed or restarted, and the reply would be lost,
// whereas the `reply-tts` task's next attempt can read the stream again from
// its first token.

import { mkdir, open, rename, unlink, writeFile } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Client, NonRetryableError, Service, TaskError } from '../../clients/node/index.js'

// @msgpack/msgpack, from the Node client's own dependencies (this example has none).
const { decode } = createRequire(new URL('../../clients/node/package.json', import.meta.url))('@msgpack/msgpack')

const env = process.env
const OUTBOX = resolve(env.VOICE_OUTBOX ?? 'outbox')
const WORK_MS = 1000 * Number(env.VOICE_WORK_S ?? '0.3') // the model's thinking time

const svc = new Service('speaker', {
  endpoint: env.ZBROKER_ENDPOINT, // undefined: the defaults of `zbroker start`
  eventsIn: env.ZBROKER_EVENTS_IN,
  eventsOut: env.ZBROKER_EVENTS_OUT
})
const client = new Client({ endpoint: env.ZBROKER_ENDPOINT }) // reads the LLM's streams

svc.task('tts', async (task) => {
  const [jobFrame, transcriptFrame] = task.frames
  const job = JSON.parse(jobFrame.toString()) // {flow, name}, from the coordinator
  const { text } = decode(transcriptFrame) // {flow, name, text}, the stt task's result
  await sleep(WORK_MS, null, { signal: task.signal }) // aborts if the broker takes the task back
  const wav = synthesize(text)
  const output = `${job.name}.wav`
  const partial = join(OUTBOX, `.${output}.${process.pid}.partial`)
  await writeFile(partial, wav)
  await rename(partial, join(OUTBOX, output))
  console.log(`${job.flow} ${task.id} attempt ${task.attempt}: ${output} (${wav.length} bytes)`)
  return { flow: job.flow, name: job.name, output, bytes: wav.length } // result and event
}, { publish: 'speech.done' })

svc.task('reply-tts', async (task) => {
  const job = JSON.parse(task.payload.toString()) // {flow, name, llm_task}, from the coordinator
  const where = `${job.flow} ${task.id} attempt ${task.attempt}`
  const started = performance.now()
  const output = `${job.name}.reply.wav`
  const partial = join(OUTBOX, `.${output}.${process.pid}.partial`)
  const file = await open(partial, 'w')
  let text = ''
  let tokens = 0
  let audioBytes = 0
  let llmAttempt = null
  let firstAudioMs = null
  let finished = false
  try {
    await file.write(wavHeader(0), 0, HEADER_BYTES, 0) // the sizes are filled in at the end
    // Every token as the LLM produces it (and those it produced already, if it began
    // first). task.signal aborts when the reply is interrupted: the stream then closes.
    // attempts: 'current' skips what an LLM attempt that failed had streamed.
    const stream = client.readStream(job.llm_task, {
      signal: task.signal,
      attempts: 'current',
      timeoutMs: Infinity // no idle limit: the LLM task may wait in its queue
    })
    for await (const chunk of stream) {
      if (stream.attempt !== llmAttempt) {
        if (llmAttempt !== null) { // the LLM task runs again while we read: its answer starts over
          console.log(`${where}: the LLM started again (attempt ${stream.attempt}): so does the audio`)
          await file.truncate(HEADER_BYTES)
          text = ''
          tokens = 0
          audioBytes = 0
        }
        llmAttempt = stream.attempt
      }
      const token = chunk.toString()
      const audio = beeps(token)
      await file.write(audio, 0, audio.length, HEADER_BYTES + audioBytes)
      audioBytes += audio.length
      text += token
      tokens++
      if (firstAudioMs === null) {
        firstAudioMs = Math.round(performance.now() - started)
        console.log(`${where}: first audio after ${firstAudioMs} ms (${JSON.stringify(token.trim())}), ${job.name}`)
      }
    }
    await file.write(wavHeader(audioBytes), 0, HEADER_BYTES, 0)
    await file.close()
    await rename(partial, join(OUTBOX, output))
    finished = true
    const bytes = HEADER_BYTES + audioBytes
    console.log(`${where}: ${output} (${tokens} tokens, ${bytes} bytes)`)
    return { flow: job.flow, name: job.name, output, bytes, tokens, first_audio_ms: firstAudioMs, text }
  } catch (err) {
    if (!task.signal.aborted) {
      if (err instanceof TaskError) { // the LLM task ended without an answer: no retry helps
        throw new NonRetryableError(err.message)
      }
      throw err
    }
    // The attempt was taken from us. By an interruption (this task was cancelled),
    // or for a retry (the broker thought us gone, or we are stopping too slowly)?
    const audioS = (audioBytes / RATE).toFixed(1)
    const { state } = await client.status(task.id)
    if (state !== 'cancelled') {
      console.log(`${where}: taken back after ${tokens} tokens: the next attempt starts over`)
      throw err
    }
    let llm = 'cancelled'
    try {
      await client.cancel(job.llm_task) // the LLM's worker sees its task cancelled at once
    } catch (cancelError) {
      if (cancelError.code !== 'conflict') throw cancelError
      llm = `already ${(await client.status(job.llm_task)).state}` // it had finished
    }
    console.log(`${where}: interrupted after ${tokens} tokens (${audioS} s of audio): ` +
      `stopped reading the stream, LLM task ${job.llm_task} ${llm}, no ${output}`)
    throw err
  } finally {
    if (!finished) {
      await file.close().catch(() => {})
      await unlink(partial).catch(() => {})
    }
  }
}, { concurrency: 8, publish: 'reply.done' })

const RATE = 8000 // 8 kHz, 8-bit mono PCM
const HEADER_BYTES = 44

/** A whole WAV file of beeps for a text. */
function synthesize (text) {
  const samples = beeps(text)
  return Buffer.concat([wavHeader(samples.length), samples])
}

/** 60 ms per character, a tone for letters and digits, silence for the rest. */
function beeps (text) {
  const perChar = 480
  const samples = Buffer.alloc(text.length * perChar, 128) // 128: silence
  for (let i = 0; i < text.length; i++) {
    const ch = text[i].toLowerCase()
    if (!/^[a-z0-9]$/.test(ch)) continue
    const hz = 220 + (ch.charCodeAt(0) % 36) * 20
    for (let s = 0; s < perChar - 80; s++) { // 10 ms of silence between beeps
      samples[i * perChar + s] = 128 + Math.round(60 * Math.sin((2 * Math.PI * hz * s) / RATE))
    }
  }
  return samples
}

function wavHeader (dataBytes) {
  const header = Buffer.alloc(HEADER_BYTES)
  header.write('RIFF', 0)
  header.writeUInt32LE(36 + dataBytes, 4)
  header.write('WAVEfmt ', 8)
  header.writeUInt32LE(16, 16) // fmt chunk size
  header.writeUInt16LE(1, 20) // PCM
  header.writeUInt16LE(1, 22) // mono
  header.writeUInt32LE(RATE, 24)
  header.writeUInt32LE(RATE, 28) // bytes per second
  header.writeUInt16LE(1, 32) // block align
  header.writeUInt16LE(8, 34) // bits per sample
  header.write('data', 36)
  header.writeUInt32LE(dataBytes, 40)
  return header
}

await mkdir(OUTBOX, { recursive: true })
svc.waitReady().then((ready) => { if (ready) console.log('ready: serving tts and reply-tts') })
await svc.run() // until SIGINT/SIGTERM; a running task finishes first
client.close()
