//! Prometheus remote write as a destination: each batch written to the receiver at
//! `metrics.remote_write.url` as one snappy-compressed `prometheus.WriteRequest`.
//!
//! Points carry per-interval figures and Prometheus wants cumulative counters, so the
//! reporter keeps its own [`SeriesBook`] and folds each batch into it once: a retry of a batch
//! resends the bytes encoded for it the first time rather than folding its points again,
//! which would count them twice. A batch the receiver refuses has been folded all the same,
//! so the next batch's counters still include its increments; only its samples are lost.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use hyper::body::Bytes;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE,
};
use reqwest::StatusCode;
use tracing::{debug, warn};
use url::Url;
use uuid::Uuid;

use super::http::{
    build_client, check_status, transport_error, ServerClient, TlsSettings, REMOTE_WRITE,
};
use super::{MetricReporter, ReportError, TokenFile};
use crate::api::MetricPoint;
use crate::collector::BoxError;
use crate::config::{is_loopback, RemoteWriteConfig};
use crate::prometheus::remote_write::encode;
use crate::prometheus::series::SeriesBook;
use crate::secret::SecretString;

/// How long the series book keeps a peer or target no point speaks of: longer than any
/// collect interval, so only those that left are forgotten.
const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// How often, in the points' time, the book looks for them.
const FORGET_EVERY_MS: i64 = 60_000;

/// The header that names the protocol version of a remote-write request.
pub const REMOTE_WRITE_VERSION_HEADER: &str = "X-Prometheus-Remote-Write-Version";
/// Remote write 1.0's version string.
pub const REMOTE_WRITE_VERSION: &str = "0.1.0";

/// The `destination` label of the delivery figures this reporter's book writes.
const DESTINATION: &str = "remote_write";

/// How requests prove who sends them.
#[derive(Debug)]
enum Auth {
    None,
    Bearer(TokenFile),
    Basic {
        username: String,
        password: TokenFile,
    },
}

/// The batch encoded last and not yet settled (accepted or refused).
#[derive(Debug)]
struct Pending {
    key: Uuid,
    body: Bytes,
}

#[derive(Debug)]
struct State {
    book: SeriesBook,
    pending: Option<Pending>,
    /// When the book last forgot quiet peers (ms of the batch's latest point): a walk over
    /// every peer, worth doing once a minute, not once per batch.
    forgot_at_ms: i64,
}

/// Writes batches to a Prometheus remote-write receiver (remote write 1.0: protobuf, snappy
/// block format), with the credentials, headers, TLS and external labels of
/// `metrics.remote_write`.
///
/// Errors are [`ReportError`]s, which [`super::classify`] sorts as for the control plane: a
/// 4xx other than 408 and 429 is a refusal (the batch is dropped and counted), everything
/// else (429 with its `Retry-After`, 5xx, timeouts, connection and TLS errors, an unreadable
/// credential file) is retried.
#[derive(Debug)]
pub struct RemoteWriteReporter {
    client: ServerClient,
    url: Url,
    /// The URL as errors and logs show it: without credentials, query or fragment.
    shown: String,
    auth: Auth,
    headers: HeaderMap,
    external: Vec<(String, String)>,
    timeout: Duration,
    state: Mutex<State>,
}

impl RemoteWriteReporter {
    /// A reporter for `cfg`, which must have passed [`crate::config::Config::validate`] with a
    /// `url`. `node_id` (the config's, may be empty) becomes the external label `node` unless
    /// `cfg.external_labels` has one. Fails when the URL, a header, or a CA or client
    /// certificate file cannot be used.
    pub fn new(cfg: &RemoteWriteConfig, node_id: &str) -> Result<Self, ReportError> {
        let url = Url::parse(cfg.url.trim()).map_err(|e| {
            ReportError::Setup(format!(
                "metrics.remote_write.url {:?} is invalid: {e}",
                cfg.url
            ))
        })?;
        let shown = shown(&url);
        let auth = match (&cfg.token_file, &cfg.password_file) {
            (Some(token), _) => Auth::Bearer(TokenFile::new(token)),
            (None, Some(password)) => Auth::Basic {
                username: cfg.username.clone(),
                password: TokenFile::new(password),
            },
            (None, None) => Auth::None,
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            let bad = || {
                ReportError::Setup(format!(
                    "metrics.remote_write.headers: {name:?} is not a usable HTTP header"
                ))
            };
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let value = HeaderValue::from_str(value).map_err(|_| bad())?;
            headers.insert(name, value);
        }
        let tls = TlsSettings {
            ca_file: cfg.ca_file.clone(),
            client_identity: cfg.cert_file.clone().zip(cfg.key_file.clone()),
            insecure_skip_verify: cfg.tls_insecure_skip_verify,
            options: cfg.tls_options(),
        };
        if tls.insecure_skip_verify {
            warn!(
                component = "metrics",
                url = %shown,
                "metrics.remote_write.tls_insecure_skip_verify is set: the receiver's certificate is NOT verified; use metrics.remote_write.ca_file instead"
            );
        }
        if !matches!(auth, Auth::None) && url.scheme() == "http" && !is_loopback(&url) {
            warn!(
                component = "metrics",
                url = %shown,
                "metrics.remote_write sends its credential over plain http to another host; use an https url"
            );
        }
        Ok(Self {
            client: build_client(&url, &tls, cfg.timeout, &REMOTE_WRITE)?,
            url,
            shown,
            auth,
            headers,
            external: cfg.labels_for(node_id),
            timeout: cfg.timeout,
            state: Mutex::new(State {
                book: SeriesBook::new(env!("CARGO_PKG_VERSION"), DESTINATION),
                pending: None,
                forgot_at_ms: 0,
            }),
        })
    }

