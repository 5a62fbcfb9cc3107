// The e2b JS SDK 2.51.0 in a real browser: headless Chromium (Debian's
// package, driven by puppeteer-core) loads a page from another origin than
// envd's, and the SDK on that page runs commands, a terminal, file
// transfers, a directory watch and signed URLs against envd with the access
// token set, across origins (CORS, preflights). A page without the token
// gets nothing.

import assert from 'node:assert/strict'
import fs from 'node:fs'
import http from 'node:http'
import os from 'node:os'
import path from 'node:path'
import { after, before, test } from 'node:test'

import * as esbuild from 'esbuild'
import puppeteer from 'puppeteer-core'

import { TEST_USER, freePort, passwdEntry, startEnvd } from '../harness.mjs'

const TOKEN = 'browser-test-token-5f1c2a'
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'

let envd
let site
let browser
let page
let pageOrigin
let dir

/** The page's script: the SDK and the scenarios, bundled for the browser. */
async function bundle(outDir) {
  await esbuild.build({
    entryPoints: [path.join(import.meta.dirname, '..', 'browser', 'page.mjs')],
    bundle: true,
    platform: 'browser',
    format: 'esm',
    outfile: path.join(outDir, 'page.js'),
    logLevel: 'error',
    plugins: [
      {
        // The SDK imports node:* only for template builds, never used in a
        // page; browser bundlers stub them out the same way.
        name: 'stub-node-builtins',
        setup(build) {
          build.onResolve({ filter: /^node:/ }, (args) => ({ path: args.path, namespace: 'node-stub' }))
          build.onLoad({ filter: /.*/, namespace: 'node-stub' }, () => ({ contents: 'export default {}' }))
        },
      },
    ],
  })
  fs.writeFileSync(path.join(outDir, 'index.html'), '<!doctype html><script type="module" src="page.js"></script>')
}

/** A static file server for the page, on its own origin. */
function serve(root, port) {
  const server = http.createServer((req, res) => {
    const name = req.url === '/' ? 'index.html' : path.basename(req.url)
    const file = path.join(root, name)
    if (!fs.existsSync(file)) return res.writeHead(404).end()
    res.writeHead(200, { 'Content-Type': name.endsWith('.js') ? 'text/javascript' : 'text/html' })
    res.end(fs.readFileSync(file))
  })
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)))
}

before(async () => {
  envd = await startEnvd('envd-js-browser')
  const init = await envd.postInit({ accessToken: TOKEN })
  assert.equal(init.status, 204, init.text)
  const user = passwdEntry(TEST_USER)
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'envd-browser-'))
  fs.chownSync(dir, user.uid, user.gid)
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'envd-browser-site-'))
  await bundle(root)
  const port = await freePort()
  site = await serve(root, port)
  // "localhost" for the page, 127.0.0.1 for envd: two origins.
  pageOrigin = `http://localhost:${port}`
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    userDataDir: fs.mkdtempSync(path.join(os.tmpdir(), 'envd-chromium-')),
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  })
  page = await browser.newPage()
  page.on('pageerror', (e) => console.error('page error:', e.message))
  await page.goto(pageOrigin, { waitUntil: 'load' })
  await page.waitForFunction('window.ready === true', { timeout: 30_000 })
})

after(async () => {
  await browser?.close()
  site?.close()
  const alive = envd?.alive()
  const log = envd?.logTail()
  await envd?.cleanup()
  if (dir) fs.rmSync(dir, { recursive: true, force: true })
  assert.ok(alive, `envd died during the browser tests; log tail:\n${log}`)
})

const run = (scenario, extra = {}) =>
  page.evaluate((name, cfg) => window.scenarios[name](cfg), scenario, { envdUrl: envd.url, token: TOKEN, dir, ...extra })

test('the page is on another origin than envd', () => {
  assert.notEqual(new URL(pageOrigin).origin, new URL(envd.url).origin)
})

test('commands: foreground, streamed background, stdin and kill', async () => {
  const r = await run('commands')
  assert.deepEqual(r.fg, { stdout: `hello from ${TEST_USER}\n`, stderr: 'oops\n', exitCode: 0 })
  assert.equal(r.streamed, 'line1\nline2\nline3\n')
  assert.equal(r.bgExit, 0)
  assert.match(r.echoed, /typed in the browser/)
  assert.equal(r.killed, true)
  assert.match(r.killError, /CommandExitError|signal: killed/)
  assert.equal(r.listedAfterKill, false)
})

test('a terminal: output, resize, kill', async () => {
  const r = await run('terminal')
  assert.match(r.screen, /30 100/)
  assert.match(r.screen, /pty-42/)
  assert.match(r.screen, /40 120/)
  assert.equal(r.killed, true)
})

test('files: text, binary, gzip, listing, a watch and signed URLs', async () => {
  const r = await run('files')
  assert.equal(r.text, 'hello, browser ✓')
  assert.deepEqual(r.bytes, Array.from({ length: 256 }, (_, i) => i))
  assert.equal(r.gzippedLength, 100_000)
  assert.deepEqual(r.listed, ['binary.bin', 'gzipped.txt', 'text.txt'])
  assert.ok(r.events.some((e) => e.endsWith(':watched.txt')), `events: ${r.events}`)
  assert.equal(r.signedUpload, 200)
  assert.deepEqual(r.signedDownload, { status: 200, body: 'uploaded with a signature' })
  assert.equal(fs.readFileSync(path.join(dir, 'signed.txt'), 'utf8'), 'uploaded with a signature')
  assert.equal(fs.statSync(path.join(dir, 'text.txt')).uid, passwdEntry(TEST_USER).uid)
})

test('a page without the token reads nothing', async () => {
  const r = await run('withoutToken')
  for (const [what, reply] of Object.entries({ rpc: r.rpc, start: r.start, download: r.download })) {
    assert.equal(reply.status, 401, `${what}: ${JSON.stringify(reply)}`)
    assert.doesNotMatch(reply.body, /hello, browser|\n[a-z0-9-]+\n/, `${what} leaked content`)
  }
  assert.equal(r.envs, 401)
  assert.equal(r.sdkError, 'AuthenticationError')
})
