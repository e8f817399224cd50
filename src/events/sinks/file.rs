//! Appends JSON lines to a file, rotating by size: `FILE` → `FILE.1` →
//! `FILE.2` … up to `keep`. An unwritable file or a full disk is counted and
//! reported, never fatal; the sink retries opening on the next event. When
//! rotation fails, events are dropped (and counted) rather than letting the
//! file grow past `max_bytes`. New files are readable by their owner only.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use super::{Throttle, dropped, failed};

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn rotate(path: &Path, keep: u32) -> std::io::Result<()> {
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(rotated(path, keep));
    for n in (1..keep).rev() {
        let from = rotated(path, n);
        if from.exists() {
            std::fs::rename(&from, rotated(path, n + 1))?;
        }
    }
    std::fs::rename(path, rotated(path, 1))
}

/// Opens (or creates, readable by its owner only: events hold identities,
/// addresses and URLs) the file for appending. A file whose last line was
/// cut short (a full disk) gets its line ended first, so the next event
/// starts a line of its own.
fn open(path: &Path) -> std::io::Result<(File, u64)> {
    let mut options = OpenOptions::new();
    options.create(true).append(true).read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    let mut len = file.metadata()?.len();
    #[cfg(unix)]
    if len > 0 {
        let mut last = [0u8; 1];
        if std::os::unix::fs::FileExt::read_at(&file, &mut last, len - 1)? == 1 && last[0] != b'\n'
        {
            file.write_all(b"\n")?;
            len += 1;
        }
    }
    Ok((file, len))
}

pub(super) fn run(
    name: &str,
    path: &Path,
    max_bytes: u64,
    keep: u32,
    rx: Receiver<Arc<str>>,
    throttle: &Throttle,
) {
    let mut current: Option<(File, u64)> = None;
    let unavailable = |e: std::io::Error| {
        failed(
            name,
            throttle,
            &format!("cannot open {}: {e}", path.display()),
        );
        dropped(name, throttle, "file unavailable");
    };
    for line in rx {
        let needed = line.len() as u64 + 1;
        if current.is_none() {
            match open(path) {
                Ok(f) => current = Some(f),
                Err(e) => {
                    unavailable(e);
                    continue;
                }
            }
        }
        if let Some((_, len)) = &current
            && *len > 0
            && len + needed > max_bytes
        {
            current = None;
            if let Err(e) = rotate(path, keep) {
                failed(
                    name,
                    throttle,
                    &format!("cannot rotate {}: {e}", path.display()),
                );
            }
            match open(path) {
                // The rotation failed and the file is still full: the event
                // is dropped rather than the file growing without bound.
                Ok((_, len)) if len > 0 && len + needed > max_bytes => {
                    dropped(name, throttle, "file full and not rotated");
                    continue;
                }
                Ok(f) => current = Some(f),
                Err(e) => {
                    unavailable(e);
                    continue;
                }
            }
        }
        if let Some((file, len)) = current.as_mut() {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            match file.write_all(&buf) {
                Ok(()) => *len += needed,
                Err(e) => {
                    failed(
                        name,
                        throttle,
                        &format!("cannot write {}: {e}", path.display()),
                    );
                    dropped(name, throttle, "write failed");
                    current = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(path: &Path, max_bytes: u64, keep: u32, lines: &[&str]) {
        let (tx, rx) = std::sync::mpsc::sync_channel(lines.len());
        for line in lines {
            tx.send(Arc::from(*line)).unwrap();
        }
        drop(tx);
        run("test", path, max_bytes, keep, rx, &Throttle::default());
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("whydenied-file-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_failing_rotation_does_not_let_the_file_grow() {
        let d = dir("rot");
        let path = d.join("events.jsonl");
        // FILE.1 is a directory: renaming FILE onto it fails.
        std::fs::create_dir_all(rotated(&path, 1)).unwrap();
        std::fs::write(rotated(&path, 1).join("x"), "x").unwrap();
        let line = "x".repeat(29);
        feed(&path, 100, 1, &[line.as_str(); 20]);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= 100, "the file grew to {len} bytes");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_cut_line_is_ended_and_new_files_are_private() {
        let d = dir("cut");
        let path = d.join("events.jsonl");
        std::fs::write(&path, "{\"cut\":").unwrap();
        feed(&path, 1 << 20, 1, &["{\"a\":1}"]);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"cut\":\n{\"a\":1}\n"
        );
        let fresh = d.join("new.jsonl");
        feed(&fresh, 1 << 20, 1, &["{}"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&d).ok();
    }
}
