use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use crate::{BoxError, Error};

pin_project! {
    /// The future of a layer that checks a request synchronously and either passes it on or
    /// rejects it with an [`Error`] without calling the inner service. No allocation either way
    /// (the rejection is boxed only when it is returned).
    #[project = CheckedProj]
    pub enum Checked<F> {
        Called { #[pin] inner: F },
        Rejected { error: Option<Error> },
    }
}

impl<F> Checked<F> {
    pub(crate) fn called(inner: F) -> Self {
        Checked::Called { inner }
    }

    pub(crate) fn rejected(error: Error) -> Self {
        Checked::Rejected { error: Some(error) }
    }
}

impl<F, T, E> Future for Checked<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CheckedProj::Called { inner } => inner.poll(cx).map_err(Into::into),
            CheckedProj::Rejected { error } => Poll::Ready(Err(match error.take() {
                Some(error) => Box::new(error),
                // Polled again after completion: a caller bug, answered rather than panicking.
                None => Box::new(Error::NoTarget),
            })),
        }
    }
}
