// Starts the real envd binary and builds e2b JS SDK (2.51.0) handles on it.
//
// How the SDK is pointed at a local envd without the E2B API (read from
// node_modules/e2b/dist/index.mjs):
//
// * `Sandbox.connect(id, { debug: true, sandboxUrl })`: in debug mode
//   (`debug: true` or E2B_DEBUG=true) connect() makes no API call and returns
//   `new Sandbox({ sandboxId: id, envdVersion: '99.99.99', ...config })`.
// * The envd base URL is `ConnectionConfig.getSandboxUrl()`: `sandboxUrl`
//   (option or E2B_SANDBOX_URL) wins; otherwise debug mode gives
//   `http://localhost:49983` (Sandbox.envdPort, hard-coded). Passing
//   `sandboxUrl: http://127.0.0.1:<port>` lets every envd use a free port.
//   The same URL is the base of downloadUrl()/uploadUrl().
// * The access token is the constructor's `envdAccessToken` (sent as
//   `X-Access-Token` on every RPC and /files call, and the key of the
//   client-side URL signatures). connect() in debug mode never sets it, so a
//   handle with a token is built with the constructor, as connect() does
//   after an API call.
// * Every RPC also carries `E2b-Sandbox-Id` and `E2b-Sandbox-Port: 49983`.

import { spawn, execFileSync } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import { Sandbox } from 'e2b'

const here = path.dirname(fileURLToPath(import.meta.url))
export const REPO = path.resolve(here, '..', '..')
export const SANDBOX_ID = 'debug_sandbox_id'
export const ENVD_VERSION = '99.99.99' // what the SDK assumes in debug mode
export const TEST_USER = process.env.ENVD_TEST_USER || 'envdtest'

export function envdBinary() {
  const raw = process.env.ENVD_BIN || 'target/debug/envd'
  return path.isAbsolute(raw) ? raw : path.join(REPO, raw)
}

/** The passwd entry of `name`, or undefined. */
export function passwdEntry(name) {
  for (const line of fs.readFileSync('/etc/passwd', 'utf8').split('\n')) {
    const f = line.split(':')
    if (f[0] === name) return { name, uid: Number(f[2]), gid: Number(f[3]), home: f[5], shell: f[6] }
  }
  return undefined
}

/** The OS user envd runs commands as by default; created when missing. */
export function ensureTestUser(name = TEST_USER) {
  let entry = passwdEntry(name)
  if (entry) return entry
  if (process.getuid() !== 0) throw new Error(`user ${name} is missing and the tests are not root`)
  execFileSync('useradd', ['-m', '-s', '/bin/bash', name], { stdio: 'inherit' })
  entry = passwdEntry(name)
  if (!entry) throw new Error(`useradd did not create ${name}`)
  return entry
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.unref()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Polls `fn` (sync or async) until it returns a truthy value or `timeoutMs` passes. */
export async function eventually(fn, timeoutMs = 10_000, intervalMs = 50) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await fn()
    if (value) return value
    if (Date.now() > deadline) return value
    await sleep(intervalMs)
  }
}

/** True while `pid` exists and is not a zombie (envd runs on this host). */
export function procAlive(pid) {
  let stat
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1')
  } catch {
    return false
  }
  const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0]
  return state !== 'Z' && state !== 'X'
}

/** Live direct children of `pid` with their argv. */
export function childrenOf(pid) {
  const found = []
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'latin1')
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
      if (Number(fields[1]) !== pid || fields[0] === 'Z' || fields[0] === 'X') continue
      const argv = fs.readFileSync(`/proc/${entry}/cmdline`, 'latin1').split('\0').slice(0, -1)
      found.push({ pid: Number(entry), argv })
    } catch {
      // gone meanwhile
    }
  }
  return found
}

/** Pids of live processes whose argv contains `needle` as one argument. */
export function pidsWithArg(needle) {
  const found = []
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const argv = fs.readFileSync(`/proc/${entry}/cmdline`, 'latin1').split('\0')
      if (argv.includes(needle) && procAlive(Number(entry))) found.push(Number(entry))
    } catch {
      // gone meanwhile
    }
  }
  return found
}

const hasSetpriv = (() => {
  try {
    execFileSync('setpriv', ['--help'], { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
})()

const running = new Set()
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL')
})

let logDir
function testLogDir() {
  if (!logDir) {
    logDir = process.env.ENVD_TEST_LOG_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'envd-sdk-js-logs-'))
    fs.mkdirSync(logDir, { recursive: true })
  }
  return logDir
}

/** One envd process on a free loopback port, with its own state dir. */
export class Envd {
  constructor(name = 'envd', { defaultUser = TEST_USER } = {}) {
    this.name = name
    this.defaultUser = defaultUser
    this.binary = envdBinary()
    this.port = 0
    this.child = undefined
    this.starts = 0
    this.stateDir = undefined
    this.logPath = undefined
  }

  get url() {
    return `http://127.0.0.1:${this.port}`
  }

  args() {
    const extra = process.env.ENVD_ARGS !== undefined
      ? process.env.ENVD_ARGS.split(/\s+/).filter(Boolean)
      : ['--state-dir', this.stateDir, '--bind', '127.0.0.1']
    return ['--dev', '--port', String(this.port), '--default-user', this.defaultUser, ...extra]
  }

