//! Which ports to forward, decided from one scan of the listeners alone
//! (no I/O here, so every rule is tested directly).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::listeners::Listener;

/// The ports to forward and where each one's connections go.
pub type Plan = BTreeMap<u16, SocketAddr>;

/// The rules:
/// - a listener on `127.0.0.1` or `::1` is a candidate (IPv4 preferred
///   when both exist: one forward per port);
/// - envd's own port never is;
/// - a port that also has a wildcard listener (`0.0.0.0`, `::`) is already
///   reachable and is left alone;
/// - a port that someone else has bound on the forward address is left
///   alone (`held` are the ports whose forward sockets are envd's own).
pub fn plan(listeners: &[Listener], forward_addr: IpAddr, own_port: u16, held: &BTreeSet<u16>) -> Plan {
    let mut targets = Plan::new();
    let mut excluded = BTreeSet::from([own_port]);
    for listener in listeners {
        let port = listener.port;
        if listener.addr.is_unspecified() || (listener.addr == forward_addr && !held.contains(&port)) {
            excluded.insert(port);
        } else if listener.addr == IpAddr::V4(Ipv4Addr::LOCALHOST) {
            targets.insert(port, SocketAddr::new(listener.addr, port));
        } else if listener.addr == IpAddr::V6(Ipv6Addr::LOCALHOST) {
            targets.entry(port).or_insert(SocketAddr::new(listener.addr, port));
        }
    }
    targets.retain(|port, _| !excluded.contains(port));
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORWARD: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 0, 21));

    fn on(addr: &str, port: u16) -> Listener {
        Listener { addr: addr.parse().unwrap(), port }
    }

    #[test]
    fn loopback_listeners_are_forwarded_ipv4_first() {
        let listeners = [on("::1", 3000), on("127.0.0.1", 3000), on("::1", 4000), on("127.0.0.1", 5000)];
        let plan = plan(&listeners, FORWARD, 49983, &BTreeSet::new());
        let targets: Vec<String> = plan.values().map(ToString::to_string).collect();
        assert_eq!(targets, ["127.0.0.1:3000", "[::1]:4000", "127.0.0.1:5000"]);
    }

    #[test]
    fn wildcards_other_addresses_and_envd_itself_are_left_alone() {
        let listeners = [
            on("127.0.0.1", 49983),
            on("127.0.0.1", 8000),
            on("0.0.0.0", 8000),
            on("::1", 8001),
            on("::", 8001),
            on("127.0.0.1", 8002),
            on("169.254.0.21", 8002),
            on("10.0.0.5", 8003),
            on("127.0.0.2", 8004),
        ];
        assert!(plan(&listeners, FORWARD, 49983, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn envds_own_forward_socket_does_not_exclude_its_port() {
        let listeners = [on("127.0.0.1", 8002), on("169.254.0.21", 8002)];
        let plan = plan(&listeners, FORWARD, 49983, &BTreeSet::from([8002]));
        assert_eq!(plan.keys().copied().collect::<Vec<_>>(), [8002]);
    }
}
