// sandbox.pty of the e2b JS SDK 2.51.0 against the real envd (CONTRACT.md
// 3.2, 3.5, 3.6, 3.9): `bash -i -l` on a pseudo-terminal, keystrokes in with
// pty.sendInput (SendInput with `pty` bytes), raw terminal output out through
// onData. Typed commands print markers split with '' (`echo rea''dy` prints
// `ready`) so the terminal's echo of the typed line never matches.

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, afterEach, before, describe, test } from 'node:test'

import { CommandExitError, InvalidArgumentError, NotFoundError, SandboxError, TimeoutError } from 'e2b'

import { TEST_USER, childrenOf, eventually, passwdEntry, procAlive, rejectsWith, sleep, startEnvd } from '../harness.mjs'

let envd
let sbx
let counter = 0
const opened = []

const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')

class Terminal {
  constructor(sandbox) {
    this.sandbox = sandbox
    this.buf = Buffer.alloc(0)
    this.waiters = new Set()
    this.result = undefined
    this.error = undefined
    this.done = false
    this.onData = (chunk) => {
      assert.ok(chunk instanceof Uint8Array)
      this.buf = Buffer.concat([this.buf, chunk])
      this.notify()
    }
  }

  notify() {
    for (const w of this.waiters) w()
  }

  attach(handle) {
    this.handle = handle
    this.pid = handle.pid
    this.ended = handle.wait().then(
      (r) => { this.result = r },
      (e) => { this.error = e },
    ).finally(() => {
      this.done = true
      this.notify()
    })
    opened.push(this)
    return this
  }

  async create(opts = {}) {
    return this.attach(await this.sandbox.pty.create({ cols: 80, rows: 24, onData: this.onData, ...opts }))
  }

  async connect(pid, opts = {}) {
    return this.attach(await this.sandbox.pty.connect(pid, { onData: this.onData, ...opts }))
  }

  get output() {
    return this.buf.toString('latin1')
  }

  mark() {
    return this.buf.length
  }

  type(data) {
    return this.sandbox.pty.sendInput(this.pid, typeof data === 'string' ? new TextEncoder().encode(data) : data)
  }

