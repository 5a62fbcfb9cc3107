//! Moves the bytes of one forwarded connection in both directions.
//!
//! Each direction runs socket → pipe → socket with `splice(2)`, so the
//! payload stays in the kernel: no copy through envd's memory and no
//! buffer of envd's per connection beyond the pipe's. The pipe is empty
//! whenever a direction waits for its source, so `EAGAIN` on the way in
//! means "source not readable" and on the way out "destination full";
//! tokio's readiness is cleared accordingly.
//!
//! Half-close: when one side ends its stream (EOF) and the pipe has
//! drained, the other side's write half is shut down and the opposite
//! direction goes on until it ends too. An error in either direction ends
//! both (a reset peer): the sockets are closed when the relay returns.
//!
//! Across a live upgrade: the relay is listed (its two sockets and two
//! pipes) while it runs, and a new image of envd resumes it on the same
//! fds. Each direction starts by draining what its pipe holds (`FIONREAD`),
//! so bytes the old image had moved into a pipe but not out are delivered
//! first, in order; a direction that had already ended sees its EOF again
//! and shuts down its write half again, which is harmless.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::held::{Forwards, HeldRelay, RelayFds};

/// Bytes moved per splice at most (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

/// Relays between `client` and `server` until both directions have ended
/// or one failed; listed in `forwards` meanwhile.
pub async fn relay(client: TcpStream, server: TcpStream, target: SocketAddr, forwards: &Forwards) -> io::Result<()> {
    let (upstream, downstream) = match (Pipe::new(), Pipe::new()) {
        (Ok(up), Ok(down)) => (up, down),
        // Out of pipes (fd limit): copying through memory still works (such
        // a connection is not handed over: its buffer is envd's memory).
        _ => return copy_through_memory(client, server).await,
    };
    run(Connection { client, server, upstream, downstream }, target, forwards).await
}

/// Goes on with a relay an earlier image of envd handed over.
pub async fn resume(relay: RelayFds, forwards: &Forwards) -> io::Result<()> {
    let [client, server, up_read, up_write, down_read, down_write] = relay.fds;
    let connection = Connection {
        client: stream(client)?,
        server: stream(server)?,
        upstream: Pipe { read: up_read, write: up_write },
        downstream: Pipe { read: down_read, write: down_write },
    };
    run(connection, relay.target, forwards).await
}

fn stream(fd: OwnedFd) -> io::Result<TcpStream> {
    let stream = std::net::TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

/// One relayed connection's fds.
struct Connection {
    client: TcpStream,
    server: TcpStream,
    upstream: Pipe,
    downstream: Pipe,
}

async fn run(connection: Connection, target: SocketAddr, forwards: &Forwards) -> io::Result<()> {
    let Connection { client, server, upstream, downstream } = &connection;
    let held = HeldRelay {
        target,
        client: client.as_raw_fd(),
        server: server.as_raw_fd(),
        upstream: [upstream.read.as_raw_fd(), upstream.write.as_raw_fd()],
        downstream: [downstream.read.as_raw_fd(), downstream.write.as_raw_fd()],
    };
    // Unlisted when this returns, before `connection` (a parameter, dropped
    // after the locals) closes the fds.
    let _listed = forwards.list_relay(held);
    tokio::try_join!(one_way(client, server, upstream), one_way(server, client, downstream))?;
    Ok(())
}

async fn copy_through_memory(mut client: TcpStream, mut server: TcpStream) -> io::Result<()> {
    tokio::io::copy_bidirectional(&mut client, &mut server).await.map(|_| ())
}

/// A non-blocking pipe used as the in-kernel buffer of one direction.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }

    /// Bytes in the pipe now.
    fn buffered(&self) -> io::Result<usize> {
        let mut bytes: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through a pointer valid for the call.
        if unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut bytes) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(bytes).unwrap_or(0))
    }
}

/// Moves `from` → `to` until EOF, then shuts down `to`'s write half; what
/// the pipe already holds goes first.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut pending = pipe.buffered()?;
    loop {
        while pending > 0 {
            pending -=
                to.async_io(Interest::WRITABLE, || splice(pipe.read.as_fd(), to.as_fd(), pending, flags)).await?;
        }
        let filled =
            from.async_io(Interest::READABLE, || splice(from.as_fd(), pipe.write.as_fd(), CHUNK, flags)).await?;
        if filled == 0 {
            return shutdown_write(to);
        }
        pending = filled;
    }
}

fn splice(
    from: std::os::fd::BorrowedFd<'_>,
    to: std::os::fd::BorrowedFd<'_>,
    len: usize,
    flags: SpliceFFlags,
) -> io::Result<usize> {
    nix::fcntl::splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(Shutdown::Write) {
        // The peer is already gone: nothing left to tell it.
        Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}
