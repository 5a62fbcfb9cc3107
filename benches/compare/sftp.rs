//! A minimal SFTP version 3 client (draft-ietf-secsh-filexfer-02) over
//! `ssh -s bench sftp` on the master connection: enough to time one
//! `STAT` or one directory listing (`OPENDIR`, `READDIR` until EOF,
//! `CLOSE`) request by request, which the `sftp` tool cannot report.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use crate::openssh::OpenSsh;

const INIT: u8 = 1;
const VERSION: u8 = 2;
const CLOSE: u8 = 4;
const OPENDIR: u8 = 11;
const READDIR: u8 = 12;
const STAT: u8 = 17;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const NAME: u8 = 104;
const ATTRS: u8 = 105;
const STATUS_EOF: u32 = 1;

pub struct Sftp {
    child: Child,
    input: ChildStdin,
    output: ChildStdout,
    next_id: u32,
}

impl Sftp {
    pub fn open(ssh: &OpenSsh) -> Sftp {
        let mut command = ssh.ssh(&[]);
        // `ssh -s bench sftp`: the subsystem name follows the host.
        command.arg("-s").arg("sftp").stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = command.spawn().expect("ssh -s sftp");
        let input = child.stdin.take().expect("piped");
        let output = child.stdout.take().expect("piped");
        let mut sftp = Sftp { child, input, output, next_id: 1 };
        sftp.send(INIT, &3u32.to_be_bytes());
        let (kind, _) = sftp.receive();
        assert_eq!(kind, VERSION, "SFTP handshake");
        sftp
    }

    /// `STAT path`; panics unless attributes come back.
    pub fn stat(&mut self, path: &str) {
        let id = self.request(STAT, &string(path.as_bytes()));
        let (kind, body) = self.receive();
        assert_eq!((kind, read_u32(&body, 0)), (ATTRS, id), "SFTP STAT {path}");
    }

    /// Lists `path` with every entry's attributes; returns the entry
    /// count, `.` and `..` included as the server sends them.
    pub fn list(&mut self, path: &str) -> usize {
        let id = self.request(OPENDIR, &string(path.as_bytes()));
        let (kind, body) = self.receive();
        assert_eq!((kind, read_u32(&body, 0)), (HANDLE, id), "SFTP OPENDIR {path}");
        let handle = body[4..].to_vec();
        let mut entries = 0;
        loop {
            self.request(READDIR, &handle);
            let (kind, body) = self.receive();
            match kind {
                NAME => entries += read_u32(&body, 4) as usize,
                STATUS if read_u32(&body, 4) == STATUS_EOF => break,
                other => panic!("SFTP READDIR answered {other}"),
            }
        }
        self.request(CLOSE, &handle);
        let (kind, body) = self.receive();
        assert_eq!((kind, read_u32(&body, 4)), (STATUS, 0), "SFTP CLOSE");
        entries
    }

    /// Sends `kind` with a fresh request id before `body`; returns the id.
    fn request(&mut self, kind: u8, body: &[u8]) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(body);
        self.send(kind, &payload);
        id
    }

    fn send(&mut self, kind: u8, payload: &[u8]) {
        let mut packet = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        packet.push(kind);
        packet.extend_from_slice(payload);
        self.input.write_all(&packet).expect("writing to sftp");
    }

    fn receive(&mut self) -> (u8, Vec<u8>) {
        let mut len = [0u8; 4];
        self.output.read_exact(&mut len).expect("reading from sftp");
        let mut packet = vec![0u8; u32::from_be_bytes(len) as usize];
        self.output.read_exact(&mut packet).expect("reading from sftp");
        assert!(!packet.is_empty(), "empty SFTP packet");
        let kind = packet.remove(0);
        (kind, packet)
    }
}

impl Drop for Sftp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn string(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn read_u32(body: &[u8], at: usize) -> u32 {
    body.get(at..at + 4).map_or(u32::MAX, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}
