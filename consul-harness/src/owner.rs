//! Whose is it: what the harness leaves outside its process (a cluster's data directories, a
//! PKI's files, an nftables table) carries its owner in its name, the process's pid and start
//! time, so that the next run removes what a SIGKILLed run left — its owner is gone, or its
//! pid now belongs to another process — and keeps what live runs, its own included, own.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// A process, as its pid and start time name it (a pid alone is reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Its pid.
    pub pid: u32,
    /// Its start time, in clock ticks after boot (`/proc/<pid>/stat`'s 22nd field).
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn me() -> Result<Owner> {
        let pid = std::process::id();
        let start = start_time(pid).ok_or_else(|| Error::Process {
            what: "read this process's start time".into(),
            reason: "/proc/self/stat unreadable".into(),
        })?;
        Ok(Owner { pid, start })
    }

    /// Whether it still runs: the same pid, started at the same time.
    pub fn alive(self) -> bool {
        start_time(self.pid) == Some(self.start)
    }

    /// `<pid>_<start>`: how a name carries it.
    pub fn tag(self) -> String {
        format!("{}_{}", self.pid, self.start)
    }

    /// The owner a name's `<pid>_<start>` names, and what follows it (after one separator).
    pub fn parse(name: &str) -> Option<(Owner, &str)> {
        let (pid, rest) = name.split_once('_')?;
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let owner = Owner {
            pid: pid.parse().ok()?,
            start: rest[..end].parse().ok()?,
        };
        let mut after = rest[end..].chars();
        after.next();
        Some((owner, after.as_str()))
    }
}

/// Whether a process `pid` runs (any start time: for a name that holds only a pid).
pub fn runs(pid: u32) -> bool {
    start_time(pid).is_some()
}

/// `/proc/<pid>/stat`'s start time (clock ticks after boot), if the process lives.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// A new directory `<prefix><owner>-<name>` under the system's temp directory, owned by this
/// process; first, the directories with the same prefix whose owner is dead are removed.
pub fn temp_dir(prefix: &str, name: &str) -> Result<PathBuf> {
    let me = Owner::me()?;
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(owner) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(Owner::parse)
                .map(|(owner, _)| owner)
            else {
                continue;
            };
            if !owner.alive() {
                tracing::info!(dir = %entry.path().display(), "removing a directory left by a dead process");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!("{prefix}{}-{name}", me.tag()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_a_dead_one_and_a_reused_pid_are_not() {
        let me = Owner::me().unwrap();
        assert!(me.alive());
        assert!(
            !Owner {
                start: me.start + 1,
                ..me
            }
            .alive()
        );
        assert!(
            !Owner {
                pid: u32::MAX,
                ..me
            }
            .alive()
        );
    }

    #[test]
    fn a_tag_reads_back_with_what_follows() {
        let owner = Owner { pid: 12, start: 34 };
        assert_eq!(owner.tag(), "12_34");
        assert_eq!(Owner::parse("12_34-dc1-abc"), Some((owner, "dc1-abc")));
        assert_eq!(Owner::parse("12_34"), Some((owner, "")));
        assert_eq!(Owner::parse("12-34-dc1"), None);
        assert_eq!(Owner::parse("x_34"), None);
        assert_eq!(Owner::parse("12_"), None);
    }

    #[test]
    fn a_dead_owners_directory_is_removed_and_a_live_ones_kept() {
        let prefix = format!("owner-test-{:08x}-", rand::random::<u32>());
        let tmp = std::env::temp_dir();
        let dead = tmp.join(format!("{prefix}{}_1-left", u32::MAX));
        std::fs::create_dir_all(dead.join("data")).unwrap();
        let unparsable = tmp.join(format!("{prefix}not-an-owner"));
        std::fs::create_dir_all(&unparsable).unwrap();
        let first = temp_dir(&prefix, "first").unwrap();
        let second = temp_dir(&prefix, "second").unwrap();
        assert!(!dead.exists(), "the dead owner's directory is removed");
        assert!(first.exists() && second.exists(), "this process's are kept");
        assert!(
            unparsable.exists(),
            "a name without an owner is not touched"
        );
        for dir in [first, second, unparsable] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
