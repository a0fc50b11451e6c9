// Compiled by `tsc --noEmit` (npm test), never run: typed uses of the public API, so
// that index.d.ts is checked as a caller sees it. Each `@ts-expect-error` is a misuse
// the typings must refuse; tsc fails if one of them is accepted.

import {
  AuthenticationFailed,
  BrokerError,
  type BrokerErrorCode,
  Client,
  Credentials,
  DEFAULT_ENDPOINT,
  type Endpoints,
  type Event,
  Forbidden,
  type Payload,
  Publisher,
  type Receipt,
  type Schedule,
  RetryLater,
  Service,
  Subscriber,
  type Task,
  TaskDead,
  TaskError,
  type TaskState,
  type TaskStatus,
  TaskStream,
  TaskUpstreamFailed,
  TimeoutError,
  unpackResults,
  Worker
} from 'zbroker'

// Exhaustive over TaskState: a state added to or removed from the union breaks this.
const FINAL: Record<TaskState, boolean> = {
  ready: false,
  delayed: false,
  inflight: false,
  done: true,
  dead: true,
  cancelled: true,
  expired: true,
  blocked: false,
  upstream_failed: true
}

export function isFinal (state: TaskState): boolean {
  return FINAL[state]
}

export async function durableTasks (client: Client): Promise<void> {
  const id: string = await client.enqueue('ocr', 'page-1', { priority: 5, ttlS: 60, key: 'k1' })
  const receipt: Receipt = await client.enqueue('ocr', Buffer.from('x'), { receipt: true })
  const existing: boolean = receipt.existing
  const ids: string[] = await client.enqueueMany('ocr', ['a', ['b', 'c']], { keys: ['k2', null] })
  const receipts: Receipt[] = await client.enqueueMany('ocr', ['a'], { receipt: true })
  const one: Buffer = await client.request('ocr', 'page-2', { timeoutMs: 1000 })
  const frames: Buffer[] = await client.result(id, { frames: true })
  const status: TaskStatus = await client.status(id)
  const state: TaskState = status.state
  const when: Date | null = status.finishedAt
  const cancelled = await client.cancel(id)
  const was: TaskState | null = cancelled.was
  const page = await client.deadLetters('ocr', { limit: 10 })
  for await (const letter of client.iterDeadLetters('ocr')) letter.id.toUpperCase()
  const moved: string[] = await client.redrive('ocr', page.tasks.map((t) => t.id))
  await client.redrive('ocr', { timeoutMs: 500 })
  const beat: Schedule = await client.schedule('beat', 'ocr', Buffer.from('x'), { everyS: 30, priority: 2 })
  const nightly = await client.schedule('nightly', 'ocr', undefined, { cron: '0 3 * * *', tz: 'Europe/Paris' })
  const all: Schedule[] = await client.schedules()
  const nextAt: Date = nightly.nextAt
  const removed: boolean = await client.unschedule(beat.name)
  void all
  void nextAt
  void removed
  void [existing, ids, receipts, one, frames, state, when, was, moved]

  // @ts-expect-error a priority is a number
  await client.enqueue('ocr', 'x', { priority: 'high' })
  // @ts-expect-error a batch takes `keys`, not one `key`
  await client.enqueueMany('ocr', ['x'], { key: 'k' })
  // @ts-expect-error 'running' is not a task state
  const wrong: TaskState = 'running'
  void wrong
}

export async function graphs (client: Client): Promise<void> {
  const first: string = await client.enqueue('stt', 'audio', { key: 'rec-42' })
  const second: string = await client.enqueue('llm', [], { dependsOn: [first], input: 'result' })
  const joined: string = await client.enqueue('join', [], {
    dependsOn: [second, { service: 'stt', key: 'rec-42' }],
    runAnyway: true,
    input: 'results'
  })
  const chained: string[] = await client.chain([['stt', 'audio'], ['llm', null], { service: 'tts' }], { maxAttempts: 2, timeoutMs: 500 })
  const fanned: string[] = await client.fanIn([['part', 'a'], { service: 'part', payload: ['b', 'c'] }], ['join', 'header'], { priority: 1 })
  const status: TaskStatus = await client.status(joined)
  const waiting: number = status.blockedOn
  const deps: string[] = status.dependsOn
  const input: 'result' | 'results' | null = status.input
  void [chained, fanned, waiting, deps, input, status.runAnyway]
  // @ts-expect-error input is 'result' or 'results'
  await client.enqueue('join', [], { dependsOn: [first], input: 'all' })
  // @ts-expect-error a dependency named by key needs its service
  await client.enqueue('join', [], { dependsOn: [{ key: 'rec-42' }] })
  // @ts-expect-error chain() sets dependsOn itself
  await client.chain([['stt', 'a']], { dependsOn: [first] })
}

