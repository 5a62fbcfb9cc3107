// Access token and signed URLs with the e2b JS SDK 2.51.0 (CONTRACT.md 4.5,
// 5.1, 5.5): a token set through POST /init, handles with the right, a wrong
// and no token, and downloadUrl()/uploadUrl(), which the JS SDK signs
// client-side with the token.

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'

import { AuthenticationError, getSignature } from 'e2b'

import { TEST_USER, passwdEntry, rejectsWith, slowBody, startEnvd } from '../harness.mjs'

let envd
let token
let good
let base
let user

before(async () => {
  envd = await startEnvd('envd-js-auth')
  token = randomBytes(32).toString('hex')
  const res = await envd.postInit({ accessToken: token })
  assert.equal(res.status, 204, `POST /init answered ${res.status}: ${res.text}`)
  good = await envd.sandbox({ token })
  user = passwdEntry(TEST_USER)
  base = path.join('/tmp', `envd-js-auth-${randomBytes(5).toString('hex')}`)
  fs.mkdirSync(base, { mode: 0o755 })
  fs.chownSync(base, user.uid, user.gid)
})

after(async () => {
  const alive = envd?.alive()
  const log = envd?.logTail()
  await envd?.cleanup()
  if (base) fs.rmSync(base, { recursive: true, force: true })
  assert.ok(alive, `envd died during the auth tests; log tail:\n${log}`)
})

describe('the token from /init', () => {
  test('a handle with the token can use every API', async () => {
    const res = await good.commands.run('echo ok')
    assert.equal(res.stdout, 'ok\n')
    await good.files.write(`${base}/t.txt`, 'secret')
    assert.equal(await good.files.read(`${base}/t.txt`), 'secret')
    assert.equal(await good.files.exists(`${base}/t.txt`), true)
    assert.ok((await good.files.list(base)).some((e) => e.name === 't.txt'))
    const data = []
    const pty = await good.pty.create({ cols: 80, rows: 24, onData: (d) => data.push(d) })
    assert.equal(await good.pty.kill(pty.pid), true)
    await pty.wait().catch(() => {})
    const watch = await good.files.watchDir(base, () => {})
    await watch.stop()
    assert.equal(await good.isRunning(), true)
  })

  for (const [label, makeHandle] of [
    ['no token', () => envd.sandbox()],
    ['a wrong token', () => envd.sandbox({ token: randomBytes(32).toString('hex') })],
  ]) {
    test(`${label}: every call is AuthenticationError`, async () => {
      const bad = await makeHandle()
      const calls = {
        'commands.run (Start stream)': () => bad.commands.run('echo nope'),
        'commands.list (unary)': () => bad.commands.list(),
        'commands.kill': () => bad.commands.kill(1),
        'pty.create': () => bad.pty.create({ cols: 80, rows: 24, onData: () => {} }),
        'files.read (GET /files)': () => bad.files.read(`${base}/t.txt`),
        'files.write (POST /files, multipart)': () => bad.files.write(`${base}/denied.txt`, 'x'),
        // Streamed: the client is still sending when the 401 is decided.
        'files.write (POST /files, streamed)': () => bad.files.write(`${base}/denied.txt`, slowBody()),
        'files.list': () => bad.files.list(base),
        'files.exists': () => bad.files.exists(`${base}/t.txt`),
        'files.getInfo': () => bad.files.getInfo(base),
        'files.makeDir': () => bad.files.makeDir(`${base}/denied-dir`),
        'files.remove': () => bad.files.remove(`${base}/t.txt`),
        'files.watchDir (WatchDir stream)': () => bad.files.watchDir(base, () => {}),
      }
      const failures = []
      for (const [name, call] of Object.entries(calls)) {
        try {
          await rejectsWith(call(), AuthenticationError)
        } catch (e) {
          failures.push(`${name}: ${e.message}`)
        }
      }
      assert.deepEqual(failures, [])
      assert.equal(fs.existsSync(`${base}/denied.txt`), false)
      assert.equal(fs.existsSync(`${base}/denied-dir`), false)
      assert.equal(fs.readFileSync(`${base}/t.txt`, 'utf8'), 'secret')
      // /health needs no token.
      assert.equal(await bad.isRunning(), true)
    })
  }
})

