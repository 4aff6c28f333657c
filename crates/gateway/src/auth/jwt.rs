//! Bearer JWTs (RFC 7519, compact JWS only): the token is split and its header read once per
//! request; each JWT authenticator of the route then picks a key, checks the signature and the
//! claims.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flotilla_manifest::JwtAlgorithm;
use http::{HeaderName, HeaderValue};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::jwks::{KeySet, Refetch, RemoteKeys};
use super::{Identity, Rejection};

/// Longer `Authorization` values are refused before any decoding.
const MAX_TOKEN_BYTES: usize = 16 << 10;

/// Verified tokens remembered per authenticator; when full, the memory starts afresh.
const VERIFIED_CAPACITY: usize = 4096;

/// A compact JWS, split, with its header decoded; nothing verified yet.
pub(crate) struct Token<'t> {
    /// The whole token.
    text: &'t str,
    /// `header.payload`, what the signature covers.
    signing_input: &'t str,
    payload: &'t str,
    signature: &'t str,
    /// `None` for an `alg` that is not a known signing algorithm (`none` included).
    alg: Result<JwtAlgorithm, BadAlg>,
    kid: Option<Box<str>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum BadAlg {
    None,
    Unknown,
}

#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    /// Extensions the verifier must understand (RFC 7515 §4.1.11); Flotilla understands none.
    crit: Option<IgnoredAny>,
}

impl<'t> Token<'t> {
    /// The bearer token of an `Authorization` value: `None` when it is not a bearer credential
    /// at all, an error when it is one but not a well-formed JWS.
    pub(crate) fn from_authorization(value: &'t HeaderValue) -> Option<Result<Self, Rejection>> {
        let text = value.to_str().ok()?;
        let (scheme, token) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        Some(Self::parse(token.trim()))
    }

    fn parse(token: &'t str) -> Result<Self, Rejection> {
        let malformed = || Rejection::format("the bearer token is not a signed JWT");
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Rejection::format("the bearer token is too large"));
        }
        let mut parts = token.split('.');
        let (Some(encoded_header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let header_json = URL_SAFE_NO_PAD
            .decode(encoded_header)
            .map_err(|_| malformed())?;
        let header: Header = serde_json::from_slice(&header_json).map_err(|_| malformed())?;
        if header.crit.is_some() {
            return Err(Rejection::format(
                "the token has critical header extensions (`crit`), which are not supported",
            ));
        }
        let alg = match JwtAlgorithm::from_name(&header.alg) {
            Some(alg) => Ok(alg),
            None if header.alg.eq_ignore_ascii_case("none") => Err(BadAlg::None),
            None => Err(BadAlg::Unknown),
        };
        Ok(Self {
            text: token,
            signing_input: &token[..encoded_header.len() + 1 + payload.len()],
            payload,
            signature,
            alg,
            kid: header.kid.map(Into::into),
        })
    }
}

/// A JWT authenticator: where its keys are and what the claims must say.
pub(crate) struct JwtAuthenticator {
    pub(crate) keys: Keys,
    issuer: Option<Box<str>>,
    audience: Box<[Box<str>]>,
    algorithms: Box<[JwtAlgorithm]>,
    leeway: Duration,
    /// `claims`: (header, claim name).
    forward: Box<[(HeaderName, Box<str>)]>,
    /// "RS256, ES256", for refusals.
    algorithm_list: Box<str>,
    /// Tokens whose signature this authenticator verified, by their whole text, with their
    /// claims. A client sends one token for many requests, and checking an RS256 or ES256
    /// signature costs more than the rest of the gateway's work on a request. An entry counts
    /// only while the key set that verified it is still the current one (a rotation that
    /// drops the key drops its tokens), and the claims' times are checked again on every use.
    verified: Mutex<HashMap<Box<str>, Verified>>,
}

/// A token's verification, remembered.
struct Verified {
    keys: Arc<KeySet>,
    claims: Claims,
}

