//! The control plane's bearer token, read from a file that may be replaced at any time.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::secret::{SecretError, SecretString};

/// What identifies one version of the file. Kubernetes rotates a mounted secret by swapping
/// a symlink, which changes the inode; an editor or `mv` changes inode or mtime too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

/// A token file, read again whenever it has changed since the last read.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(Stamp, SecretString)>>,
}

impl TokenFile {
    /// A token read from `path` on first use.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cached: Mutex::new(None),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current token: the cached one while the file is unchanged, else the file's
    /// content with surrounding whitespace removed. A `stat` per call is the whole cost of
    /// noticing a rotation at once.
    pub fn current(&self) -> Result<SecretString, SecretError> {
        use std::os::unix::fs::MetadataExt;
        let read_error = |source| SecretError::Read {
            path: self.path.clone(),
            source,
        };
        let meta = std::fs::metadata(&self.path).map_err(read_error)?;
        let stamp = Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        };
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, token)) = cached.as_ref() {
            if *seen == stamp {
                return Ok(token.clone());
            }
        }
        let text =
            crate::small_file::read_text_at_most(&self.path, crate::small_file::MAX_SECRET_BYTES)
                .map_err(read_error)?;
        let token = text.trim();
        if token.is_empty() {
            return Err(read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file is empty",
            )));
        }
        let token = SecretString::new(token);
        *cached = Some((stamp, token.clone()));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_is_read_again_and_an_empty_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("plexd-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let t = TokenFile::new(&path);
        assert_eq!(t.current().unwrap().expose(), "first");
        assert_eq!(t.current().unwrap().expose(), "first");

        // Rotation as tools do it: write a new file, rename it over the old one.
        let next = dir.join("token.new");
        std::fs::write(&next, "second").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(t.current().unwrap().expose(), "second");

        std::fs::write(&path, "  \n").unwrap();
        let err = t.current().unwrap_err().to_string();
        assert!(err.contains("the file is empty"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(t.current().is_err());
    }
}
