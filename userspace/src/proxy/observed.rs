//! A body wrapper that reports, exactly once, how many data bytes went through it: when the body
//! ends, or when it is dropped before its end (the client went away, or the exchange failed).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Buf;
use hyper::body::{Body, Frame, SizeHint};

type OnEnd = Box<dyn FnOnce(BodyEnd) + Send + Sync>;

/// How an observed body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyEnd {
    /// Data bytes delivered.
    pub bytes: u64,
    /// Whether the body was delivered to its end (not dropped halfway or failed).
    pub complete: bool,
}

pub struct ObservedBody<B> {
    inner: B,
    bytes: u64,
    on_end: Option<OnEnd>,
}

impl<B: Body> ObservedBody<B> {
    pub fn new(inner: B, on_end: impl FnOnce(BodyEnd) + Send + Sync + 'static) -> Self {
        let mut observed = Self {
            inner,
            bytes: 0,
            on_end: Some(Box::new(on_end)),
        };
        // Bodies that are empty by construction (HEAD, 204, 304) may never be polled.
        if observed.inner.is_end_stream() {
            observed.end(true);
        }
        observed
    }

    fn end(&mut self, complete: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end(BodyEnd {
                bytes: self.bytes,
                complete,
            });
        }
    }
}

impl<B> std::fmt::Debug for ObservedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBody")
            .field("bytes", &self.bytes)
            .field("ended", &self.on_end.is_none())
            .finish_non_exhaustive()
    }
}

impl<B: Body + Unpin> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.remaining() as u64;
                }
                if self.inner.is_end_stream() {
                    self.end(true);
                }
            }
            Some(Err(_)) => self.end(false),
            None => self.end(true),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(BodyEnd {
                bytes: self.bytes,
                complete: false,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};

    use super::*;

    fn recorder() -> (Arc<Mutex<Vec<BodyEnd>>>, impl FnOnce(BodyEnd) + Send + Sync) {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&ends);
        (ends, move |end| sink.lock().unwrap().push(end))
    }

    #[tokio::test]
    async fn reports_bytes_once_at_the_end() {
        let (ends, on_end) = recorder();
        let body = ObservedBody::new(Full::new(Bytes::from_static(b"hello")), on_end);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let expected = BodyEnd {
            bytes: 5,
            complete: true,
        };
        assert_eq!(*ends.lock().unwrap(), [expected]);
    }

    #[tokio::test]
    async fn empty_bodies_end_without_being_polled() {
        let (ends, on_end) = recorder();
        let body = ObservedBody::new(Empty::<Bytes>::new(), on_end);
        assert_eq!(ends.lock().unwrap().len(), 1);
        drop(body);
        assert_eq!(ends.lock().unwrap().len(), 1);
    }

    /// Two data frames of two bytes each.
    struct TwoChunks(u8);

    impl Body for TwoChunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 == 2 {
                return Poll::Ready(None);
            }
            self.0 += 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"ab")))))
        }
    }

    #[tokio::test]
    async fn a_body_dropped_halfway_is_incomplete() {
        let (ends, on_end) = recorder();
        let mut body = ObservedBody::new(TwoChunks(0), on_end);
        body.frame().await.unwrap().unwrap();
        drop(body);
        let expected = BodyEnd {
            bytes: 2,
            complete: false,
        };
        assert_eq!(*ends.lock().unwrap(), [expected]);
    }
}
