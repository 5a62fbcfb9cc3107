// sandbox.files of the e2b JS SDK 2.51.0 against the real envd: the HTTP
// /files API (CONTRACT.md 4.6, 4.7: multipart and octet-stream uploads,
// gzip, metadata) and the Filesystem RPCs (3.10-3.12: Stat, ListDir,
// MakeDir, Move, Remove, WatchDir streaming).

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'

import { FileNotFoundError, FileType, FilesystemEventType, InvalidArgumentError, NotFoundError, SandboxError } from 'e2b'

import { TEST_USER, eventually, passwdEntry, rejectsWith, sleep, slowBody, startEnvd } from '../harness.mjs'

let envd
let sbx
let user
let base // a fresh directory per run, owned by the test user

const rid = () => randomBytes(5).toString('hex')

before(async () => {
  envd = await startEnvd('envd-js-files')
  sbx = await envd.sandbox()
  user = passwdEntry(TEST_USER)
  base = path.join('/tmp', `envd-js-files-${rid()}`)
  fs.mkdirSync(base, { mode: 0o755 })
  fs.chownSync(base, user.uid, user.gid)
})

after(async () => {
  const alive = envd?.alive()
  const log = envd?.logTail()
  await envd?.cleanup()
  if (base) fs.rmSync(base, { recursive: true, force: true })
  for (const p of [`${user?.home}/js-rel-${process.pid}.txt`, `/root/js-root-rel-${process.pid}.txt`]) fs.rmSync(p, { force: true })
  assert.ok(alive, `envd died during the files tests; log tail:\n${log}`)
})

const allBytes = () => Uint8Array.from({ length: 256 * 4 }, (_, i) => i % 256)

