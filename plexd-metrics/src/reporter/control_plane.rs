//! The control plane's metrics API and its secrets API, as the spec's `api.ControlPlane`.

use std::io::BufWriter;
use std::time::Duration;

use async_trait::async_trait;
use flate2::write::GzEncoder;
use flate2::Compression;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::StatusCode;
use tracing::{debug, warn};
use url::Url;
use uuid::Uuid;

use super::http::{
    build_client, check_status, transport_error, ServerClient, TlsSettings, CONTROL_PLANE,
    MAX_RESPONSE_BODY,
};
use super::local::SecretFetcher;
use super::{MetricReporter, ReportError, TokenFile};
use crate::api::MetricPoint;
use crate::collector::BoxError;
use crate::config::ControlPlaneConfig;
use crate::secret::{SecretResponse, SecretString};

/// Header that carries a batch's idempotency key, the same on every retry of the batch.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// Posts batches to `{url}/v1/nodes/{node_id}/metrics` as gzip-compressed JSON with the
/// bearer token of `control_plane.token_file`, and fetches secrets for the local endpoint.
#[derive(Debug)]
pub struct ControlPlaneReporter {
    client: ServerClient,
    base: Url,
    token: TokenFile,
    timeout: Duration,
}

impl ControlPlaneReporter {
    /// A client for `cfg`, which must have passed [`crate::config::Config::validate`]. Fails
    /// when a CA or client certificate file cannot be used.
    pub fn new(cfg: &ControlPlaneConfig) -> Result<Self, ReportError> {
        let base = Url::parse(&cfg.url).map_err(|e| {
            ReportError::Setup(format!("control_plane.url {:?} is invalid: {e}", cfg.url))
        })?;
        let token = cfg.token_file.clone().ok_or_else(|| {
            ReportError::Setup(
                "control_plane.token_file is required when control_plane.url is set".into(),
            )
        })?;
        let tls = TlsSettings {
            ca_file: cfg.ca_file.clone(),
            client_identity: cfg.cert_file.clone().zip(cfg.key_file.clone()),
            insecure_skip_verify: cfg.tls_insecure_skip_verify,
            options: cfg.tls_options(),
        };
        if tls.insecure_skip_verify {
            warn!(
                component = "metrics",
                url = %base,
                "control_plane.tls_insecure_skip_verify is set: the control plane's certificate is NOT verified; use control_plane.ca_file instead"
            );
        }
        Ok(Self {
            client: build_client(&base, &tls, cfg.timeout, &CONTROL_PLANE)?,
            base,
            token: TokenFile::new(token),
            timeout: cfg.timeout,
        })
    }

    /// `{url}/v1/nodes/{node_id}/metrics`, with the node id escaped as a path segment.
    pub fn metrics_url(&self, node_id: &str) -> Url {
        self.endpoint(&["v1", "nodes", node_id, "metrics"])
    }

    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("validated http(s) URLs have a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    fn bearer(&self, token: &SecretString) -> Result<HeaderValue, ReportError> {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                ReportError::Setup(format!(
                "control_plane.token_file: {} holds characters that cannot go into an HTTP header",
                self.token.path().display()
            ))
            })?;
        // Keeps the value out of reqwest's and hyper's Debug output.
        value.set_sensitive(true);
        Ok(value)
    }

    async fn post(
        &self,
        node_id: &str,
        key: Uuid,
        batch: &[MetricPoint],
    ) -> Result<(), ReportError> {
        let url = self.metrics_url(node_id);
        let body = gzip_json(batch)
            .map_err(|e| ReportError::Setup(format!("cannot encode the batch: {e}")))?;
        let mut token = self.token.current().map_err(token_error)?;
        let mut retried_new_token = false;
        loop {
            let sent = self
                .client
                .post(&url)
                .header(CONTENT_TYPE, "application/json")
                .header(CONTENT_ENCODING, "gzip")
                .header(AUTHORIZATION, self.bearer(&token)?)
                .header(IDEMPOTENCY_KEY, key.to_string())
                .body(body.clone())
                .send()
                .await
                .map_err(|e| transport_error(&CONTROL_PLANE, url.as_str(), self.timeout, e))?;
            let result = check_status(&CONTROL_PLANE, url.as_str(), sent).await;
            // A token rotated between reading it and the server checking it: the batch is
            // worth one more try at once with the new token instead of being rejected.
            if let Err(ReportError::Status { status, .. }) = &result {
                if *status == StatusCode::UNAUTHORIZED && !retried_new_token {
                    if let Ok(fresh) = self.token.current() {
                        if fresh != token {
                            debug!(
                                component = "metrics",
                                "token file changed; sending the batch again with the new token"
                            );
                            token = fresh;
                            retried_new_token = true;
                            continue;
                        }
                    }
                }
            }
            return result.map(drop);
        }
    }
}