pub(crate) enum Keys {
    /// A shared secret: fixed for the gateway's life.
    Fixed(Arc<KeySet>),
    Remote(Arc<RemoteKeys>),
}

impl JwtAuthenticator {
    pub(crate) fn new(
        keys: Keys,
        settings: &flotilla_manifest::JwtSettings,
        forward: Box<[(HeaderName, Box<str>)]>,
    ) -> Self {
        let names: Vec<&str> = settings.algorithms.iter().map(|a| a.as_str()).collect();
        Self {
            keys,
            issuer: settings.issuer.as_deref().map(Into::into),
            audience: settings
                .audience
                .iter()
                .map(|a| a.as_str().into())
                .collect(),
            algorithms: settings.algorithms.clone().into(),
            leeway: settings.leeway,
            forward,
            algorithm_list: names.join(", ").into(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The claims of `token` if this authenticator verified it with the keys it has now.
    fn remembered(&self, token: &Token<'_>) -> Option<Claims> {
        let current = match &self.keys {
            Keys::Fixed(set) => set.clone(),
            Keys::Remote(remote) => remote.current()?,
        };
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let entry = verified.get(token.text)?;
        Arc::ptr_eq(&entry.keys, &current).then(|| entry.claims.clone())
    }

    fn remember(&self, token: &Token<'_>, keys: Arc<KeySet>, claims: &Claims) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CAPACITY {
            verified.clear();
        }
        verified.insert(
            token.text.into(),
            Verified {
                keys,
                claims: claims.clone(),
            },
        );
    }

    /// Verifies `token`, returning who it names. `via` is the authenticator's name as a header.
    pub(crate) async fn verify(
        &self,
        token: &Token<'_>,
        via: &Arc<str>,
        via_header: &HeaderValue,
    ) -> Result<Identity, Rejection> {
        if let Some(claims) = self.remembered(token) {
            self.check(&claims)?;
            return Identity::from_claims(claims, via.clone(), via_header.clone());
        }
        let alg = match token.alg {
            Err(BadAlg::None) => {
                return Err(Rejection::format(
                    "unsigned tokens (alg none) are never accepted",
                ));
            }
            Err(BadAlg::Unknown) => {
                return Err(Rejection::format("the token's algorithm is not supported"));
            }
            Ok(alg) if !self.algorithms.contains(&alg) => {
                return Err(Rejection::format_owned(format!(
                    "the token's algorithm {} is not accepted here (accepted: {})",
                    alg.as_str(),
                    self.algorithm_list
                )));
            }
            Ok(alg) => alg,
        };
        let signature = URL_SAFE_NO_PAD
            .decode(token.signature)
            .map_err(|_| Rejection::format("the token's signature is not base64url"))?;
        let (verified, keys) = match &self.keys {
            Keys::Fixed(set) => (verify_with(set, alg, token, &signature)?, set.clone()),
            Keys::Remote(remote) => {
                let current = remote.current();
                let first = match &current {
                    Some(set) => verify_with(set, alg, token, &signature),
                    None => Err(Rejection::unavailable()),
                };
                match (first, current) {
                    (Err(rejection), current) if rejection.unknown_key || rejection.unavailable => {
                        match remote.refetch(current.as_ref()).await {
                            Refetch::Fresh(set) => {
                                (verify_with(&set, alg, token, &signature)?, set)
                            }
                            Refetch::TooSoon => return Err(rejection),
                            Refetch::Unavailable => return Err(Rejection::unavailable()),
                        }
                    }
                    (first, Some(current)) => (first?, current),
                    // Without keys the first try is `unavailable`, handled above.
                    (first, None) => {
                        first?;
                        return Err(Rejection::unavailable());
                    }
                }
            }
        };
        if !verified {
            return Err(Rejection::signature("the token's signature is not valid"));
        }
        let claims = self.claims(token.payload)?;
        self.check(&claims)?;
        self.remember(token, keys, &claims);
        Identity::from_claims(claims, via.clone(), via_header.clone())
    }

    fn claims(&self, payload: &str) -> Result<Claims, Rejection> {
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| Rejection::claims("the token's claims are not base64url"))?;
        let mut deserializer = serde_json::Deserializer::from_slice(&json);
        let claims = ClaimsSeed {
            forward: &self.forward,
        }
        .deserialize(&mut deserializer)
        .and_then(|claims| deserializer.end().map(|()| claims))
        .map_err(|e| {
            // The error names a claim or a position, never a value.
            Rejection::claims_owned(format!("the token's claims are not valid: {}", short(&e)))
        })?;
        Ok(claims)
    }

    fn check(&self, claims: &Claims) -> Result<(), Rejection> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = self.leeway.as_secs_f64();
        let Some(exp) = claims.exp else {
            return Err(Rejection::claims("the token has no expiry (`exp`)"));
        };
        if now > exp + leeway {
            return Err(Rejection::claims("the token has expired"));
        }
        if claims.nbf.is_some_and(|nbf| now + leeway < nbf) {
            return Err(Rejection::claims("the token is not valid yet (`nbf`)"));
        }
        if let Some(issuer) = &self.issuer
            && claims.iss.as_deref() != Some(&**issuer)
        {
            return Err(Rejection::claims("the token's issuer is not accepted here"));
        }
        if !self.audience.is_empty()
            && !claims
                .aud
                .iter()
                .any(|aud| self.audience.iter().any(|a| **a == **aud))
        {
            return Err(Rejection::claims(
                "the token is not meant for this audience",
            ));
        }
        Ok(())
    }
}

