//! API keys in a request header, known to the gateway only by their SHA-256 digests.

use http::{HeaderMap, HeaderName};
use ring::digest;
use subtle::ConstantTimeEq;

use super::{Identity, Rejection};

pub(crate) struct ApiKeys {
    pub(crate) header: HeaderName,
    /// Each key's digest and the identity it proves, built once.
    keys: Box<[([u8; 32], Identity)]>,
}

impl ApiKeys {
    pub(crate) fn new(header: HeaderName, keys: Vec<([u8; 32], Identity)>) -> Self {
        Self {
            header,
            keys: keys.into(),
        }
    }

    /// `None` when the request carries no key in this authenticator's header.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Option<Result<Identity, Rejection>> {
        let presented = headers.get(&self.header)?;
        let digest = digest::digest(&digest::SHA256, presented.as_bytes());
        // Every digest is compared, in constant time, so timing tells nothing about how close a
        // guess came or which key matched.
        let mut found = None;
        for (known, identity) in self.keys.iter() {
            let equal: bool = known.ct_eq(digest.as_ref()).into();
            if equal && found.is_none() {
                found = Some(identity);
            }
        }
        Some(match found {
            Some(identity) => Ok(identity.clone()),
            None => Err(Rejection::api_key()),
        })
    }
}
