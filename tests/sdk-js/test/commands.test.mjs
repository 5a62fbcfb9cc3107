// sandbox.commands of the e2b JS SDK 2.51.0 against the real envd
// (CONTRACT.md 3.2-3.9: Start/Connect/List/SendInput/CloseStdin/SendSignal
// through connect-web + undici, JSON codec, HTTP/1.1).

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, before, describe, test } from 'node:test'

import { AuthenticationError, CommandExitError, InvalidArgumentError, NotFoundError, SandboxError, TimeoutError } from 'e2b'

import { TEST_USER, eventually, passwdEntry, pidsWithArg, procAlive, rejectsWith, sleep, startEnvd } from '../harness.mjs'

const marker = () => 'm' + randomBytes(6).toString('hex')

let envd
let sbx

before(async () => {
  envd = await startEnvd('envd-js-commands')
  sbx = await envd.sandbox()
})

after(async () => {
  const alive = envd?.alive()
  const log = envd?.logTail()
  await envd?.cleanup()
  assert.ok(alive, `envd died during the commands tests; log tail:\n${log}`)
})

describe('foreground run', () => {
  test('stdout, stderr and exit code 0', async () => {
    const res = await sbx.commands.run('echo hello; echo oops >&2')
    assert.equal(res.stdout, 'hello\n')
    assert.equal(res.stderr, 'oops\n')
    assert.equal(res.exitCode, 0)
    assert.equal(res.error, undefined)
  })

  test('non-zero exit rejects with CommandExitError carrying the output', async () => {
    const err = await rejectsWith(sbx.commands.run('echo partial; echo bad >&2; exit 7'), CommandExitError)
    assert.equal(err.exitCode, 7)
    assert.equal(err.stdout, 'partial\n')
    assert.equal(err.stderr, 'bad\n')
    assert.equal(err.error, 'exit status 7')
    assert.ok(err instanceof SandboxError)
  })

  for (const code of [1, 42, 255]) {
    test(`exit ${code}`, async () => {
      const err = await rejectsWith(sbx.commands.run(`exit ${code}`), CommandExitError)
      assert.equal(err.exitCode, code)
      assert.equal(err.error, `exit status ${code}`)
    })
  }

  test('missing command exits 127 with the shell message', async () => {
    const name = 'no-such-command-' + marker()
    const err = await rejectsWith(sbx.commands.run(name), CommandExitError)
    assert.equal(err.exitCode, 127)
    assert.match(err.stderr, new RegExp(`${name}.*not found`))
  })

  test('callbacks receive output as it is produced', async () => {
    const out = []
    const err = []
    const started = Date.now()
    let firstAt
    const res = await sbx.commands.run('echo early; echo e1 >&2; sleep 1.5; echo late', {
      onStdout: (d) => {
        firstAt ??= Date.now() - started
        out.push(d)
      },
      onStderr: (d) => err.push(d),
    })
    assert.equal(out.join(''), 'early\nlate\n')
    assert.equal(res.stdout, 'early\nlate\n')
    assert.equal(err.join(''), 'e1\n')
    assert.ok(firstAt < 1200, `first output after ${firstAt} ms: stream not flushed per event`)
  })

  test('multi-line output is exact', async () => {
    const res = await sbx.commands.run('seq 1 50000')
    let want = ''
    for (let i = 1; i <= 50000; i++) want += `${i}\n`
    assert.equal(res.stdout, want)
  })

  test('UTF-8 split across events and invalid bytes', async () => {
    const res = await sbx.commands.run(String.raw`printf '\xe2\x82'; sleep 0.3; printf '\xac\n'; printf 'a\xffb\n' >&2`)
    assert.equal(res.stdout, '\u20ac\n')
    assert.equal(res.stderr, 'a\ufffdb\n')
  })

  test('envs', async () => {
    const res = await sbx.commands.run('echo "$A|$B"', { envs: { A: 'x y', B: '€' } })
    assert.equal(res.stdout, 'x y|€\n')
  })

  test('cwd', async () => {
    const res = await sbx.commands.run('pwd', { cwd: '/tmp' })
    assert.equal(res.stdout, '/tmp\n')
  })

  test('missing cwd is InvalidArgumentError', async () => {
    await rejectsWith(sbx.commands.run('true', { cwd: '/does/not/exist/' + marker() }), InvalidArgumentError, /does not exist/)
  })

  test('default user is the envd default user, with a login environment', async () => {
    const { home } = passwdEntry(TEST_USER)
    const res = await sbx.commands.run('whoami; echo "$HOME"; pwd; echo "$USER $LOGNAME"')
    assert.equal(res.stdout, `${TEST_USER}\n${home}\n${home}\n${TEST_USER} ${TEST_USER}\n`)
  })

  test('user root', async () => {
    const res = await sbx.commands.run('whoami; echo "$HOME"; id -u; pwd', { user: 'root' })
    assert.equal(res.stdout, 'root\n/root\n0\n/root\n')
  })

  test('unknown user is AuthenticationError', async () => {
    await rejectsWith(sbx.commands.run('true', { user: 'nouser' + marker().slice(0, 6) }), AuthenticationError)
  })

  test('timeoutMs kills the command and rejects with TimeoutError', async () => {
    const arg = `30.${Date.now() % 1e9}`
    const started = Date.now()
    const handle = await sbx.commands.run(`exec sleep ${arg}`, { background: true, timeoutMs: 1500 })
    assert.ok(procAlive(handle.pid))
    await rejectsWith(handle.wait(), TimeoutError)
    assert.ok(Date.now() - started < 10_000)
    assert.ok(await eventually(() => !procAlive(handle.pid), 5000), 'process survived its timeout')
  })

  test('foreground timeoutMs', async () => {
    const started = Date.now()
    await rejectsWith(sbx.commands.run('sleep 30', { timeoutMs: 1500 }), TimeoutError)
    assert.ok(Date.now() - started < 10_000)
  })
})