describe('write and read', () => {
  test('text round trip; the file belongs to the default user', async () => {
    const p = `${base}/hello.txt`
    const info = await sbx.files.write(p, 'hello €\n')
    assert.deepEqual({ name: info.name, type: info.type, path: info.path }, { name: 'hello.txt', type: FileType.FILE, path: p })
    assert.equal(await sbx.files.read(p), 'hello €\n')
    assert.equal(fs.readFileSync(p, 'utf8'), 'hello €\n')
    const st = fs.statSync(p)
    assert.equal(st.uid, user.uid)
    assert.equal(st.gid, user.gid)
  })

  test('overwrite replaces the content', async () => {
    const p = `${base}/over.txt`
    await sbx.files.write(p, 'a much longer first version')
    await sbx.files.write(p, 'short')
    assert.equal(await sbx.files.read(p), 'short')
  })

  test('bytes (Uint8Array, ArrayBuffer, Blob) and every read format', async () => {
    const data = allBytes()
    const p1 = `${base}/bytes.bin`
    await sbx.files.write(p1, data)
    assert.deepEqual(new Uint8Array(await sbx.files.read(p1, { format: 'bytes' })), data)
    const blob = await sbx.files.read(p1, { format: 'blob' })
    assert.ok(blob instanceof Blob)
    assert.deepEqual(new Uint8Array(await blob.arrayBuffer()), data)
    const stream = await sbx.files.read(p1, { format: 'stream' })
    const parts = []
    for await (const chunk of stream) parts.push(chunk)
    assert.deepEqual(new Uint8Array(Buffer.concat(parts)), data)

    const p2 = `${base}/arraybuffer.bin`
    await sbx.files.write(p2, data.buffer.slice(0))
    assert.deepEqual(new Uint8Array(fs.readFileSync(p2)), data)
    const p3 = `${base}/blob.bin`
    await sbx.files.write(p3, new Blob([data]))
    assert.deepEqual(new Uint8Array(fs.readFileSync(p3)), data)
  })

  test('empty file', async () => {
    const p = `${base}/empty.txt`
    await sbx.files.write(p, '')
    assert.equal(fs.statSync(p).size, 0)
    assert.equal(await sbx.files.read(p), '')
    assert.equal((await sbx.files.read(p, { format: 'bytes' })).length, 0)
  })

  test('streamed upload (ReadableStream, octet-stream) and gzip upload/download', async () => {
    const big = randomBytes(3 * 1024 * 1024)
    const p = `${base}/streamed.bin`
    const stream = new ReadableStream({
      start(c) {
        for (let i = 0; i < big.length; i += 256 * 1024) c.enqueue(new Uint8Array(big.subarray(i, i + 256 * 1024)))
        c.close()
      },
    })
    const info = await sbx.files.write(p, stream)
    assert.equal(info.path, p)
    assert.ok(Buffer.from(fs.readFileSync(p)).equals(big))

    const pg = `${base}/gzip.txt`
    const text = 'compress me '.repeat(10000)
    await sbx.files.write(pg, text, { gzip: true })
    assert.equal(fs.readFileSync(pg, 'utf8'), text)
    assert.equal(await sbx.files.read(pg, { gzip: true }), text)

    const po = `${base}/octet.txt`
    await sbx.files.write(po, 'octet body', { useOctetStream: true })
    assert.equal(fs.readFileSync(po, 'utf8'), 'octet body')
  })

  test('many files in one request, parents created', async () => {
    const files = Array.from({ length: 25 }, (_, i) => ({ path: `${base}/many/d${i % 5}/f${i}.txt`, data: `content ${i}` }))
    const infos = await sbx.files.write(files)
    assert.equal(infos.length, files.length)
    assert.deepEqual(infos.map((i) => i.path), files.map((f) => f.path))
    for (const f of files) assert.equal(await sbx.files.read(f.path), f.data)
    const st = fs.statSync(`${base}/many/d0`)
    assert.equal(st.uid, user.uid, 'created parent directory not owned by the user')
    // writeFiles is the same call.
    const more = await sbx.files.writeFiles([{ path: `${base}/many/x.txt`, data: 'x' }, { path: `${base}/many/y.txt`, data: new Uint8Array([121]) }])
    assert.deepEqual(more.map((i) => i.name), ['x.txt', 'y.txt'])
    assert.equal(fs.readFileSync(`${base}/many/y.txt`, 'utf8'), 'y')
  })

  test('metadata round trip', async () => {
    const p = `${base}/meta.txt`
    const info = await sbx.files.write(p, 'm', { metadata: { owner: 'team-a', kind: 'note' } })
    assert.deepEqual(info.metadata, { owner: 'team-a', kind: 'note' })
    assert.deepEqual((await sbx.files.getInfo(p)).metadata, { owner: 'team-a', kind: 'note' })
    // Rewriting without metadata removes it.
    const again = await sbx.files.write(p, 'm2')
    assert.equal(again.metadata, undefined)
    assert.equal((await sbx.files.getInfo(p)).metadata, undefined)
  })

  test('relative paths resolve against the user home; user root', async () => {
    const rel = `js-rel-${process.pid}.txt`
    const info = await sbx.files.write(rel, 'rel')
    assert.equal(info.path, `${user.home}/${rel}`)
    assert.equal(fs.readFileSync(`${user.home}/${rel}`, 'utf8'), 'rel')
    assert.equal(await sbx.files.read(`~/${rel}`), 'rel')

    const rootRel = `js-root-rel-${process.pid}.txt`
    const rinfo = await sbx.files.write(rootRel, 'root', { user: 'root' })
    assert.equal(rinfo.path, `/root/${rootRel}`)
    assert.equal(fs.statSync(`/root/${rootRel}`).uid, 0)
    assert.equal(await sbx.files.read(rootRel, { user: 'root' }), 'root')
  })

  test('read errors: missing → FileNotFoundError, directory → InvalidArgumentError', async () => {
    const err = await rejectsWith(sbx.files.read(`${base}/nope-${rid()}`), FileNotFoundError)
    assert.ok(err instanceof NotFoundError)
    await rejectsWith(sbx.files.read(base), InvalidArgumentError)
  })

  test('write over a directory is refused', async () => {
    fs.mkdirSync(`${base}/adir`, { recursive: true })
    await rejectsWith(sbx.files.write(`${base}/adir`, 'x'), InvalidArgumentError)
    // Streamed: still being sent when envd finds the target is a directory.
    await rejectsWith(sbx.files.write(`${base}/adir`, slowBody()), InvalidArgumentError)
  })
})