/// Picks the key for `token` in `set` and checks the signature.
fn verify_with(
    set: &KeySet,
    alg: JwtAlgorithm,
    token: &Token<'_>,
    signature: &[u8],
) -> Result<bool, Rejection> {
    let mut usable = set.keys.iter().filter(|key| key.may_verify(alg));
    let key = match (&token.kid, set.keys.len()) {
        // A shared secret is the one key there is, whatever `kid` the token carries.
        (_, 1) if set.keys[0].kid().is_none() && alg.is_hmac() => usable.next(),
        (Some(kid), _) => usable.find(|key| key.kid() == Some(&**kid)),
        (None, _) => {
            let first = usable.next();
            if usable.next().is_some() {
                return Err(Rejection::format(
                    "the token names no key (`kid`) and several keys could verify it",
                ));
            }
            first
        }
    };
    let Some(key) = key else {
        return Err(Rejection::unknown_key());
    };
    Ok(key.verify(alg, token.signing_input.as_bytes(), signature))
}

/// A serde error's message without the input it quotes.
fn short(error: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => "not a JSON object",
        Category::Data => "a registered claim has the wrong type, or appears twice",
    }
}

/// The claims Flotilla reads; the others are skipped without being stored.
#[derive(Default, Clone)]
pub(crate) struct Claims {
    pub(crate) exp: Option<f64>,
    pub(crate) nbf: Option<f64>,
    pub(crate) iss: Option<String>,
    pub(crate) aud: Vec<String>,
    pub(crate) sub: Option<String>,
    pub(crate) scopes: Vec<String>,
    /// Forwarded claims by header, as header values.
    pub(crate) forwarded: Vec<(HeaderName, HeaderValue)>,
}

struct ClaimsSeed<'a> {
    forward: &'a [(HeaderName, Box<str>)],
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Exp,
    Nbf,
    Iss,
    Aud,
    Sub,
    Scope,
    Scp,
    Other,
}

impl Field {
    fn registered(name: &str) -> Self {
        match name {
            "exp" => Field::Exp,
            "nbf" => Field::Nbf,
            "iss" => Field::Iss,
            "aud" => Field::Aud,
            "sub" => Field::Sub,
            "scope" => Field::Scope,
            "scp" => Field::Scp,
            _ => Field::Other,
        }
    }
}

