//! `/metrics`: the [`SeriesBook`]'s families in the Prometheus text format, or OpenMetrics
//! when the scraper asks for it.
//!
//! The Manager hands each collect cycle's points to a [`PointsTap`] (a clone into a
//! channel, never a wait); the exposition task folds them into its book and renders both
//! formats once per cycle. A scrape only copies the last rendering, so neither a slow
//! scraper nor a large mesh can hold up collection, and a scrape costs the same whatever
//! the peer count.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use subtle::ConstantTimeEq as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::names::{Kind, RTT_BUCKETS};
use super::series::{Family, SeriesBook, Value};
use crate::api::MetricPoint;
use crate::reporter::token::TokenFile;

/// The content type of the text format, which every Prometheus understands.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of OpenMetrics, for scrapers that ask for it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Both renderings of one snapshot.
#[derive(Clone, Debug, Default)]
pub struct Rendered {
    /// OpenMetrics text, `# EOF` included.
    pub openmetrics: Bytes,
    /// The Prometheus text format 0.0.4.
    pub text: Bytes,
}

impl Rendered {
    /// Renders `families` in both formats.
    pub fn of(families: Vec<Family>) -> Self {
        let openmetrics = encode_openmetrics(families);
        let text = openmetrics_to_text(&openmetrics);
        Self {
            openmetrics: Bytes::from(openmetrics),
            text: Bytes::from(text),
        }
    }
}

/// Writes a snapshot through prometheus-client's OpenMetrics encoder.
pub fn encode_openmetrics(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(families)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String does not fail");
    // prometheus-client writes the last bucket's bound as `inf`; both formats spell it
    // `+Inf`, and queries that select that bucket by its label expect that spelling. A label
    // value cannot contain this text unescaped, so only bucket bounds match.
    out.replace("le=\"inf\"", "le=\"+Inf\"")
}

/// A snapshot as a prometheus-client collector: its families are written as they are.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let kind = match family.def.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric =
                encoder.encode_descriptor(family.def.name, family.def.help, None, kind)?;
            // A family without labels has its one sample written bare (`name 1`, not
            // `name{} 1`).
            if let [sample] = family.samples.as_slice() {
                if sample.labels.is_empty() {
                    encode_value(metric, &sample.value, family.def.kind)?;
                    continue;
                }
            }
            for sample in &family.samples {
                let labels: Vec<(&str, std::borrow::Cow<'_, str>)> = sample
                    .labels
                    .iter()
                    .map(|(k, v)| (*k, escape_label_value(v)))
                    .collect();
                encode_value(
                    metric.encode_family(&labels)?,
                    &sample.value,
                    family.def.kind,
                )?;
            }
        }
        Ok(())
    }
}

/// Writes one sample's value: a counter, a gauge or a histogram.
fn encode_value(
    mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    value: &Value,
    kind: Kind,
) -> Result<(), std::fmt::Error> {
    match (value, kind) {
        (Value::Number(v), Kind::Counter) => ConstCounter::new(*v).encode(encoder),
        (Value::Number(v), _) => ConstGauge::new(*v).encode(encoder),
        (
            Value::Histogram {
                buckets,
                count,
                sum,
            },
            _,
        ) => {
            // prometheus-client wants each bucket's own count; the book keeps them
            // cumulative, as Prometheus writes them.
            let mut own: Vec<(f64, u64)> = Vec::with_capacity(buckets.len() + 1);
            let mut below = 0;
            for (bound, cumulative) in RTT_BUCKETS.iter().zip(buckets) {
                own.push((*bound, cumulative - below));
                below = *cumulative;
            }
            own.push((f64::INFINITY, count - below));
            encoder.encode_histogram::<NoLabelSet>(*sum, *count, &own, None)
        }
    }
}

/// A label value as both formats quote it: prometheus-client writes values as they are, and
/// a peer's name is the operator's text.
fn escape_label_value(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The text format 0.0.4 from OpenMetrics text written by [`encode_openmetrics`]: no
/// `# EOF` and no `# UNIT`, and a counter's `# HELP` and `# TYPE` name its samples' name
/// (with `_total`). prometheus-client writes OpenMetrics only, and promtool, older
/// scrapers and curl users read the text format; the two differ only in these lines.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut held_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Which name it needs is known only at the TYPE line that follows.
            held_help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(help) = held_help.take() {
                let text = help
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.split_once(' '))
                    .map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Where the Manager hands each cycle's points.
#[derive(Clone, Debug)]
pub struct PointsTap {
    tx: mpsc::UnboundedSender<Vec<MetricPoint>>,
}

impl PointsTap {
    /// Hands over a copy of one cycle's points; never waits.
    pub fn collected(&self, points: &[MetricPoint]) {
        // A closed channel means the exposition has stopped, with the agent.
        let _ = self.tx.send(points.to_vec());
    }
}

/// The task that folds points into the book and renders them.
pub struct Exposition {
    book: SeriesBook,
    points: mpsc::UnboundedReceiver<Vec<MetricPoint>>,
    rendered: watch::Sender<Arc<Rendered>>,
}

impl Exposition {
    /// An exposition of `book`, its tap, and the renderings it publishes (empty until the
    /// first cycle, apart from the agent's build info).
    pub fn new(book: SeriesBook) -> (Self, PointsTap, watch::Receiver<Arc<Rendered>>) {
        let (tx, points) = mpsc::unbounded_channel();
        let (rendered, rx) = watch::channel(Arc::new(Rendered::of(book.families())));
        (
            Self {
                book,
                points,
                rendered,
            },
            PointsTap { tx },
            rx,
        )
    }

    /// Folds and renders every cycle until `cancel` fires or the tap is gone.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let points = tokio::select! {
                () = cancel.cancelled() => return,
                points = self.points.recv() => match points {
                    Some(points) => points,
                    None => return,
                },
            };
            self.book.observe_cycle(&points);
            self.rendered
                .send_replace(Arc::new(Rendered::of(self.book.families())));
        }
    }
}

