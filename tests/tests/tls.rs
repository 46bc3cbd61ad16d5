//! The clients' TLS keys against OpenSSL's `s_server`, a TLS implementation that shares no
//! code with rustls, and certificates made with the `openssl` commands operators use: pinning
//! a self-signed certificate, `server_name`, versions and cipher suites. No privileges
//! needed; Debian's `openssl` must be installed (`cargo xtask setup`).

use std::path::Path;

use plexd_metrics::config::ControlPlaneConfig;
use plexd_metrics::reporter::{ControlPlaneReporter, SecretFetcher};
use plexd_metrics_tests::control_plane::TempDir;
use plexd_metrics_tests::openssl::{ca_and_leaf, self_signed, CertFiles, SServer};

/// The answer `s_server -WWW` gives for the secret `k` of node `n`.
const SECRET: &str = r#"{"ciphertext":"c2VjcmV0","nonce":"bm9uY2U="}"#;

/// A directory `s_server` serves the secret from.
fn root() -> TempDir {
    let dir = TempDir::new("tls-root");
    std::fs::create_dir_all(dir.path().join("v1/nodes/n/secrets")).unwrap();
    dir.write("v1/nodes/n/secrets/k", SECRET);
    dir
}

/// A control plane client of `url` with `ca_file` and `tls` keys set over the defaults.
fn config(
    url: &str,
    dir: &TempDir,
    ca: &Path,
    tls: impl FnOnce(&mut ControlPlaneConfig),
) -> ControlPlaneConfig {
    let mut cfg = ControlPlaneConfig {
        url: url.to_owned(),
        token_file: Some(dir.write("token", "t")),
        ca_file: Some(ca.to_owned()),
        ..ControlPlaneConfig::default()
    };
    tls(&mut cfg);
    cfg
}

/// Fetches the secret through the control plane client: the body arrives only over a
/// handshake that succeeded.
async fn fetch(cfg: &ControlPlaneConfig) -> Result<(), String> {
    let reporter = ControlPlaneReporter::new(cfg).map_err(|e| e.to_string())?;
    let secret = reporter
        .fetch_secret("n", "k")
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(secret.nonce, "bm9uY2U=");
    Ok(())
}

#[tokio::test]
async fn a_self_signed_ca_certificate_in_ca_file_is_pinned_with_its_name_still_checked() {
    let dir = TempDir::new("tls-pin");
    let server_cert = self_signed(dir.path(), "server", "cp.example", &[]);
    let root = root();
    let server = SServer::start(root.path(), &server_cert, &[]);
    let url = server.url();

    // Connected by address, verified against the name the certificate carries.
    let pinned = config(&url, &dir, &server_cert.cert, |c| {
        c.server_name = "cp.example".into()
    });
    fetch(&pinned)
        .await
        .expect("the pinned certificate is accepted");

    // Without server_name the URL's address is checked, which the certificate lacks.
    let e = fetch(&config(&url, &dir, &server_cert.cert, |_| {}))
        .await
        .unwrap_err();
    assert!(e.contains("not valid for name \"127.0.0.1\""), "{e}");
    assert!(e.contains("set control_plane.server_name"), "{e}");

    // A wrong name is refused though the certificate is pinned.
    let e = fetch(&config(&url, &dir, &server_cert.cert, |c| {
        c.server_name = "other.example".into()
    }))
    .await
    .unwrap_err();
    assert!(e.contains("not valid for name \"other.example\""), "{e}");
    assert!(e.contains("control_plane.server_name"), "{e}");

    // Another certificate in ca_file: the advice says what is wrong and both ways out.
    let other = self_signed(dir.path(), "other", "cp.example", &[]);
    let e = fetch(&config(&url, &dir, &other.cert, |c| {
        c.server_name = "cp.example".into()
    }))
    .await
    .unwrap_err();
    assert!(e.contains("CaUsedAsEndEntity"), "{e}");
    assert!(e.contains("is itself a CA certificate"), "{e}");
    assert!(
        e.contains("put that very certificate in control_plane.ca_file to pin it"),
        "{e}"
    );
    assert!(e.contains("basicConstraints=critical,CA:FALSE"), "{e}");
    assert!(!e.contains("set control_plane.ca_file to the CA"), "{e}");
}

#[tokio::test]
async fn server_name_is_sent_as_sni_so_a_server_with_two_names_shows_the_right_one() {
    // s_server presents default.example's certificate unless the client asks for
    // cp.example in SNI; only cp.example's certificate is pinned.
    let dir = TempDir::new("tls-sni");
    let default = self_signed(dir.path(), "default", "default.example", &[]);
    let named = self_signed(dir.path(), "named", "cp.example", &[]);
    let root = root();
    let cert2 = named.cert.to_str().unwrap();
    let key2 = named.key.to_str().unwrap();
    let server = SServer::start(
        root.path(),
        &default,
        &["-servername", "cp.example", "-cert2", cert2, "-key2", key2],
    );
    let url = server.url();
    let by_name = config(&url, &dir, &named.cert, |c| {
        c.server_name = "cp.example".into()
    });
    fetch(&by_name)
        .await
        .expect("cp.example was asked for in SNI, and its certificate came back");

    // Pinning default.example's certificate and naming it: the server shows it because the
    // name sent is not cp.example.
    let other = config(&url, &dir, &default.cert, |c| {
        c.server_name = "default.example".into()
    });
    fetch(&other)
        .await
        .expect("the default certificate for another name");

    // The name is checked against what the server showed: asking for cp.example while
    // trusting only default.example's certificate fails.
    let e = fetch(&config(&url, &dir, &default.cert, |c| {
        c.server_name = "cp.example".into()
    }))
    .await
    .unwrap_err();
    assert!(e.contains("control_plane"), "{e}");
}

