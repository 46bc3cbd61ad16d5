//! Where batches go: the spec's `MetricReporter` and its implementations.
//!
//! - [`ControlPlaneReporter`]: the control plane's API (gzip JSON, bearer token from a file,
//!   idempotency key); it is also the [`SecretFetcher`] of the local endpoint's credential.
//! - [`LocalReporter`]: an optional local HTTPS endpoint with its own TLS settings and a
//!   credential fetched from the control plane and decrypted with the node's key.
//! - [`MultiReporter`]: both at once; only the control plane's result counts.
//! - [`RemoteWriteReporter`]: Prometheus remote write 1.0 (snappy protobuf) to a receiver
//!   such as Prometheus, Mimir, Thanos or VictoriaMetrics.
//! - [`StdoutReporter`]: one JSON line per batch when no control plane is configured.

mod control_plane;
pub(crate) mod http;
mod local;
mod multi;
mod remote_write;
mod stdout;
mod tls;
pub(crate) mod token;

pub use control_plane::{gzip_json, ControlPlaneReporter};
pub use http::TlsSettings;
pub use local::{LocalReporter, SecretFetcher, CREDENTIAL_TTL, LOCAL_TIMEOUT};
pub use multi::{MultiReporter, LOCAL_BACKLOG};
pub use remote_write::{RemoteWriteReporter, REMOTE_WRITE_VERSION, REMOTE_WRITE_VERSION_HEADER};
pub use stdout::StdoutReporter;
pub use token::TokenFile;

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::api::MetricPoint;
use crate::collector::BoxError;
use crate::secret::SecretError;

/// The `User-Agent` of every request: the agent's name and version.
pub const USER_AGENT: &str = concat!("plexd-metrics/", env!("CARGO_PKG_VERSION"));

/// Delivers one batch of points for a node: the spec's `MetricReporter`.
#[async_trait]
pub trait MetricReporter: Send + Sync {
    /// Sends `batch` on behalf of `node_id`. An error means the batch was not accepted.
    async fn report_metrics(&self, node_id: &str, batch: &[MetricPoint]) -> Result<(), BoxError>;

    /// Sends `batch` with the idempotency key that stays the same across its retries, so
    /// that a receiver can drop a batch it already accepted. Reporters that have no use for
    /// the key leave this as it is.
    async fn report_batch(
        &self,
        node_id: &str,
        key: Uuid,
        batch: &[MetricPoint],
    ) -> Result<(), BoxError> {
        let _ = key;
        self.report_metrics(node_id, batch).await
    }

    /// Waits, at most until the caller's deadline, for work the reporter still runs in the
    /// background (the local endpoint's deliveries). Called once at shutdown.
    async fn close(&self) {}
}

/// Why a batch (or a secret) did not get through. Texts name the URL without credentials
/// and never the token.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The request could not be made or got no answer (DNS, connection, TLS, reset).
    #[error("{what} {url}: {detail}")]
    Transport {
        /// `control plane` or `local endpoint`.
        what: &'static str,
        /// Where the request went.
        url: String,
        /// The cause chain, with a hint for TLS problems.
        detail: String,
    },
    /// No complete answer within the request timeout.
    #[error("{what} {url}: no answer within {timeout:?} (timeout)")]
    Timeout {
        /// `control plane` or `local endpoint`.
        what: &'static str,
        /// Where the request went.
        url: String,
        /// The bound that expired.
        timeout: Duration,
    },
    /// The server answered with a status other than 2xx.
    #[error("{what} {url} answered {status}{}", body_suffix(.body))]
    Status {
        /// `control plane` or `local endpoint`.
        what: &'static str,
        /// Where the request went.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The first line of the response body, shortened.
        body: String,
        /// How long the server asked us to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// A credential file (bearer token, password) could not be read.
    #[error("{key}: {source}")]
    Token {
        /// The config key naming the file, e.g. `control_plane.token_file`.
        key: &'static str,
        /// Why it could not be read.
        source: SecretError,
    },
    /// The local endpoint has no credential: it could not be fetched or decrypted and none
    /// is cached. No request was made.
    #[error("local endpoint: no credential for secret {key:?}: {cause}")]
    Credential {
        /// The secret's name (`local_endpoint.secret_key`), not its value.
        key: String,
        /// Why fetching or decrypting failed.
        cause: String,
    },
    /// The secret response was not the JSON the API promises.
    #[error("control plane {url}: secret response is not the expected JSON: {detail}")]
    SecretFormat {
        /// Where the request went.
        url: String,
        /// The parser's message.
        detail: String,
    },
    /// An HTTP client could not be built (a CA or client certificate file is unusable).
    #[error("{0}")]
    Setup(String),
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl ReportError {
    /// Whether sending the same batch again can never succeed: a 4xx other than 408
    /// (request timeout) and 429 (too many requests) means the server refuses this content.
    pub fn is_rejection(&self) -> bool {
        matches!(self, Self::Status { status, .. }
            if status.is_client_error()
                && *status != reqwest::StatusCode::REQUEST_TIMEOUT
                && *status != reqwest::StatusCode::TOO_MANY_REQUESTS)
    }

    /// The wait the server asked for with `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What the Manager should do about a failed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Keep it and send it again later, not before `after` when the server said so.
    Retry {
        /// The server's `Retry-After`.
        after: Option<Duration>,
    },
    /// Drop it: the receiver refused its content.
    Rejected,
}

/// Classifies any reporter's error; errors that are not a [`ReportError`] are retried.
pub fn classify(err: &BoxError) -> Failure {
    match err.downcast_ref::<ReportError>() {
        Some(e) if e.is_rejection() => Failure::Rejected,
        Some(e) => Failure::Retry {
            after: e.retry_after(),
        },
        None => Failure::Retry { after: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn status(code: u16) -> BoxError {
        Box::new(ReportError::Status {
            what: "control plane",
            url: "https://cp".into(),
            status: StatusCode::from_u16(code).unwrap(),
            body: String::new(),
            retry_after: (code == 429).then_some(Duration::from_secs(7)),
        })
    }

    #[test]
    fn only_4xx_but_408_and_429_are_rejections() {
        for code in [400, 401, 403, 404, 413, 422] {
            assert_eq!(classify(&status(code)), Failure::Rejected, "{code}");
        }
        assert_eq!(classify(&status(408)), Failure::Retry { after: None });
        assert_eq!(
            classify(&status(429)),
            Failure::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        for code in [500, 502, 503, 301] {
            assert_eq!(
                classify(&status(code)),
                Failure::Retry { after: None },
                "{code}"
            );
        }
        assert_eq!(
            classify(&"anything else".into()),
            Failure::Retry { after: None }
        );
    }
}
