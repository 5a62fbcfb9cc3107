//! The polling watchers against a real directory and inotify.

use super::*;
use crate::fs::watch::EventKind;

fn dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("envd-watchers-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Watchers in the order of their ids, for comparing two exports.
fn sorted(mut states: Vec<WatcherState>) -> Vec<WatcherState> {
    states.sort_by(|a, b| a.id.cmp(&b.id));
    states
}

#[tokio::test]
async fn every_field_of_a_watcher_survives_export_serialise_and_resume() {
    let (root, flooded) = (dir("handover"), dir("handover-flooded"));
    let watchers = PollingWatchers::new(3, Duration::from_secs(60), InotifyBudget::new(4));
    let options = WatchOptions { recursive: true, ..WatchOptions::default() };
    let queued = watchers.create(root.clone(), options).await.unwrap();
    let failed = watchers.create(flooded.clone(), WatchOptions::default()).await.unwrap();
    std::fs::write(root.join("queued"), b"").unwrap();
    // Five events for a queue of three: that watcher fails.
    for i in 0..5 {
        std::fs::write(flooded.join(format!("f{i}")), b"").unwrap();
    }
    settle().await;
    let mut part = watchers.export();
    part.retain(|w| w.id == failed || w.id == queued);
    let queued_state = part.iter().find(|w| w.id == queued).unwrap();
    assert!(!queued_state.events.is_empty() && queued_state.options.recursive);
    assert!(part.iter().find(|w| w.id == failed).unwrap().failure.is_some());

    let read_back: Vec<WatcherState> = serde_json::from_str(&serde_json::to_string(&part).unwrap()).unwrap();
    assert_eq!(read_back, part, "serialising loses nothing");
    let next = PollingWatchers::new(3, Duration::from_secs(60), InotifyBudget::new(4));
    assert_eq!(next.resume(read_back).await, (2, 0));
    assert_eq!(sorted(next.export()), sorted(part), "resuming loses nothing");
    let _ = (std::fs::remove_dir_all(root), std::fs::remove_dir_all(flooded));
}

#[tokio::test]
async fn poll_remove_and_overflow() {
    let root = dir("poll");
    let watchers = PollingWatchers::new(3, Duration::from_secs(60), InotifyBudget::new(1));
    let id = watchers.create(root.clone(), WatchOptions::default()).await.unwrap();
    assert!(id.starts_with('w') && id.len() == 21);
    std::fs::write(root.join("a"), b"").unwrap();
    settle().await;
    let events = watchers.poll(&id).await.unwrap();
    assert_eq!((events[0].name.as_str(), events[0].kind), ("a", EventKind::Create));
    for i in 0..5 {
        std::fs::write(root.join(format!("f{i}")), b"").unwrap();
    }
    settle().await;
    assert!(matches!(watchers.poll(&id).await, Err(WatcherError::Failed(_))));
    assert!(matches!(watchers.poll(&id).await, Err(WatcherError::Failed(_))));
    let again = watchers.create(root.clone(), WatchOptions::default()).await.unwrap();
    watchers.remove(&again).await.unwrap();
    watchers.remove(&id).await.unwrap();
    assert_eq!(watchers.poll(&id).await, Err(WatcherError::Unknown(id.clone())));
    assert_eq!(watchers.remove(&id).await, Err(WatcherError::Unknown(id)));
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_watchers_expire() {
    let root = dir("idle");
    let watchers = PollingWatchers::new(10, Duration::from_secs(60), InotifyBudget::new(1));
    let id = watchers.create(root.clone(), WatchOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert!(watchers.poll(&id).await.is_ok());
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert!(watchers.poll(&id).await.is_ok(), "polling keeps it alive");
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert!(watchers.is_empty());
    assert!(matches!(watchers.poll(&id).await, Err(WatcherError::Unknown(_))));
    std::fs::remove_dir_all(root).unwrap();
}
