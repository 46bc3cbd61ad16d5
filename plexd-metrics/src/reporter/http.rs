//! The HTTP clients' shared parts: TLS settings, and errors a user can act on.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::redirect::Policy;

use super::{ReportError, USER_AGENT};

/// Longest part of an error response's body kept for the log.
const BODY_EXCERPT: usize = 200;

/// How one client verifies its server and proves itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM CA certificates trusted in addition to the system's and Mozilla's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and its key, for mutual TLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Accept any server certificate.
    pub insecure_skip_verify: bool,
}

/// Builds a client with rustls, the given trust and a bound on every request.
///
/// Redirects are not followed: a POST that is redirected is a misconfigured URL, and
/// following it could carry the bearer token elsewhere.
pub(crate) fn build_client(
    tls: &TlsSettings,
    timeout: Duration,
    keys: &TlsKeys,
) -> Result<reqwest::Client, ReportError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .user_agent(USER_AGENT)
        .timeout(timeout)
        .redirect(Policy::none());
    if let Some(path) = &tls.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            ReportError::Setup(format!("{}: cannot read {}: {e}", keys.ca, path.display()))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            ReportError::Setup(format!(
                "{}: {} is not a PEM certificate bundle: {}",
                keys.ca,
                path.display(),
                chain(&e)
            ))
        })?;
        if certs.is_empty() {
            return Err(ReportError::Setup(format!(
                "{}: {} holds no PEM certificate",
                keys.ca,
                path.display()
            )));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some((cert, key)) = &tls.client_identity {
        let mut pem = Vec::new();
        for (name, path) in [("cert_file", cert), ("key_file", key)] {
            let bytes = std::fs::read(path).map_err(|e| {
                ReportError::Setup(format!(
                    "{}.{name}: cannot read {}: {e}",
                    keys.section,
                    path.display()
                ))
            })?;
            pem.extend_from_slice(&bytes);
            pem.push(b'\n');
        }
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            ReportError::Setup(format!(
                "{}.cert_file/key_file: {} and {} are not a PEM certificate and private key: {}",
                keys.section,
                cert.display(),
                key.display(),
                chain(&e)
            ))
        })?;
        builder = builder.identity(identity);
    }
    if tls.insecure_skip_verify {
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder
        .build()
        .map_err(|e| ReportError::Setup(format!("cannot set up the HTTP client: {}", chain(&e))))
}

/// The config keys a client's error messages point at.
pub(crate) struct TlsKeys {
    /// `control plane` or `local endpoint`.
    pub what: &'static str,
    /// The key that adds a CA for this client.
    pub ca: &'static str,
    /// The config section of this client's other keys (`cert_file`, `key_file`).
    pub section: &'static str,
}

/// The control plane client's keys.
pub(crate) const CONTROL_PLANE: TlsKeys = TlsKeys {
    what: "control plane",
    ca: "control_plane.ca_file",
    section: "control_plane",
};

/// The local endpoint client's keys.
pub(crate) const LOCAL_ENDPOINT: TlsKeys = TlsKeys {
    what: "local endpoint",
    ca: "metrics.local_endpoint.ca_file",
    section: "metrics.local_endpoint",
};

/// The remote-write client's keys.
pub(crate) const REMOTE_WRITE: TlsKeys = TlsKeys {
    what: "remote write",
    ca: "metrics.remote_write.ca_file",
    section: "metrics.remote_write",
};

/// Turns a failed request into an error naming the URL (never the token) and the cause.
pub(crate) fn transport_error(
    keys: &TlsKeys,
    url: &str,
    timeout: Duration,
    e: reqwest::Error,
) -> ReportError {
    if e.is_timeout() {
        return ReportError::Timeout {
            what: keys.what,
            url: url.to_owned(),
            timeout,
        };
    }
    let mut detail = chain(&e.without_url());
    let lower = detail.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("unknownissuer") {
        detail.push_str(&format!(
            " (TLS: set {} to the CA that signed the server's certificate)",
            keys.ca
        ));
    }
    ReportError::Transport {
        what: keys.what,
        url: url.to_owned(),
        detail,
    }
}

/// Accepts a 2xx response and returns its body; otherwise returns the status with the
/// body's first line.
pub(crate) async fn check_status(
    keys: &TlsKeys,
    url: &str,
    response: reqwest::Response,
) -> Result<String, ReportError> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // Reading the body, even when unused, lets the connection be reused.
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(body);
    }
    let first_line: String = body
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .chars()
        .take(BODY_EXCERPT)
        .collect();
    Err(ReportError::Status {
        what: keys.what,
        url: url.to_owned(),
        status,
        body: first_line,
        retry_after,
    })
}

/// An error and its sources, each once: reqwest's own text alone says little
/// ("error sending request"); the cause (refused, certificate unknown) is further down.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}
