//! Secret material: bearer tokens, the node secret key and the decryption of fetched secrets.
//!
//! Every type here that holds a secret redacts it in `Debug` and `Display`, so that a stray
//! `?value` in a log line or an error message cannot leak it.

use std::fmt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use serde::Deserialize;

const REDACTED: &str = "[redacted]";

/// Why secret material could not be loaded or decrypted. No variant carries the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A key or token file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The node secret key file does not hold 32 bytes in a format we read.
    #[error(
        "{} does not hold a node secret key: expected 32 bytes written as 64 hex digits or as base64",
        path.display()
    )]
    KeyFormat {
        /// The file.
        path: PathBuf,
    },
    /// A field of the control plane's secret response is not base64.
    #[error("secret response: {field} is not valid base64")]
    Base64 {
        /// `ciphertext` or `nonce`.
        field: &'static str,
    },
    /// AES-GCM nonces are 12 bytes.
    #[error("secret response: nonce must be 12 bytes, got {len}")]
    NonceLength {
        /// Bytes in the decoded nonce.
        len: usize,
    },
    /// Authentication failed: wrong node secret key, or a corrupted ciphertext.
    #[error(
        "cannot decrypt the secret: authentication failed (does control_plane.node_secret_key_file hold this node's key?)"
    )]
    Decrypt,
    /// The decrypted secret is not text, or is empty.
    #[error("the decrypted secret is empty or not UTF-8 text")]
    NotText,
}

/// A secret string (a bearer token). `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; only for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// The node's 32-byte AES-256 key that decrypts secrets fetched from the control plane.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeSecretKey([u8; 32]);

impl fmt::Debug for NodeSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeSecretKey(")?;
        f.write_str(REDACTED)?;
        f.write_str(")")
    }
}

impl NodeSecretKey {
    /// A key from its raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Reads the key from `path`: 64 hex digits or base64 of 32 bytes, surrounding
    /// whitespace ignored. Anything else is an error naming the file (never its content).
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let limit = crate::small_file::MAX_SECRET_BYTES;
        let text =
            crate::small_file::read_at_most(path, limit).map_err(|source| SecretError::Read {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(&text).ok_or_else(|| SecretError::KeyFormat {
            path: path.to_owned(),
        })
    }

    /// Decodes hex or base64 (standard or URL-safe, padded or not) text of 32 bytes.
    pub fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()?
        } else {
            decode_base64(text)?
        };
        Some(Self(bytes.try_into().ok()?))
    }
}

/// The control plane's answer to `GET /v1/nodes/{node_id}/secrets/{key}`: the spec's
/// `api.SecretResponse`, both fields base64.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct SecretResponse {
    /// AES-256-GCM ciphertext followed by its 16-byte tag.
    pub ciphertext: String,
    /// The 12-byte nonce.
    pub nonce: String,
}

impl fmt::Debug for SecretResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretResponse")
            .field("ciphertext", &REDACTED)
            .field("nonce", &self.nonce)
            .finish()
    }
}

/// Decrypts a fetched secret with the node secret key (the spec's `nodeapi.DecryptSecret`).
pub fn decrypt_secret(
    key: &NodeSecretKey,
    response: &SecretResponse,
) -> Result<SecretString, SecretError> {
    let ciphertext = decode_base64(&response.ciphertext).ok_or(SecretError::Base64 {
        field: "ciphertext",
    })?;
    let nonce = decode_base64(&response.nonce).ok_or(SecretError::Base64 { field: "nonce" })?;
    if nonce.len() != 12 {
        return Err(SecretError::NonceLength { len: nonce.len() });
    }
    let cipher = Aes256Gcm::new_from_slice(&key.0).expect("the key is 32 bytes by construction");
    let plain = cipher
        .decrypt(Nonce::from_slice(&nonce), ciphertext.as_slice())
        .map_err(|_| SecretError::Decrypt)?;
    match String::from_utf8(plain) {
        Ok(text) if !text.trim().is_empty() => Ok(SecretString(text.trim().to_owned())),
        _ => Err(SecretError::NotText),
    }
}

/// Go's `encoding/json` writes `[]byte` as padded standard base64; other writers drop the
/// padding or use the URL-safe alphabet, and reading those too costs nothing.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text.trim()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    fn encrypt(key: &[u8; 32], nonce: &[u8; 12], plain: &str) -> SecretResponse {
        let cipher = Aes256Gcm::new_from_slice(key).unwrap();
        let ct = cipher
            .encrypt(Nonce::from_slice(nonce), plain.as_bytes())
            .unwrap();
        SecretResponse {
            ciphertext: STANDARD.encode(ct),
            nonce: STANDARD.encode(nonce),
        }
    }

    #[test]
    fn round_trip_with_the_right_key_only() {
        let key = [7u8; 32];
        let resp = encrypt(&key, &[1; 12], "local-metrics-token");
        let token = decrypt_secret(&NodeSecretKey::from_bytes(key), &resp).unwrap();
        assert_eq!(token.expose(), "local-metrics-token");
        let err = decrypt_secret(&NodeSecretKey::from_bytes([8; 32]), &resp).unwrap_err();
        assert!(matches!(err, SecretError::Decrypt), "{err}");
    }

    #[test]
    fn malformed_responses_are_named() {
        let key = NodeSecretKey::from_bytes([7; 32]);
        let bad = SecretResponse {
            ciphertext: "%%%".into(),
            nonce: STANDARD.encode([0u8; 12]),
        };
        assert_eq!(
            decrypt_secret(&key, &bad).unwrap_err().to_string(),
            "secret response: ciphertext is not valid base64"
        );
        let short = SecretResponse {
            ciphertext: STANDARD.encode([0u8; 32]),
            nonce: STANDARD.encode([0u8; 8]),
        };
        assert_eq!(
            decrypt_secret(&key, &short).unwrap_err().to_string(),
            "secret response: nonce must be 12 bytes, got 8"
        );
    }

    #[test]
    fn keys_parse_from_hex_and_base64_only_at_32_bytes() {
        let raw: [u8; 32] = std::array::from_fn(|i| i as u8 * 3);
        let want = NodeSecretKey::from_bytes(raw);
        assert_eq!(
            NodeSecretKey::parse(format!("{}\n", hex::encode(raw)).as_bytes()),
            Some(want.clone())
        );
        assert_eq!(
            NodeSecretKey::parse(STANDARD.encode(raw).as_bytes()),
            Some(want)
        );
        for bad in [
            &b"short"[..],
            hex::encode([1u8; 31]).as_bytes(),
            STANDARD.encode([1u8; 33]).as_bytes(),
            b"",
        ] {
            assert!(NodeSecretKey::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn nothing_secret_is_printed() {
        let token = SecretString::new("hunter2");
        let key = NodeSecretKey::from_bytes([0x41; 32]);
        let resp = encrypt(&[0x41; 32], &[2; 12], "hunter2");
        let printed = format!("{token} {token:?} {key:?} {resp:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains(&hex::encode([0x41u8; 32])), "{printed}");
        assert!(!printed.contains(&resp.ciphertext), "{printed}");
    }

    #[test]
    fn a_bad_key_file_is_named_without_its_content() {
        let dir = std::env::temp_dir().join(format!("plexd-nsk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nsk");
        std::fs::write(&path, "not-a-key-but-secret").unwrap();
        let err = NodeSecretKey::load(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(!err.contains("not-a-key-but-secret"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