impl<'de> DeserializeSeed<'de> for ClaimsSeed<'_> {
    type Value = Claims;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Claims, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ClaimsSeed<'_> {
    type Value = Claims;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims, A::Error> {
        let mut claims = Claims::default();
        let mut seen = [false; 7];
        while let Some((field, forwarded)) = map.next_key_seed(FieldSeed {
            forward: self.forward,
        })? {
            if field != Field::Other {
                let slot = field as usize;
                if seen[slot] {
                    return Err(de::Error::custom("duplicate claim"));
                }
                seen[slot] = true;
            }
            let Some(first) = forwarded else {
                if field == Field::Other {
                    map.next_value::<IgnoredAny>()?;
                } else {
                    map.next_value_seed(Registered {
                        field,
                        claims: &mut claims,
                    })?;
                }
                continue;
            };
            // Forwarded claims are rare and small: read them whole, then type them.
            let value: serde_json::Value = map.next_value()?;
            let text = match &value {
                serde_json::Value::Null => None,
                serde_json::Value::String(text) => Some(text.clone()),
                other => Some(other.to_string()),
            };
            // A claim that cannot be a header value is not forwarded.
            if let Some(header_value) = text.and_then(|text| HeaderValue::try_from(text).ok()) {
                let claim = &self.forward[first].1;
                for (header, _) in self.forward[first..].iter().filter(|(_, c)| c == claim) {
                    claims
                        .forwarded
                        .push((header.clone(), header_value.clone()));
                }
            }
            if field != Field::Other {
                Registered {
                    field,
                    claims: &mut claims,
                }
                .deserialize(value)
                .map_err(de::Error::custom)?;
            }
        }
        Ok(claims)
    }
}

/// Stores the value of a registered claim in its typed slot.
struct Registered<'c> {
    field: Field,
    claims: &'c mut Claims,
}

impl<'de> DeserializeSeed<'de> for Registered<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        use serde::Deserialize;
        let claims = self.claims;
        match self.field {
            Field::Exp => claims.exp = Some(f64::deserialize(deserializer)?),
            Field::Nbf => claims.nbf = Some(f64::deserialize(deserializer)?),
            Field::Iss => claims.iss = Some(String::deserialize(deserializer)?),
            Field::Sub => claims.sub = Some(String::deserialize(deserializer)?),
            Field::Aud => claims.aud = OneOrMany::deserialize(deserializer)?.0,
            Field::Scope | Field::Scp => {
                // `scope` is a space-separated string (RFC 8693); `scp` is that or an array.
                let OneOrMany(scopes) = if self.field == Field::Scope {
                    OneOrMany(vec![String::deserialize(deserializer)?])
                } else {
                    OneOrMany::deserialize(deserializer)?
                };
                for scope in &scopes {
                    claims
                        .scopes
                        .extend(scope.split_ascii_whitespace().map(String::from));
                }
            }
            Field::Other => {
                IgnoredAny::deserialize(deserializer)?;
            }
        }
        Ok(())
    }
}

/// Reads a claim name without allocating: which registered claim it is, and the index of the
/// first `claims` entry that forwards it.
struct FieldSeed<'a> {
    forward: &'a [(HeaderName, Box<str>)],
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = (Field, Option<usize>);

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for FieldSeed<'_> {
    type Value = (Field, Option<usize>);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a claim name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        let forwarded = self.forward.iter().position(|(_, claim)| **claim == *name);
        Ok((Field::registered(name), forwarded))
    }
}

/// A string or an array of strings, as `aud` and `scp` may be.
struct OneOrMany(Vec<String>);

impl<'de> serde::Deserialize<'de> for OneOrMany {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor;
        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![text.to_owned()]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(16));
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(OneOrMany(items))
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}
