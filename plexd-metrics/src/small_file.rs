//! Reading the small files the agent is pointed at (its config, peer names, tokens, keys)
//! with a bound on their size: a path that turns out to be a device, a log file or a
//! runaway generator must end in an error that names it, not in the agent's memory filling.

use std::io::{self, Read as _};
use std::path::Path;

/// Bound of a config or peer-names file: ten thousand peers' names take under 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Bound of a token, password or key file.
pub const MAX_SECRET_BYTES: u64 = 64 << 10;

/// The bytes of `path`, if it holds at most `limit` of them.
pub fn read_at_most(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "larger than {} KiB, more than such a file ever holds",
                limit >> 10
            ),
        ));
    }
    Ok(bytes)
}

/// The text of `path`, if it is UTF-8 and holds at most `limit` bytes.
pub fn read_text_at_most(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read_at_most(path, limit)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_within_the_bound_is_read_and_a_longer_one_or_a_device_is_refused() {
        let dir = std::env::temp_dir().join(format!("plexd-small-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![b'a'; 1024]).unwrap();
        assert_eq!(read_at_most(&path, 1024).unwrap().len(), 1024);
        let err = read_at_most(&path, 1023).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // An endless device ends at the bound too.
        let err = read_text_at_most(Path::new("/dev/zero"), 4096).unwrap_err();
        assert!(err.to_string().starts_with("larger than 4 KiB"), "{err}");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(
            read_text_at_most(&path, 10).unwrap_err().to_string(),
            "not UTF-8 text"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
