//! What the host sets up through `/init` in the VM test: an NFS volume from
//! a real NFS server, a CA for the bundle, the events address; and the
//! part of the exec-context fingerprint that shows them.
//!
//! The NFS server is the guest's own kernel server (nfs-kernel-server in
//! the image). envd mounts with the reference's options, which send both
//! the MOUNT and the NFS protocol to port 2049 (the platform's NFS proxy
//! serves both there), while the kernel server has MOUNT on rpc.mountd's
//! own port (20048 in the image). A relay on the host joins the two the
//! way the platform's proxy does: the guest's target address
//! ([`NFS_ADDRESS`]:2049) is forwarded (guestfwd) to the relay, which reads
//! the RPC program of each connection's first call and passes the
//! connection on to the guest's mountd or nfsd through host forwards.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use super::qemu::free_port;

/// Where the guest reaches the NFS server (the relay).
pub const NFS_ADDRESS: &str = "169.254.169.100";
/// The export in the guest.
pub const EXPORT: &str = "/srv/nfs/e2e";
/// The volume's mount path in the guest.
pub const VOLUME: &str = "/mnt/e2e-volume";
/// The events address `/init` sends.
pub const EVENTS_IP: &str = "169.254.169.77";
/// The lifecycle `/init` sends.
pub const LIFECYCLE: &str = "e2e-lifecycle-1";
/// The guest's rpc.mountd port (tests/vm/build-image.sh).
const GUEST_MOUNTD_PORT: u16 = 20048;
/// RPC program number of the MOUNT protocol.
const MOUNT_PROGRAM: u32 = 100_005;

/// The relay and the CA of one run.
#[derive(Debug)]
pub struct HostSetup {
    relay_port: u16,
    nfsd_port: u16,
    mountd_port: u16,
    ca_pem: String,
}

impl HostSetup {
    /// Generates the CA in `work` and starts the relay.
    pub fn start(work: &Path) -> Result<HostSetup, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("NFS relay: {e}"))?;
        let relay_port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let (nfsd_port, mountd_port) = (free_port(), free_port());
        std::thread::spawn(move || relay(listener, nfsd_port, mountd_port));
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days"])
            .args(["2", "-subj", "/CN=envd e2e egress CA", "-keyout", "e2e-ca.key", "-out", "e2e-ca.pem"])
            .current_dir(work)
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if !status.status.success() {
            return Err(format!("openssl: {}", String::from_utf8_lossy(&status.stderr)));
        }
        let ca_pem = std::fs::read_to_string(work.join("e2e-ca.pem")).map_err(|e| e.to_string())?;
        Ok(HostSetup { relay_port, nfsd_port, mountd_port, ca_pem })
    }

    /// The extra `-netdev user` rules: the guest's NFS address to the
    /// relay, and the relay's way back to the guest's nfsd and mountd.
    pub fn netdev_rules(&self) -> String {
        format!(
            ",hostfwd=tcp:127.0.0.1:{}-:2049,hostfwd=tcp:127.0.0.1:{}-:{GUEST_MOUNTD_PORT},\
             guestfwd=tcp:{NFS_ADDRESS}:2049-cmd:socat STDIO TCP:127.0.0.1:{}",
            self.nfsd_port, self.mountd_port, self.relay_port
        )
    }

    /// Adds the events address, the CA and the volume to an `/init` body.
    pub fn add_to_init(&self, body: &mut Value) {
        body["hyperloopIP"] = json!(EVENTS_IP);
        body["caBundle"] = json!(self.ca_pem);
        body["volumeMounts"] = json!([{"nfs_target": format!("{NFS_ADDRESS}:{EXPORT}"), "path": VOLUME}]);
        body["lifecycleID"] = json!(LIFECYCLE);
    }

    /// The CA's PEM text.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

/// Root script that starts the guest's NFS server, now and on later boots.
pub const START_NFS_SERVER: &str =
    "touch /etc/envd-test-nfs && chmod 0777 /srv/nfs/e2e && systemctl start nfs-server 2>&1 && echo started";

/// Shell lines of the fingerprint for the host's set-up, `key=value`.
pub const FINGERPRINT: &str = r#"printf 'volume=%s\n' "$(findmnt -n -r -o FSTYPE,SOURCE --mountpoint /mnt/e2e-volume || echo none)"
printf 'ca_bundle=%s\n' "$(sha256sum < /etc/ssl/certs/ca-certificates.crt)"
printf 'events_entry=%s\nE2B_EVENTS_ADDRESS=%s\n' "$(grep events.e2b.local /etc/hosts)" "$E2B_EVENTS_ADDRESS""#;

/// The fingerprint lines a full set-up shows.
pub fn expected_lines() -> Vec<String> {
    vec![
        format!("volume=nfs {NFS_ADDRESS}:{EXPORT}"),
        format!("events_entry={EVENTS_IP:<16} events.e2b.local"),
        format!("E2B_EVENTS_ADDRESS=http://{EVENTS_IP}"),
    ]
}

fn relay(listener: TcpListener, nfsd_port: u16, mountd_port: u16) {
    for client in listener.incoming().flatten() {
        std::thread::spawn(move || {
            if let Err(err) = relay_one(client, nfsd_port, mountd_port) {
                eprintln!("[vm-e2e] NFS relay: {err}");
            }
        });
    }
}

/// Reads the first RPC call's header (record mark, xid, type, RPC
/// version, program), connects to the server of that program and pipes.
fn relay_one(mut client: TcpStream, nfsd_port: u16, mountd_port: u16) -> std::io::Result<()> {
    let mut head = [0u8; 20];
    client.read_exact(&mut head)?;
    let program = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
    let port = if program == MOUNT_PROGRAM { mountd_port } else { nfsd_port };
    let mut server = TcpStream::connect(("127.0.0.1", port))?;
    server.write_all(&head)?;
    let (mut client_read, mut server_write) = (client.try_clone()?, server.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_read, &mut server_write);
        let _ = server_write.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}
