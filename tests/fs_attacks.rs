//! Attacks on envd's filesystem operations by a non-root user of the same
//! machine, against the real binary (which runs as root): swapping a
//! directory envd just created for a symlink (a real process running as
//! the test user, in a tight loop, for hundreds of requests), and symlinks
//! planted to redirect a request to root's files. Each attack must change
//! nothing that the user could not change themselves; what users may do
//! through symlinks must keep working.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::attacker::Swapper;
use common::fs_rpc::{CREATE_WATCHER, LIST_DIR as LIST, MAKE_DIR as MKDIR, MOVE, REMOVE, STAT, WATCH_DIR as WATCH};
use common::*;
use http::{Method, StatusCode};
use serde_json::json;

/// Requests made against each racing attacker.
const ITERATIONS: usize = 300;
const SECRET: &[u8] = b"root's secret\n";
const BOUNDARY: &str = "envd-attack-boundary";

/// The scene of an attack: the user's own directory, and root's.
struct Arena {
    dir: Scratch,
    user: TestUser,
    /// Owned by the user (their home, say).
    home: PathBuf,
    /// Root's, 0755: `secret.txt` (0600) and `victim.txt` (0644).
    vault: PathBuf,
    /// Root's, 0700, holding `inner.txt`.
    private: PathBuf,
}