describe('filesystem RPCs', () => {
  test('exists', async () => {
    await sbx.files.write(`${base}/exists.txt`, 'x')
    assert.equal(await sbx.files.exists(`${base}/exists.txt`), true)
    assert.equal(await sbx.files.exists(base), true)
    assert.equal(await sbx.files.exists(`${base}/missing-${rid()}`), false)
  })

  test('getInfo of a file, a directory and a symlink', async () => {
    const p = `${base}/info.txt`
    await sbx.files.write(p, '12345')
    fs.chmodSync(p, 0o640)
    const info = await sbx.files.getInfo(p)
    assert.equal(info.name, 'info.txt')
    assert.equal(info.type, FileType.FILE)
    assert.equal(info.path, p)
    assert.equal(info.size, 5)
    assert.equal(info.mode, 0o640)
    assert.equal(info.permissions, '-rw-r-----')
    assert.equal(info.owner, TEST_USER)
    assert.equal(info.group, fs.readFileSync('/etc/group', 'utf8').split('\n').find((l) => l.split(':')[2] === String(user.gid)).split(':')[0])
    assert.ok(info.modifiedTime instanceof Date)
    assert.ok(Math.abs(info.modifiedTime.getTime() - fs.statSync(p).mtimeMs) < 1000)
    assert.equal(info.symlinkTarget, undefined)

    const dir = await sbx.files.getInfo(base)
    assert.equal(dir.type, FileType.DIR)
    assert.equal(dir.permissions, 'drwxr-xr-x')

    const link = `${base}/info-link`
    fs.symlinkSync(p, link)
    const l = await sbx.files.getInfo(link)
    // The Go envd reports a symlink with its target's type (JS 2.51 ignores is_symlink).
    assert.equal(l.type, FileType.FILE)
    assert.equal(l.symlinkTarget, p)
    assert.equal(l.permissions, 'Lrwxrwxrwx')
    assert.equal(l.name, 'info-link')

    await rejectsWith(sbx.files.getInfo(`${base}/missing-${rid()}`), FileNotFoundError)
  })

  test('list with depth', async () => {
    const d = `${base}/tree`
    await sbx.files.write([
      { path: `${d}/b.txt`, data: 'b' },
      { path: `${d}/a.txt`, data: 'a' },
      { path: `${d}/sub/c.txt`, data: 'c' },
      { path: `${d}/sub/deeper/d.txt`, data: 'd' },
    ])
    const one = await sbx.files.list(d)
    assert.deepEqual(one.map((e) => [e.name, e.type, e.path]), [
      ['a.txt', 'file', `${d}/a.txt`],
      ['b.txt', 'file', `${d}/b.txt`],
      ['sub', 'dir', `${d}/sub`],
    ])
    const two = await sbx.files.list(d, { depth: 2 })
    assert.deepEqual(two.map((e) => e.path), [`${d}/a.txt`, `${d}/b.txt`, `${d}/sub`, `${d}/sub/c.txt`, `${d}/sub/deeper`])
    const all = await sbx.files.list(d, { depth: 10 })
    assert.ok(all.some((e) => e.path === `${d}/sub/deeper/d.txt`))
    assert.equal(one[0].size, 1)
    await rejectsWith(sbx.files.list(`${base}/no-such-${rid()}`), FileNotFoundError)
    await rejectsWith(sbx.files.list(`${d}/a.txt`), InvalidArgumentError)
  })

  test('makeDir: true, then false when it exists; parents owned by the user', async () => {
    const d = `${base}/mk/x/y`
    assert.equal(await sbx.files.makeDir(d), true)
    assert.ok(fs.statSync(d).isDirectory())
    assert.equal(fs.statSync(`${base}/mk/x`).uid, user.uid)
    assert.equal(await sbx.files.makeDir(d), false)
    await sbx.files.write(`${base}/mk/file`, 'f')
    await rejectsWith(sbx.files.makeDir(`${base}/mk/file`), InvalidArgumentError)
  })

  test('rename', async () => {
    const a = `${base}/ren-a.txt`
    const b = `${base}/renamed/sub/ren-b.txt`
    await sbx.files.write(a, 'moving')
    const info = await sbx.files.rename(a, b)
    assert.equal(info.path, b)
    assert.equal(info.name, 'ren-b.txt')
    assert.equal(await sbx.files.exists(a), false)
    assert.equal(await sbx.files.read(b), 'moving')
    await rejectsWith(sbx.files.rename(`${base}/missing-${rid()}`, `${base}/x`), FileNotFoundError)
  })

  test('remove a file, a tree, and something missing', async () => {
    await sbx.files.write(`${base}/rm.txt`, 'x')
    await sbx.files.remove(`${base}/rm.txt`)
    assert.equal(fs.existsSync(`${base}/rm.txt`), false)
    await sbx.files.write([{ path: `${base}/rmtree/a/b.txt`, data: 'b' }, { path: `${base}/rmtree/c.txt`, data: 'c' }])
    await sbx.files.remove(`${base}/rmtree`)
    assert.equal(fs.existsSync(`${base}/rmtree`), false)
    await sbx.files.remove(`${base}/never-existed-${rid()}`)
  })
})

