//! Verification keys: a JWKS (RFC 7517) from a URL or a file, or a shared secret, and the
//! background work that keeps a JWKS fresh.
//!
//! Each key knows the algorithms it may verify, decided by the key itself (`kty`, `crv`, `alg`)
//! and never by the token: an RSA key never becomes an HMAC secret, whatever `alg` a token
//! claims, which is what algorithm confusion attacks rely on.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use flotilla_manifest::JwtAlgorithm;
use ring::{hmac, signature};
use tokio::time::Instant;

/// JWK members are base64url; some providers pad them, which RFC 7518 does not forbid readers
/// to accept.
const JWK_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// A JWKS larger than this is not a key set.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// RFC 7518 §3.3: RSA keys of fewer bits are refused (ring refuses them too, less clearly).
const MIN_RSA_BITS: usize = 2048;

/// How a key checks a signature.
enum Verifier {
    /// Big-endian modulus and exponent, without leading zeros.
    Rsa {
        n: Box<[u8]>,
        e: Box<[u8]>,
    },
    /// An uncompressed point (`04 || x || y`).
    EcdsaP256(Box<[u8]>),
    EcdsaP384(Box<[u8]>),
    Ed25519([u8; 32]),
    /// The shared secret, keyed once for each HMAC size.
    Hmac(Box<HmacKeys>),
}

struct HmacKeys {
    sha256: hmac::Key,
    sha384: hmac::Key,
    sha512: hmac::Key,
}

/// One verification key and the algorithms it may be used with.
pub(crate) struct VerificationKey {
    kid: Option<Box<str>>,
    algorithms: Vec<JwtAlgorithm>,
    verifier: Verifier,
}

impl VerificationKey {
    /// A key for the shared secret; it verifies the HS algorithms and nothing else.
    pub(crate) fn secret(secret: &[u8], algorithms: &[JwtAlgorithm]) -> Self {
        Self {
            kid: None,
            algorithms: algorithms.iter().copied().filter(|a| a.is_hmac()).collect(),
            verifier: Verifier::Hmac(Box::new(HmacKeys {
                sha256: hmac::Key::new(hmac::HMAC_SHA256, secret),
                sha384: hmac::Key::new(hmac::HMAC_SHA384, secret),
                sha512: hmac::Key::new(hmac::HMAC_SHA512, secret),
            })),
        }
    }

    pub(crate) fn may_verify(&self, algorithm: JwtAlgorithm) -> bool {
        self.algorithms.contains(&algorithm)
    }

    pub(crate) fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// True when `signature` over `message` is valid for `algorithm` with this key. The pairing
    /// of algorithm and key type is checked again here, so a key can only verify its own kind.
    pub(crate) fn verify(&self, algorithm: JwtAlgorithm, message: &[u8], sig: &[u8]) -> bool {
        if !self.may_verify(algorithm) {
            return false;
        }
        use JwtAlgorithm as A;
        let public = |params: &'static dyn signature::VerificationAlgorithm, key: &[u8]| {
            signature::UnparsedPublicKey::new(params, key)
                .verify(message, sig)
                .is_ok()
        };
        let rsa = |params: &'static signature::RsaParameters, n: &[u8], e: &[u8]| {
            signature::RsaPublicKeyComponents { n, e }
                .verify(params, message, sig)
                .is_ok()
        };
        match (algorithm, &self.verifier) {
            (A::Rs256, Verifier::Rsa { n, e }) => rsa(&signature::RSA_PKCS1_2048_8192_SHA256, n, e),
            (A::Rs384, Verifier::Rsa { n, e }) => rsa(&signature::RSA_PKCS1_2048_8192_SHA384, n, e),
            (A::Rs512, Verifier::Rsa { n, e }) => rsa(&signature::RSA_PKCS1_2048_8192_SHA512, n, e),
            (A::Ps256, Verifier::Rsa { n, e }) => rsa(&signature::RSA_PSS_2048_8192_SHA256, n, e),
            (A::Es256, Verifier::EcdsaP256(point)) => {
                public(&signature::ECDSA_P256_SHA256_FIXED, point)
            }
            (A::Es384, Verifier::EcdsaP384(point)) => {
                public(&signature::ECDSA_P384_SHA384_FIXED, point)
            }
            (A::EdDsa, Verifier::Ed25519(key)) => public(&signature::ED25519, key),
            (A::Hs256, Verifier::Hmac(keys)) => hmac::verify(&keys.sha256, message, sig).is_ok(),
            (A::Hs384, Verifier::Hmac(keys)) => hmac::verify(&keys.sha384, message, sig).is_ok(),
            (A::Hs512, Verifier::Hmac(keys)) => hmac::verify(&keys.sha512, message, sig).is_ok(),
            _ => false,
        }
    }
}

