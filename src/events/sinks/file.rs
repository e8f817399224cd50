//! Appends JSON lines to a file, rotating by size: `FILE` → `FILE.1` →
//! `FILE.2` … up to `keep`. An unwritable file or a full disk is counted and
//! reported, never fatal; the sink retries opening on the next event.

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

fn open(path: &Path) -> std::io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let len = file.metadata()?.len();
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
    for line in rx {
        let needed = line.len() as u64 + 1;
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
        }
        if current.is_none() {
            match open(path) {
                Ok(f) => current = Some(f),
                Err(e) => {
                    failed(
                        name,
                        throttle,
                        &format!("cannot open {}: {e}", path.display()),
                    );
                    dropped(name, throttle, "file unavailable");
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