describe('background, connect, list, kill', () => {
  test('list shows the config; a second client connects; kill ends both', async () => {
    const m = marker()
    const cmd = `sleep 0.5; echo ${m}; exec sleep 60`
    const handle = await sbx.commands.run(cmd, { background: true, envs: { M: m }, cwd: '/tmp' })
    assert.ok(handle.pid > 0)
    const info = (await sbx.commands.list()).find((p) => p.pid === handle.pid)
    assert.ok(info, 'background process missing from list()')
    assert.equal(info.cmd, '/bin/bash')
    assert.deepEqual(info.args, ['-l', '-c', cmd])
    assert.deepEqual(info.envs, { M: m })
    assert.equal(info.cwd, '/tmp')
    assert.equal(info.tag, undefined)

    const other = await envd.sandbox()
    const out = []
    const joined = await other.commands.connect(handle.pid, { onStdout: (d) => out.push(d) })
    assert.equal(joined.pid, handle.pid)
    assert.ok(await eventually(() => out.join('') === `${m}\n` && handle.stdout === `${m}\n`, 10_000),
      `connected client got ${JSON.stringify(out.join(''))}, starter got ${JSON.stringify(handle.stdout)}`)

    assert.equal(await other.commands.kill(handle.pid), true)
    for (const h of [handle, joined]) {
      const err = await rejectsWith(h.wait(), CommandExitError)
      assert.equal(err.exitCode, -1)
      assert.equal(err.error, 'signal: killed')
    }
    assert.ok(await eventually(async () => !(await sbx.commands.list()).some((p) => p.pid === handle.pid), 5000))
    assert.equal(await sbx.commands.kill(handle.pid), false)
    assert.equal(await handle.kill(), false)
  })

  test('handle.kill()', async () => {
    const handle = await sbx.commands.run('sleep 60', { background: true })
    assert.equal(await handle.kill(), true)
    const err = await rejectsWith(handle.wait(), CommandExitError)
    assert.equal(err.exitCode, -1)
    assert.ok(await eventually(() => !procAlive(handle.pid), 5000))
  })

  test('disconnect keeps the process running; connect gets only new output', async () => {
    const handle = await sbx.commands.run('echo first; sleep 1.5; echo later', { background: true })
    await eventually(() => handle.stdout === 'first\n', 5000)
    await handle.disconnect()
    await sleep(200)
    assert.ok(procAlive(handle.pid))
    const joined = await sbx.commands.connect(handle.pid)
    const res = await joined.wait()
    assert.equal(res.stdout, 'later\n')
    assert.equal(res.exitCode, 0)
  })

  test('background process that exits on its own', async () => {
    const handle = await sbx.commands.run('sleep 0.3; echo done; exit 2', { background: true })
    const err = await rejectsWith(handle.wait(), CommandExitError)
    assert.equal(err.exitCode, 2)
    assert.equal(err.stdout, 'done\n')
    assert.equal(handle.exitCode, 2)
  })

  test('connect to an unknown pid is NotFoundError', async () => {
    await rejectsWith(sbx.commands.connect(999_999_999), NotFoundError)
  })

  test('kill of an unknown pid is false', async () => {
    assert.equal(await sbx.commands.kill(999_999_999), false)
  })

  test('a grandchild holding stdout keeps the end event back until kill', async () => {
    const arg = `30.${Date.now() % 1e9}`
    const handle = await sbx.commands.run(`sleep ${arg} & echo bg`, { background: true })
    try {
      await sleep(700)
      assert.equal(handle.stdout, 'bg\n')
      assert.equal(handle.exitCode, undefined, 'end event sent while a grandchild holds stdout')
      // bash itself has exited; the signal makes envd stop waiting for EOF and
      // report bash's own status.
      assert.equal(await handle.kill(), true)
      const started = Date.now()
      const res = await handle.wait()
      assert.equal(res.exitCode, 0)
      assert.ok(Date.now() - started < 3000)
    } finally {
      // The grandchild is not envd's to kill (commands get no process group).
      for (const pid of pidsWithArg(arg)) process.kill(pid, 'SIGKILL')
    }
  })
})