    /// The receiver's URL as errors show it (no credentials, query or fragment).
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// The labels added to every series, sorted by name.
    pub fn external_labels(&self) -> &[(String, String)] {
        &self.external
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The body of batch `key`: the one encoded for it before while it is unsettled, else
    /// `batch` folded and encoded now, replacing any other batch's.
    fn body(&self, key: Uuid, batch: &[MetricPoint]) -> Bytes {
        let mut state = self.state();
        if let Some(pending) = state.pending.as_ref().filter(|p| p.key == key) {
            return pending.body.clone();
        }
        let body = Bytes::from(encode(&mut state.book, batch, &self.external));
        // Peers that left stop being spoken of; their totals go after a while.
        if let Some(latest) = batch.iter().map(|p| p.timestamp.timestamp_millis()).max() {
            if latest - state.forgot_at_ms >= FORGET_EVERY_MS {
                state
                    .book
                    .forget_before(latest - FORGET_AFTER.as_millis() as i64);
                state.forgot_at_ms = latest;
            }
        }
        state.pending = Some(Pending {
            key,
            body: body.clone(),
        });
        body
    }

    /// Forgets batch `key`'s body: it was accepted or refused and is not sent again.
    fn settle(&self, key: Uuid) {
        let mut state = self.state();
        if state.pending.as_ref().is_some_and(|p| p.key == key) {
            state.pending = None;
        }
    }

    /// The current bearer token or password, `None` without credentials.
    fn credential(&self) -> Result<Option<SecretString>, ReportError> {
        let (file, key) = match &self.auth {
            Auth::None => return Ok(None),
            Auth::Bearer(file) => (file, "metrics.remote_write.token_file"),
            Auth::Basic { password, .. } => (password, "metrics.remote_write.password_file"),
        };
        file.current()
            .map(Some)
            .map_err(|source| ReportError::Token { key, source })
    }

    fn request(&self, body: Bytes, credential: Option<&SecretString>) -> reqwest::RequestBuilder {
        let request = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/x-protobuf")
            .header(CONTENT_ENCODING, "snappy")
            .header(REMOTE_WRITE_VERSION_HEADER, REMOTE_WRITE_VERSION)
            .body(body);
        match (&self.auth, credential) {
            (Auth::Bearer(_), Some(token)) => {
                match HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
                    Ok(mut value) => {
                        // Keeps the value out of reqwest's and hyper's Debug output.
                        value.set_sensitive(true);
                        request.header(AUTHORIZATION, value)
                    }
                    // Sent without it; the receiver's 401 names the key to check.
                    Err(_) => request,
                }
            }
            (Auth::Basic { username, .. }, Some(password)) => {
                request.basic_auth(username, Some(password.expose()))
            }
            _ => request,
        }
    }

    async fn post(&self, key: Uuid, batch: &[MetricPoint]) -> Result<(), ReportError> {
        let body = self.body(key, batch);
        let mut credential = self.credential()?;
        let mut retried_new_credential = false;
        loop {
            let sent = self
                .request(body.clone(), credential.as_ref())
                .send()
                .await
                .map_err(|e| hint(transport_error(&REMOTE_WRITE, &self.shown, self.timeout, e)))?;
            let result = check_status(&REMOTE_WRITE, &self.shown, sent).await;
            // A credential rotated between reading it and the receiver checking it: the
            // batch is sent again at once with the new one rather than refused.
            if let Err(ReportError::Status { status, .. }) = &result {
                if *status == StatusCode::UNAUTHORIZED && !retried_new_credential {
                    if let Ok(fresh) = self.credential() {
                        if fresh != credential {
                            debug!(
                                component = "metrics",
                                "remote-write credential file changed; sending the batch again"
                            );
                            credential = fresh;
                            retried_new_credential = true;
                            continue;
                        }
                    }
                }
            }
            return match result {
                Ok(_) => {
                    self.settle(key);
                    Ok(())
                }
                Err(e) => {
                    if e.is_rejection() {
                        self.settle(key);
                    }
                    Err(hint(e))
                }
            };
        }
    }
}