  /** Waits until `re` (applied to the latin1 view of the bytes) matches after offset `since`. */
  async expect(re, since = 0, timeoutMs = 15_000) {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const m = re.exec(this.buf.subarray(since).toString('latin1'))
      if (m) return m
      if (this.done || Date.now() > deadline) {
        throw new Error(`${re} not seen in the terminal output (ended=${this.done}, error=${this.error?.message}); ` +
          `output since mark:\n${JSON.stringify(this.buf.subarray(since).toString('latin1').slice(-1500))}`)
      }
      await new Promise((resolve) => {
        const w = () => { this.waiters.delete(w); clearTimeout(t); resolve() }
        const t = setTimeout(w, 250)
        this.waiters.add(w)
      })
    }
  }

  async waitReady() {
    const mark = this.mark()
    await this.type("echo rea''dy\n")
    await this.expect(/(?<!')ready\r\n/, mark)
  }

  /** Types `command` at the prompt; resolves to what it printed (CRLF → LF), decoded as UTF-8. */
  async run(command, timeoutMs = 15_000) {
    const token = `j${++counter}x${randomBytes(3).toString('hex')}`
    const split = `${token.slice(0, 2)}''${token.slice(2)}`
    const mark = this.mark()
    await this.type(`echo ${split}-b; ${command}; echo ${split}-e\n`)
    const m = await this.expect(new RegExp(`${escapeRe(token)}-b\\r\\n([\\s\\S]*?)${escapeRe(token)}-e\\r\\n`), mark, timeoutMs)
    return Buffer.from(m[1], 'latin1').toString('utf8').replaceAll('\r\n', '\n')
  }

  async waitEnd(timeoutMs = 15_000) {
    let t
    const timeout = new Promise((_, reject) => {
      t = setTimeout(() => reject(new Error(`PTY ${this.pid} did not end; output tail:\n${JSON.stringify(this.output.slice(-1500))}`)), timeoutMs)
    })
    try {
      await Promise.race([this.ended, timeout])
    } finally {
      clearTimeout(t)
    }
  }

  async close() {
    if (!this.handle || this.done) return
    await this.sandbox.pty.kill(this.pid).catch(() => {})
    await this.waitEnd(10_000).catch(() => {})
  }
}

const terminal = (opts) => new Terminal(sbx).create(opts)

before(async () => {
  envd = await startEnvd('envd-js-pty')
  sbx = await envd.sandbox()
})

afterEach(async () => {
  while (opened.length) await opened.pop().close()
})

after(async () => {
  const alive = envd?.alive()
  const log = envd?.logTail()
  await envd?.cleanup()
  assert.ok(alive, `envd died during the pty tests; log tail:\n${log}`)
})

describe('pty.create and sendInput', () => {
  test('an interactive login bash answers typed commands', async () => {
    const term = await terminal()
    assert.ok(term.pid > 0 && procAlive(term.pid))
    await term.waitReady()
    const mark = term.mark()
    await term.type('echo $((6*7))\n')
    // The echo of the typed line, then the answer.
    await term.expect(/echo \$\(\(6\*7\)\)\r\n[\s\S]*?[\r\n]42\r\n/, mark)
    assert.equal(await term.run('echo $$'), `${term.pid}\n`)
    assert.match(await term.run('echo $-'), /i/)
    assert.equal(await term.run("shopt -q login_shell && echo lo''gin-yes"), 'login-yes\n')

    const info = (await sbx.commands.list()).find((p) => p.pid === term.pid)
    assert.ok(info, 'PTY missing from commands.list()')
    assert.equal(info.cmd, '/bin/bash')
    assert.deepEqual(info.args, ['-i', '-l'])
    assert.deepEqual(info.envs, { TERM: 'xterm-256color', LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8' })
  })

  test('tty is a /dev/pts terminal and the shell leads its session', async () => {
    const term = await terminal()
    await term.waitReady()
    assert.match(await term.run('tty'), /^\/dev\/pts\/\d+\n$/)
    assert.equal(await term.run("[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo al''l-tty"), 'all-tty\n')
    assert.equal(await term.run("cut -d' ' -f6 /proc/$$/stat"), `${term.pid}\n`)
  })

  test('stty size is the requested size; resize changes it', async () => {
    const term = await terminal({ cols: 101, rows: 33 })
    await term.waitReady()
    assert.equal(await term.run('stty size'), '33 101\n')
    await sbx.pty.resize(term.pid, { cols: 150, rows: 50 })
    assert.equal(await term.run('stty size'), '50 150\n')
    assert.equal(await term.run('echo $LINES $COLUMNS'), '50 150\n')
  })

  test('resize delivers SIGWINCH to the foreground job', async () => {
    const term = await terminal()
    await term.waitReady()
    let mark = term.mark()
    await term.type("bash -c 'trap \"stty size; echo go''t-winch; exit 0\" WINCH; echo wa''iting; while :; do sleep 0.05; done'\n")
    await term.expect(/(?<!')waiting\r\n/, mark)
    mark = term.mark()
    await sbx.pty.resize(term.pid, { cols: 90, rows: 30 })
    await term.expect(/30 90\r\ngot-winch\r\n/, mark, 5000)
  })

  test('UTF-8 typed and printed', async () => {
    const term = await terminal()
    await term.waitReady()
    assert.equal(await term.run("echo 'héllo €'"), 'héllo €\n')
  })

  test('large output arrives complete', async () => {
    const term = await terminal({ cols: 200, rows: 24 })
    await term.waitReady()
    let want = ''
    for (let i = 1; i <= 20000; i++) want += `${i}\n`
    assert.equal(await term.run('seq 1 20000', 30_000), want)
  })
})

describe('pty.create options', () => {
  test('default user: whoami, $HOME, TERM/LANG/LC_ALL as the SDK sends them', async () => {
    const { home } = passwdEntry(TEST_USER)
    const term = await terminal()
    await term.waitReady()
    assert.equal(await term.run('whoami'), `${TEST_USER}\n`)
    assert.equal(await term.run('echo $HOME; pwd'), `${home}\n${home}\n`)
    assert.equal(await term.run('echo "$TERM|$LANG|$LC_ALL"'), 'xterm-256color|C.UTF-8|C.UTF-8\n')
  })

  test('user root, cwd and envs', async () => {
    const term = await terminal({ user: 'root', cwd: '/tmp', envs: { PTY_VAR: 'a b', TERM: 'vt100' } })
    await term.waitReady()
    assert.equal(await term.run('whoami; pwd; echo $HOME'), 'root\n/tmp\n/root\n')
    assert.equal(await term.run('echo "$PTY_VAR|$TERM|$LANG|$LC_ALL"'), 'a b|vt100|C.UTF-8|C.UTF-8\n')
  })

  test('missing cwd is InvalidArgumentError', async () => {
    await rejectsWith(sbx.pty.create({ cols: 80, rows: 24, onData: () => {}, cwd: '/no/such/dir-' + randomBytes(4).toString('hex') }), InvalidArgumentError)
  })
})

describe('ending a terminal', () => {
  test('kill returns true and wait rejects with a signal death', async () => {
    const term = await terminal()
    await term.waitReady()
    assert.equal(await term.handle.kill(), true)
    await term.waitEnd(10_000)
    assert.ok(term.error instanceof CommandExitError, `got ${term.error}`)
    assert.equal(term.error.exitCode, -1)
    assert.equal(term.error.error, 'signal: killed')
    assert.ok(await eventually(() => !procAlive(term.pid), 5000))
    assert.equal(await sbx.pty.kill(term.pid), false)
  })

  test('pty.kill(pid)', async () => {
    const term = await terminal()
    await term.waitReady()
    assert.equal(await sbx.pty.kill(term.pid), true)
    await term.waitEnd(10_000)
    assert.equal(term.error?.exitCode, -1)
  })

  test('exit 3 reports exit code 3', async () => {
    const term = await terminal()
    await term.waitReady()
    await term.type('exit 3\n')
    await term.waitEnd(10_000)
    assert.ok(term.error instanceof CommandExitError, `got ${term.error}`)
    assert.equal(term.error.exitCode, 3)
    assert.equal(term.error.error, 'exit status 3')
  })

  test('Ctrl-D at an empty prompt ends the shell', async () => {
    const term = await terminal()
    await term.waitReady()
    await sleep(300) // readline is waiting for the next line
    await term.type(new Uint8Array([4]))
    await term.waitEnd(10_000)
    assert.equal(term.error, undefined, `${term.error}`)
    assert.equal(term.result.exitCode, 0)
    assert.match(term.output, /logout/)
  })

  test('Ctrl-C interrupts sleep 100 within a second', async () => {
    const term = await terminal()
    await term.waitReady()
    await term.type('sleep 100\n')
    const sleeper = await eventually(() => childrenOf(term.pid).find((c) => c.argv.join(' ') === 'sleep 100'), 10_000)
    assert.ok(sleeper, 'sleep 100 did not start')
    await sleep(100)
    const started = Date.now()
    await term.type(new Uint8Array([3]))
    assert.ok(await eventually(() => !procAlive(sleeper.pid), 5000), 'Ctrl-C did not stop sleep 100')
    assert.ok(Date.now() - started < 1000, `took ${Date.now() - started} ms`)
    const mark = term.mark()
    await term.type("echo sta''tus-$?\n")
    assert.equal((await term.expect(/status-(\d+)\r\n/, mark))[1], '130')
    assert.equal(term.done, false)
  })

  test('timeoutMs ends the terminal with TimeoutError', async () => {
    const term = await terminal({ timeoutMs: 2000 })
    await term.waitReady()
    await term.waitEnd(15_000)
    assert.ok(term.error instanceof TimeoutError, `got ${term.error}`)
    assert.ok(await eventually(() => !procAlive(term.pid), 5000))
  })
})

describe('a second client', () => {
  test('connect from another handle receives output and sees the end', async () => {
    const first = await terminal()
    await first.waitReady()
    const other = await envd.sandbox()
    const second = await new Terminal(other).connect(first.pid)
    assert.equal(second.pid, first.pid)
    const [m1, m2] = [first.mark(), second.mark()]
    await second.type('echo $((7*6))\n')
    await first.expect(/[\r\n]42\r\n/, m1)
    await second.expect(/[\r\n]42\r\n/, m2)
    assert.equal(await first.run("echo fr''om-first"), 'from-first\n')
    await second.expect(/(?<!')from-first\r\n/, m2)
    await other.pty.resize(first.pid, { cols: 70, rows: 20 })
    assert.equal(await first.run('stty size'), '20 70\n')
    await first.type('exit 5\n')
    await first.waitEnd(10_000)
    await second.waitEnd(10_000)
    for (const t of [first, second]) {
      assert.ok(t.error instanceof CommandExitError, `got ${t.error}`)
      assert.equal(t.error.exitCode, 5)
    }
  })

  test('disconnect keeps the shell; a later connect gets only new output', async () => {
    const first = await terminal()
    await first.waitReady()
    await first.handle.disconnect()
    await sleep(200)
    assert.ok(procAlive(first.pid))
    const again = await new Terminal(sbx).connect(first.pid)
    assert.doesNotMatch(again.output, /ready/)
    assert.equal(await again.run("echo ba''ck"), 'back\n')
  })
})

describe('bad input', () => {
  test('unknown pids', async () => {
    await rejectsWith(sbx.pty.resize(999_999_999, { cols: 80, rows: 24 }), NotFoundError)
    await rejectsWith(sbx.pty.sendInput(999_999_999, new Uint8Array([120])), NotFoundError)
    await rejectsWith(sbx.pty.connect(999_999_999, { onData: () => {} }), NotFoundError)
    assert.equal(await sbx.pty.kill(999_999_999), false)
  })

  test('input after the shell ended is NotFoundError', async () => {
    const term = await terminal()
    await term.waitReady()
    await term.type('exit 0\n')
    await term.waitEnd(10_000)
    assert.equal(term.result?.exitCode, 0)
    await rejectsWith(term.type('echo late\n'), NotFoundError)
  })

  test('resizing a process without a terminal is refused', async () => {
    const handle = await sbx.commands.run('sleep 30', { background: true })
    try {
      const err = await rejectsWith(sbx.pty.resize(handle.pid, { cols: 80, rows: 24 }), SandboxError)
      assert.ok(!(err instanceof NotFoundError))
    } finally {
      await handle.kill()
      await handle.wait().catch(() => {})
    }
  })
})
