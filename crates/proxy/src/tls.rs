//! HTTPS at the edge: the server configuration from PEM files, and a self-signed development
//! certificate for `flotilla up --tls`.
//!
//! rustls with the `ring` provider only. ALPN offers `h2` first and `http/1.1` second, so
//! browsers and HTTP/2 clients get HTTP/2 and everything else HTTP/1.1 on the same port.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Why the TLS configuration could not be built. Each names the file, so the message alone
/// tells the user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read TLS {what} `{}`: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("`{}` holds no PEM certificate (expected a `-----BEGIN CERTIFICATE-----` block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("`{}` holds no PEM private key (expected a PKCS#8, PKCS#1 or SEC1 `-----BEGIN ... PRIVATE KEY-----` block)", path.display())]
    NoKey { path: PathBuf },
    #[error("`{}` is not valid PEM: {reason}", path.display())]
    InvalidPem { path: PathBuf, reason: String },
    #[error("the private key in `{}` does not belong to the certificate in `{}`", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate `{}` or key `{}` cannot be used: {reason}", cert.display(), key.display())]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The provider every TLS configuration of Flotilla uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration for `cert` (a PEM chain, leaf first) and `key` (a PEM private
/// key), with ALPN `h2` and `http/1.1`. Paths are used as given; the caller resolves them
/// against the manifest directory.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert)?;
    let private_key = private_key(key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| unusable(cert, key, error))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|error| match error {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                }
            }
            other => unusable(cert, key, other),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn unusable(cert: &Path, key: &Path, reason: impl ToString) -> TlsError {
    TlsError::Unusable {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in the PEM file `path`, in order.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read("certificate", path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::InvalidPem {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| match error {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        other => TlsError::InvalidPem {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// Names the development certificate is for.
const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// A certificate that expires sooner than this is made again.
const DEV_MIN_REMAINING: Duration = Duration::from_secs(24 * 60 * 60);
const DEV_VALIDITY_DAYS: i64 = 365;

/// A self-signed certificate for `localhost`, `127.0.0.1` and `::1` in `dir/cert.pem` and
/// `dir/key.pem` (the key readable by its owner only), made once and reused while it is valid
/// for more than a day. Returns the two paths.
///
/// Clients trust it by trusting `cert.pem` itself (`curl --cacert .flotilla/tls/cert.pem`).
pub fn dev_certificate(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        match usable_for_a_day(&cert, &key) {
            Ok(()) => return Ok((cert, key)),
            Err(reason) => tracing::info!(
                cert = %cert.display(),
                %reason,
                "making a new development certificate"
            ),
        }
    }
    fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let (cert_pem, key_pem) = generate_dev_certificate()?;
    write_private(&key, key_pem.as_bytes())
        .map_err(|e| format!("cannot write `{}`: {e}", key.display()))?;
    fs::write(&cert, cert_pem).map_err(|e| format!("cannot write `{}`: {e}", cert.display()))?;
    Ok((cert, key))
}

/// The certificate and key load, belong together, and a client trusting the certificate would
/// accept it for every development name a day from now.
fn usable_for_a_day(cert: &Path, key: &Path) -> Result<(), String> {
    server_config(cert, key).map_err(|e| e.to_string())?;
    let chain = certificates(cert).map_err(|e| e.to_string())?;
    let mut roots = RootCertStore::empty();
    roots
        .add(chain[0].clone())
        .map_err(|e| format!("not usable as its own root: {e}"))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| e.to_string())?;
    let tomorrow = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            + DEV_MIN_REMAINING,
    );
    for name in DEV_NAMES {
        let server_name = ServerName::try_from(name).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], tomorrow)
            .map_err(|e| format!("not valid for {name} a day from now: {e}"))?;
    }
    Ok(())
}

fn generate_dev_certificate() -> Result<(String, String), String> {
    let failed = |e: rcgen::Error| format!("cannot make a development certificate: {e}");
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let mut params = rcgen::CertificateParams::new(
        DEV_NAMES
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>(),
    )
    .map_err(failed)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "Flotilla development certificate",
    );
    let today = days_since_epoch(SystemTime::now());
    // From yesterday, so a client whose clock is a little behind accepts it too.
    let (year, month, day) = ymd(civil_date(today - 1));
    params.not_before = rcgen::date_time_ymd(year, month, day);
    let (year, month, day) = ymd(civil_date(today + DEV_VALIDITY_DAYS));
    params.not_after = rcgen::date_time_ymd(year, month, day);
    let cert = params.self_signed(&key).map_err(failed)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn days_since_epoch(time: SystemTime) -> i64 {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    i64::try_from(seconds / 86_400).unwrap_or(i64::MAX / 2)
}

/// The (year, month, day) `days` after 1970-01-01 in the proleptic Gregorian calendar
/// (the civil-from-days calculation).
fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

fn ymd((year, month, day): (i64, i64, i64)) -> (i32, u8, u8) {
    (
        i32::try_from(year).unwrap_or(9999),
        u8::try_from(month).unwrap_or(1),
        u8::try_from(day).unwrap_or(1),
    )
}

/// Writes `contents` to `path` readable and writable by the owner only (on Unix), replacing
/// any earlier file.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(0o600);
        // `mode` only applies to a new file; an older key file may have been wider.
        if path.exists() {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        }
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        let format = civil_date;
        assert_eq!(format(0), (1970, 1, 1));
        assert_eq!(format(59), (1970, 3, 1));
        assert_eq!(format(11_016), (2000, 2, 29));
        assert_eq!(format(20_454), (2026, 1, 1));
        assert_eq!(format(20_453), (2025, 12, 31));
    }
}