/// `url` without credentials, query or fragment: a query may carry an API key.
fn shown(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// Adds the config key to check to an error whose cause is likely in the config.
fn hint(mut e: ReportError) -> ReportError {
    match &mut e {
        ReportError::Status { status, body, .. } => {
            let key = match status.as_u16() {
                401 | 403 => "check metrics.remote_write.token_file, or username and password_file",
                404 | 405 => {
                    "check metrics.remote_write.url: the receiver's write path, e.g. /api/v1/write; \
                     Prometheus needs --web.enable-remote-write-receiver"
                }
                413 => "the batch is too large for the receiver: lower metrics.batch_size",
                _ => return e,
            };
            *body = if body.is_empty() {
                format!("({key})")
            } else {
                format!("{body} ({key})")
            };
        }
        ReportError::Transport { detail, .. } if !detail.contains("(TLS:") => {
            detail.push_str(" (check metrics.remote_write.url and that the receiver is up)");
        }
        _ => {}
    }
    e
}

#[async_trait]
impl MetricReporter for RemoteWriteReporter {
    async fn report_metrics(&self, node_id: &str, batch: &[MetricPoint]) -> Result<(), BoxError> {
        self.report_batch(node_id, Uuid::new_v4(), batch).await
    }

    /// Writes `batch`; a call with the `key` of the batch sent last, still unsettled, resends
    /// its bytes. `node_id` is not used: the node is an external label, fixed at construction.
    async fn report_batch(
        &self,
        _node_id: &str,
        key: Uuid,
        batch: &[MetricPoint],
    ) -> Result<(), BoxError> {
        Ok(self.post(key, batch).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::remote_write::decode;

    fn cfg(url: &str) -> RemoteWriteConfig {
        RemoteWriteConfig {
            url: url.into(),
            ..RemoteWriteConfig::default()
        }
    }

    fn point(rx: u64) -> MetricPoint {
        let stats = crate::collector::TunnelStats {
            peer_id: "gw".into(),
            public_key: "K".into(),
            rx_packets: Some(rx),
            ..Default::default()
        };
        MetricPoint::new(chrono::Utc::now(), crate::api::GROUP_TUNNEL, "gw", &stats).unwrap()
    }

    fn rx_total(body: &Bytes) -> f64 {
        decode(body)
            .unwrap()
            .timeseries
            .iter()
            .find(|s| s.label("__name__") == Some("plexd_peer_receive_packets_total"))
            .expect("the series")
            .samples[0]
            .value
    }

    #[test]
    fn a_retry_resends_the_same_bytes_and_folds_once() {
        let r = RemoteWriteReporter::new(&cfg("http://127.0.0.1:9/api/v1/write"), "n1").unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = r.body(a, &[point(10)]);
        assert_eq!(
            r.body(a, &[point(10)]),
            first,
            "the same key: the same bytes"
        );
        assert_eq!(rx_total(&first), 10.0);
        r.settle(a);
        let next = r.body(b, &[point(5)]);
        assert_eq!(rx_total(&next), 15.0, "cumulative across batches");
        // Settling another key leaves the pending body alone.
        r.settle(a);
        assert_eq!(r.body(b, &[]), next);
    }

    #[test]
    fn the_node_label_and_a_url_without_secrets() {
        let r =
            RemoteWriteReporter::new(&cfg("https://vm.example/api/v1/write?token=s3cr3t"), "n1")
                .unwrap();
        assert_eq!(r.url(), "https://vm.example/api/v1/write");
        assert_eq!(r.external_labels(), [("node".to_owned(), "n1".to_owned())]);
        let r = RemoteWriteReporter::new(&cfg("https://vm.example/"), "").unwrap();
        assert!(r.external_labels().is_empty());
    }

    #[test]
    fn errors_name_the_key_to_check() {
        let status = |code: u16| {
            hint(ReportError::Status {
                what: "remote write",
                url: "https://x/api/v1/write".into(),
                status: StatusCode::from_u16(code).unwrap(),
                body: String::new(),
                retry_after: None,
            })
            .to_string()
        };
        assert!(status(401).contains("metrics.remote_write.token_file"));
        assert!(status(404).contains("--web.enable-remote-write-receiver"));
        assert_eq!(
            status(400),
            "remote write https://x/api/v1/write answered 400 Bad Request"
        );
        let missing = RemoteWriteReporter::new(
            &RemoteWriteConfig {
                token_file: Some("/nonexistent/token".into()),
                ..cfg("https://x/")
            },
            "",
        )
        .unwrap()
        .credential()
        .unwrap_err()
        .to_string();
        assert!(
            missing.starts_with("metrics.remote_write.token_file: cannot read /nonexistent/token"),
            "{missing}"
        );
        let bad_ca = RemoteWriteReporter::new(
            &RemoteWriteConfig {
                cert_file: Some("/nonexistent/c".into()),
                key_file: Some("/nonexistent/k".into()),
                ..cfg("https://x/")
            },
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad_ca.starts_with("metrics.remote_write.cert_file: cannot read /nonexistent/c"),
            "{bad_ca}"
        );
    }
}
