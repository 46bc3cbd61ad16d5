//! The agent's own HTTP endpoints (health, `/metrics`) share one small server: HTTP/1 on a
//! listener bound before anything runs (a taken port is a configuration error), optionally
//! behind TLS, each connection in a task of a set the server owns, bounded in number and
//! time, without keep-alive. Answers are computed synchronously from state the server only
//! reads, so no request waits on the Manager's loop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;
/// How long one connection (TLS handshake, request and answer) may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of descriptors, say), so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What answers a request.
pub type Answer = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Binds `addr` as a non-blocking tokio listener. Must run inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Serves `answer` on `listener` until `cancel` fires; `name` says which endpoint in logs.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    answer: Answer,
    cancel: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(component = "metrics", endpoint = name, error = %e, "cannot accept a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                if connections.len() >= MAX_CONNECTIONS {
                    debug!(component = "metrics", endpoint = name, "busy; connection closed");
                    continue;
                }
                let (answer, tls) = (answer.clone(), tls.clone());
                connections.spawn(async move {
                    let served = async {
                        match tls {
                            Some(acceptor) => match acceptor.accept(stream).await {
                                Ok(stream) => serve_connection(stream, answer).await,
                                Err(e) => Err(format!("TLS handshake: {e}")),
                            },
                            None => serve_connection(stream, answer).await,
                        }
                    };
                    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, served).await {
                        debug!(component = "metrics", endpoint = name, error = %e, "connection failed");
                    }
                });
            }
        }
    }
    connections.shutdown().await;
}

async fn serve_connection<S>(stream: S, answer: Answer) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let response = answer(&req);
        async move { Ok::<_, Infallible>(response) }
    });
    hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(CONNECTION_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(|e| e.to_string())
}
