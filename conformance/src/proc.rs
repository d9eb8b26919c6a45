//! Child processes the runner starts (user backends, Kamailio) and must
//! leave nothing of behind: each runs in a process group of its own, and
//! the whole group is stopped.

// Waiting for a child to exit is bounded by the clock.
#![allow(clippy::disallowed_methods)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A child started in its own process group ([`spawn_group`]); dropping it
/// sends SIGTERM to the group, waits up to `grace` for the child to exit,
/// then SIGKILLs whatever of the group is left (workers, or the program a
/// `sh -c` wrapper started).
#[derive(Debug)]
pub struct GroupChild {
    child: Child,
    grace: Duration,
}

/// Spawns `cmd` as the leader of a new process group.
pub fn spawn_group(cmd: &mut Command, grace: Duration) -> std::io::Result<GroupChild> {
    use std::os::unix::process::CommandExt;
    let child = cmd.process_group(0).spawn()?;
    Ok(GroupChild { child, grace })
}

impl GroupChild {
    /// The child process itself.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    fn signal(&self, sig: &str) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args([sig, "--", &group])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // Members that outlived the leader, if any.
                self.signal("-KILL");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_stops_the_whole_group() {
        // `sh -c` starts a grandchild that ignores nothing special; killing
        // only the shell would leave it running.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("sleep 30 & echo $! > {}; wait", pidfile.display()));
        let g = spawn_group(&mut cmd, Duration::from_secs(2)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the shell never started sleep");
            std::thread::sleep(Duration::from_millis(20));
        };
        let alive = || {
            std::path::Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ")
        };
        assert!(alive(), "sleep {pid} runs");
        drop(g);
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() {
            assert!(Instant::now() < deadline, "sleep {pid} outlived its group");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
