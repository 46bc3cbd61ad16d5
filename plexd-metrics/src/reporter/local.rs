//! The spec's `LocalReporter`: every batch also goes to a local HTTPS endpoint, with a
//! bearer token that is a secret fetched from the control plane and decrypted here.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use tokio::sync::RwLock;
use tokio::time::Instant;
use tracing::warn;
use url::Url;

use super::http::{
    build_client, check_status, transport_error, ServerClient, TlsSettings, LOCAL_ENDPOINT,
};
use super::{MetricReporter, ReportError};
use crate::api::MetricPoint;
use crate::collector::BoxError;
use crate::config::LocalEndpointConfig;
use crate::secret::{decrypt_secret, NodeSecretKey, SecretResponse, SecretString};

/// How long a decrypted credential is used before it is fetched again.
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(5 * 60);
/// Bound of one request to the local endpoint, connection and response body included.
pub const LOCAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches an encrypted secret of a node: the spec's `SecretFetcher`, which the control
/// plane client satisfies.
#[async_trait]
pub trait SecretFetcher: Send + Sync {
    /// The secret `key` of `node_id`, still encrypted.
    async fn fetch_secret(&self, node_id: &str, key: &str) -> Result<SecretResponse, BoxError>;
}

struct Cached {
    token: SecretString,
    fetched_at: Instant,
}

/// Posts each batch, as plain JSON, to `metrics.local_endpoint.url`.
pub struct LocalReporter {
    client: ServerClient,
    url: Url,
    secret_key: String,
    fetcher: Arc<dyn SecretFetcher>,
    node_secret_key: NodeSecretKey,
    node_id: String,
    ttl: Duration,
    cache: RwLock<Option<Cached>>,
}

impl std::fmt::Debug for LocalReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalReporter")
            .field("url", &self.url.as_str())
            .field("secret_key", &"[redacted]")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl LocalReporter {
    /// A reporter for `cfg` (validated) with its own HTTP client. The credential is fetched
    /// through `fetcher` as secret `cfg.secret_key` of `node_id` on first use.
    pub fn new(
        cfg: &LocalEndpointConfig,
        fetcher: Arc<dyn SecretFetcher>,
        node_secret_key: NodeSecretKey,
        node_id: impl Into<String>,
    ) -> Result<Self, ReportError> {
        let url = Url::parse(&cfg.url).map_err(|_| {
            ReportError::Setup(format!(
                "metrics: config: local_endpoint: invalid URL {:?}",
                cfg.url
            ))
        })?;
        let tls = TlsSettings {
            ca_file: cfg.ca_file.clone(),
            client_identity: None,
            insecure_skip_verify: cfg.tls_insecure_skip_verify,
            options: cfg.tls_options(),
        };
        if tls.insecure_skip_verify {
            warn!(
                component = "metrics",
                url = %url,
                "metrics.local_endpoint.tls_insecure_skip_verify is set: the local endpoint's certificate is NOT verified"
            );
        }
        Ok(Self {
            client: build_client(&url, &tls, LOCAL_TIMEOUT, &LOCAL_ENDPOINT)?,
            url,
            secret_key: cfg.secret_key.clone(),
            fetcher,
            node_secret_key,
            node_id: node_id.into(),
            ttl: CREDENTIAL_TTL,
            cache: RwLock::new(None),
        })
    }

    /// Replaces the credential's lifetime in the cache ([`CREDENTIAL_TTL`] by default).
    pub fn with_credential_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The bearer token: cached while younger than the TTL, else fetched and decrypted.
    /// When that fails, a stale token is better than none (and a warning says so); with no
    /// token at all, the error stops the POST.
    pub async fn credential(&self) -> Result<SecretString, ReportError> {
        if let Some(cached) = self.cache.read().await.as_ref() {
            if cached.fetched_at.elapsed() < self.ttl {
                return Ok(cached.token.clone());
            }
        }
        let mut cache = self.cache.write().await;
        // Another report may have refreshed it while this one waited for the lock.
        if let Some(cached) = cache.as_ref() {
            if cached.fetched_at.elapsed() < self.ttl {
                return Ok(cached.token.clone());
            }
        }
        match self.fetch().await {
            Ok(token) => {
                *cache = Some(Cached {
                    token: token.clone(),
                    fetched_at: Instant::now(),
                });
                Ok(token)
            }
            Err(cause) => match cache.as_ref() {
                Some(stale) => {
                    warn!(component = "metrics", error = %cause, "using cached credential");
                    Ok(stale.token.clone())
                }
                None => Err(ReportError::Credential {
                    key: self.secret_key.clone(),
                    cause,
                }),
            },
        }
    }

    async fn fetch(&self) -> Result<SecretString, String> {
        let response = self
            .fetcher
            .fetch_secret(&self.node_id, &self.secret_key)
            .await
            .map_err(|e| e.to_string())?;
        decrypt_secret(&self.node_secret_key, &response).map_err(|e| e.to_string())
    }
}

