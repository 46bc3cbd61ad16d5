//! The TLS keys every HTTP client section has (`control_plane`, `metrics.local_endpoint`,
//! `metrics.remote_write`) beside its certificate files, and their rules: one parser, so
//! that the three sections accept the same spellings and refuse with the same words.

use std::fmt;

use tokio_rustls::rustls::crypto::ring::cipher_suite as suite;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{version, SupportedCipherSuite, SupportedProtocolVersion};

/// The oldest TLS version offered unless a section's `min_version` says otherwise.
pub const DEFAULT_TLS_MIN_VERSION: &str = "TLS1.2";
/// The newest TLS version offered unless a section's `max_version` says otherwise.
pub const DEFAULT_TLS_MAX_VERSION: &str = "TLS1.3";

/// A section's TLS keys as written, before [`TlsOptions::parse`] checks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// The name the server's certificate must be valid for; empty means the URL's host.
    pub server_name: String,
    /// The oldest TLS version offered.
    pub min_version: String,
    /// The newest TLS version offered.
    pub max_version: String,
    /// The cipher suites offered, by name; empty means rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// Whether sessions are resumed (TLS 1.3 tickets, TLS 1.2 tickets and session ids).
    pub session_tickets: bool,
}

impl Default for TlsOptions {
    fn default() -> Self {
        Self {
            server_name: String::new(),
            min_version: DEFAULT_TLS_MIN_VERSION.to_owned(),
            max_version: DEFAULT_TLS_MAX_VERSION.to_owned(),
            cipher_suites: Vec::new(),
            session_tickets: true,
        }
    }
}

/// A TLS version rustls speaks, oldest first so that versions compare by age.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2 (RFC 5246).
    Tls12,
    /// TLS 1.3 (RFC 8446).
    Tls13,
}

impl TlsVersion {
    /// rustls' description of this version.
    pub fn rustls(self) -> &'static SupportedProtocolVersion {
        match self {
            Self::Tls12 => &version::TLS12,
            Self::Tls13 => &version::TLS13,
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tls12 => "TLS1.2",
            Self::Tls13 => "TLS1.3",
        })
    }
}

/// Reads a version the way people write it: `TLS1.2`, `TLSv1.2`, `tls12`, `1.2`, Go's
/// `VersionTLS12`, in any case. Empty means `default`.
fn parse_version(key: &str, text: &str, default: TlsVersion) -> Result<TlsVersion, String> {
    let lower = text.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Ok(default);
    }
    let core = lower.strip_prefix("version").unwrap_or(&lower);
    let old = |name: &str| {
        format!(
            "{key}: {text:?} ({name}) is refused: rustls, the agent's TLS library, implements \
             only TLS 1.2 and 1.3, on purpose; SSL, TLS 1.0 and TLS 1.1 are deprecated (RFC \
             8996, RFC 7568) and every maintained server speaks TLS 1.2; write TLS1.2 or TLS1.3"
        )
    };
    if core.starts_with("ssl") {
        return Err(old("SSL"));
    }
    let number: String = core
        .strip_prefix("tls")
        .unwrap_or(core)
        .trim_start_matches(['v', ' ', '_', '-'])
        .chars()
        .filter(|c| !matches!(c, '.' | '_'))
        .collect();
    match number.as_str() {
        "12" => Ok(TlsVersion::Tls12),
        "13" => Ok(TlsVersion::Tls13),
        "1" | "10" => Err(old("TLS 1.0")),
        "11" => Err(old("TLS 1.1")),
        _ => Err(format!(
            "{key}: {text:?} is not a TLS version; write TLS1.2 or TLS1.3"
        )),
    }
}

/// The cipher suites rustls implements, by the names Go's crypto/tls gives them (the IANA
/// names, which OpenSSL's `-ciphersuites` shares for TLS 1.3).
const CIPHER_SUITES: [(&str, SupportedCipherSuite); 9] = [
    ("TLS_AES_128_GCM_SHA256", suite::TLS13_AES_128_GCM_SHA256),
    ("TLS_AES_256_GCM_SHA384", suite::TLS13_AES_256_GCM_SHA384),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        suite::TLS13_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// Finds a suite by name, in any case. Go's older names of the ChaCha20 suites (without
/// `_SHA256`) are accepted too, so that a config written for metricsd reads the same.
fn find_suite(name: &str) -> Option<SupportedCipherSuite> {
    let name = name.trim().to_ascii_uppercase();
    let full = match name.as_str() {
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
            format!("{name}_SHA256")
        }
        _ => name,
    };
    CIPHER_SUITES
        .iter()
        .find(|(n, _)| *n == full)
        .map(|(_, s)| *s)
}

