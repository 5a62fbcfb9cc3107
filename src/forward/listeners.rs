//! The TCP listeners of this network namespace, from the kernel's socket
//! diagnostics (netlink `NETLINK_SOCK_DIAG`): one dump per address family,
//! filtered to the LISTEN state by the kernel, so a scan costs two small
//! round trips however many connections the sandbox has open. A kernel
//! without the TCP diagnostics module (`inet_diag`/`tcp_diag`, often left
//! out of minimal guest kernels) answers ENOENT; then `/proc/net/tcp` and
//! `/proc/net/tcp6` are read instead, which lists every connection as text.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use socket2::{Domain, Protocol, Socket, Type};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `TCP_LISTEN` (include/net/tcp_states.h).
const TCP_LISTEN: u32 = 10;
/// Size of `struct nlmsghdr`.
const NLMSG_HEADER: usize = 16;
/// Size of `struct inet_diag_req_v2`.
const REQUEST_BODY: usize = 56;
/// Size of `struct inet_diag_msg`, the part of each answer read here.
const ANSWER_BODY: usize = 72;
/// Receive buffer: the kernel fills it with as many answers as fit.
const RECV_BUFFER: usize = 32 * 1024;

/// A listening TCP socket: its local address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listener {
    /// The bound address (`0.0.0.0` / `::` for a wildcard).
    pub addr: IpAddr,
    /// The port.
    pub port: u16,
}

/// Why the listeners could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The netlink socket or its exchange failed.
    #[error("socket diagnostics: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel answered with an error.
    #[error("socket diagnostics: the kernel answered error {0}")]
    Kernel(i32),
    /// The answer does not have the expected layout.
    #[error("socket diagnostics: malformed answer")]
    Malformed,
}

/// Where the listeners are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Netlink socket diagnostics.
    SockDiag,
    /// `/proc/net/tcp` and `/proc/net/tcp6`.
    ProcNet,
}

/// Every TCP listener of the namespace, IPv4 and IPv6, from `source`.
pub fn tcp_listeners(source: Source) -> Result<Vec<Listener>, ScanError> {
    match source {
        Source::SockDiag => sock_diag_listeners(),
        Source::ProcNet => proc_net_listeners(),
    }
}

/// Listeners from `/proc/net/tcp{,6}`; a missing tcp6 (no IPv6) is empty.
fn proc_net_listeners() -> Result<Vec<Listener>, ScanError> {
    let mut listeners = parse_proc_net(&std::fs::read_to_string("/proc/net/tcp")?);
    match std::fs::read_to_string("/proc/net/tcp6") {
        Ok(table) => listeners.extend(parse_proc_net(&table)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err.into()),
    }
    Ok(listeners)
}

/// The LISTEN rows of one table: `sl local_address rem_address st ...`,
/// addresses as hex words of the in-memory (network order) bytes, the
/// port in host order, state `0A` for LISTEN.
fn parse_proc_net(table: &str) -> Vec<Listener> {
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let mut columns = row.split_whitespace().skip(1);
            let (local, _remote, state) = (columns.next()?, columns.next()?, columns.next()?);
            if u32::from_str_radix(state, 16).ok()? != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let mut bytes = Vec::with_capacity(16);
            for word in addr.as_bytes().chunks(8) {
                let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
                bytes.extend_from_slice(&word.to_ne_bytes());
            }
            let addr = match bytes.len() {
                4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
                16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)).to_canonical(),
                _ => return None,
            };
            Some(Listener { addr, port })
        })
        .collect()
}