/// Answers `GET /metrics` from the latest rendering.
pub struct MetricsEndpoint {
    rendered: watch::Receiver<Arc<Rendered>>,
    token: Option<TokenFile>,
}

impl MetricsEndpoint {
    /// An endpoint serving `rendered`; with `token`, a request must carry
    /// `Authorization: Bearer <token>`, the file's content now (it is read again when it
    /// changes, as Kubernetes rotates a mounted secret).
    pub fn new(rendered: watch::Receiver<Arc<Rendered>>, token: Option<TokenFile>) -> Self {
        Self { rendered, token }
    }

    /// The answer to one request.
    pub fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let token = match self.token.as_ref().map(TokenFile::current) {
            None => None,
            Some(Ok(token)) => Some(token),
            Some(Err(e)) => {
                tracing::warn!(component = "metrics", error = %e, "cannot read metrics.prometheus.token_file; /metrics refuses every scrape until it can");
                let mut r = Response::new(Full::new(Bytes::from_static(
                    b"the token file cannot be read\n",
                )));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return r;
            }
        };
        answer(
            &self.rendered.borrow(),
            token.as_ref().map(|t| t.expose()),
            req.method(),
            req.uri().path(),
            req.headers().get(AUTHORIZATION),
            req.headers().get(ACCEPT),
        )
    }
}

