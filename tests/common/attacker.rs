//! A hostile process for the filesystem attack tests: a real process
//! running as the non-root test user, swapping a name in a directory it
//! owns for a symlink in a tight loop while the test makes requests.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::TestUser;

/// A forked process, running as the test user, that watches `dir/name` as
/// fast as it can and, whenever it is a directory, exchanges it
/// (`renameat2(RENAME_EXCHANGE)`, atomic) with `dir/name.swap`, a symlink
/// to `decoy` it keeps ready. Killed when dropped.
pub struct Swapper {
    pid: libc::pid_t,
}

impl Swapper {
    pub fn start(user: &TestUser, dir: &Path, name: &str, decoy: &Path) -> Swapper {
        let cstr = |bytes: &[u8]| CString::new(bytes).expect("no NUL in test paths");
        // Everything the child needs is allocated before the fork: the
        // child of a threaded process may only make system calls.
        let dir = cstr(dir.as_os_str().as_bytes());
        let name = cstr(name.as_bytes());
        let swap = cstr(format!("{}.swap", name.to_str().unwrap_or("x")).as_bytes());
        let decoy = cstr(decoy.as_os_str().as_bytes());
        let (uid, gid) = (user.uid, user.gid);
        // SAFETY: the child only makes raw system calls on data prepared
        // above and never returns (it loops until killed).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: plain system calls on valid NUL-terminated strings.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    libc::_exit(3);
                }
                let dirfd = libc::open(dir.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
                if dirfd < 0 {
                    libc::_exit(4);
                }
                let mut stat: libc::stat = std::mem::zeroed();
                loop {
                    // The symlink waits at the side name; one exchange puts
                    // it in place of the directory atomically.
                    libc::symlinkat(decoy.as_ptr(), dirfd, swap.as_ptr());
                    let found = libc::fstatat(dirfd, name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) == 0;
                    if found && stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
                        let (from, to) = (name.as_ptr(), swap.as_ptr());
                        libc::syscall(libc::SYS_renameat2, dirfd, from, dirfd, to, libc::RENAME_EXCHANGE);
                    }
                }
            }
        }
        Swapper { pid }
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        // SAFETY: `pid` is the child this value forked; kill and reap it.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}