impl Arena {
    fn new(name: &str) -> Arena {
        let user = test_user();
        let dir = Scratch::new(name);
        let home = dir.path("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(user.uid), Some(user.gid)).unwrap();
        let vault = dir.path("vault");
        std::fs::create_dir(&vault).unwrap();
        std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(vault.join("secret.txt"), SECRET).unwrap();
        std::fs::set_permissions(vault.join("secret.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(vault.join("victim.txt"), b"keep me").unwrap();
        std::fs::set_permissions(vault.join("victim.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let private = dir.path("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(private.join("inner.txt"), b"inner").unwrap();
        Arena { dir, user, home, vault, private }
    }

    fn home(&self, rel: &str) -> String {
        self.home.join(rel).display().to_string()
    }

    /// A symlink `home/<name> -> target` owned by the user, as if they had
    /// made it with `ln -s`.
    fn plant(&self, name: &str, target: &Path) -> PathBuf {
        let link = self.home.join(name);
        std::os::unix::fs::symlink(target, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(self.user.uid), Some(self.user.gid)).unwrap();
        link
    }

    /// Root's files are exactly as [`Arena::new`] made them.
    fn assert_vault_untouched(&self) {
        let secret = self.vault.join("secret.txt");
        assert_eq!(std::fs::read(&secret).unwrap(), SECRET, "secret content");
        let meta = std::fs::metadata(&secret).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, 0, 0o600), "secret owner and mode");
        assert_eq!(std::fs::read(self.vault.join("victim.txt")).unwrap(), b"keep me");
        assert_eq!(self.dir.names("vault"), ["secret.txt", "victim.txt"]);
        assert_eq!(self.dir.names("private"), ["inner.txt"]);
        for dir in [&self.vault, &self.private] {
            assert_eq!(std::fs::metadata(dir).unwrap().uid(), 0, "{} changed owner", dir.display());
        }
    }
}

fn q(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_./".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn upload(client: &Client, path: &str, user: &str, body: &'static [u8]) -> Reply {
    let query = format!("/files?path={}&username={user}", q(path));
    client.send(Method::POST, &query, &[("content-type", "application/octet-stream")], Bytes::from_static(body)).await
}

async fn upload_multipart(client: &Client, path: &str, user: &str) -> Reply {
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\npwned\r\n--{BOUNDARY}--\r\n"
    );
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let query = format!("/files?path={}&username={user}", q(path));
    client.send(Method::POST, &query, &[("content-type", content_type.as_str())], body).await
}

async fn download(client: &Client, path: &str, user: &str) -> Reply {
    client.send(Method::GET, &format!("/files?path={}&username={user}", q(path)), &[], Bytes::new()).await
}

async fn compose(client: &Client, sources: &[String], destination: &str, user: &str) -> Reply {
    let body = json!({"source_paths": sources, "destination": destination, "username": user});
    client.send(Method::POST, "/files/compose", &[("content-type", "application/json")], body.to_string()).await
}

fn assert_forbidden(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{what}: {}", reply.text());
    let message = reply.json()["message"].as_str().unwrap_or("").to_owned();
    assert!(message.contains("symlink owned by another user"), "{what}: {message}");
}

async fn assert_rpc_denied(client: &Client, rpc: &str, message: serde_json::Value) {
    let (status, error) = client.call_err(rpc, &message).await;
    assert_eq!((status, error.code.as_str()), (StatusCode::FORBIDDEN, "permission_denied"), "{rpc} {message}");
    assert!(error.message.contains("symlink owned by another user"), "{rpc}: {}", error.message);
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

// --- Races: a directory envd creates, swapped for a symlink ---

/// Removes what a race left in `area` (the attacker's name and its swap
/// partner), whatever each has become. Nothing else of the attacker's
/// swapping can happen once `victim` is gone.
fn clear_race(area: &Path) {
    let (victim, swap) = (area.join("victim"), area.join("victim.swap"));
    loop {
        match std::fs::symlink_metadata(&victim) {
            Ok(meta) if meta.is_dir() => drop(std::fs::remove_dir_all(&victim)),
            Ok(_) => drop(std::fs::remove_file(&victim)),
            Err(_) => {}
        }
        if std::fs::symlink_metadata(&swap).is_ok_and(|m| m.is_dir()) {
            drop(std::fs::remove_dir_all(&swap));
        }
        let swap_is_dir = std::fs::symlink_metadata(&swap).is_ok_and(|m| m.is_dir());
        if std::fs::symlink_metadata(&victim).is_err() && !swap_is_dir {
            return;
        }
    }
}

/// Whether the race reached root's directory: (it changed owner, it got
/// new entries). Puts it back as it was.
fn vault_was_reached(vault: &Path) -> (bool, bool) {
    let owned = std::fs::metadata(vault).unwrap().uid() != 0;
    let written = std::fs::read_dir(vault).unwrap().count() != 2;
    if owned {
        std::os::unix::fs::chown(vault, Some(0), Some(0)).unwrap();
    }
    for entry in std::fs::read_dir(vault).unwrap().flatten() {
        if !["secret.txt", "victim.txt"].contains(&entry.file_name().to_str().unwrap_or("")) {
            let path = entry.path();
            drop(if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) });
        }
    }
    (owned, written)
}

/// Runs `request` [`ITERATIONS`] times against a [`Swapper`] on
/// `home/victim`; returns how often root's directory changed owner, got
/// entries, and how often the request failed.
async fn race<F: std::future::Future<Output = Reply>>(arena: &Arena, request: impl Fn() -> F) -> [usize; 3] {
    let swapper = Swapper::start(&arena.user, &arena.home, "victim", &arena.vault);
    let mut counts = [0; 3];
    for _ in 0..ITERATIONS {
        let reply = request().await;
        let (owned, written) = vault_was_reached(&arena.vault);
        counts[0] += usize::from(owned);
        counts[1] += usize::from(written);
        counts[2] += usize::from(reply.status != StatusCode::OK);
        clear_race(&arena.home);
    }
    drop(swapper);
    counts
}

#[tokio::test]
async fn make_dir_races_never_hand_out_roots_directory() {
    let envd = Envd::start();
    let arena = Arena::new("race-mkdir");
    let client = envd.client().with_user(&arena.user.name);
    // The first directory created is the one swapped; the next one would
    // be made through the swap, inside root's directory.
    let message = json!({"path": arena.home("victim/sub")});
    let [owned, written, refused] = race(&arena, || client.unary(MKDIR, &message, &[])).await;
    println!(
        "MakeDir race, {ITERATIONS} calls: root's directory chowned {owned}, written {written}, refused {refused}"
    );
    assert_eq!((owned, written), (0, 0), "root's directory reached by MakeDir (chowned, written into)");
    arena.assert_vault_untouched();
}

#[tokio::test]
async fn upload_races_never_hand_out_roots_directory() {
    let envd = Envd::start();
    let arena = Arena::new("race-upload");
    let client = envd.client();
    let (path, name) = (arena.home("victim/f.txt"), arena.user.name.clone());
    let [owned, written, refused] = race(&arena, || upload(&client, &path, &name, b"data")).await;
    println!(
        "upload race, {ITERATIONS} uploads: root's directory chowned {owned}, written {written}, refused {refused}"
    );
    assert_eq!((owned, written), (0, 0), "root's directory reached by uploads (chowned, written into)");
    arena.assert_vault_untouched();
}

// --- Planted symlinks ---

#[tokio::test]
async fn uploads_through_a_users_symlink_to_roots_files_are_refused() {
    let envd = Envd::start();
    let arena = Arena::new("plant-upload");
    let client = envd.client();
    let name = arena.user.name.clone();
    let link = arena.plant("data.txt", &arena.vault.join("secret.txt"));
    arena.plant("vault", &arena.vault);

    assert_forbidden(&upload(&client, &arena.home("data.txt"), &name, b"pwned").await, "octet-stream over a link");
    assert_forbidden(&upload_multipart(&client, &arena.home("data.txt"), &name).await, "multipart over a link");
    for through_dir in ["vault/secret.txt", "vault/new.txt", "vault/sub/new.txt"] {
        assert_forbidden(&upload(&client, &arena.home(through_dir), &name, b"pwned").await, through_dir);
    }
    assert!(is_symlink(&link), "the planted link stays");
    arena.assert_vault_untouched();
    assert_eq!(arena.dir.names("home"), ["data.txt", "vault"], "no temporary file left behind");
}

#[tokio::test]
async fn compose_refuses_sources_a_users_symlink_leads_to() {
    let envd = Envd::start();
    let arena = Arena::new("plant-compose");
    let client = envd.client();
    let name = arena.user.name.clone();
    arena.plant("src", &arena.vault.join("secret.txt"));
    arena.plant("vault", &arena.vault);

    let secret = compose(&client, &[arena.home("src")], &arena.home("out.txt"), &name).await;
    assert_forbidden(&secret, "a source linked to a root-only file");
    // Readable, but compose removes its sources, which the user may not.
    let readable = compose(&client, &[arena.home("vault/victim.txt")], &arena.home("out.txt"), &name).await;
    assert_forbidden(&readable, "a source in root's directory");
    let into_vault = std::fs::write(arena.home.join("mine.txt"), b"mine").map(|()| arena.home("mine.txt")).unwrap();
    let destination = compose(&client, &[into_vault], &arena.home("vault/out.txt"), &name).await;
    assert_forbidden(&destination, "a destination in root's directory");
    assert!(!arena.home.join("out.txt").exists(), "no output file");
    assert!(is_symlink(&arena.home.join("src")));
    arena.assert_vault_untouched();
}

#[tokio::test]
async fn remove_move_and_make_dir_through_a_users_symlinked_dir_are_refused() {
    let envd = Envd::start();
    let arena = Arena::new("plant-ops");
    let client = envd.client().with_user(&arena.user.name);
    arena.plant("vault", &arena.vault);
    std::fs::write(arena.home.join("mine.txt"), b"mine").unwrap();

    assert_rpc_denied(&client, REMOVE, json!({"path": arena.home("vault/victim.txt")})).await;
    assert_rpc_denied(&client, MOVE, json!({"source": arena.home("vault/victim.txt"), "destination": arena.home("x")}))
        .await;
    let planting = json!({"source": arena.home("mine.txt"), "destination": arena.home("vault/planted.txt")});
    assert_rpc_denied(&client, MOVE, planting).await;
    assert_rpc_denied(&client, MKDIR, json!({"path": arena.home("vault/newdir")})).await;
    assert_rpc_denied(&client, MKDIR, json!({"path": arena.home("vault/a/b")})).await;
    arena.assert_vault_untouched();
    assert_eq!(std::fs::read(arena.home.join("mine.txt")).unwrap(), b"mine");
    assert!(!arena.home.join("x").exists());
}

#[tokio::test]
async fn reads_through_a_users_symlink_need_that_users_rights() {
    let envd = Envd::start();
    let arena = Arena::new("plant-read");
    let client = envd.client().with_user(&arena.user.name);
    let name = arena.user.name.clone();
    arena.plant("shadow", &arena.vault.join("secret.txt"));
    arena.plant("priv", &arena.private);

    assert_forbidden(&download(&client, &arena.home("shadow"), &name).await, "download of a root-only file");
    assert_forbidden(&download(&client, &arena.home("priv/inner.txt"), &name).await, "download below a 0700 dir");
    assert_rpc_denied(&client, STAT, json!({"path": arena.home("priv/inner.txt")})).await;
    assert_rpc_denied(&client, LIST, json!({"path": arena.home("priv")})).await;
    assert_rpc_denied(&client, CREATE_WATCHER, json!({"path": arena.home("priv")})).await;
    let mut stream = client.stream(WATCH, &json!({"path": arena.home("priv")}), &[]).await;
    let end = stream.next_frame().await.expect("an end frame");
    assert_eq!(end.end_error().map(|e| e.code).as_deref(), Some("permission_denied"));
    arena.assert_vault_untouched();
}

#[tokio::test]
async fn symlinks_the_user_may_follow_still_work() {
    let envd = Envd::start();
    let arena = Arena::new("plant-allowed");
    let client = envd.client().with_user(&arena.user.name);
    let name = arena.user.name.clone();
    // Root's own link to root's file: written through, the link stays.
    let root_link = arena.dir.path("rootlink");
    std::os::unix::fs::symlink(arena.vault.join("victim.txt"), &root_link).unwrap();
    let reply = upload(&client, &root_link.display().to_string(), &name, b"replaced").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(is_symlink(&root_link));
    assert_eq!(std::fs::read(arena.vault.join("victim.txt")).unwrap(), b"replaced");

    // The user's links to the user's own files and directories.
    let own = arena.home.join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::write(own.join("target.txt"), b"old").unwrap();
    for path in [&own, &own.join("target.txt")] {
        std::os::unix::fs::chown(path, Some(arena.user.uid), Some(arena.user.gid)).unwrap();
    }
    let file_link = arena.plant("mine", &own.join("target.txt"));
    arena.plant("dir", &own);
    let reply = upload(&client, &arena.home("mine"), &name, b"new").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(is_symlink(&file_link));
    assert_eq!(std::fs::read(own.join("target.txt")).unwrap(), b"new");
    let reply = upload(&client, &arena.home("dir/sub/up.txt"), &name, b"up").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(std::fs::metadata(own.join("sub")).unwrap().uid(), arena.user.uid);
    let listed = client.call(LIST, &json!({"path": arena.home("dir")})).await;
    assert_eq!(listed["entries"].as_array().map(Vec::len), Some(2), "{listed}");
    let moved = json!({"source": arena.home("dir/sub/up.txt"), "destination": arena.home("dir/moved.txt")});
    client.call(MOVE, &moved).await;
    let joined = compose(&client, &[arena.home("dir/moved.txt")], &arena.home("dir/joined.txt"), &name).await;
    assert_eq!(joined.status, StatusCode::OK, "{}", joined.text());
    client.call(REMOVE, &json!({"path": arena.home("dir/sub")})).await;
    assert_eq!(arena.dir.names("home/own"), ["joined.txt", "target.txt"]);

    // A world-readable root file read through the user's link; the link
    // itself reported by Stat.
    let public = arena.plant("public", &arena.vault.join("victim.txt"));
    let reply = download(&client, &public.display().to_string(), &name).await;
    assert_eq!((reply.status, reply.body.as_ref()), (StatusCode::OK, b"replaced".as_slice()));
    let stat = client.call(STAT, &json!({"path": arena.home("public")})).await;
    assert_eq!(stat["entry"]["symlinkTarget"], arena.vault.join("victim.txt").display().to_string());
}