  async start(timeoutMs = 30_000) {
    if (!fs.existsSync(this.binary)) {
      throw new Error(`envd binary ${this.binary} does not exist; run \`cargo build\` or set ENVD_BIN`)
    }
    let lastError = ''
    for (let attempt = 0; attempt < 3; attempt++) {
      this.starts++
      this.port = await freePort()
      this.stateDir ??= fs.mkdtempSync(path.join(os.tmpdir(), `${this.name}-state-`))
      this.logPath = path.join(testLogDir(), `${this.name}-${process.pid}-${this.starts}.log`)
      const log = fs.openSync(this.logPath, 'w')
      // setpriv --pdeathsig: envd dies with the test process, whatever kills it.
      const [cmd, argv] = hasSetpriv
        ? ['setpriv', ['--pdeathsig', 'KILL', '--', this.binary, ...this.args()]]
        : [this.binary, this.args()]
      const child = spawn(cmd, argv, { stdio: ['ignore', log, log], cwd: '/' })
      fs.closeSync(log)
      this.child = child
      running.add(child)
      let exited = false
      child.on('exit', (code, signal) => {
        exited = true
        lastError = `envd exited (code ${code}, signal ${signal})`
        running.delete(child)
      })
      const deadline = Date.now() + timeoutMs
      while (Date.now() < deadline && !exited) {
        try {
          const res = await fetch(`${this.url}/health`, { signal: AbortSignal.timeout(1000) })
          await res.arrayBuffer()
          if (res.status === 204) return this
          lastError = `GET /health answered ${res.status}, want 204`
        } catch (e) {
          lastError = `GET /health: ${e.cause?.code ?? e.message}`
        }
        await sleep(50)
      }
      await this.stop()
      if (!exited) throw new Error(`envd did not become healthy in ${timeoutMs} ms: ${lastError}\n${this.logTail()}`)
    }
    throw new Error(`envd failed to start: ${lastError}\n${this.logTail()}`)
  }

  async stop() {
    const child = this.child
    this.child = undefined
    if (!child || child.exitCode !== null || child.signalCode !== null) return
    const gone = new Promise((r) => child.once('exit', r))
    child.kill('SIGTERM')
    const t = setTimeout(() => child.kill('SIGKILL'), 10_000)
    await gone
    clearTimeout(t)
  }

  async cleanup() {
    await this.stop()
    if (this.stateDir) fs.rmSync(this.stateDir, { recursive: true, force: true })
    this.stateDir = undefined
  }

  alive() {
    return !!this.child && this.child.exitCode === null && this.child.signalCode === null
  }

  logTail(lines = 60) {
    try {
      return fs.readFileSync(this.logPath, 'utf8').split('\n').slice(-lines).join('\n')
    } catch {
      return '(no log)'
    }
  }

  /** A plain HTTP request to envd; resolves to { status, headers, body (Buffer), text, json() }. */
  async http(method, urlPath, { body, headers } = {}) {
    const res = await fetch(this.url + urlPath, { method, body, headers, signal: AbortSignal.timeout(10_000) })
    const buf = Buffer.from(await res.arrayBuffer())
    return { status: res.status, headers: res.headers, body: buf, text: buf.toString('utf8'), json: () => JSON.parse(buf.toString('utf8')) }
  }

  /** POST /init as the orchestrator does: JSON body, all fields optional. */
  postInit(body = {}, headers = {}) {
    return this.http('POST', '/init', {
      body: JSON.stringify(body),
      headers: { 'Content-Type': 'application/json', ...headers },
    })
  }

  /** An SDK handle on this envd, built the way users do in debug mode. */
  async sandbox(opts = {}) {
    const { token, ...rest } = opts
    if (token === undefined && Object.keys(rest).length === 0) {
      return Sandbox.connect(SANDBOX_ID, { debug: true, sandboxUrl: this.url })
    }
    // What Sandbox.connect() builds after a successful API call.
    return new Sandbox({
      sandboxId: SANDBOX_ID,
      envdVersion: ENVD_VERSION,
      envdAccessToken: token,
      debug: true,
      sandboxUrl: this.url,
      ...rest,
    })
  }
}

/** Starts an envd for a test file; call `cleanup()` in `after`. */
export async function startEnvd(name) {
  if (process.getuid() !== 0) throw new Error('the SDK interop tests run envd as root; run them as root')
  ensureTestUser()
  return new Envd(name).start()
}

/**
 * A body that is still being sent when the server decides: `chunks` pieces of
 * `size` bytes, `gapMs` apart. An early answer (401, 400) must still reach
 * the client (CONTRACT 5.5: the Go server reads and discards an unread
 * body before closing).
 */
export function slowBody(chunks = 4, size = 16 * 1024, gapMs = 50) {
  let sent = 0
  return new ReadableStream({
    async pull(controller) {
      if (sent === chunks) return controller.close()
      if (sent > 0) await sleep(gapMs)
      sent++
      controller.enqueue(new Uint8Array(size).fill(120))
    },
  })
}

/** Reject unless `promise` rejects with an instance of `Klass`; returns the error. */
export async function rejectsWith(promise, Klass, messageRe) {
  let err
  try {
    await promise
  } catch (e) {
    err = e
  }
  if (!err) throw new Error(`expected ${Klass.name}, but the call succeeded`)
  if (!(err instanceof Klass)) {
    const cause = err?.cause ? ` (cause: ${err.cause.code ?? err.cause.message})` : ''
    throw new Error(`expected ${Klass.name}, got ${err?.constructor?.name}: ${err?.message}${cause}`, { cause: err })
  }
  if (messageRe && !messageRe.test(err.message)) {
    throw new Error(`${Klass.name} message ${JSON.stringify(err.message)} does not match ${messageRe}`)
  }
  return err
}
