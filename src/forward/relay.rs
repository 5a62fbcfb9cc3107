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

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice at most (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

/// Relays between `client` and `server` until both directions have ended
/// or one failed.
pub async fn relay(client: TcpStream, server: TcpStream) -> io::Result<()> {
    let (upstream, downstream) = match (Pipe::new(), Pipe::new()) {
        (Ok(up), Ok(down)) => (up, down),
        // Out of pipes (fd limit): copying through memory still works.
        _ => return copy_through_memory(client, server).await,
    };
    tokio::try_join!(one_way(&client, &server, upstream), one_way(&server, &client, downstream))?;
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
}

/// Moves `from` → `to` until EOF, then shuts down `to`'s write half.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: Pipe) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let filled =
            from.async_io(Interest::READABLE, || splice(from.as_fd(), pipe.write.as_fd(), CHUNK, flags)).await?;
        if filled == 0 {
            return shutdown_write(to);
        }
        let mut pending = filled;
        while pending > 0 {
            pending -=
                to.async_io(Interest::WRITABLE, || splice(pipe.read.as_fd(), to.as_fd(), pending, flags)).await?;
        }
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