describe('signed URLs', () => {
  test('the SDK signs with the contract formula (test vectors)', async () => {
    const t = '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'
    const a = await getSignature({ path: '/home/user/hello.txt', operation: 'read', user: undefined, envdAccessToken: t })
    assert.equal(a.signature, 'v1_Q1oODJQwZxJOp+Cv9RJhuccjbZgB7bld8m4C4Z73S4w')
    assert.equal(a.expiration, null)
  })

  test('downloadUrl: signed, readable without the header; tampering is refused', async () => {
    const p = `${base}/down.txt`
    await good.files.write(p, 'download me')
    const url = new URL(await good.downloadUrl(p))
    assert.equal(url.origin, envd.url)
    assert.equal(url.searchParams.get('path'), p)
    assert.match(url.searchParams.get('signature'), /^v1_[A-Za-z0-9+/]+$/)
    assert.equal(url.searchParams.get('signature_expiration'), null)
    let res = await fetch(url)
    assert.equal(res.status, 200)
    assert.equal(await res.text(), 'download me')

    const tampered = new URL(url)
    tampered.searchParams.set('path', `${base}/t.txt`)
    res = await fetch(tampered)
    assert.equal(res.status, 401, 'a signature for another path was accepted')
    await res.arrayBuffer()

    const unsigned = new URL(url)
    unsigned.searchParams.delete('signature')
    res = await fetch(unsigned)
    assert.equal(res.status, 401, 'an unsigned URL was accepted')
    await res.arrayBuffer()
  })

  test('downloadUrl with an expiration; an expired one is refused', async () => {
    const p = `${base}/exp.txt`
    await good.files.write(p, 'expiring')
    const url = new URL(await good.downloadUrl(p, { useSignatureExpiration: 60 }))
    const exp = Number(url.searchParams.get('signature_expiration'))
    assert.ok(Math.abs(exp - (Date.now() / 1000 + 60)) < 5)
    let res = await fetch(url)
    assert.equal(res.status, 200)
    assert.equal(await res.text(), 'expiring')

    const expired = await good.downloadUrl(p, { useSignatureExpiration: -10 })
    res = await fetch(expired)
    assert.equal(res.status, 401)
    assert.match(await res.text(), /expired/)
  })

  test('downloadUrl for another user', async () => {
    const name = `js-auth-${process.pid}.txt`
    fs.writeFileSync(`/root/${name}`, 'root file')
    try {
      const url = new URL(await good.downloadUrl(name, { user: 'root' }))
      assert.equal(url.searchParams.get('username'), 'root')
      const res = await fetch(url)
      assert.equal(res.status, 200)
      assert.equal(await res.text(), 'root file')
    } finally {
      fs.rmSync(`/root/${name}`, { force: true })
    }
  })

  test('uploadUrl: signed multipart upload, owned by the user of the URL', async () => {
    const target = `${base}/up.txt`
    const form = new FormData()
    form.append('file', new Blob(['uploaded via signed url']), 'up.txt')
    const res = await fetch(await good.uploadUrl(target), { method: 'POST', body: form })
    assert.equal(res.status, 200, await res.clone().text())
    assert.equal((await res.json())[0].path, target)
    assert.equal(fs.readFileSync(target, 'utf8'), 'uploaded via signed url')
    assert.equal(fs.statSync(target).uid, user.uid)

    const rootTarget = `${base}/up-root.txt`
    const form2 = new FormData()
    form2.append('file', new Blob(['as root']), 'up-root.txt')
    const res2 = await fetch(await good.uploadUrl(rootTarget, { user: 'root', useSignatureExpiration: 30 }), { method: 'POST', body: form2 })
    assert.equal(res2.status, 200, await res2.clone().text())
    await res2.arrayBuffer()
    assert.equal(fs.statSync(rootTarget).uid, 0)
  })

  test('a read signature does not authorise a write', async () => {
    const target = `${base}/not-written.txt`
    const readUrl = await good.downloadUrl(target)
    // Still sending when the 401 is decided.
    const res = await fetch(readUrl, { method: 'POST', body: slowBody(), duplex: 'half', headers: { 'Content-Type': 'application/octet-stream' } })
    assert.equal(res.status, 401)
    await res.arrayBuffer()
    assert.equal(fs.existsSync(target), false)
  })
})