export async function placement (client: Client): Promise<void> {
  const id: string = await client.enqueue('llm', 'prompt', {
    require: ['gpu'],
    prefer: ['model:llama3'],
    affinity: 'conversation:7',
    concurrencyKey: 'user:42'
  })
  const receipt: Receipt = await client.enqueue('index', 'v2', { key: 'file:a', debounceS: 2, receipt: true })
  const replaced: boolean = receipt.replaced === true
  const ids: string[] = await client.enqueueMany('llm', ['a', 'b'], { concurrencyKey: 'user:42', require: null })
  const answer: Buffer = await client.request('llm', 'p', { prefer: ['de'], affinity: null })
  const status: TaskStatus = await client.status(id)
  const required: string[] = status.require
  const key: string | null = status.concurrencyKey
  const limited: { service: string, limit: number | null, perKey: boolean } = await client.limit('llm', 1, { perKey: true })
  await client.limit('llm', null, { timeoutMs: 500 })
  const rated: number | null = (await client.rate('llm', 2.5, { burst: 5, perKey: true })).rate
  await client.rate('llm', null)
  const row = (await client.queues())[0]
  const perS: number | undefined = row.rate?.per_s
  const unplaceable: number = row.unplaceable
  const keyLimit: number | null = row.key_limit
  void [replaced, ids, answer, required, key, limited, rated, perS, unplaceable, keyLimit, status.prefer, status.affinity]
  // @ts-expect-error require is a list of tags
  await client.enqueue('llm', 'p', { require: 'gpu' })
  // @ts-expect-error debounceS is an option of enqueue() alone
  await client.enqueueMany('index', ['a'], { debounceS: 1 })
  // @ts-expect-error debounceS is an option of enqueue() alone
  await client.request('index', 'a', { key: 'k', debounceS: 1 })
  // @ts-expect-error a limit is a number or null
  await client.limit('llm', '1')
  // @ts-expect-error perKey is a boolean
  await client.rate('llm', 1, { perKey: 'yes' })
}

export function taggedWorker (): Worker {
  const w = new Worker({ service: 'llm', handler: () => null, tags: ['gpu'] })
  w.setTags(['gpu', 'model:llama3'])
  w.setTags([])
  const tags: string[] = w.tags
  const sent: number = w.stats.tagsSent
  void [tags, sent]
  new Service('llm').task('llm', () => null, { tags: ['gpu'] }).setTags(['gpu', 'model:x'], { queue: 'llm' }).setTags([])
  // @ts-expect-error tags are an array
  w.setTags('gpu')
  return w
}

export function joiningWorker (): Worker {
  return new Worker({
    service: 'join',
    handler: (task: Task) => {
      const upstream: string[] = task.dependsOn
      const results: Array<Buffer[] | null> = unpackResults(task.frames[task.frames.length - 1])
      return [Buffer.from(upstream.join(',')), ...results.map((r) => r === null ? '' : Buffer.concat(r))]
    }
  })
}

export function upstream (err: unknown): string | null {
  if (err instanceof TaskUpstreamFailed) return err.error
  return null
}

export async function streams (client: Client, signal: AbortSignal): Promise<string> {
  const stream: TaskStream = client.stream('llm', 'prompt', { priority: 1, window: 64, attempts: 'current', signal, waitS: 120 })
  const id: string = await stream.accepted
  let text = ''
  let attempt: number | null = null
  for await (const token of stream) {
    if (stream.attempt !== attempt) {
      attempt = stream.attempt
      text = '' // a new attempt starts over
    }
    text += token.toString()
  }
  const result: Buffer = stream.result
  const frames: Buffer[] = client.stream('llm', 'p', { frames: true }).result
  const resumed = client.readStream(id, { offset: stream.offset, cancelOnAbandon: false })
  const next: IteratorResult<Buffer, undefined> = await resumed.next()
  resumed.close()
  void [result, frames, next, stream.taskId]
  // @ts-expect-error attempts is 'all' or 'current'
  client.stream('llm', 'p', { attempts: 'last' })
  // @ts-expect-error a new task's stream has no offset
  client.stream('llm', 'p', { offset: 3 })
  return text
}

