//! OpenSSL as the other side of the agent's TLS: `openssl req`/`x509` make certificates the
//! way operators do, and `openssl s_server` is a TLS server that shares no code with rustls,
//! restricted to the versions and suites a test names.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Bound on `s_server` saying which port it listens on.
const START: Duration = Duration::from_secs(15);

/// Runs `openssl` with `args` in `dir`; panics with its output when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate and its key, as PEM files.
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A self-signed certificate for DNS name `name`, made in `dir` as `<file>.pem` and
/// `<file>.key` by `openssl req -x509`, which makes a CA certificate (CA:TRUE) unless `extra`
/// says otherwise.
pub fn self_signed(dir: &Path, file: &str, name: &str, extra: &[&str]) -> CertFiles {
    let (cert, key) = (format!("{file}.pem"), format!("{file}.key"));
    let subject = format!("/CN={name}");
    let san = format!("subjectAltName=DNS:{name}");
    let mut args = vec![
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject,
        "-addext", &san, "-keyout", &key, "-out", &cert,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
    CertFiles {
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

/// A CA (`ca.pem`, CA:TRUE) and a server certificate for `name` it signed (`leaf.pem`,
/// CA:FALSE): the two-step way to a certificate WebPKI accepts.
pub fn ca_and_leaf(dir: &Path, name: &str) -> (PathBuf, CertFiles) {
    let ca = self_signed(dir, "ca", "plexd test CA", &[]);
    let subject = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", "leaf.key",
            "-out", "leaf.csr",
        ],
    );
    std::fs::write(
        dir.join("leaf.ext"),
        format!("subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n"),
    )
    .expect("write the extensions file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.pem",
        ],
    );
    (
        ca.cert,
        CertFiles {
            cert: dir.join("leaf.pem"),
            key: dir.join("leaf.key"),
        },
    )
}

/// `openssl s_server -WWW` on 127.0.0.1: answers a GET with the file of that path under its
/// root directory. Dropping it stops it.
pub struct SServer {
    child: Child,
    port: u16,
}

impl SServer {
    /// Serves `root` with `server`'s certificate, restricted by `args` (e.g. `-tls1_3`, or
    /// `-cipher ECDHE-RSA-AES128-GCM-SHA256 -tls1_2`).
    pub fn start(root: &Path, server: &CertFiles, args: &[&str]) -> Self {
        let mut child = Command::new("openssl")
            .arg("s_server")
            .args(["-accept", "127.0.0.1:0", "-WWW", "-cert"])
            .arg(&server.cert)
            .arg("-key")
            .arg(&server.key)
            .args(args)
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Its handshake errors are what the tests assert on the client side.
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_server (Debian package openssl)");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads to the end, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .strip_prefix("ACCEPT 127.0.0.1:")
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let port = match rx.recv_timeout(START) {
            Ok(port) => port,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("openssl s_server {args:?} named no port within {START:?}: {e}");
            }
        };
        Self { child, port }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
