// What a browser user of the e2b JS SDK does, run inside headless Chromium
// on a page of another origin than envd's. Bundled by browser.test.mjs;
// each scenario returns plain data for the test to check.

import { Sandbox } from 'e2b'

const until = async (check, what, timeoutMs = 15_000) => {
  const deadline = Date.now() + timeoutMs
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 25))
  }
}

const connect = ({ envdUrl, token }) =>
  // What Sandbox.connect() builds after its API call, pointed at envd.
  new Sandbox({ sandboxId: 'browser', envdVersion: '99.99.99', envdAccessToken: token, debug: true, sandboxUrl: envdUrl })

async function commands(cfg) {
  const sbx = connect(cfg)
  const fg = await sbx.commands.run('echo hello from $(whoami); echo oops >&2')

  const streamed = []
  const bg = await sbx.commands.run('for i in 1 2 3; do echo line$i; sleep 0.05; done', {
    background: true,
    onStdout: (d) => streamed.push(d),
  })
  const bgResult = await bg.wait()

  const echoed = []
  const cat = await sbx.commands.run('cat', { background: true, stdin: true, onStdout: (d) => echoed.push(d) })
  await sbx.commands.sendStdin(cat.pid, 'typed in the browser\n')
  await until(() => echoed.join('').includes('typed in the browser'), 'stdin echo')
  const sleeper = await sbx.commands.run('sleep 600', { background: true })
  const killed = await sleeper.kill()
  let killError = ''
  try {
    await sleeper.wait()
  } catch (e) {
    killError = `${e.name}: ${e.message}`
  }
  await cat.kill()
  return {
    fg: { stdout: fg.stdout, stderr: fg.stderr, exitCode: fg.exitCode },
    streamed: streamed.join(''),
    bgExit: bgResult.exitCode,
    echoed: echoed.join(''),
    killed,
    killError,
    listedAfterKill: (await sbx.commands.list()).some((p) => p.pid === sleeper.pid),
  }
}

async function terminal(cfg) {
  const sbx = connect(cfg)
  const decoder = new TextDecoder()
  let screen = ''
  const term = await sbx.pty.create({ cols: 100, rows: 30, onData: (d) => (screen += decoder.decode(d)) })
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; echo pty-$((6*7))\n'))
  await until(() => screen.includes('pty-42'), 'terminal output')
  await sbx.pty.resize(term.pid, { cols: 120, rows: 40 })
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size\n'))
  await until(() => screen.includes('40 120'), 'resized terminal')
  const killed = await sbx.pty.kill(term.pid)
  return { screen, killed }
}

async function files(cfg) {
  const sbx = connect(cfg)
  const dir = cfg.dir
  const binary = new Uint8Array(256).map((_, i) => i)
  await sbx.files.write(`${dir}/text.txt`, 'hello, browser ✓')
  await sbx.files.write(`${dir}/binary.bin`, binary.buffer)
  await sbx.files.write(`${dir}/gzipped.txt`, 'x'.repeat(100_000), { gzip: true })
  const text = await sbx.files.read(`${dir}/text.txt`)
  const bytes = await sbx.files.read(`${dir}/binary.bin`, { format: 'bytes' })
  const gzipped = await sbx.files.read(`${dir}/gzipped.txt`, { gzip: true })
  const listed = (await sbx.files.list(dir)).map((e) => e.name).sort()

  const events = []
  const watcher = await sbx.files.watchDir(dir, (e) => events.push(`${e.type}:${e.name}`))
  await sbx.files.write(`${dir}/watched.txt`, 'seen')
  await until(() => events.some((e) => e.endsWith(':watched.txt')), 'a watch event')
  await watcher.stop()

  // Signed URLs, used with plain fetch as a page would.
  const uploadUrl = await sbx.uploadUrl(`${dir}/signed.txt`, { useSignatureExpiration: 60 })
  const form = new FormData()
  form.append('file', new Blob(['uploaded with a signature']), 'signed.txt')
  const uploaded = await fetch(uploadUrl, { method: 'POST', body: form })
  const downloadUrl = await sbx.downloadUrl(`${dir}/signed.txt`, { useSignatureExpiration: 60 })
  const downloaded = await fetch(downloadUrl)
  return {
    text,
    bytes: Array.from(bytes),
    gzippedLength: gzipped.length,
    listed,
    events,
    signedUpload: uploaded.status,
    signedDownload: { status: downloaded.status, body: await downloaded.text() },
  }
}

/** What a page that does not hold the token can get out of envd. */
async function withoutToken({ envdUrl, dir }) {
  const rpc = await fetch(`${envdUrl}/process.Process/List`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: '{}',
  })
  const start = await fetch(`${envdUrl}/process.Process/Start`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'Connect-Protocol-Version': '1' },
    body: JSON.stringify({ process: { cmd: '/bin/cat', args: ['/etc/hostname'] } }),
  })
  const download = await fetch(`${envdUrl}/files?path=${encodeURIComponent(`${dir}/text.txt`)}`)
  const envs = await fetch(`${envdUrl}/envs`)
  let sdkError = ''
  try {
    await connect({ envdUrl, token: 'not-the-token' }).commands.run('true')
  } catch (e) {
    sdkError = e.name
  }
  return {
    rpc: { status: rpc.status, body: await rpc.text() },
    start: { status: start.status, body: await start.text() },
    download: { status: download.status, body: await download.text() },
    envs: envs.status,
    sdkError,
  }
}

window.scenarios = { commands, terminal, files, withoutToken }
window.ready = true
