//! What the host sets up through `/init` besides the exec context, against
//! the real binary: the egress proxy's CA (a real TLS server on loopback
//! and curl started through envd), the events address in the hosts file
//! and in every process's env, and NFS volumes (mounted, kept per
//! lifecycle, remounted, refused with 400), all of it back after a cold
//! boot before the first command runs. Scratch files stand in for
//! `/etc/hosts` and the system bundle (envd's flags point at them); the
//! volume tests use the `mount` stand-in of `common::host_setup`, since
//! this kernel has no NFS client (the VM test mounts a real export).

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::host_setup::{
    HOSTS_START, HostFiles, NfsStandIn, TestCa, TlsServer, UnmountOnDrop, fingerprint_script, mounts_at,
};
use common::{Client, Envd, Scratch, bash};
use serde_json::{Value, json};

/// The reference's mount options, verbatim.
const NFS_OPTIONS: &str = "fg,hard,sync,rsize=1048576,wsize=1048576,mountproto=tcp,mountport=2049,proto=tcp,\
port=2049,nfsvers=3,noacl,noac,lookupcache=none";

async fn output_of(client: &Client, script: &str) -> String {
    let run = client.run(&bash(script), &[]).await;
    assert_eq!(run.exit_code(), 0, "{script}: {}", run.stderr_str());
    run.stdout_str()
}

async fn init(client: &Client, body: Value) {
    let reply = client.post_json("/init", &body).await;
    assert_eq!(reply.status, 204, "{body}: {}", reply.text());
}

#[tokio::test]
async fn the_host_ca_is_trusted_then_replaced_and_never_duplicated() {
    let files = HostFiles::new("ca-files");
    let (first, second) = (TestCa::new(&files.scratch.0, "first"), TestCa::new(&files.scratch.0, "second"));
    let (server1, server2) = (TlsServer::start(&first), TlsServer::start(&second));
    let envd = Envd::options().args(files.args()).start();
    let client = envd.client();
    let system = files.read(&files.bundle());
    let fetch = |server: &TlsServer| format!("{}; true", server.curl(&files.bundle()));

    assert_eq!(output_of(&client, &fetch(&server1)).await, "000", "not trusted before /init");
    init(&client, json!({"caBundle": first.pem()})).await;
    assert_eq!(output_of(&client, &fetch(&server1)).await, "200");
    let bundle = files.read(&files.bundle());
    assert!(bundle.starts_with(&system), "the system's CAs stay");
    assert_eq!(bundle.matches(first.pem().trim_end()).count(), 1);
    assert_eq!(files.read(&files.ca_file()), first.pem());
    for file in [files.bundle(), files.ca_file()] {
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o644, "{}", file.display());
    }

    // Every resume sends the CA again: nothing changes.
    init(&client, json!({"caBundle": format!("{}\n\n", first.pem())})).await;
    assert_eq!(files.read(&files.bundle()), bundle, "the same CA is not appended twice");

    init(&client, json!({"caBundle": second.pem()})).await;
    assert_eq!(output_of(&client, &fetch(&server2)).await, "200");
    assert_eq!(output_of(&client, &fetch(&server1)).await, "000", "the replaced CA is no longer trusted");
    let bundle = files.read(&files.bundle());
    assert!(!bundle.contains(first.pem().trim_end()));
    assert_eq!(bundle.matches(second.pem().trim_end()).count(), 1);
    assert_eq!(bundle, format!("{system}{}", second.pem()));
    assert_eq!(files.read(&files.ca_file()), second.pem());
}

#[tokio::test]
async fn a_missing_bundle_fails_init_with_400() {
    let files = HostFiles::new("ca-missing");
    std::fs::remove_file(files.bundle()).unwrap();
    let envd = Envd::options().args(files.args()).start();
    let pem = TestCa::new(&files.scratch.0, "lonely").pem();
    let reply = envd.client().post_json("/init", &json!({"caBundle": pem})).await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().starts_with("failed to install CA bundle: "), "{}", reply.text());
}

#[tokio::test]
async fn the_events_address_is_one_hosts_entry_and_in_every_process_env() {
    let files = HostFiles::new("events-files");
    let envd = Envd::options().args(files.args()).start();
    let client = envd.client();

    init(&client, json!({"hyperloopIP": "10.11.12.13"})).await;
    assert_eq!(files.read(&files.hosts()), format!("{HOSTS_START}10.11.12.13      events.e2b.local\n"));
    assert_eq!(output_of(&client, "echo $E2B_EVENTS_ADDRESS").await, "http://10.11.12.13\n");

    init(&client, json!({"hyperloopIP": "fd00::7"})).await;
    let hosts = files.read(&files.hosts());
    assert_eq!(hosts, format!("{HOSTS_START}fd00::7          events.e2b.local\n"), "replaced, not added");
    init(&client, json!({"hyperloopIP": "fd00::7"})).await;
    assert_eq!(files.read(&files.hosts()), hosts);
    assert_eq!(output_of(&client, "echo $E2B_EVENTS_ADDRESS").await, "http://fd00::7\n");
}