fn token_error(source: crate::secret::SecretError) -> ReportError {
    ReportError::Token {
        key: "control_plane.token_file",
        source,
    }
}

/// The batch as the API's JSON array, gzip-compressed: the body of
/// `POST /v1/nodes/{node_id}/metrics`. At the fastest level: metric points still compress
/// about 5:1 there, for a fraction of the CPU time of the default level (`cargo xtask bench`
/// measures it).
pub fn gzip_json(batch: &[MetricPoint]) -> std::io::Result<Vec<u8>> {
    // The JSON goes to the encoder in chunks rather than as one buffer of the whole batch,
    // which the agent would hold beside the compressed body; a point's JSON is its data and
    // about a hundred bytes more, and compresses about 5:1.
    let json_len: usize = batch.iter().map(|p| p.data.as_str().len() + 100).sum();
    let gz = GzEncoder::new(Vec::with_capacity(json_len / 4), Compression::fast());
    let mut json = BufWriter::with_capacity(JSON_CHUNK, gz);
    serde_json::to_writer(&mut json, batch)?;
    json.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .finish()
}

/// How much JSON goes to the encoder at a time: large enough that the per-call cost of the
/// compressor does not show, small beside a batch of thousands of points.
const JSON_CHUNK: usize = 64 * 1024;

#[async_trait]
impl MetricReporter for ControlPlaneReporter {
    async fn report_metrics(&self, node_id: &str, batch: &[MetricPoint]) -> Result<(), BoxError> {
        self.report_batch(node_id, Uuid::new_v4(), batch).await
    }

    async fn report_batch(
        &self,
        node_id: &str,
        key: Uuid,
        batch: &[MetricPoint],
    ) -> Result<(), BoxError> {
        Ok(self.post(node_id, key, batch).await?)
    }
}

#[async_trait]
impl SecretFetcher for ControlPlaneReporter {
    async fn fetch_secret(&self, node_id: &str, key: &str) -> Result<SecretResponse, BoxError> {
        let url = self.endpoint(&["v1", "nodes", node_id, "secrets", key]);
        let token = self.token.current().map_err(token_error)?;
        let response = self
            .client
            .get(&url)
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, self.bearer(&token)?)
            .send()
            .await
            .map_err(|e| transport_error(&CONTROL_PLANE, url.as_str(), self.timeout, e))?;
        let body = check_status(&CONTROL_PLANE, url.as_str(), response).await?;
        serde_json::from_str(&body).map_err(|e| {
            let detail = if body.len() >= MAX_RESPONSE_BODY {
                format!("the answer is larger than {} KiB", MAX_RESPONSE_BODY >> 10)
            } else {
                e.to_string()
            };
            ReportError::SecretFormat {
                url: url.to_string(),
                detail,
            }
            .into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn urls_escape_the_node_id_and_keep_a_base_path() {
        let dir = std::env::temp_dir();
        let cfg = |url: &str| ControlPlaneConfig {
            url: url.into(),
            token_file: Some(dir.join("unused")),
            ..ControlPlaneConfig::default()
        };
        let r = ControlPlaneReporter::new(&cfg("https://cp.example:8443")).unwrap();
        assert_eq!(
            r.metrics_url("node-1").as_str(),
            "https://cp.example:8443/v1/nodes/node-1/metrics"
        );
        let r = ControlPlaneReporter::new(&cfg("https://cp.example/api/")).unwrap();
        assert_eq!(
            r.metrics_url("a/b c").as_str(),
            "https://cp.example/api/v1/nodes/a%2Fb%20c/metrics"
        );
    }

    #[test]
    fn the_body_is_the_gzipped_json_array() {
        let p = MetricPoint::new(
            chrono::Utc::now(),
            "system",
            "",
            &serde_json::json!({"load_avg_1": 1.5}),
        )
        .unwrap();
        let gz = gzip_json(&[p.clone(), p.clone()]).unwrap();
        let mut json = String::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_string(&mut json)
            .unwrap();
        let back: Vec<MetricPoint> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vec![p.clone(), p]);
    }

    #[test]
    fn a_batch_of_many_chunks_decompresses_to_its_json() {
        let batch: Vec<MetricPoint> = (0..2_000)
            .map(|i| {
                MetricPoint::new(
                    chrono::Utc::now(),
                    "tunnel",
                    format!("peer-{i}"),
                    &serde_json::json!({"i": i, "pad": "x".repeat(i % 97)}),
                )
                .unwrap()
            })
            .collect();
        let want = serde_json::to_vec(&batch).unwrap();
        assert!(want.len() > 2 * JSON_CHUNK, "{} bytes", want.len());
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(gzip_json(&batch).unwrap().as_slice())
            .read_to_end(&mut json)
            .unwrap();
        assert_eq!(json, want);
    }
}