// Answers each line "<id> <size>" with "<id>:" and <size> bytes, on one line.
const LINE_ECHO_SERVER = `
import sys
for line in sys.stdin:
    ident, size = line.split()
    sys.stdout.write(ident + ":" + "x" * int(size) + "\\n")
    sys.stdout.flush()
`

describe('reattaching to a long-lived stdio server (E2B issues #1352, #1587)', () => {
  test('a reattached stream delivers every response of any size, round after round', async () => {
    const quoted = `'${LINE_ECHO_SERVER.replaceAll("'", "'\\''")}'`
    const server = await sbx.commands.run(`python3 -c ${quoted}`, { background: true, stdin: true, timeoutMs: 0 })
    try {
      for (let round = 0; round < 20; round++) {
        const received = []
        const joined = await sbx.commands.connect(server.pid, { onStdout: (d) => received.push(d), timeoutMs: 0 })
        let expected = ''
        for (const [i, size] of [8192, 10, 65536, 8000, 70000, 1].entries()) {
          const id = `r${round}-${i}`
          await sbx.commands.sendStdin(server.pid, `${id} ${size}\n`)
          expected += `${id}:${'x'.repeat(size)}\n`
          await eventually(() => received.join('').length >= expected.length, 15_000)
          const got = received.join('')
          assert.ok(got === expected, `round ${round}, response ${i} (${size} bytes): got ${got.length} of ${expected.length} bytes`)
        }
        await joined.disconnect()
      }
    } finally {
      await server.kill()
    }
  })
})

describe('stdin', () => {
  test('sendStdin and closeStdin', async () => {
    const handle = await sbx.commands.run('cat', { background: true, stdin: true })
    await handle.sendStdin('line one\n')
    await sbx.commands.sendStdin(handle.pid, new TextEncoder().encode('line two €\n'))
    await eventually(() => handle.stdout === 'line one\nline two €\n', 5000)
    assert.equal(handle.stdout, 'line one\nline two €\n', 'input not delivered before closeStdin')
    await handle.closeStdin()
    const res = await handle.wait()
    assert.equal(res.exitCode, 0)
    assert.equal(res.stdout, 'line one\nline two €\n')
  })

  test('closeStdin twice is harmless', async () => {
    const handle = await sbx.commands.run('cat; echo eof', { background: true, stdin: true })
    await sbx.commands.closeStdin(handle.pid)
    await sbx.commands.closeStdin(handle.pid).catch(() => {})
    const res = await handle.wait()
    assert.equal(res.stdout, 'eof\n')
  })

  test('without stdin: true the process reads EOF and sendStdin is refused', async () => {
    const handle = await sbx.commands.run('read -t 5 x; echo "rc=$?"; sleep 5', { background: true })
    await eventually(() => handle.stdout !== '', 5000)
    assert.equal(handle.stdout, 'rc=1\n', 'stdin is not /dev/null')
    const err = await rejectsWith(sbx.commands.sendStdin(handle.pid, 'x\n'), SandboxError)
    assert.match(err.message, /^13: /, 'expected the internal code (13)')
    await handle.kill()
    await handle.wait().catch(() => {})
  })

  test('sendStdin to an unknown pid is NotFoundError', async () => {
    await rejectsWith(sbx.commands.sendStdin(999_999_999, 'x'), NotFoundError)
  })

  test('large stdin round trip', async () => {
    const handle = await sbx.commands.run('sha256sum', { background: true, stdin: true })
    const chunk = 'x'.repeat(64 * 1024)
    for (let i = 0; i < 16; i++) await handle.sendStdin(chunk)
    await handle.closeStdin()
    const res = await handle.wait()
    const { createHash } = await import('node:crypto')
    assert.equal(res.stdout.split(' ')[0], createHash('sha256').update(chunk.repeat(16)).digest('hex'))
  })
})