#[async_trait]
impl MetricReporter for LocalReporter {
    async fn report_metrics(&self, _node_id: &str, batch: &[MetricPoint]) -> Result<(), BoxError> {
        let token = self.credential().await?;
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                ReportError::Credential {
                key: self.secret_key.clone(),
                cause:
                    "the decrypted credential holds characters that cannot go into an HTTP header"
                        .into(),
            }
            })?;
        auth.set_sensitive(true);
        let body = serde_json::to_vec(batch)?;
        let response = self
            .client
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, auth)
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error(&LOCAL_ENDPOINT, self.url.as_str(), LOCAL_TIMEOUT, e))?;
        check_status(&LOCAL_ENDPOINT, self.url.as_str(), response).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::{Aead, KeyInit};
    use aes_gcm::{Aes256Gcm, Nonce};
    use base64::{engine::general_purpose::STANDARD, Engine};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    const NSK: [u8; 32] = [9; 32];

    /// Serves an encrypted token per call from a script; `Err` entries fail that call.
    struct Script {
        answers: Mutex<Vec<Result<&'static str, &'static str>>>,
        calls: AtomicU32,
        gate: tokio::sync::Semaphore,
    }

    impl Script {
        fn new(answers: Vec<Result<&'static str, &'static str>>) -> Arc<Self> {
            Self::gated(answers, 1000)
        }
        /// A fetcher whose calls wait until `open` permits are added.
        fn gated(answers: Vec<Result<&'static str, &'static str>>, open: usize) -> Arc<Self> {
            Arc::new(Self {
                answers: Mutex::new(answers),
                calls: AtomicU32::new(0),
                gate: tokio::sync::Semaphore::new(open),
            })
        }
    }

    #[async_trait]
    impl SecretFetcher for Script {
        async fn fetch_secret(&self, node_id: &str, key: &str) -> Result<SecretResponse, BoxError> {
            assert_eq!((node_id, key), ("node-1", "local-metrics-token"));
            let _permit = self.gate.acquire().await.unwrap();
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = self.answers.lock().unwrap().remove(0);
            let plain = answer.map_err(BoxError::from)?;
            let nonce = [3u8; 12];
            let ct = Aes256Gcm::new_from_slice(&NSK)
                .unwrap()
                .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
                .unwrap();
            Ok(SecretResponse {
                ciphertext: STANDARD.encode(ct),
                nonce: STANDARD.encode(nonce),
            })
        }
    }

    fn reporter(script: Arc<Script>) -> LocalReporter {
        let cfg = LocalEndpointConfig {
            url: "https://metrics.local:9090/ingest".into(),
            secret_key: "local-metrics-token".into(),
            ..LocalEndpointConfig::default()
        };
        LocalReporter::new(&cfg, script, NodeSecretKey::from_bytes(NSK), "node-1").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn cached_for_the_ttl_then_fetched_again() {
        let script = Script::new(vec![Ok("one"), Ok("two")]);
        let r = reporter(script.clone());
        assert_eq!(r.credential().await.unwrap().expose(), "one");
        tokio::time::advance(CREDENTIAL_TTL - Duration::from_secs(1)).await;
        assert_eq!(r.credential().await.unwrap().expose(), "one");
        assert_eq!(
            script.calls.load(Ordering::SeqCst),
            1,
            "served from the cache"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(r.credential().await.unwrap().expose(), "two");
        assert_eq!(script.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_falls_back_to_the_stale_token() {
        let script = Script::new(vec![Ok("one"), Err("control plane down"), Ok("three")]);
        let r = reporter(script.clone());
        assert_eq!(r.credential().await.unwrap().expose(), "one");
        tokio::time::advance(CREDENTIAL_TTL).await;
        assert_eq!(r.credential().await.unwrap().expose(), "one", "stale");
        // The stale token does not count as fresh: the next call tries again.
        assert_eq!(r.credential().await.unwrap().expose(), "three");
        assert_eq!(script.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn no_token_at_all_is_an_error_naming_the_secret_not_its_value() {
        let script = Script::new(vec![Err("control plane down")]);
        let r = reporter(script);
        let err = r
            .report_metrics("node-1", &[])
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "local endpoint: no credential for secret \"local-metrics-token\": control plane down"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        // The fetch is held until every caller is waiting for the cache.
        let script = Script::gated(vec![Ok("one")], 0);
        let r = Arc::new(reporter(script.clone()));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { r.credential().await.unwrap().expose().to_owned() })
            })
            .collect();
        tokio::task::yield_now().await;
        script.gate.add_permits(1000);
        for c in callers {
            assert_eq!(c.await.unwrap(), "one");
        }
        assert_eq!(
            script.calls.load(Ordering::SeqCst),
            1,
            "double-checked cache"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrong_node_key_is_a_decrypt_error() {
        let script = Script::new(vec![Ok("one")]);
        let cfg = LocalEndpointConfig {
            url: "https://metrics.local/ingest".into(),
            secret_key: "local-metrics-token".into(),
            ..LocalEndpointConfig::default()
        };
        let r =
            LocalReporter::new(&cfg, script, NodeSecretKey::from_bytes([1; 32]), "node-1").unwrap();
        let err = r.credential().await.unwrap_err().to_string();
        assert!(err.contains("cannot decrypt the secret"), "{err}");
    }
}