/// The keys an authenticator verifies with right now.
#[derive(Default)]
pub(crate) struct KeySet {
    pub(crate) keys: Vec<VerificationKey>,
}

/// A JWK as far as Flotilla reads it; other members are ignored.
#[derive(serde::Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(serde::Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
}

/// The usable keys of a JWKS document, restricted to `accepted` algorithms, and a note on every
/// key left out (a key set may hold encryption keys or algorithms this gateway does not accept).
pub(crate) fn parse_jwks(
    json: &[u8],
    accepted: &[JwtAlgorithm],
) -> Result<(KeySet, Vec<String>), String> {
    let document: Jwks = serde_json::from_slice(json)
        .map_err(|e| format!("not a JWKS document (a JSON object with `keys`): {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (index, value) in document.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                skipped.push(format!("key {index}: {e}"));
                continue;
            }
        };
        let label = match &jwk.kid {
            Some(kid) => format!("key `{kid}`"),
            None => format!("key {index}"),
        };
        match key_from_jwk(&jwk, accepted) {
            Ok(key) => keys.push(key),
            Err(reason) => skipped.push(format!("{label}: {reason}")),
        }
    }
    if keys.is_empty() {
        let why = if skipped.is_empty() {
            "it holds no keys".to_owned()
        } else {
            skipped.join("; ")
        };
        return Err(format!("no usable signing key: {why}"));
    }
    Ok((KeySet { keys }, skipped))
}

