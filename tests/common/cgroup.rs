//! Real cgroup v2 directories for tests (`/sys/fs/cgroup/unified` here).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A cgroup v2 directory for one test (to pass as `--cgroup-root`); on drop
/// every process left in it is killed and the directories are removed.
pub struct TestCgroup(pub PathBuf, std::cell::RefCell<Vec<std::process::Child>>);

impl TestCgroup {
    /// A fresh cgroup named after the test, under the v2 root.
    pub fn new(name: &str) -> TestCgroup {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
            .expect("a cgroup v2 hierarchy is needed for the workload cgroup tests");
        let dir = root.join(format!("envd-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TestCgroup(dir, Default::default())
    }
}

impl TestCgroup {
    /// `--cgroup-root <dir>`.
    pub fn args(&self) -> [String; 2] {
        ["--cgroup-root".to_owned(), self.0.display().to_string()]
    }

    /// The per-command cgroups envd made below `slot` (`user` or `ptys`).
    pub fn command_cgroups(&self, slot: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.0.join(slot)) else { return Vec::new() };
        entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()
    }

    /// Pids in `slot` and every cgroup below it.
    pub fn members(&self, slot: &str) -> Vec<u32> {
        let dir = self.0.join(slot);
        std::iter::once(dir)
            .chain(self.command_cgroups(slot))
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|text| text.lines().filter_map(|l| l.parse().ok()).collect::<Vec<u32>>())
            .collect()
    }

    /// A cgroup below this one (parents included) holding a busy loop.
    pub fn with_busy_process(&self, relative: &str) -> u32 {
        let dir = self.0.join(relative);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        let pid = child.id();
        self.1.borrow_mut().push(child);
        pid
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.freeze"), "0");
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        let mut dirs = vec![];
        let mut queue = vec![self.0.clone()];
        while let Some(dir) = queue.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.path().join("cgroup.procs").exists() {
                    let _ = std::fs::write(entry.path().join("cgroup.freeze"), "0");
                    queue.push(entry.path());
                }
            }
            dirs.push(dir);
        }
        for mut child in self.1.borrow_mut().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::thread::sleep(Duration::from_millis(200));
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