export function streamingHandlers (): Worker[] {
  const generator = new Worker({
    service: 'llm',
    handler: async function * (task: Task) {
      for (const word of task.payload.toString().split(' ')) yield word
      return 'done'
    }
  })
  const sync = new Worker({
    service: 'llm',
    handler: function * () {
      yield Buffer.from('a')
      return ['x', 'y']
    }
  })
  const emitting = new Worker({
    service: 'llm',
    handler: async (task) => {
      await task.emit('token')
      task.emit(new Uint8Array(1))
      return null
    }
  })
  const s = new Service('llm').task('llm', async function * (task) {
    yield { token: 'a' }
    await task.emit(['any', 'msgpack'])
    return { done: true }
  })
  void s
  return [generator, sync, emitting]
}

export function errors (err: unknown): string {
  if (err instanceof AuthenticationFailed) return `${err.endpoint}: ${err.reason}`
  if (err instanceof Forbidden) {
    const code: 'forbidden' = err.code
    return `${code}: ${err.brokerMessage}`
  }
  if (err instanceof TaskDead) return `${err.taskId} ${err.state} ${err.error ?? ''}`
  if (err instanceof TaskError) {
    const state: TaskState = err.state
    return state
  }
  if (err instanceof BrokerError) {
    const code: BrokerErrorCode | string = err.code
    return `${code}: ${err.brokerMessage}`
  }
  if (err instanceof TimeoutError) return err.key ?? err.keys?.join(',') ?? err.taskId ?? String(err.next ?? 0)
  return String(err)
}

export async function worker (): Promise<boolean> {
  const handler = async (task: Task): Promise<Payload> => {
    task.progress('half')
    if (task.attempt > 2) throw new RetryLater(1.5, 'busy')
    return [task.payload, Buffer.from(task.id)]
  }
  const w = new Worker({ endpoint: DEFAULT_ENDPOINT, service: 'ocr', handler, concurrency: 4 })
  await w.start()
  const held: number = w.stats.received - w.stats.handled
  void held
  // @ts-expect-error a worker needs a handler
  void new Worker({ service: 'ocr' })
  return await w.stop({ timeoutMs: 100 })
}

export async function events (): Promise<void> {
  const publisher = new Publisher({ source: 'types-check' })
  const sent: Event<{ n: number }> = await publisher.publish('count', { n: 1 })
  const batch: Array<Event<number>> = await publisher.publishMany('count', [1, 2])
  const subscriber = new Subscriber({ topics: ['count'] })
  const next: Event | null = await subscriber.recv({ timeoutMs: 10 })
  for await (const event of subscriber) event.type.toUpperCase()
  void [sent, batch, next]
  publisher.close({ lingerMs: 10 })
}

export async function authenticated (): Promise<void> {
  const credentials: Credentials = Credentials.load('keys/broker.key', 'keys/ocr.key_secret')
  const fromEnv: Credentials | null = Credentials.fromEnvironment()
  const server: string = credentials.serverKey
  const client = new Client({ credentials })
  void new Client(DEFAULT_ENDPOINT, { credentials: fromEnv })
  const w = new Worker({ service: 'ocr', handler: () => null, credentials })
  w.on('error', (err: unknown) => { if (err instanceof Forbidden) client.close() })
  const why: AuthenticationFailed | Forbidden | null = w.error
  const publisher = new Publisher({ credentials, source: 'ocr' })
  const refused: AuthenticationFailed | null = publisher.error
  const subscriber = new Subscriber({ topics: ['ocr.'], credentials })
  const s = new Service('ocr', { credentials })
  const stopped: AuthenticationFailed | Forbidden | null = s.error
  void [server, why, refused, subscriber, stopped, w.stopped]
  // @ts-expect-error credentials are a Credentials, not a key file path
  void new Client({ credentials: 'keys/ocr.key_secret' })
  // @ts-expect-error the secret key is not a property
  void credentials.secretKey
}

export async function service (): Promise<boolean | null> {
  const s = new Service('ocr', { heartbeatMs: null })
    .task('ocr', (task) => task.payload.length, { concurrency: 2, publish: 'ocr.done' })
    .on('config.', (event) => event.payload)
  await s.waitReady({ timeoutMs: 100 })
  return await s.run({ handleSignals: false })
}

// Several brokers (active/standby): a list, or one comma-separated string.
export function severalBrokers (): void {
  const endpoints: Endpoints = ['tcp://a:5555', 'tcp://b:5555']
  void new Client(endpoints, { timeoutMs: 5000 })
  void new Client({ endpoint: 'tcp://a:5555,tcp://b:5555' })
  void new Publisher(['tcp://a:5556', 'tcp://b:5556'])
  void new Subscriber({ endpoint: ['tcp://a:5557', 'tcp://b:5557'], topics: ['fs.'] })
  void new Service('ocr', { endpoint: endpoints, eventsIn: 'tcp://a:5556,tcp://b:5556' })
  // @ts-expect-error an endpoint is a string or strings
  void new Client([5555])
}
