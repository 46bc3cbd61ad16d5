//! The rustls configuration of every HTTP client: the trust reqwest would set up itself
//! (Mozilla's roots, the system's, `ca_file`), the client certificate, the section's TLS keys
//! (versions, cipher suites, server name, resumption), and a verifier that also accepts a
//! server certificate pinned in `ca_file`.
//!
//! A self-signed certificate made by `openssl req -x509` is a CA certificate (CA:TRUE), which
//! WebPKI refuses as a server's own certificate even when it is a trusted root. An operator
//! who puts exactly that certificate in `ca_file` has said which certificate to expect, so
//! the agent accepts it then, still checking its name, its dates and the handshake's
//! signature.

use crate::small_file::{read_at_most, MAX_CONFIG_BYTES};
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::{verify_server_name, Resumption, WebPkiServerVerifier};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::ParsedCertificate;
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};

use super::http::{TlsKeys, TlsSettings};
use super::ReportError;

/// The ALPN protocols reqwest offers when it builds the configuration itself: HTTP/2 where
/// the server speaks it, else HTTP/1.1.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The rustls configuration for one client.
pub(crate) fn client_config(
    tls: &TlsSettings,
    keys: &TlsKeys,
) -> Result<ClientConfig, ReportError> {
    let options = tls
        .options
        .parse(keys.section)
        .map_err(|found| ReportError::Setup(found.join("; ")))?;
    let mut provider = ring::default_provider();
    if let Some(suites) = options.cipher_suites {
        provider.cipher_suites = suites;
    }
    let provider = Arc::new(provider);

    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // As reqwest does: a system store often holds a certificate rustls cannot parse, which
    // costs that one root and nothing else.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let pinned = match &tls.ca_file {
        Some(path) => read_ca_file(path, keys)?,
        None => Vec::new(),
    };
    for cert in &pinned {
        roots.add(cert.clone()).map_err(|e| {
            ReportError::Setup(format!(
                "{}: a certificate in {} cannot be trusted as a CA: {e}",
                keys.ca,
                path_text(&tls.ca_file)
            ))
        })?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ReportError::Setup(format!("cannot set up TLS verification: {e}")))?;
    let verifier = Verifier {
        webpki,
        pinned,
        server_name: options.server_name,
        insecure: tls.insecure_skip_verify,
    };

    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&options.versions)
        .map_err(|e| {
            ReportError::Setup(format!(
                "{}: the TLS versions and cipher suites do not fit together: {e}",
                keys.section
            ))
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match &tls.client_identity {
        Some((cert, key)) => {
            let (chain, key_der) = read_identity(cert, key, keys)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                ReportError::Setup(format!(
                    "{}.cert_file/key_file: {} and {} are not a certificate and its private \
                     key: {e}",
                    keys.section,
                    cert.display(),
                    key.display()
                ))
            })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    if !options.session_tickets {
        config.resumption = Resumption::disabled();
    }
    Ok(config)
}

fn path_text(path: &Option<std::path::PathBuf>) -> String {
    path.as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// The certificates of a CA file; at least one.
fn read_ca_file(path: &Path, keys: &TlsKeys) -> Result<Vec<CertificateDer<'static>>, ReportError> {
    let pem = read_at_most(path, MAX_CONFIG_BYTES).map_err(|e| {
        ReportError::Setup(format!("{}: cannot read {}: {e}", keys.ca, path.display()))
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ReportError::Setup(format!(
                "{}: {} is not a PEM certificate bundle: {e}",
                keys.ca,
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(ReportError::Setup(format!(
            "{}: {} holds no PEM certificate",
            keys.ca,
            path.display()
        )));
    }
    Ok(certs)
}

/// A client certificate chain and its private key, for mutual TLS.
fn read_identity(
    cert: &Path,
    key: &Path,
    keys: &TlsKeys,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ReportError> {
    let read = |name: &str, path: &Path| {
        read_at_most(path, MAX_CONFIG_BYTES).map_err(|e| {
            ReportError::Setup(format!(
                "{}.{name}: cannot read {}: {e}",
                keys.section,
                path.display()
            ))
        })
    };
    let (cert_pem, key_pem) = (read("cert_file", cert)?, read("key_file", key)?);
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            ReportError::Setup(format!(
                "{}.cert_file: {} is not a PEM certificate (chain)",
                keys.section,
                cert.display()
            ))
        })?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        ReportError::Setup(format!(
            "{}.key_file: {} is not a PEM private key: {e}",
            keys.section,
            key.display()
        ))
    })?;
    Ok((chain, key_der))
}

/// WebPKI verification against the configured roots and name, which also accepts a server
/// certificate that is byte for byte one of `ca_file`'s (see the module's comment).
#[derive(Debug)]
struct Verifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// The certificates of `ca_file`.
    pinned: Vec<CertificateDer<'static>>,
    /// `server_name`, which replaces the URL's host in the name check.
    server_name: Option<ServerName<'static>>,
    /// `tls_insecure_skip_verify`: any certificate passes (the signature of the handshake is
    /// still checked against the one presented).
    insecure: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if self.insecure {
            return Ok(ServerCertVerified::assertion());
        }
        let name = self.server_name.as_ref().unwrap_or(server_name);
        let verified =
            self.webpki
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now);
        match verified {
            Err(_)
                if self
                    .pinned
                    .iter()
                    .any(|p| p.as_ref() == end_entity.as_ref()) =>
            {
                verify_pinned(end_entity, name, now)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// What WebPKI checks of a server certificate that does not depend on its issuer: the name
/// and the dates. The issuer does not matter for a certificate the operator pinned.
fn verify_pinned(
    cert: &CertificateDer<'_>,
    name: &ServerName<'_>,
    now: UnixTime,
) -> Result<ServerCertVerified, Error> {
    verify_server_name(&ParsedCertificate::try_from(cert)?, name)?;
    let (not_before, not_after) =
        validity(cert.as_ref()).ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if now < not_before {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now > not_after {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(ServerCertVerified::assertion())
}

/// A certificate's notBefore and notAfter as UNIX seconds (RFC 5280 4.1: the validity
/// follows the version, serial number, signature algorithm and issuer of the TBS part).
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    const SEQUENCE: u8 = 0x30;
    let (certificate, _) = der_item(der, SEQUENCE)?;
    let (mut tbs, _) = der_item(certificate, SEQUENCE)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_item(tbs, 0xa0)?.1; // the explicit version
    }
    for _ in 0..3 {
        // serial number, signature algorithm, issuer
        let tag = *tbs.first()?;
        tbs = der_item(tbs, tag)?.1;
    }
    let (validity, _) = der_item(tbs, SEQUENCE)?;
    let (not_before, rest) = der_time(validity)?;
    let (not_after, _) = der_time(rest)?;
    Some((not_before, not_after))
}

/// One DER item with tag `tag`: its contents and what follows it.
fn der_item(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950 to 2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`)
/// as UNIX seconds, and what follows it.
fn der_time(input: &[u8]) -> Option<(i64, &[u8])> {
    let (text, rest, century) = match input.first()? {
        0x17 => {
            let (text, rest) = der_item(input, 0x17)?;
            let yy: u32 = std::str::from_utf8(text.get(..2)?).ok()?.parse().ok()?;
            (text, rest, Some(if yy < 50 { "20" } else { "19" }))
        }
        0x18 => {
            let (text, rest) = der_item(input, 0x18)?;
            (text, rest, None)
        }
        _ => return None,
    };
    let text = std::str::from_utf8(text).ok()?;
    let full = format!("{}{text}", century.unwrap_or_default());
    let time = chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%SZ").ok()?;
    Some((time.and_utc().timestamp(), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsOptions;
    use crate::reporter::http::CONTROL_PLANE;

    #[test]
    fn validity_reads_both_time_forms() {
        let key = rcgen::KeyPair::generate().unwrap();
        for (before, after) in [
            ((2001, 2, 3), (2049, 12, 31)), // UTCTime
            ((1999, 1, 1), (2100, 6, 30)),  // UTCTime, then GeneralizedTime
        ] {
            let mut params = rcgen::CertificateParams::new(vec!["cp.example".into()]).unwrap();
            params.not_before = rcgen::date_time_ymd(before.0, before.1, before.2);
            params.not_after = rcgen::date_time_ymd(after.0, after.1, after.2);
            let cert = params.self_signed(&key).unwrap();
            let ymd = |(y, m, d): (i32, u8, u8)| {
                chrono::NaiveDate::from_ymd_opt(y, m.into(), d.into())
                    .unwrap()
                    .and_hms_opt(0, 0, 0)
                    .unwrap()
                    .and_utc()
                    .timestamp()
            };
            assert_eq!(validity(cert.der()), Some((ymd(before), ymd(after))));
        }
        assert_eq!(validity(b"\x30\x03\x02\x01\x01"), None);
        assert_eq!(validity(b""), None);
    }

    /// A CA:TRUE self-signed certificate for `cp.example`, as `openssl req -x509` makes.
    fn self_signed_ca(not_after: (i32, u8, u8)) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["cp.example".into()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        params.self_signed(&key).unwrap().der().clone()
    }

    fn name(n: &str) -> ServerName<'static> {
        ServerName::try_from(n.to_owned()).unwrap()
    }

    #[test]
    fn a_pinned_certificate_still_needs_its_name_and_dates() {
        let now = UnixTime::now();
        let cert = self_signed_ca((2090, 1, 1));
        assert!(verify_pinned(&cert, &name("cp.example"), now).is_ok());
        assert_eq!(
            verify_pinned(&cert, &name("other.example"), now)
                .unwrap_err()
                .to_string(),
            Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected: name("other.example"),
                presented: vec!["DnsName(\"cp.example\")".into()],
            })
            .to_string()
        );
        let expired = self_signed_ca((2021, 1, 1));
        assert_eq!(
            verify_pinned(&expired, &name("cp.example"), now).unwrap_err(),
            Error::InvalidCertificate(CertificateError::Expired)
        );
    }

    #[test]
    fn session_tickets_off_disables_resumption_and_alpn_offers_h2_then_http1() {
        let mut tls = TlsSettings::default();
        let on = client_config(&tls, &CONTROL_PLANE).unwrap();
        assert_eq!(on.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(!format!("{:?}", on.resumption).contains("Disabled"));
        tls.options = TlsOptions {
            session_tickets: false,
            ..TlsOptions::default()
        };
        let off = client_config(&tls, &CONTROL_PLANE).unwrap();
        assert!(
            format!("{:?}", off.resumption).contains("Disabled"),
            "{:?}",
            off.resumption
        );
    }

    #[test]
    fn bad_keys_name_the_section() {
        let tls = TlsSettings {
            options: TlsOptions {
                min_version: "TLS1.0".into(),
                ..TlsOptions::default()
            },
            ..TlsSettings::default()
        };
        let e = client_config(&tls, &CONTROL_PLANE).unwrap_err().to_string();
        assert!(e.contains("control_plane.min_version: \"TLS1.0\""), "{e}");
    }
}
