//! Fetches an application endpoint (`metrics.apps`) over HTTP(S): one GET, bounded in time
//! by the entry's timeout and in size by a body limit read chunk by chunk, with the bearer
//! token of its `token_file` when it has one.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{ACCEPT, CONTENT_TYPE};

use crate::collector::{AppFetcher, AppResponse};
use crate::config::AppConfig;
use crate::reporter::http::{build_client, chain, ServerClient, TlsKeys, TlsSettings};
use crate::reporter::{ReportError, TokenFile};

/// The client's keys in setup errors; the entry's index is added in front.
const APP_KEYS: TlsKeys = TlsKeys {
    what: "app endpoint",
    ca: "ca_file",
    section: "metrics.apps[]",
};

/// The text format first, in its classic version (not OpenMetrics, whose `_total` and
/// `_created` spellings differ); JSON as well; anything else is still read.
const ACCEPT_FORMATS: &str = "text/plain;version=0.0.4;q=0.9, application/json;q=0.8, */*;q=0.1";

/// One endpoint of `metrics.apps`, fetched with a client of its own (its own trust).
pub struct HttpAppFetcher {
    name: String,
    url: url::Url,
    client: ServerClient,
    /// The token file and the key that names it, for errors.
    token: Option<(TokenFile, String)>,
    timeout: Duration,
    max_body: usize,
    max_metrics: usize,
}

impl HttpAppFetcher {
    /// The fetcher of `metrics.apps[index]`, reading at most `max_body` bytes of body. Fails
    /// when its `ca_file` cannot be used.
    pub fn new(index: usize, cfg: &AppConfig, max_body: usize) -> Result<Self, ReportError> {
        let tls = TlsSettings {
            ca_file: cfg.ca_file.clone(),
            ..TlsSettings::default()
        };
        let setup =
            |e: String| ReportError::Setup(format!("config: apps[{index}] ({}): {e}", cfg.name));
        let url = url::Url::parse(cfg.url.trim())
            .map_err(|e| setup(format!("invalid URL {:?}: {e}", cfg.url)))?;
        let client =
            build_client(&url, &tls, cfg.timeout, &APP_KEYS).map_err(|e| setup(e.to_string()))?;
        Ok(Self {
            name: cfg.name.clone(),
            url,
            client,
            token: cfg.token_file.as_ref().map(|path| {
                (
                    TokenFile::new(path),
                    format!("metrics.apps[{index}].token_file"),
                )
            }),
            timeout: cfg.timeout,
            max_body,
            max_metrics: usize::try_from(cfg.max_metrics).unwrap_or(usize::MAX),
        })
    }

    /// Why a request failed, in words a user acts on.
    fn describe(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            );
        }
        let detail = chain(e);
        let lower = detail.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("unknownissuer") {
            format!(
                "{detail} (TLS: set the entry's ca_file to the CA that signed the server's \
                 certificate)"
            )
        } else if e.is_connect() {
            format!("cannot connect: {detail}")
        } else {
            detail
        }
    }
}

#[async_trait]
impl AppFetcher for HttpAppFetcher {
    fn name(&self) -> &str {
        &self.name
    }

    fn url(&self) -> &str {
        self.url.as_str()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn max_metrics(&self) -> usize {
        self.max_metrics
    }

    async fn fetch(&self) -> Result<AppResponse, String> {
        let mut request = self.client.get(&self.url).header(ACCEPT, ACCEPT_FORMATS);
        if let Some((file, key)) = &self.token {
            let token = file.current().map_err(|e| format!("{key}: {e}"))?;
            request = request.bearer_auth(token.expose());
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| self.describe(&e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        let too_large = || format!("body larger than {}", size_text(self.max_body));
        if response
            .content_length()
            .is_some_and(|len| len > self.max_body as u64)
        {
            return Err(too_large());
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Chunk by chunk: a body without a length (or lying about it) is cut at the limit
        // instead of being buffered whole first.
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.describe(&e.without_url()))?
        {
            if body.len() + chunk.len() > self.max_body {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(AppResponse { body, content_type })
    }
}

/// `16 MiB` for whole mebibytes, bytes otherwise.
fn size_text(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_a_user_writes_them() {
        assert_eq!(size_text(16 << 20), "16 MiB");
        assert_eq!(size_text(1000), "1000 bytes");
    }

    #[test]
    fn an_unusable_ca_file_names_the_entry() {
        let cfg = AppConfig {
            name: "api".into(),
            url: "https://127.0.0.1:1/m".into(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..AppConfig::default()
        };
        let err = HttpAppFetcher::new(3, &cfg, 10).err().unwrap().to_string();
        assert!(
            err.contains("config: apps[3] (api): ca_file: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
    }
}