describe('watchDir (WatchDir stream)', () => {
  const has = (events, type, name) => events.some((e) => e.type === type && e.name === name)

  test('create, write, chmod, rename, remove events', async () => {
    const d = `${base}/watch-${rid()}`
    fs.mkdirSync(d)
    const events = []
    let exited = false
    const handle = await sbx.files.watchDir(d, (e) => events.push(e), { onExit: () => { exited = true } })
    try {
      // A process in the sandbox creating and writing a file.
      await sbx.commands.run(`printf one > ${d}/new.txt`, { user: 'root' })
      assert.ok(await eventually(() => has(events, FilesystemEventType.CREATE, 'new.txt') && has(events, FilesystemEventType.WRITE, 'new.txt'), 5000),
        `events: ${JSON.stringify(events)}`)
      fs.chmodSync(`${d}/new.txt`, 0o600)
      assert.ok(await eventually(() => has(events, FilesystemEventType.CHMOD, 'new.txt'), 5000), `events: ${JSON.stringify(events)}`)
      await sbx.files.rename(`${d}/new.txt`, `${d}/moved.txt`)
      assert.ok(await eventually(() => has(events, FilesystemEventType.RENAME, 'new.txt') && has(events, FilesystemEventType.CREATE, 'moved.txt'), 5000),
        `events: ${JSON.stringify(events)}`)
      await sbx.files.remove(`${d}/moved.txt`)
      assert.ok(await eventually(() => has(events, FilesystemEventType.REMOVE, 'moved.txt'), 5000), `events: ${JSON.stringify(events)}`)
      assert.ok(events.every((e) => e.entry === undefined), 'entry sent without includeEntry')
    } finally {
      await handle.stop()
    }
    // Nothing arrives after stop().
    const count = events.length
    fs.writeFileSync(`${d}/after-stop.txt`, 'x')
    await sleep(300)
    assert.equal(events.length, count)
    assert.ok(await eventually(() => exited, 3000), 'onExit not called after stop()')
  })

  test('files.write is seen as CREATE and WRITE of that file (the E2B docs example)', async () => {
    // https://e2b.dev/docs/filesystem/watch: watchDir, then files.write, then
    // the callback sees `write` for the file's name. The Go envd opens the
    // destination itself (CONTRACT 4.7 step 6), so inotify reports exactly
    // that, and nothing under any other name.
    const d = `${base}/watch-docs-${rid()}`
    fs.mkdirSync(d)
    const events = []
    const handle = await sbx.files.watchDir(d, (e) => events.push(e))
    try {
      await sbx.files.write(`${d}/my-file`, 'hello')
      await eventually(() => has(events, FilesystemEventType.WRITE, 'my-file'), 3000)
      await sleep(200)
      assert.ok(has(events, FilesystemEventType.CREATE, 'my-file'), `no create for my-file; events: ${JSON.stringify(events)}`)
      assert.ok(has(events, FilesystemEventType.WRITE, 'my-file'), `no write for my-file; events: ${JSON.stringify(events)}`)
      const foreign = events.filter((e) => e.name !== 'my-file')
      assert.deepEqual(foreign, [], 'events for names the user never wrote')
    } finally {
      await handle.stop()
    }
  })

  test('recursive with includeEntry', async () => {
    const d = `${base}/watch-rec-${rid()}`
    fs.mkdirSync(`${d}/sub`, { recursive: true })
    const events = []
    const handle = await sbx.files.watchDir(d, (e) => events.push(e), { recursive: true, includeEntry: true })
    try {
      await sbx.files.makeDir(`${d}/sub/new-dir`)
      await sbx.files.write(`${d}/sub/new-dir/deep.txt`, 'deep')
      assert.ok(await eventually(() => has(events, FilesystemEventType.CREATE, 'sub/new-dir/deep.txt'), 5000), `events: ${JSON.stringify(events)}`)
      const created = events.find((e) => e.type === FilesystemEventType.CREATE && e.name === 'sub/new-dir/deep.txt')
      assert.ok(created.entry, 'no entry with includeEntry')
      assert.equal(created.entry.path, `${d}/sub/new-dir/deep.txt`)
      assert.equal(created.entry.type, FileType.FILE)
      assert.ok(has(events, FilesystemEventType.CREATE, 'sub/new-dir'))
    } finally {
      await handle.stop()
    }
  })

  test('non-recursive watch ignores subdirectories', async () => {
    const d = `${base}/watch-flat-${rid()}`
    fs.mkdirSync(`${d}/sub`, { recursive: true })
    const events = []
    const handle = await sbx.files.watchDir(d, (e) => events.push(e))
    try {
      fs.writeFileSync(`${d}/sub/inner.txt`, 'x')
      fs.writeFileSync(`${d}/top.txt`, 'x')
      assert.ok(await eventually(() => has(events, FilesystemEventType.CREATE, 'top.txt'), 5000), `events: ${JSON.stringify(events)}`)
      await sleep(200)
      assert.ok(!events.some((e) => e.name.includes('inner.txt')), `events: ${JSON.stringify(events)}`)
    } finally {
      await handle.stop()
    }
  })

  test('watch errors: missing → FileNotFoundError, a file → InvalidArgumentError', async () => {
    await rejectsWith(sbx.files.watchDir(`${base}/missing-${rid()}`, () => {}), FileNotFoundError)
    await sbx.files.write(`${base}/watch-file.txt`, 'x')
    await rejectsWith(sbx.files.watchDir(`${base}/watch-file.txt`, () => {}), InvalidArgumentError)
  })

  test('timeoutMs ends the watch and calls onExit', async () => {
    const d = `${base}/watch-timeout-${rid()}`
    fs.mkdirSync(d)
    let exitErr = 'not called'
    await sbx.files.watchDir(d, () => {}, { timeoutMs: 1000, onExit: (e) => { exitErr = e } })
    assert.ok(await eventually(() => exitErr !== 'not called', 10_000), 'onExit not called after timeoutMs')
  })
})

describe('download and upload URLs without a token', () => {
  test('unsigned URLs work with plain HTTP', async () => {
    const p = `${base}/url.txt`
    await sbx.files.write(p, 'via url')
    const down = await sbx.downloadUrl(p)
    const u = new URL(down)
    assert.equal(u.origin, envd.url)
    assert.equal(u.pathname, '/files')
    assert.equal(u.searchParams.get('path'), p)
    assert.equal(u.searchParams.get('signature'), null)
    const res = await fetch(down)
    assert.equal(res.status, 200)
    assert.equal(await res.text(), 'via url')

    const target = `${base}/uploaded-by-url.txt`
    const form = new FormData()
    form.append('file', new Blob(['uploaded']), 'ignored-name.txt')
    const up = await fetch(await sbx.uploadUrl(target), { method: 'POST', body: form })
    assert.equal(up.status, 200, await up.clone().text())
    const body = await up.json()
    assert.equal(body[0].path, target)
    assert.equal(fs.readFileSync(target, 'utf8'), 'uploaded')
  })

  test('signature options are refused client-side without a token', async () => {
    await rejectsWith(sbx.downloadUrl('/x', { useSignatureExpiration: 10 }), InvalidArgumentError)
    assert.ok(SandboxError)
  })
})