#[tokio::test]
async fn certificates_openssl_makes_with_ca_false_verify_as_before() {
    let dir = TempDir::new("tls-leaf");
    let root = root();
    let url_name = |c: &mut ControlPlaneConfig| c.server_name = "cp.example".into();

    // A CA and a server certificate it signed.
    let (ca, leaf) = ca_and_leaf(dir.path(), "cp.example");
    let server = SServer::start(root.path(), &leaf, &[]);
    fetch(&config(&server.url(), &dir, &ca, url_name))
        .await
        .unwrap();
    drop(server);

    // A self-signed certificate with CA:FALSE is its own trust anchor.
    let own = self_signed(
        dir.path(),
        "own",
        "cp.example",
        &["-addext", "basicConstraints=critical,CA:FALSE"],
    );
    let server = SServer::start(root.path(), &own, &[]);
    fetch(&config(&server.url(), &dir, &own.cert, url_name))
        .await
        .unwrap();
}

/// Connects to an `s_server` restricted by `server_args` with each client setting in `ok`
/// (must succeed) and `refused` (must fail in the handshake, with advice on the keys).
async fn offers(
    server_args: &[&str],
    ok: &[fn(&mut ControlPlaneConfig)],
    refused: &[fn(&mut ControlPlaneConfig)],
) {
    let dir = TempDir::new("tls-offer");
    let (ca, leaf): (_, CertFiles) = ca_and_leaf(dir.path(), "cp.example");
    let root = root();
    let server = SServer::start(root.path(), &leaf, server_args);
    let with = |set: &fn(&mut ControlPlaneConfig)| {
        config(&server.url(), &dir, &ca, |c| {
            c.server_name = "cp.example".into();
            set(c)
        })
    };
    for (i, set) in ok.iter().enumerate() {
        if let Err(e) = fetch(&with(set)).await {
            panic!("{server_args:?}, accepted setting {i}: {e}");
        }
    }
    for (i, set) in refused.iter().enumerate() {
        let e = fetch(&with(set))
            .await
            .expect_err(&format!("{server_args:?}, refused setting {i}"));
        assert!(
            e.contains("check control_plane.min_version, max_version and cipher_suites"),
            "{server_args:?}, refused setting {i}: {e}"
        );
    }
}

#[tokio::test]
async fn versions_offered_meet_a_server_that_speaks_one() {
    offers(
        &["-tls1_2"],
        &[|_| {}, |c| c.max_version = "TLS1.2".into()],
        &[|c| c.min_version = "TLS1.3".into()],
    )
    .await;
    offers(
        &["-tls1_3"],
        &[|_| {}, |c| c.min_version = "tls13".into()],
        &[|c| c.max_version = "1.2".into()],
    )
    .await;
}

#[tokio::test]
async fn cipher_suites_offered_meet_a_server_that_takes_one() {
    offers(
        &["-cipher", "ECDHE-RSA-AES128-GCM-SHA256", "-tls1_2"],
        &[|c| {
            c.max_version = "TLS1.2".into();
            c.cipher_suites = vec!["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()];
        }],
        &[|c| {
            c.max_version = "TLS1.2".into();
            c.cipher_suites = vec![
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384".into(),
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256".into(),
            ];
        }],
    )
    .await;
    offers(
        &["-ciphersuites", "TLS_AES_256_GCM_SHA384", "-tls1_3"],
        &[|c| {
            c.min_version = "TLS1.3".into();
            c.cipher_suites = vec!["TLS_AES_256_GCM_SHA384".into()];
        }],
        &[|c| {
            c.min_version = "TLS1.3".into();
            c.cipher_suites = vec!["TLS_AES_128_GCM_SHA256".into()];
        }],
    )
    .await;
}

#[tokio::test]
async fn without_session_tickets_the_client_still_connects() {
    let dir = TempDir::new("tls-tickets");
    let (ca, leaf) = ca_and_leaf(dir.path(), "cp.example");
    let root = root();
    let server = SServer::start(root.path(), &leaf, &[]);
    let cfg = config(&server.url(), &dir, &ca, |c| {
        c.server_name = "cp.example".into();
        c.session_tickets = false;
    });
    let reporter = ControlPlaneReporter::new(&cfg).unwrap();
    // s_server closes each connection, so each fetch is a new handshake.
    for _ in 0..2 {
        reporter.fetch_secret("n", "k").await.unwrap();
    }
}
