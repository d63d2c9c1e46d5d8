//! How clients reach the coordinator: `http://` in the clear, or `https://`
//! with TLS, trusting the system's roots or a given CA, and presenting a
//! client certificate where the coordinator asks for one (mTLS). Also the
//! token files that keep secrets off command lines.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS settings of a client (CLI, worker, dataprep process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM file with the CA that signed the coordinator's certificate;
    /// none: the system's trusted roots.
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate and key this client presents (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Why an endpoint could not be built from a URL and [`ClientTls`].
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid coordinator URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Settings(String),
}

/// An endpoint for `url` with `tls` applied and a 5 s connect timeout.
/// TLS settings with an `http://` URL are refused rather than ignored: a
/// user who gave a CA expects the connection to be encrypted.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, EndpointError> {
    let bad_url = |message: String| EndpointError::Url {
        url: url.to_string(),
        message,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad_url(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err(bad_url(
            "expected http://HOST:PORT or https://HOST:PORT".into(),
        ));
    }
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(EndpointError::Settings(
            "a client certificate needs its key and a key its certificate \
             (--client-cert and --client-key)"
                .into(),
        ));
    }
    let any_tls = tls.ca_cert.is_some() || tls.client_cert.is_some();
    if !https {
        if any_tls {
            return Err(bad_url(
                "TLS settings (--ca-cert, --client-cert) need an https:// URL".into(),
            ));
        }
        return Ok(endpoint);
    }
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_cert {
        Some(path) => {
            config.ca_certificate(Certificate::from_pem(read_pem(path, "CA certificate")?))
        }
        None => config.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        config = config.identity(Identity::from_pem(
            read_pem(cert, "client certificate")?,
            read_pem(key, "client key")?,
        ));
    }
    endpoint
        .tls_config(config)
        .map_err(|e| EndpointError::Settings(crate::error_chain(&e)))
}

/// A PEM file's bytes, refusing one with no PEM block so that a wrong path
/// (a DER file, a key where a certificate belongs) is named here rather
/// than as an anonymous handshake failure later.
pub fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, EndpointError> {
    let bytes = std::fs::read(path).map_err(|source| EndpointError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(EndpointError::Settings(format!(
            "{what} {} is not a PEM file (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The message clients show when a call or connection failed in a way
/// TLS settings explain, or none.
pub fn hint(url: &str, error_text: &str) -> Option<&'static str> {
    let https = url.starts_with("https://");
    let lower = error_text.to_ascii_lowercase();
    if https && (lower.contains("certificate") || lower.contains("unknownissuer")) {
        Some(
            "the coordinator's certificate is not trusted: pass the CA that signed it \
             with --ca-cert or TWINHEAD_CA_CERT",
        )
    } else if https && (lower.contains("corrupt message") || lower.contains("invalidcontenttype")) {
        Some("the coordinator does not serve TLS at this address: use an http:// URL")
    } else {
        None
    }
}

/// A secret read from a file: its first line without surrounding
/// whitespace (files written by `echo` end in a newline). An empty file is
/// an error, not "no token": an open coordinator should be asked for
/// explicitly.
pub fn read_token_file(path: &Path) -> Result<String, EndpointError> {
    let text = std::fs::read_to_string(path).map_err(|source| EndpointError::Read {
        what: "token file",
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(EndpointError::Settings(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_string())
}

/// A token given inline or in a file, never both.
pub fn token_from(
    inline: Option<&str>,
    file: Option<&Path>,
    flags: (&str, &str),
) -> Result<Option<String>, EndpointError> {
    match (inline.filter(|t| !t.is_empty()), file) {
        (Some(_), Some(_)) => Err(EndpointError::Settings(format!(
            "give {} or {}, not both",
            flags.0, flags.1
        ))),
        (Some(token), None) => Ok(Some(token.to_string())),
        (None, Some(path)) => read_token_file(path).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_need_https_and_a_cert_needs_its_key() {
        let ca = ClientTls {
            ca_cert: Some("ca.pem".into()),
            ..Default::default()
        };
        let err = endpoint("http://127.0.0.1:1", &ca).expect_err("http with a CA");
        assert!(err.to_string().contains("need an https:// URL"), "{err}");
        let half = ClientTls {
            client_cert: Some("cert.pem".into()),
            ..Default::default()
        };
        let err = endpoint("https://127.0.0.1:1", &half).expect_err("cert without key");
        assert!(err.to_string().contains("--client-key"), "{err}");
        let err = endpoint("ftp://x", &ClientTls::default()).expect_err("scheme");
        assert!(err.to_string().contains("ftp://x"), "{err}");
        endpoint("http://127.0.0.1:1", &ClientTls::default()).expect("plain http");
    }

    #[test]
    fn pem_and_token_files_are_checked() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("twinhead-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let der = dir.join("ca.der");
        std::fs::write(&der, [0x30u8, 0x82, 0x01])?;
        let err = read_pem(&der, "CA certificate").expect_err("not PEM");
        assert!(
            err.to_string().contains("ca.der is not a PEM file"),
            "{err}"
        );
        let missing = read_pem(&dir.join("nope.pem"), "CA certificate").expect_err("missing");
        assert!(missing.to_string().contains("nope.pem"), "{missing}");

        let token = dir.join("token");
        std::fs::write(&token, "s3cret \n")?;
        assert_eq!(read_token_file(&token)?, "s3cret");
        assert_eq!(
            token_from(None, Some(&token), ("--token", "--token-file"))?,
            Some("s3cret".to_string())
        );
        assert_eq!(
            token_from(Some("x"), None, ("--token", "--token-file"))?,
            Some("x".into())
        );
        let both =
            token_from(Some("x"), Some(&token), ("--token", "--token-file")).expect_err("both");
        assert!(
            both.to_string().contains("--token or --token-file"),
            "{both}"
        );
        std::fs::write(&token, "\n")?;
        let empty = read_token_file(&token).expect_err("empty");
        assert!(empty.to_string().contains("is empty"), "{empty}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