fn key_from_jwk(jwk: &Jwk, accepted: &[JwtAlgorithm]) -> Result<VerificationKey, String> {
    if let Some(usage) = &jwk.usage
        && usage != "sig"
    {
        return Err(format!("its `use` is {usage:?}, not \"sig\""));
    }
    let member = |name: &str, value: &Option<String>| -> Result<Vec<u8>, String> {
        let text = value
            .as_deref()
            .ok_or_else(|| format!("`{name}` is missing"))?;
        JWK_BASE64
            .decode(text)
            .map_err(|_| format!("`{name}` is not base64url"))
    };
    let (family, verifier): (&[JwtAlgorithm], Verifier) =
        match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("RSA", _) => {
                let n = strip_leading_zeros(member("n", &jwk.n)?);
                let e = strip_leading_zeros(member("e", &jwk.e)?);
                let bits = n.first().map_or(0, |top| {
                    (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
                });
                if bits < MIN_RSA_BITS {
                    return Err(format!(
                        "its RSA modulus has {bits} bits, fewer than {MIN_RSA_BITS}"
                    ));
                }
                if e.is_empty() {
                    return Err("its RSA exponent is zero".into());
                }
                (
                    &[
                        JwtAlgorithm::Rs256,
                        JwtAlgorithm::Rs384,
                        JwtAlgorithm::Rs512,
                        JwtAlgorithm::Ps256,
                    ],
                    Verifier::Rsa {
                        n: n.into(),
                        e: e.into(),
                    },
                )
            }
            ("EC", Some(curve @ ("P-256" | "P-384"))) => {
                let size = if curve == "P-256" { 32 } else { 48 };
                let (x, y) = (member("x", &jwk.x)?, member("y", &jwk.y)?);
                if x.len() != size || y.len() != size {
                    return Err(format!("its {curve} coordinates are not {size} bytes each"));
                }
                let mut point = Vec::with_capacity(1 + 2 * size);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                if curve == "P-256" {
                    (&[JwtAlgorithm::Es256], Verifier::EcdsaP256(point.into()))
                } else {
                    (&[JwtAlgorithm::Es384], Verifier::EcdsaP384(point.into()))
                }
            }
            ("OKP", Some("Ed25519")) => {
                let x: [u8; 32] = member("x", &jwk.x)?
                    .try_into()
                    .map_err(|_| "its Ed25519 key is not 32 bytes".to_owned())?;
                (&[JwtAlgorithm::EdDsa], Verifier::Ed25519(x))
            }
            ("EC" | "OKP", curve) => {
                return Err(format!(
                    "curve {:?} is not supported (P-256, P-384 and Ed25519 are)",
                    curve.unwrap_or("")
                ));
            }
            ("oct", _) => {
                return Err(
                    "symmetric (`oct`) keys are not taken from a JWKS; use `secret_env` for HS \
                 algorithms"
                        .into(),
                );
            }
            (kty, _) => return Err(format!("key type {kty:?} is not supported")),
        };
    let mut algorithms: Vec<JwtAlgorithm> = family
        .iter()
        .copied()
        .filter(|a| accepted.contains(a))
        .collect();
    if let Some(alg) = &jwk.alg {
        // A key that names its algorithm is used with that one only (RFC 7517 §4.4).
        match JwtAlgorithm::from_name(alg) {
            Some(named) if family.contains(&named) => algorithms.retain(|a| *a == named),
            _ => return Err(format!("its `alg` {alg:?} does not fit a {} key", jwk.kty)),
        }
    }
    if algorithms.is_empty() {
        return Err("none of the accepted `algorithms` can use it".into());
    }
    Ok(VerificationKey {
        kid: jwk.kid.as_deref().map(Into::into),
        algorithms,
        verifier,
    })
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

/// Where a JWKS comes from.
pub(crate) enum Source {
    Url {
        url: String,
        client: reqwest::Client,
    },
    File(PathBuf),
}

impl Source {
    pub(crate) fn describe(&self) -> String {
        match self {
            Source::Url { url, .. } => url.clone(),
            Source::File(path) => path.display().to_string(),
        }
    }

    async fn read(&self) -> Result<Vec<u8>, String> {
        match self {
            Source::Url { url, client } => fetch(client, url).await,
            Source::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
        }
    }

    /// When the file last changed; `None` for URLs, or when it cannot be told.
    async fn modified(&self) -> Option<SystemTime> {
        match self {
            Source::File(path) => tokio::fs::metadata(path).await.ok()?.modified().ok(),
            Source::Url { .. } => None,
        }
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut response = client
        .get(url)
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    if response
        .content_length()
        .is_some_and(|length| length > MAX_JWKS_BYTES as u64)
    {
        return Err(format!("{url} sent more than {MAX_JWKS_BYTES} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("cannot read the answer of {url}: {e}"))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("{url} sent more than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A JWKS that is loaded again every `refresh`, and at once (at most every `min_refetch`) when
/// a token names a key it does not hold.
pub(crate) struct RemoteKeys {
    /// The authenticator, for log lines.
    name: Arc<str>,
    source: Source,
    accepted: Vec<JwtAlgorithm>,
    refresh: Duration,
    min_refetch: Duration,
    /// Swapped whole on reload, so a request reads one consistent set; the lock is held only
    /// to clone the `Arc`.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// When the source was last read, and the file's modification time then. A tokio mutex:
    /// it makes concurrent refetches for an unknown `kid` wait for one read instead of each
    /// reading the source.
    last_read: tokio::sync::Mutex<Option<(Instant, Option<SystemTime>)>>,
}

/// What a refetch for an unknown key found.
pub(crate) enum Refetch {
    /// The source was read (now or by a concurrent caller) and these are its keys.
    Fresh(Arc<KeySet>),
    /// The source was read too recently to read it again.
    TooSoon,
    /// Nothing could be loaded, ever.
    Unavailable,
}

impl RemoteKeys {
    pub(crate) fn new(
        name: Arc<str>,
        source: Source,
        accepted: Vec<JwtAlgorithm>,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Self {
        Self {
            name,
            source,
            accepted,
            refresh,
            min_refetch,
            keys: RwLock::new(None),
            last_read: tokio::sync::Mutex::new(None),
        }
    }

    /// The current keys; `None` until a load has succeeded.
    pub(crate) fn current(&self) -> Option<Arc<KeySet>> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the source and replaces the keys; on failure the keys stay as they were.
    pub(crate) async fn load(&self) -> Result<Arc<KeySet>, String> {
        let mut last_read = self.last_read.lock().await;
        self.load_locked(&mut last_read).await
    }

    async fn load_locked(
        &self,
        last_read: &mut Option<(Instant, Option<SystemTime>)>,
    ) -> Result<Arc<KeySet>, String> {
        let modified = self.source.modified().await;
        *last_read = Some((Instant::now(), modified));
        let bytes = self.source.read().await?;
        let (keys, skipped) = parse_jwks(&bytes, &self.accepted)
            .map_err(|e| format!("JWKS at {}: {e}", self.source.describe()))?;
        for note in skipped {
            tracing::debug!(authenticator = %self.name, "JWKS key left out: {note}");
        }
        let keys = Arc::new(keys);
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(keys.clone());
        Ok(keys)
    }

    /// For a token whose key is not in `seen`: reads the source again unless it was read less
    /// than `min_refetch` ago, so a stream of tokens with made-up `kid`s cannot hammer the
    /// identity provider.
    pub(crate) async fn refetch(&self, seen: Option<&Arc<KeySet>>) -> Refetch {
        let mut last_read = self.last_read.lock().await;
        // Someone else reloaded while this request waited for the lock: use their keys.
        if let Some(current) = self.current()
            && seen.is_none_or(|seen| !Arc::ptr_eq(seen, &current))
        {
            return Refetch::Fresh(current);
        }
        if last_read.is_some_and(|(at, _)| at.elapsed() < self.min_refetch) {
            return match self.current() {
                Some(_) => Refetch::TooSoon,
                None => Refetch::Unavailable,
            };
        }
        match self.load_locked(&mut last_read).await {
            Ok(keys) => {
                tracing::info!(authenticator = %self.name, "JWKS fetched again for an unknown key id");
                Refetch::Fresh(keys)
            }
            Err(error) => {
                tracing::warn!(authenticator = %self.name, "{error}; keeping the keys it had");
                match self.current() {
                    Some(_) => Refetch::TooSoon,
                    None => Refetch::Unavailable,
                }
            }
        }
    }

    /// Reloads every `refresh` (every `min_refetch` while nothing has loaded yet) until
    /// `shutdown`; a failed reload keeps the last good keys. A file is read again only when
    /// its modification time changed.
    pub(crate) async fn refresh_until(
        self: Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let period = if self.current().is_some() {
                self.refresh
            } else {
                self.min_refetch
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let mut last_read = self.last_read.lock().await;
            if let Source::File(_) = self.source
                && self.current().is_some()
            {
                let modified = self.source.modified().await;
                let unchanged = last_read
                    .as_ref()
                    .is_some_and(|(_, before)| before.is_some() && *before == modified);
                if unchanged {
                    continue;
                }
            }
            if let Err(error) = self.load_locked(&mut last_read).await {
                tracing::warn!(authenticator = %self.name, "{error}; keeping the keys it had");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_unsupported_kinds_are_left_out_with_a_reason() {
        let jwks = br#"{"keys": [
            {"kty": "oct", "kid": "s", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "k", "crv": "secp256k1", "x": "AA", "y": "AA"},
            {"kty": "OKP", "kid": "enc", "use": "enc", "crv": "X25519", "x": "AA"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let (set, skipped) = parse_jwks(jwks, &[JwtAlgorithm::EdDsa]).expect("one usable key");
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid(), Some("ed"));
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[0].contains("oct"), "{skipped:?}");
    }

    #[test]
    fn a_key_is_only_used_with_its_own_algorithm_family() {
        let jwks = br#"{"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let all = JwtAlgorithm::ALL;
        let (set, _) = parse_jwks(jwks, &all).expect("key");
        for alg in all {
            assert_eq!(
                set.keys[0].may_verify(alg),
                alg == JwtAlgorithm::EdDsa,
                "{alg:?}"
            );
        }
        // Naming an algorithm of another family is a broken key, not a licence.
        let mislabelled = br#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "HS256",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert!(parse_jwks(mislabelled, &all).is_err());
    }

    #[test]
    fn short_rsa_keys_are_refused() {
        let n = JWK_BASE64.encode([0xff; 128]);
        let jwks = format!(r#"{{"keys": [{{"kty": "RSA", "n": "{n}", "e": "AQAB"}}]}}"#);
        let error = parse_jwks(jwks.as_bytes(), &[JwtAlgorithm::Rs256])
            .err()
            .expect("1024-bit key refused");
        assert!(error.contains("1024 bits"), "{error}");
    }
}
