//! The response body of the layer: the inner body untouched, an explanation,
//! or (when explaining failed) the inner body replayed from what was read.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of a response that went through [`crate::ExplainLayer`].
    #[allow(missing_docs)]
    #[project = Proj]
    pub enum ExplainBody<B: Body> {
        /// Not a denial: the inner body, streamed as it is.
        Inner {
            #[pin] inner: B,
        },
        /// An explanation, in one piece.
        Explained {
            data: Option<Bytes>,
        },
        /// A denial that could not be explained: the bytes already read, then
        /// the rest of the inner body, exactly as the upstream sent it.
        Replay {
            prefix: VecDeque<Bytes>,
            trailers: Option<HeaderMap>,
            error: Option<<B as Body>::Error>,
            rest: Option<Pin<Box<B>>>,
        },
    }
}

impl<B: Body> ExplainBody<B> {
    /// Wraps a body that passes through.
    #[inline]
    pub fn inner(inner: B) -> Self {
        ExplainBody::Inner { inner }
    }

    pub(crate) fn explained(data: Bytes) -> Self {
        ExplainBody::Explained {
            data: (!data.is_empty()).then_some(data),
        }
    }
}

impl<B> Body for ExplainBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            Proj::Inner { inner } => inner.poll_frame(cx),
            Proj::Explained { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Proj::Replay {
                prefix,
                trailers,
                error,
                rest,
            } => {
                if let Some(bytes) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                if let Some(t) = trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                match rest {
                    Some(body) => body.as_mut().poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            ExplainBody::Inner { inner } => inner.is_end_stream(),
            ExplainBody::Explained { data } => data.is_none(),
            ExplainBody::Replay {
                prefix,
                trailers,
                error,
                rest,
            } => {
                prefix.is_empty()
                    && trailers.is_none()
                    && error.is_none()
                    && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            ExplainBody::Inner { inner } => inner.size_hint(),
            ExplainBody::Explained { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ExplainBody::Replay { .. } => SizeHint::default(),
        }
    }
}
