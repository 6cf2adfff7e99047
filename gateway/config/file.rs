//! Reading the files the config names: regular files only, and at most a size limit.
//!
//! A FIFO given as the config would block `check-config` and `run` forever, `/dev/zero`
//! would be read until memory runs out. Every file the gateway reads at start or reload
//! (the config, each profile, the upstream TLS PEM files) is opened without blocking,
//! checked with `fstat` on the opened descriptor (so a path swapped after the check does
//! not matter), and read through a `limit + 1` window, so a file that grows while it is
//! read, or that reports no size (procfs), is refused too.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest config file (`gateway.toml`) accepted: 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Largest device profile (`<name>.json`) accepted: 1 MiB.
pub const MAX_PROFILE_BYTES: u64 = 1024 * 1024;
/// Largest upstream TLS PEM file (`ca_file`, `client_cert`, `client_key`) accepted: 1 MiB.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why a file was not read. Its `Display` does not name the path: callers do.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("refused: {0}, not a regular file")]
    NotRegular(FileKind),
    #[error("refused: larger than {} (the limit for this file)", Size(*limit))]
    TooLarge { limit: u64 },
    #[error("cannot read: not UTF-8 text")]
    NotUtf8,
}

/// What a path turned out to be instead of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
    Other,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Directory => "a directory",
            FileKind::Fifo => "a FIFO (named pipe)",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Socket => "a socket",
            FileKind::Other => "a special file",
        })
    }
}

/// A byte count as people read it: `1 MiB`, `64 KiB`, `100 bytes`.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{} MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{} KiB", n >> 10),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// Open `path` for reading without blocking (a FIFO without a writer would block a plain
/// open) and check, on the opened file, that it is a regular file of at most `limit`
/// bytes.
fn open_regular(path: &Path, limit: u64) -> Result<(std::fs::File, u64), FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK has no effect on reads of a regular file; O_NOCTTY keeps a terminal
        // named by mistake from becoming the controlling one.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            FileKind::Directory
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_char_device() {
            FileKind::CharDevice
        } else if ft.is_block_device() {
            FileKind::BlockDevice
        } else if ft.is_socket() {
            FileKind::Socket
        } else {
            FileKind::Other
        };
        return Err(FileError::NotRegular(kind));
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge { limit });
    }
    Ok((file, meta.len()))
}

/// Check that `path` is a regular file of at most `limit` bytes, without reading it.
pub fn check(path: &Path, limit: u64) -> Result<(), FileError> {
    open_regular(path, limit).map(|_| ())
}

/// The bytes of `path`, a regular file of at most `limit` bytes.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let (file, len) = open_regular(path, limit)?;
    // `len` <= `limit`: one more byte tells a file that grew since `fstat`.
    let mut bytes = Vec::with_capacity(len as usize + 1);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge { limit });
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> Result<String, FileError> {
    String::from_utf8(read(path, limit)?).map_err(|_| FileError::NotUtf8)
}

/// Trusted roots for a TLS client: the certificates of `ca_file` (PEM, read as above), or
/// the system's. `Err` says what is wrong, without the file's contents.
pub fn root_store(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = read(path, MAX_PEM_BYTES).map_err(|e| e.to_string())?;
            let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("not a PEM certificate file: {e}"))?;
            if certs.is_empty() {
                return Err("holds no PEM certificate".into());
            }
            for c in certs {
                roots.add(c).map_err(|e| e.to_string())?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err("no usable root certificates on this system (set ca_file)".into());
            }
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, "x = 1\n").unwrap();
        assert_eq!(read_text(&path, 6).unwrap(), "x = 1\n");
        assert!(matches!(
            read_text(&path, 5),
            Err(FileError::TooLarge { limit: 5 })
        ));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_text(&path, 10), Err(FileError::NotUtf8)));
        let missing = read(&dir.path().join("missing"), 10).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("cannot read: No such file or directory"),
            "{missing}"
        );
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would never return.
        assert!(matches!(
            read(&fifo, 1024),
            Err(FileError::NotRegular(FileKind::Fifo))
        ));
        assert!(matches!(
            read(Path::new("/dev/zero"), 1024),
            Err(FileError::NotRegular(FileKind::CharDevice))
        ));
        assert!(matches!(
            read(dir.path(), 1024),
            Err(FileError::NotRegular(FileKind::Directory))
        ));
        assert_eq!(
            read(Path::new("/dev/zero"), MAX_CONFIG_BYTES)
                .unwrap_err()
                .to_string(),
            "refused: a character device, not a regular file"
        );
    }

    #[test]
    fn a_file_longer_than_its_reported_size_is_cut_at_the_limit() {
        // procfs files report size 0 and then produce text: the read window catches it.
        let maps = Path::new("/proc/self/maps");
        assert_eq!(std::fs::metadata(maps).unwrap().len(), 0);
        assert!(matches!(
            read(maps, 16),
            Err(FileError::TooLarge { limit: 16 })
        ));
        assert_eq!(
            FileError::TooLarge {
                limit: MAX_PEM_BYTES
            }
            .to_string(),
            "refused: larger than 1 MiB (the limit for this file)"
        );
    }
}