/// Listeners from netlink socket diagnostics.
fn sock_diag_listeners() -> Result<Vec<Listener>, ScanError> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM.cloexec(),
        Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    let mut listeners = Vec::new();
    for (sequence, family) in [(1, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        // An unbound netlink socket sends to the kernel (port id 0).
        socket.send(&dump_request(family, sequence))?;
        read_dump(&socket, &mut listeners)?;
    }
    Ok(listeners)
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for every TCP socket of `family`
/// in LISTEN.
fn dump_request(family: u8, sequence: u32) -> Vec<u8> {
    let length = (NLMSG_HEADER + REQUEST_BODY) as u32;
    let mut request = Vec::with_capacity(length as usize);
    request.extend_from_slice(&length.to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    request.extend_from_slice(&sequence.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // The socket id (ports, addresses, interface, cookie): zero matches all.
    request.resize(length as usize, 0);
    request
}

/// Reads answers until the dump's `NLMSG_DONE`.
fn read_dump(mut socket: &Socket, listeners: &mut Vec<Listener>) -> Result<(), ScanError> {
    let mut buffer = vec![0u8; RECV_BUFFER];
    loop {
        let received = socket.read(&mut buffer)?;
        if received == 0 {
            return Err(ScanError::Malformed);
        }
        if parse_answers(&buffer[..received], listeners)? {
            return Ok(());
        }
    }
}

/// Parses one datagram of answers; true once the dump is complete.
fn parse_answers(mut datagram: &[u8], listeners: &mut Vec<Listener>) -> Result<bool, ScanError> {
    while datagram.len() >= NLMSG_HEADER {
        let length = u32::from_ne_bytes(field(datagram, 0)?) as usize;
        let kind = u16::from_ne_bytes(field(datagram, 4)?);
        if length < NLMSG_HEADER || length > datagram.len() {
            return Err(ScanError::Malformed);
        }
        let body = &datagram[NLMSG_HEADER..length];
        match i32::from(kind) {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let code = i32::from_ne_bytes(field(body, 0)?);
                return Err(ScanError::Kernel(-code));
            }
            _ if kind == SOCK_DIAG_BY_FAMILY => {
                if let Some(listener) = parse_listener(body)? {
                    listeners.push(listener);
                }
            }
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        let next = length.div_ceil(4) * 4;
        datagram = datagram.get(next..).unwrap_or_default();
    }
    Ok(false)
}

/// The local address of one `inet_diag_msg`.
fn parse_listener(body: &[u8]) -> Result<Option<Listener>, ScanError> {
    if body.len() < ANSWER_BODY {
        return Err(ScanError::Malformed);
    }
    let (family, state) = (body[0], body[1]);
    if u32::from(state) != TCP_LISTEN {
        return Ok(None);
    }
    // Ports and addresses are in network byte order.
    let port = u16::from_be_bytes(field(body, 4)?);
    let addr = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::from(field::<4>(body, 8)?)),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(field::<16>(body, 8)?)).to_canonical(),
        _ => return Ok(None),
    };
    Ok(Some(Listener { addr, port }))
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], ScanError> {
    bytes.get(at..at + N).and_then(|slice| slice.try_into().ok()).ok_or(ScanError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sources_see_a_loopback_listener_of_each_family() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let connected = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        for source in [Source::SockDiag, Source::ProcNet] {
            let found = tcp_listeners(source).unwrap();
            let v4_port = v4.local_addr().unwrap().port();
            let v4_listener = Listener { addr: "127.0.0.1".parse().unwrap(), port: v4_port };
            assert!(found.contains(&v4_listener), "{source:?}: {found:?}");
            let client_port = connected.local_addr().unwrap().port();
            assert!(!found.iter().any(|l| l.port == client_port), "{source:?}: a connection is no listener");
            if let Some(v6) = &v6 {
                let port = v6.local_addr().unwrap().port();
                assert!(found.contains(&Listener { addr: "::1".parse().unwrap(), port }), "{source:?}: {found:?}");
            }
        }
    }

    #[test]
    fn proc_net_rows_are_read_in_network_order() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
                  0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n   \
                  1: 0100007F:1F91 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0\n";
        let v6 = "  sl  local_address                         remote_address                        st\n   \
                  0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A\n   \
                  1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A\n";
        let listener = |addr: &str, port| Listener { addr: addr.parse().unwrap(), port };
        if cfg!(target_endian = "little") {
            assert_eq!(parse_proc_net(v4), [listener("127.0.0.1", 8080)]);
            assert_eq!(parse_proc_net(v6), [listener("::1", 3000), listener("::", 80)]);
        }
    }

    #[test]
    fn a_truncated_answer_is_malformed() {
        let mut datagram = vec![0u8; NLMSG_HEADER + 8];
        datagram[..4].copy_from_slice(&((NLMSG_HEADER + 8) as u32).to_ne_bytes());
        datagram[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(matches!(parse_answers(&datagram, &mut Vec::new()), Err(ScanError::Malformed)));
        let mut huge = datagram.clone();
        huge[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(parse_answers(&huge, &mut Vec::new()), Err(ScanError::Malformed)));
    }
}
