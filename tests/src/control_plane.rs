//! A control plane for tests: a real HTTP server on 127.0.0.1 (TLS with certificates made
//! here, or plain HTTP) that speaks the metrics and secrets API, records every request, and
//! can be told to fail, hang, throttle or go away.
//!
//! It runs on its own runtime in its own thread, so both `#[tokio::test]`s and plain tests
//! that drive the agent binary can use it. Nothing here needs privileges.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use plexd_metrics::api::MetricPoint;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How the server answers one metrics request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// 204 No Content: accepted.
    Accept,
    /// This status, with `body` as the response body.
    Status(u16, String),
    /// 429 with `Retry-After: secs`.
    TooManyRequests(u64),
    /// Never answer; the client's timeout has to end it.
    Hang,
}

/// A certificate authority made for one test, and certificates it signed.
pub struct TestPki {
    ca_key: KeyPair,
    ca: rcgen::Certificate,
}

/// A PEM certificate and its key, written to files for the agent's config.
pub struct PemPair {
    /// The certificate.
    pub cert: String,
    /// Its PKCS#8 private key.
    pub key: String,
}

impl TestPki {
    /// A fresh CA.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = params.self_signed(&ca_key).expect("self-sign the CA");
        Self { ca_key, ca }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A certificate for `localhost` and 127.0.0.1, for the server side.
    pub fn server_cert(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = self.leaf(vec![
            SanType::DnsName("localhost".try_into().expect("DNS name")),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ]);
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// The same as [`TestPki::server_cert`], as PEM for an agent's config.
    pub fn server_pem(&self) -> PemPair {
        let (cert, key) = self.leaf(vec![
            SanType::DnsName("localhost".try_into().expect("DNS name")),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ]);
        PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client certificate, for mutual TLS.
    pub fn client_cert(&self) -> PemPair {
        let (cert, key) = self.leaf(vec![SanType::DnsName(
            "node-1.plexd.test".try_into().expect("DNS name"),
        )]);
        PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn leaf(&self, sans: Vec<SanType>) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = sans;
        params
            .distinguished_name
            .push(DnType::CommonName, "plexd test leaf");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign the leaf");
        (cert, key)
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path, without query.
    pub path: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// The body, gunzipped when `Content-Encoding: gzip` said so.
    pub body: Vec<u8>,
    /// The status the server answered with (0 when it hung).
    pub status: u16,
    /// An accepted batch whose idempotency key was accepted before.
    pub duplicate: bool,
}

impl Recorded {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// The body as the API's batch.
    pub fn points(&self) -> Vec<MetricPoint> {
        serde_json::from_slice(&self.body).expect("the body is a batch of metric points")
    }

    /// Whether the server accepted it (2xx).
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `Idempotency-Key` header.
    pub fn key(&self) -> Option<&str> {
        self.header("idempotency-key")
    }
}

#[derive(Default)]
struct State {
    script: Mutex<VecDeque<Behaviour>>,
    default: Mutex<Option<Behaviour>>,
    secret_behaviour: Mutex<Option<Behaviour>>,
    token: Mutex<Option<String>>,
    secrets: Mutex<HashMap<String, serde_json::Value>>,
    accepted_keys: Mutex<HashSet<String>>,
}

/// The server. Dropping it stops it.
pub struct TestControlPlane {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    acceptor: Option<TlsAcceptor>,
    stop: Mutex<CancellationToken>,
    requests: tokio::sync::Mutex<mpsc::UnboundedReceiver<Recorded>>,
    sender: mpsc::UnboundedSender<Recorded>,
    runtime: Option<tokio::runtime::Runtime>,
    pki: Option<TestPki>,
}

/// Options of [`TestControlPlane::start`].
#[derive(Default)]
pub struct Options {
    /// Serve HTTPS with a certificate of a fresh test CA (else plain HTTP).
    pub tls: bool,
    /// Require a client certificate signed by that CA.
    pub require_client_cert: bool,
}

impl TestControlPlane {
    /// An HTTPS control plane with a fresh CA.
    pub fn https() -> Self {
        Self::start(Options {
            tls: true,
            ..Options::default()
        })
    }

    /// A plain-HTTP control plane on loopback.
    pub fn http() -> Self {
        Self::start(Options::default())
    }

    /// Starts a server on 127.0.0.1 on a free port.
    pub fn start(options: Options) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        let pki = options.tls.then(|| TestPki::new("control plane"));
        let acceptor = pki.as_ref().map(|pki| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("TLS versions");
            let builder = if options.require_client_cert {
                let mut roots = RootCertStore::empty();
                roots.add(pki.ca_der()).expect("add the CA");
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            let (chain, key) = pki.server_cert();
            let config = builder
                .with_single_cert(chain, key)
                .expect("server certificate");
            TlsAcceptor::from(Arc::new(config))
        });
        let listener = bind(&runtime, "127.0.0.1:0".parse().expect("address"));
        let addr = listener.local_addr().expect("local address");
        let (sender, receiver) = mpsc::unbounded_channel();
        let server = Self {
            addr,
            scheme: if options.tls { "https" } else { "http" },
            state: Arc::default(),
            acceptor,
            stop: Mutex::new(CancellationToken::new()),
            requests: tokio::sync::Mutex::new(receiver),
            sender,
            runtime: Some(runtime),
            pki,
        };
        server.serve(listener);
        server
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("running")
    }

    fn serve(&self, listener: TcpListener) {
        let stop = self.stop.lock().unwrap().clone();
        let (state, acceptor, sender) = (
            self.state.clone(),
            self.acceptor.clone(),
            self.sender.clone(),
        );
        self.runtime().spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (state, acceptor, sender, stop) = (
                    state.clone(),
                    acceptor.clone(),
                    sender.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let conn_stop = stop.clone();
                    let service = hyper::service::service_fn(move |req| {
                        handle(state.clone(), sender.clone(), stop.clone(), req)
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            // A refused handshake is the client's error to report.
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                tokio::select! {
                                    () = conn_stop.cancelled() => {}
                                    _ = http.serve_connection(TokioIo::new(tls), service) => {}
                                }
                            }
                        }
                        None => {
                            tokio::select! {
                                () = conn_stop.cancelled() => {}
                                _ = http.serve_connection(TokioIo::new(tcp), service) => {}
                            }
                        }
                    }
                });
            }
        });
    }

    /// The base URL for `control_plane.url`.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.addr.port())
    }

    /// The test CA's certificate (PEM); HTTPS servers only.
    pub fn ca_pem(&self) -> String {
        self.pki.as_ref().expect("an HTTPS server").ca_pem()
    }

    /// A client certificate signed by the server's CA; HTTPS servers only.
    pub fn client_cert(&self) -> PemPair {
        self.pki.as_ref().expect("an HTTPS server").client_cert()
    }

    /// Requires `Authorization: Bearer <token>`; anything else gets 401.
    pub fn require_token(&self, token: &str) {
        *self.state.token.lock().unwrap() = Some(token.to_owned());
    }

    /// Answers the next metrics requests with `behaviours`, one each, then with the default.
    pub fn script(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.state.script.lock().unwrap().extend(behaviours);
    }

    /// How metrics requests are answered once the script is used up (Accept at first).
    pub fn set_default(&self, behaviour: Behaviour) {
        *self.state.default.lock().unwrap() = Some(behaviour);
    }

    /// Stores secret `key`: `plain` encrypted with `node_key` under a random nonce.
    pub fn put_secret(&self, key: &str, plain: &str, node_key: &[u8; 32]) {
        let nonce: [u8; 12] = std::array::from_fn(|_| rand_byte());
        let ciphertext = Aes256Gcm::new_from_slice(node_key)
            .expect("32-byte key")
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .expect("encrypt");
        self.state.secrets.lock().unwrap().insert(
            key.to_owned(),
            serde_json::json!({
                "ciphertext": STANDARD.encode(ciphertext),
                "nonce": STANDARD.encode(nonce),
            }),
        );
    }

    /// Makes the secrets API answer with `behaviour` (None: serve the stored secrets).
    pub fn set_secret_behaviour(&self, behaviour: Option<Behaviour>) {
        *self.state.secret_behaviour.lock().unwrap() = behaviour;
    }

    /// Closes the port and every open connection: clients see "connection refused".
    pub fn go_away(&self) {
        self.stop.lock().unwrap().cancel();
    }

    /// Listens again on the same port after [`TestControlPlane::go_away`].
    pub fn come_back(&self) {
        *self.stop.lock().unwrap() = CancellationToken::new();
        let listener = bind(self.runtime(), self.addr);
        self.serve(listener);
    }

    /// The next request, waiting at most `within`.
    pub async fn next(&self, within: Duration) -> Recorded {
        let mut requests = self.requests.lock().await;
        match tokio::time::timeout(within, requests.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => panic!("the test control plane stopped"),
            Err(_) => panic!("no request reached the test control plane within {within:?}"),
        }
    }

    /// The next request, for tests without a runtime of their own.
    pub fn next_blocking(&self, within: Duration) -> Recorded {
        self.runtime().block_on(self.next(within))
    }

    /// The next request, or `None` when none comes within `within` (for a test that has more
    /// to say about the silence than the timeout).
    pub fn next_within(&self, within: Duration) -> Option<Recorded> {
        self.runtime().block_on(async {
            let mut requests = self.requests.lock().await;
            tokio::time::timeout(within, requests.recv())
                .await
                .ok()
                .map(|r| r.expect("the test control plane stopped"))
        })
    }

    /// A request that has already arrived, if any.
    pub fn try_next(&self) -> Option<Recorded> {
        self.requests.try_lock().ok()?.try_recv().ok()
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        self.stop.lock().unwrap().cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Binds with std, so that it works from inside another runtime too.
fn bind(runtime: &tokio::runtime::Runtime, addr: SocketAddr) -> TcpListener {
    let std = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std.set_nonblocking(true).expect("non-blocking listener");
    let _entered = runtime.enter();
    TcpListener::from_std(std).expect("register the listener")
}

fn rand_byte() -> u8 {
    // Nonces only need to differ between calls of one test.
    use std::sync::atomic::{AtomicU8, Ordering};
    static NEXT: AtomicU8 = AtomicU8::new(1);
    NEXT.fetch_add(37, Ordering::Relaxed) ^ (std::process::id() as u8)
}

fn answer(status: u16, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = StatusCode::from_u16(status).expect("valid status");
    response
}

async fn handle(
    state: Arc<State>,
    sender: mpsc::UnboundedSender<Recorded>,
    stop: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let raw = body.collect().await?.to_bytes();
    let gzip = parts
        .headers
        .get("content-encoding")
        .is_some_and(|v| v == "gzip");
    let mut recorded = Recorded {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        headers: parts.headers.clone(),
        body: raw.to_vec(),
        status: 0,
        duplicate: false,
    };
    if gzip {
        let mut plain = Vec::new();
        if flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut plain)
            .is_err()
        {
            recorded.status = 400;
            let _ = sender.send(recorded);
            return Ok(answer(400, "body is not gzip"));
        }
        recorded.body = plain;
    }
    let token = state.token.lock().unwrap().clone();
    if let Some(token) = token {
        let wanted = format!("Bearer {token}");
        if parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            != Some(&wanted)
        {
            recorded.status = 401;
            let _ = sender.send(recorded);
            return Ok(answer(401, "invalid bearer token\nsecond line"));
        }
    }
    let secrets_prefix = parts.uri.path().contains("/secrets/");
    let behaviour = if parts.method == Method::GET && secrets_prefix {
        state.secret_behaviour.lock().unwrap().clone()
    } else {
        let scripted = state.script.lock().unwrap().pop_front();
        Some(scripted.unwrap_or_else(|| {
            state
                .default
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(Behaviour::Accept)
        }))
    };
    let response = match behaviour {
        None => {
            // The secrets API: GET /v1/nodes/{node}/secrets/{key}
            let key = parts.uri.path().rsplit('/').next().unwrap_or_default();
            match state.secrets.lock().unwrap().get(key) {
                Some(secret) => answer(200, &secret.to_string()),
                None => answer(404, "no such secret"),
            }
        }
        Some(Behaviour::Accept) => {
            if let Some(key) = recorded.key() {
                recorded.duplicate = !state.accepted_keys.lock().unwrap().insert(key.to_owned());
            }
            answer(204, "")
        }
        Some(Behaviour::Status(code, body)) => answer(code, &body),
        Some(Behaviour::TooManyRequests(secs)) => {
            let mut r = answer(429, "slow down");
            r.headers_mut().insert(
                "retry-after",
                secs.to_string().parse().expect("header value"),
            );
            r
        }
        Some(Behaviour::Hang) => {
            let _ = sender.send(recorded);
            stop.cancelled().await;
            return Ok(answer(503, "stopped"));
        }
    };
    recorded.status = response.status().as_u16();
    let _ = sender.send(recorded);
    Ok(response)
}

/// A temporary directory removed on drop, for config, token and key files.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory whose name starts with `name`.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name(&format!("plexd-{name}-")));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        Self(dir)
    }

    /// Writes `content` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("write a temp file");
        path
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
