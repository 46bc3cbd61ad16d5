//! The HTTP clients' shared parts: TLS settings, and errors a user can act on.

use std::path::PathBuf;
use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::Policy;
use tokio_rustls::rustls::pki_types::ServerName;
use url::Url;

use super::{ReportError, USER_AGENT};
use crate::config::TlsOptions;

/// Most bytes of a response body read: the answers the agent needs (a secret, an error's
/// first line) are small, and a server that sends more, or never stops, must not fill the
/// agent's memory while the request's timeout runs.
pub(crate) const MAX_RESPONSE_BODY: usize = 1 << 20;

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
    /// Server name, versions, cipher suites and resumption.
    pub options: TlsOptions,
}

/// Builds the client of the server at `url`: rustls configured by
/// [`super::tls::client_config`], and a bound on every request.
///
/// Redirects are not followed: a POST that is redirected is a misconfigured URL, and
/// following it could carry the bearer token elsewhere.
pub(crate) fn build_client(
    url: &Url,
    tls: &TlsSettings,
    timeout: Duration,
    keys: &TlsKeys,
) -> Result<ServerClient, ReportError> {
    let config = super::tls::client_config(tls, keys)?;
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .user_agent(USER_AGENT)
        .timeout(timeout)
        .redirect(Policy::none());
    let sni = sni_name(url, tls);
    if let (Some(name), Some(host)) = (&sni, url.host_str()) {
        builder = builder.dns_resolver(Arc::new(ServerNameResolver {
            server_name: name.clone(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        }));
    }
    let client = builder
        .build()
        .map_err(|e| ReportError::Setup(format!("cannot set up the HTTP client: {}", chain(&e))))?;
    Ok(ServerClient { client, sni })
}

/// The DNS name to send as SNI instead of `url`'s host: `server_name` when it is a DNS
/// name other than the host (TLS sends no SNI for an address).
fn sni_name(url: &Url, tls: &TlsSettings) -> Option<String> {
    if url.scheme() != "https" {
        return None;
    }
    match ServerName::try_from(tls.options.server_name.trim()).ok()? {
        ServerName::DnsName(name) if Some(name.as_ref()) != url.host_str() => {
            Some(name.as_ref().to_owned())
        }
        _ => None,
    }
}

/// A client of one server. With `server_name` set to another DNS name than the URL's host,
/// the connection is addressed by that name, so that rustls sends it as SNI (reqwest takes
/// SNI from the request's URL and has no setting of its own for it), while the resolver
/// maps the name back to the URL's host and the `Host` header stays the URL's.
#[derive(Clone, Debug)]
pub(crate) struct ServerClient {
    client: reqwest::Client,
    sni: Option<String>,
}

impl ServerClient {
    /// A request to `url`.
    pub(crate) fn request(&self, method: reqwest::Method, url: &Url) -> reqwest::RequestBuilder {
        let Some(name) = &self.sni else {
            return self.client.request(method, url.clone());
        };
        let mut addressed = url.clone();
        if addressed.set_host(Some(name)).is_err() {
            return self.client.request(method, url.clone());
        }
        let host = &url[url::Position::BeforeHost..url::Position::AfterPort];
        self.client
            .request(method, addressed)
            .header(reqwest::header::HOST, host)
    }

    /// A POST to `url`.
    pub(crate) fn post(&self, url: &Url) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, url)
    }

    /// A GET of `url`.
    pub(crate) fn get(&self, url: &Url) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, url)
    }
}

/// Resolves `server_name` to the addresses of the URL's host, every other name as usual.
struct ServerNameResolver {
    server_name: String,
    host: String,
}

impl Resolve for ServerNameResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let target = if name.as_str() == self.server_name {
            self.host.clone()
        } else {
            name.as_str().to_owned()
        };
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.as_str(), 0))
                .await?
                .collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
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
    if let Some(advice) = tls_advice(keys, &detail.to_ascii_lowercase()) {
        detail.push_str(&format!(" (TLS: {advice})"));
    }
    ReportError::Transport {
        what: keys.what,
        url: url.to_owned(),
        detail,
    }
}

/// What to change when a handshake failed, from rustls' words for the failure (`lower`,
/// in lower case).
fn tls_advice(keys: &TlsKeys, lower: &str) -> Option<String> {
    let (ca, section) = (keys.ca, keys.section);
    if lower.contains("causedasendentity") {
        Some(format!(
            "the server's certificate is itself a CA certificate (basicConstraints CA:TRUE, \
             as `openssl req -x509` makes by default), which TLS refuses as a server's \
             certificate, and it is not in {ca}: put that very certificate in {ca} to pin it \
             (its name and dates are still checked), or give the server a certificate with \
             CA:FALSE (`openssl req -x509 ... -addext basicConstraints=critical,CA:FALSE`, or \
             a CA that signs a server certificate) and put its CA in {ca}"
        ))
    } else if lower.contains("not valid for name") || lower.contains("notvalidforname") {
        Some(format!(
            "the server's certificate is not valid for the name the agent checks (the URL's \
             host, or {section}.server_name): set {section}.server_name to a name the \
             certificate carries, e.g. when the URL names an IP address"
        ))
    } else if lower.contains("certificate") || lower.contains("unknownissuer") {
        Some(format!(
            "set {ca} to the CA that signed the server's certificate"
        ))
    } else if ["protocolversion", "handshakefailure", "peerincompatible"]
        .iter()
        .any(|w| lower.contains(w))
    {
        Some(format!(
            "the server accepts none of the TLS versions or cipher suites offered; check \
             {section}.min_version, max_version and cipher_suites against the server's"
        ))
    } else {
        None
    }
}

/// Accepts a 2xx response and returns its body (at most [`MAX_RESPONSE_BODY`] bytes of it);
/// otherwise returns the status with the body's first line.
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
    // Reading the body, even when unused, lets the connection be reused; one cut short is
    // dropped with its connection.
    let body = bounded_text(response, MAX_RESPONSE_BODY).await;
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

/// The first `limit` bytes of `response`'s body as text (invalid UTF-8 replaced); what
/// could not be read is left out, since a body is only ever evidence here.
async fn bounded_text(mut response: reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&body).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A server on loopback that answers every request with `status` and a chunked body that
    /// never ends. Returns its URL.
    async fn endless(status: &'static str) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                         Transfer-Encoding: chunked\r\n\r\n"
                    );
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                    // Until the client hangs up.
                    while stream.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        Url::parse(&format!("http://{addr}/")).unwrap()
    }

    #[tokio::test]
    async fn an_endless_body_is_read_only_up_to_the_bound() {
        let timeout = Duration::from_secs(30);
        for status in ["503 Service Unavailable", "200 OK"] {
            let url = endless(status).await;
            let client =
                build_client(&url, &TlsSettings::default(), timeout, &CONTROL_PLANE).unwrap();
            let started = Instant::now();
            let response = client.get(&url).send().await.unwrap();
            let result = check_status(&CONTROL_PLANE, url.as_str(), response).await;
            // Well before the request's timeout: the read stopped at the bound.
            assert!(
                started.elapsed() < timeout / 3,
                "{status}: {:?}",
                started.elapsed()
            );
            match result {
                Ok(body) => assert_eq!(body.len(), MAX_RESPONSE_BODY, "{status}"),
                Err(ReportError::Status { status, body, .. }) => {
                    assert_eq!(status.as_u16(), 503);
                    assert_eq!(body.len(), BODY_EXCERPT);
                }
                Err(e) => panic!("{status}: {e}"),
            }
        }
    }
}