/// A section's TLS keys once they passed the rules, in rustls' types.
#[derive(Clone, Debug)]
pub struct ParsedTls {
    /// The name to verify the certificate against instead of the URL's host.
    pub server_name: Option<ServerName<'static>>,
    /// The versions offered, newest first.
    pub versions: Vec<&'static SupportedProtocolVersion>,
    /// The suites offered; `None` means the provider's defaults.
    pub cipher_suites: Option<Vec<SupportedCipherSuite>>,
    /// Whether sessions are resumed.
    pub session_tickets: bool,
}

impl TlsOptions {
    /// Checks the keys; each problem names `section.<key>` and says what to write.
    pub fn parse(&self, section: &str) -> Result<ParsedTls, Vec<String>> {
        let mut problems = Vec::new();
        let server_name = match self.server_name.trim() {
            "" => None,
            name => match ServerName::try_from(name.to_owned()) {
                Ok(n) => Some(n),
                Err(_) => {
                    problems.push(format!(
                        "{section}.server_name: {:?} is neither a DNS name nor an IP address; \
                         write the name the server's certificate carries, e.g. cp.example",
                        self.server_name
                    ));
                    None
                }
            },
        };
        let min = parse_version(
            &format!("{section}.min_version"),
            &self.min_version,
            TlsVersion::Tls12,
        );
        let max = parse_version(
            &format!("{section}.max_version"),
            &self.max_version,
            TlsVersion::Tls13,
        );
        let range = match (min, max) {
            (Ok(min), Ok(max)) if min > max => {
                problems.push(format!(
                    "{section}: min_version {min} is newer than max_version {max}; no version \
                     is left to offer"
                ));
                None
            }
            (Ok(min), Ok(max)) => Some((min, max)),
            (min, max) => {
                problems.extend(min.err());
                problems.extend(max.err());
                None
            }
        };
        let mut suites = Vec::new();
        for name in &self.cipher_suites {
            match find_suite(name) {
                Some(s) if !suites.contains(&s) => suites.push(s),
                Some(_) => {}
                None => problems.push(format!(
                    "{section}.cipher_suites: {name:?} is not a cipher suite rustls implements \
                     (its suites are AEADs with forward secrecy); the supported ones are {}",
                    supported_suite_names()
                )),
            }
        }
        let mut versions = Vec::new();
        if let Some((min, max)) = range {
            for v in [TlsVersion::Tls13, TlsVersion::Tls12] {
                if v < min || v > max {
                    continue;
                }
                let listed = suites.iter().any(|s| s.version() == v.rustls());
                if !suites.is_empty() && !listed {
                    let of_version: Vec<&str> = CIPHER_SUITES
                        .iter()
                        .filter(|(_, s)| s.version() == v.rustls())
                        .map(|(n, _)| *n)
                        .collect();
                    problems.push(format!(
                        "{section}.cipher_suites names no {v} suite, so {v} could not be used; \
                         add one of {}, or leave {v} out with min_version/max_version",
                        of_version.join(", ")
                    ));
                }
                versions.push(v.rustls());
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(ParsedTls {
            server_name,
            versions,
            cipher_suites: (!suites.is_empty()).then_some(suites),
            session_tickets: self.session_tickets,
        })
    }
}

/// Every suite name [`TlsOptions::parse`] accepts, for its error message.
fn supported_suite_names() -> String {
    CIPHER_SUITES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opts(min: &str, max: &str, suites: &[&str]) -> TlsOptions {
        TlsOptions {
            min_version: min.into(),
            max_version: max.into(),
            cipher_suites: suites.iter().map(|s| s.to_string()).collect(),
            ..TlsOptions::default()
        }
    }

    fn problems(o: &TlsOptions) -> Vec<String> {
        o.parse("s").err().unwrap_or_default()
    }

    #[test]
    fn the_defaults_offer_tls_1_3_and_1_2_with_rustls_suites_and_resumption() {
        let p = TlsOptions::default().parse("s").unwrap();
        assert_eq!(p.versions, [&version::TLS13, &version::TLS12]);
        assert!(p.cipher_suites.is_none());
        assert!(p.server_name.is_none());
        assert!(p.session_tickets);
    }

    #[test]
    fn versions_read_in_the_usual_spellings() {
        for text in [
            "TLS1.2",
            "tls1.2",
            "TLSv1.2",
            "TLS 1.2",
            "tls12",
            "TLS_1_2",
            "1.2",
            "VersionTLS12",
        ] {
            assert_eq!(
                parse_version("k", text, TlsVersion::Tls13),
                Ok(TlsVersion::Tls12),
                "{text}"
            );
        }
        for text in ["TLS1.3", "tlsv13", "1.3", " TLS1.3 "] {
            assert_eq!(
                parse_version("k", text, TlsVersion::Tls12),
                Ok(TlsVersion::Tls13),
                "{text}"
            );
        }
        assert_eq!(
            parse_version("k", "", TlsVersion::Tls13),
            Ok(TlsVersion::Tls13)
        );
    }

    #[test]
    fn old_versions_are_refused_with_the_reason() {
        for text in ["TLS1.0", "tls1.1", "1.0", "SSLv3", "VersionTLS10"] {
            let e = parse_version("s.min_version", text, TlsVersion::Tls12).unwrap_err();
            assert!(e.starts_with("s.min_version: "), "{e}");
            assert!(e.contains("rustls"), "{e}");
            assert!(e.contains("RFC 8996"), "{e}");
            assert!(e.contains("write TLS1.2 or TLS1.3"), "{e}");
        }
        let e = parse_version("s.max_version", "1.4", TlsVersion::Tls13).unwrap_err();
        assert_eq!(
            e,
            "s.max_version: \"1.4\" is not a TLS version; write TLS1.2 or TLS1.3"
        );
    }

    #[test]
    fn min_above_max_is_refused() {
        assert_eq!(
            problems(&opts("TLS1.3", "TLS1.2", &[])),
            ["s: min_version TLS1.3 is newer than max_version TLS1.2; no version is left to offer"]
        );
        let p = opts("1.3", "1.3", &[]).parse("s").unwrap();
        assert_eq!(p.versions, [&version::TLS13]);
    }

    #[test]
    fn suites_are_found_by_go_and_iana_names_and_unknown_ones_list_the_supported() {
        let p = opts("", "TLS1.2", &["tls_ecdhe_rsa_with_aes_128_gcm_sha256"])
            .parse("s")
            .unwrap();
        assert_eq!(
            p.cipher_suites.unwrap(),
            [suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]
        );
        let p = opts(
            "",
            "",
            &[
                "TLS_AES_256_GCM_SHA384",
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
            ],
        )
        .parse("s")
        .unwrap();
        assert_eq!(
            p.cipher_suites.unwrap(),
            [
                suite::TLS13_AES_256_GCM_SHA384,
                suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            ]
        );
        let found = problems(&opts("", "", &["TLS_RSA_WITH_AES_128_CBC_SHA"]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(
                "s.cipher_suites: \"TLS_RSA_WITH_AES_128_CBC_SHA\" is not a cipher suite rustls implements"
            ),
            "{found:?}"
        );
        for (name, _) in CIPHER_SUITES {
            assert!(found[0].contains(name), "{found:?}");
        }
    }

    #[test]
    fn a_list_that_leaves_an_allowed_version_without_a_suite_is_refused() {
        let found = problems(&opts("", "", &["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("s.cipher_suites names no TLS1.3 suite"),
            "{found:?}"
        );
        assert!(found[0].contains("TLS_AES_128_GCM_SHA256"), "{found:?}");
        let found = problems(&opts("TLS1.2", "TLS1.2", &["TLS_AES_128_GCM_SHA256"]));
        assert!(
            found[0].starts_with("s.cipher_suites names no TLS1.2 suite"),
            "{found:?}"
        );
        assert!(opts("TLS1.3", "", &["TLS_AES_128_GCM_SHA256"])
            .parse("s")
            .is_ok());
    }

    #[test]
    fn a_server_name_is_a_dns_name_or_an_address() {
        let mut o = TlsOptions {
            server_name: "cp.example".into(),
            ..TlsOptions::default()
        };
        assert_eq!(
            o.parse("s").unwrap().server_name.unwrap().to_str(),
            "cp.example"
        );
        o.server_name = "not a name!".into();
        let found = problems(&o);
        assert!(
            found[0].starts_with("s.server_name: \"not a name!\""),
            "{found:?}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(
            server_name in ".*",
            min in ".*",
            max in ".*",
            suites in proptest::collection::vec(".*", 0..4),
            tickets: bool,
        ) {
            let o = TlsOptions {
                server_name,
                min_version: min,
                max_version: max,
                cipher_suites: suites,
                session_tickets: tickets,
            };
            if let Err(found) = o.parse("s") {
                prop_assert!(!found.is_empty());
                prop_assert!(found.iter().all(|p| p.starts_with("s")));
            }
        }
    }
}
