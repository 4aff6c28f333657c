use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use http::uri::PathAndQuery;
use http::{Request, Uri};
use tower::{Layer, Service};

use crate::future::Checked;
use crate::{BoxError, Error, Target};

/// Replaces the matched route prefix by the route's rewrite, per the request's [`Target`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RewriteLayer;

impl RewriteLayer {
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for RewriteLayer {
    type Service = Rewrite<S>;

    fn layer(&self, inner: S) -> Rewrite<S> {
        Rewrite { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Rewrite<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Rewrite<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Checked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Err(error) = apply(&mut request) {
            return Checked::rejected(error);
        }
        Checked::called(self.inner.call(request))
    }
}

fn apply<B>(request: &mut Request<B>) -> Result<(), Error> {
    let Some(Target {
        strip_prefix: Some(prefix),
        rewrite,
        ..
    }) = request.extensions().get::<Target>()
    else {
        return Ok(());
    };
    let Some(path_and_query) = request.uri().path_and_query() else {
        return Ok(());
    };
    let Some(rewritten) = rewrite_path(path_and_query, prefix, rewrite.as_deref())? else {
        return Ok(());
    };
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.path_and_query = Some(rewritten);
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| Error::InvalidRewrite)?;
    Ok(())
}

/// Replaces `strip_prefix` at the start of the path by `rewrite` (nothing when `None`), joining
/// with exactly one slash and keeping the query: with prefix `/api/v1/products` and rewrite
/// `/products`, `/api/v1/products/TEA-001?x=1` becomes `/products/TEA-001?x=1` and
/// `/api/v1/products` becomes `/products`. Returns `None` when the path does not start with the
/// prefix on a segment boundary (`/api` is not a prefix of `/apix`).
pub fn rewrite_path(
    path_and_query: &PathAndQuery,
    strip_prefix: &str,
    rewrite: Option<&str>,
) -> Result<Option<PathAndQuery>, Error> {
    let path = path_and_query.path();
    // Trailing slashes are dropped from both so the joint gets exactly one; the root prefix
    // becomes "" and so matches every path.
    let prefix = strip_prefix.trim_end_matches('/');
    let Some(rest) = path.strip_prefix(prefix) else {
        return Ok(None);
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Ok(None);
    }
    let base = rewrite.unwrap_or("").trim_end_matches('/');
    let query = path_and_query.query();

    let mut out =
        BytesMut::with_capacity(1 + base.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
    if !base.is_empty() && !base.starts_with('/') {
        out.put_u8(b'/');
    }
    out.put_slice(base.as_bytes());
    out.put_slice(rest.as_bytes());
    if out.is_empty() {
        out.put_u8(b'/');
    }
    if let Some(query) = query {
        out.put_u8(b'?');
        out.put_slice(query.as_bytes());
    }
    PathAndQuery::from_maybe_shared(out.freeze())
        .map(Some)
        .map_err(|_| Error::InvalidRewrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(path: &'static str, prefix: &str, rewrite: Option<&str>) -> Option<String> {
        rewrite_path(&PathAndQuery::from_static(path), prefix, rewrite)
            .expect("valid")
            .map(|p| p.as_str().to_owned())
    }

    #[test]
    fn replaces_prefix_and_keeps_query() {
        let r = Some("/products");
        let p = "/api/v1/products";
        assert_eq!(
            rw("/api/v1/products/TEA-001?x=1", p, r).as_deref(),
            Some("/products/TEA-001?x=1")
        );
        assert_eq!(rw("/api/v1/products", p, r).as_deref(), Some("/products"));
        assert_eq!(rw("/api/v1/products/", p, r).as_deref(), Some("/products/"));
        assert_eq!(
            rw("/api/v1/products?q=tea", p, r).as_deref(),
            Some("/products?q=tea")
        );
    }

    #[test]
    fn rewrite_to_root_or_none_strips() {
        let p = "/api/v1/products";
        assert_eq!(
            rw("/api/v1/products/TEA", p, Some("/")).as_deref(),
            Some("/TEA")
        );
        assert_eq!(rw("/api/v1/products", p, Some("/")).as_deref(), Some("/"));
        assert_eq!(rw("/api/v1/products/TEA", p, None).as_deref(), Some("/TEA"));
        assert_eq!(
            rw("/api/v1/products?a=b", p, None).as_deref(),
            Some("/?a=b")
        );
    }

    #[test]
    fn trailing_slashes_join_once() {
        assert_eq!(
            rw("/api/x", "/api/", Some("/v2/")).as_deref(),
            Some("/v2/x")
        );
        assert_eq!(rw("/x/y", "/", Some("/v2")).as_deref(), Some("/v2/x/y"));
    }

    #[test]
    fn only_whole_segments_match() {
        assert_eq!(rw("/apix", "/api", Some("/v2")), None);
        assert_eq!(rw("/other", "/api", Some("/v2")), None);
    }

    #[test]
    fn request_uri_is_rewritten_in_place() {
        let mut request = Request::builder()
            .uri("http://shop.example/api/v1/products/TEA-001?x=1")
            .body(())
            .expect("request");
        request.extensions_mut().insert(Target {
            service: "catalog".into(),
            strip_prefix: Some("/api/v1/products".into()),
            rewrite: Some("/products".into()),
            ..Target::service("catalog".into())
        });
        apply(&mut request).expect("rewritten");
        assert_eq!(
            request.uri().to_string(),
            "http://shop.example/products/TEA-001?x=1"
        );
    }
}