#[tokio::test]
async fn a_volume_that_cannot_be_mounted_fails_init_with_400_and_says_why() {
    let mnt = Scratch::new("vol-fail");
    let _cleanup = UnmountOnDrop(mnt.path("data"));
    let envd = Envd::start();
    let client = envd.client();
    // This kernel has no NFS client and nothing serves NFS on loopback.
    let body =
        json!({"volumeMounts": [{"nfs_target": "127.0.0.1:/missing", "path": mnt.s("data")}], "lifecycleID": "l"});
    let reply = client.post_json("/init", &body).await;
    assert_eq!(reply.status, 400);
    let text = reply.text();
    assert!(text.starts_with("failed to setup NFS volumes: failed to mount NFS at"), "{text}");
    assert!(text.contains(&mnt.s("data")), "{text}");
    assert_eq!(mounts_at(&mnt.path("data")), 0);

    let relative = json!({"volumeMounts": [{"nfs_target": "127.0.0.1:/v", "path": "data"}]});
    let reply = client.post_json("/init", &relative).await;
    assert_eq!((reply.status.as_u16(), reply.text().contains("invalid volume")), (400, true), "{}", reply.text());
    let incomplete = json!({"volumeMounts": [{"path": mnt.s("data")}]});
    assert_eq!(client.post_json("/init", &incomplete).await.status, 400);
    // envd still answers /init normally afterwards.
    init(&client, json!({})).await;
}

fn volume_init(path: &Path, lifecycle: &str, ca: &TestCa) -> Value {
    json!({
        "volumeMounts": [{"nfs_target": "10.0.0.1:/vol1", "path": path}],
        "lifecycleID": lifecycle,
        "hyperloopIP": "10.0.0.2",
        "caBundle": ca.pem(),
    })
}

#[tokio::test]
async fn volumes_are_kept_per_lifecycle_and_back_before_the_first_command_after_a_cold_boot() {
    let nfs = NfsStandIn::new("vol-nfs");
    let export = nfs.export("vol1");
    let files = HostFiles::new("vol-files");
    let ca = TestCa::new(&files.scratch.0, "vol-ca");
    let (state, mnt) = (Scratch::new("vol-state"), Scratch::new("vol-mnt"));
    let volume = mnt.path("data");
    let _cleanup = UnmountOnDrop(volume.clone());
    let mut args = files.args();
    args.extend(["--state-dir".to_owned(), state.s("")]);
    let start = || Envd::options().args(args.clone()).env("PATH", &nfs.path_env()).start();
    let fingerprint = fingerprint_script(&files, &[&volume]);

    let before = {
        let envd = start();
        let client = envd.client();
        init(&client, volume_init(&volume, "life-1", &ca)).await;
        assert_eq!(nfs.calls(), [format!("-v -t nfs -o {NFS_OPTIONS} 10.0.0.1:/vol1 {}", volume.display())]);
        output_of(&client, &format!("echo through > {}/f", volume.display())).await;
        assert_eq!(std::fs::read_to_string(export.join("f")).unwrap(), "through\n", "written to the export");

        init(&client, volume_init(&volume, "life-1", &ca)).await;
        assert_eq!(nfs.calls().len(), 1, "the same lifecycle keeps its mount");
        init(&client, volume_init(&volume, "life-2", &ca)).await;
        assert_eq!(nfs.calls().len(), 2, "a new lifecycle remounts");
        assert_eq!(mounts_at(&volume), 1, "the stale mount was unmounted first");
        output_of(&client, &fingerprint).await
        // envd is SIGKILLed here.
    };
    assert!(before.contains("10.0.0.2") && before.contains("events=http://10.0.0.2"), "{before}");
    let saved = std::fs::read_to_string(state.path("exec-context.json")).unwrap();
    assert!(saved.contains("life-2") && saved.contains("10.0.0.1:/vol1"), "{saved}");

    // A cold boot: no mounts, /etc rebuilt from the template, a slow server.
    UnmountOnDrop(volume.clone());
    files.reset();
    nfs.set_delay(2);
    let envd = start();
    let client = envd.client();
    output_of(&client, &format!("echo first-command > {}/g", volume.display())).await;
    assert_eq!(
        std::fs::read_to_string(export.join("g")).unwrap(),
        "first-command\n",
        "the first command after a cold boot waited for the volume"
    );
    assert_eq!(output_of(&client, &fingerprint).await, before, "the host's set-up is back as it was");
    assert_eq!(nfs.calls().len(), 3);
    // The host's /init of the same lifecycle keeps the restored mount.
    init(&client, volume_init(&volume, "life-2", &ca)).await;
    assert_eq!(nfs.calls().len(), 3);
}