fn answer(
    rendered: &Rendered,
    token: Option<&str>,
    method: &Method,
    path: &str,
    authorization: Option<&HeaderValue>,
    accept: Option<&HeaderValue>,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if path != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; the metrics are at /metrics\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    if let Some(token) = token {
        if !bearer_matches(authorization, token) {
            let mut r = plain(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let (body, content_type) = if wants_openmetrics(accept) {
        (rendered.openmetrics.clone(), OPENMETRICS_CONTENT_TYPE)
    } else {
        (rendered.text.clone(), TEXT_CONTENT_TYPE)
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Whether `Authorization` is `Bearer <token>`, compared in constant time so that the
/// answer's timing says nothing about how much of a guess was right.
fn bearer_matches(authorization: Option<&HeaderValue>, token: &str) -> bool {
    let Some(given) = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.trim().as_bytes().ct_eq(token.as_bytes()).into()
}

/// Whether the scraper prefers OpenMetrics: Prometheus asks for it first and takes the text
/// format as a fallback; a plain `curl` gets the text format.
fn wants_openmetrics(accept: Option<&HeaderValue>) -> bool {
    accept
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"))
}

/// Why `/metrics` could not start: each is a configuration problem (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ExpositionError {
    /// The address cannot be bound.
    #[error(
        "metrics: prometheus: cannot listen on {addr}: {source}; set metrics.prometheus.listen \
         to a free address of this host, or leave it empty to turn /metrics off"
    )]
    Bind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The token file cannot be read or is empty.
    #[error("metrics: prometheus: token_file {path}: {problem}")]
    Token {
        /// The configured file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The certificate or key cannot be used.
    #[error("metrics: prometheus: cannot serve HTTPS with cert_file {cert} and key_file {key}: {problem}")]
    Tls {
        /// The configured certificate file.
        cert: String,
        /// The configured key file.
        key: String,
        /// What is wrong with them.
        problem: String,
    },
}

/// The bound `/metrics` listener with what it serves.
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    endpoint: Arc<MetricsEndpoint>,
}

impl MetricsServer {
    /// Reads the token and the certificate, and binds `addr`, so that every problem shows
    /// before the agent runs. Must run inside a tokio runtime.
    pub fn bind(
        addr: std::net::SocketAddr,
        cfg: &crate::config::PrometheusConfig,
        rendered: watch::Receiver<Arc<Rendered>>,
    ) -> Result<Self, ExpositionError> {
        let token = cfg.token_file.as_deref().map(read_token).transpose()?;
        let tls = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        let listener = crate::http_server::bind(addr)
            .map_err(|source| ExpositionError::Bind { addr, source })?;
        Ok(Self {
            listener,
            tls,
            endpoint: Arc::new(MetricsEndpoint::new(rendered, token)),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `/metrics` until `cancel` fires.
    pub async fn serve(self, cancel: CancellationToken) {
        if let Ok(addr) = self.local_addr() {
            tracing::info!(
                component = "metrics",
                %addr,
                tls = self.tls.is_some(),
                token = self.endpoint.token.is_some(),
                "Prometheus endpoint listening (/metrics)"
            );
        }
        let endpoint = self.endpoint;
        let answer: crate::http_server::Answer = Arc::new(move |req| endpoint.answer(req));
        crate::http_server::serve("prometheus", self.listener, self.tls, answer, cancel).await;
    }
}

/// The token file, read once now so that a missing or empty one stops the agent at start.
fn read_token(path: &std::path::Path) -> Result<TokenFile, ExpositionError> {
    let file = TokenFile::new(path);
    file.current().map_err(|e| ExpositionError::Token {
        path: path.display().to_string(),
        problem: e.to_string(),
    })?;
    Ok(file)
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, ExpositionError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let problem = |problem: String| ExpositionError::Tls {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        problem,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| problem(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(problem(
            "the certificate file holds no PEM certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| problem(format!("key: {e}")))?;
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| problem(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| problem(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::names;
    use crate::prometheus::series::Sample;

    fn families() -> Vec<Family> {
        vec![
            Family {
                def: names::PEER_LOST_PACKETS,
                samples: vec![Sample {
                    labels: vec![("interface", "wg0".into()), ("peer", "gw \"1\"".into())],
                    value: Value::Number(7.0),
                }],
            },
            Family {
                def: names::PEER_UP,
                samples: vec![Sample {
                    labels: vec![("peer", "gw".into())],
                    value: Value::Number(1.0),
                }],
            },
            Family {
                def: names::PEER_RTT,
                samples: vec![Sample {
                    labels: vec![("peer", "gw".into())],
                    value: Value::Histogram {
                        buckets: [0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2],
                        count: 3,
                        sum: 2.5,
                    },
                }],
            },
        ]
    }

    #[test]
    fn both_formats_name_counters_as_their_conventions_say() {
        let r = Rendered::of(families());
        let om = std::str::from_utf8(&r.openmetrics).unwrap();
        assert!(
            om.contains("# TYPE plexd_peer_lost_packets counter\n"),
            "{om}"
        );
        assert!(
            om.contains("plexd_peer_lost_packets_total{interface=\"wg0\",peer=\"gw \\\"1\\\"\"} 7"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"));
        let text = std::str::from_utf8(&r.text).unwrap();
        assert!(
            text.contains("# HELP plexd_peer_lost_packets_total Transport messages"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE plexd_peer_lost_packets_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE plexd_peer_up gauge\n"));
        let bare = Rendered::of(vec![Family {
            def: names::NODE_LOAD1,
            samples: vec![Sample {
                labels: vec![],
                value: Value::Number(0.5),
            }],
        }]);
        let bare = std::str::from_utf8(&bare.text).unwrap();
        assert!(bare.contains("\nplexd_node_load1 0.5\n"), "{bare}");
        assert!(!text.contains("# EOF"));
        // Buckets are cumulative, as Prometheus reads them; +Inf holds every observation.
        assert!(
            text.contains("plexd_peer_rtt_seconds_bucket{le=\"0.001\",peer=\"gw\"} 1\n")
                || text.contains("plexd_peer_rtt_seconds_bucket{peer=\"gw\",le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("_bucket{le=\"+Inf\",peer=\"gw\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("plexd_peer_rtt_seconds_count{peer=\"gw\"} 3\n"),
            "{text}"
        );
    }

    fn header(v: &'static str) -> HeaderValue {
        HeaderValue::from_static(v)
    }

    #[test]
    fn the_token_is_required_and_the_format_follows_accept() {
        let r = Rendered::of(families());
        let get = Method::GET;
        let status = |auth: Option<&HeaderValue>| {
            answer(&r, Some("s3cret"), &get, "/metrics", auth, None).status()
        };
        assert_eq!(status(None), StatusCode::UNAUTHORIZED);
        assert_eq!(
            status(Some(&header("Bearer wrong"))),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(Some(&header("Basic s3cret"))),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(status(Some(&header("Bearer s3cret"))), StatusCode::OK);
        let unauthorized = answer(&r, Some("s3cret"), &get, "/metrics", None, None);
        assert_eq!(unauthorized.headers()[WWW_AUTHENTICATE], "Bearer");

        let prometheus = header(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.1",
        );
        let om = answer(&r, None, &get, "/metrics", None, Some(&prometheus));
        assert_eq!(om.headers()[CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        let text = answer(&r, None, &get, "/metrics", None, Some(&header("*/*")));
        assert_eq!(text.headers()[CONTENT_TYPE], TEXT_CONTENT_TYPE);
        assert_eq!(
            answer(&r, None, &get, "/", None, None).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(&r, None, &Method::POST, "/metrics", None, None).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
