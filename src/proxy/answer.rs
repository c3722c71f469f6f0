//! A body runonce holds in full (an error, a guarded answer, a replay) that records its delivery first.
//!
//! "Delivered" decides whether an identical later call is a retry or a new call (DESIGN.md "Retry or deliberate
//! repeat?"), so it must be in the store before the client can act on the answer. hyper polls a response body
//! only to write it to a live connection; this body, when first polled, runs its `record` future (the store
//! write) to the end and only then hands out its data. A client that disconnected before its answer never has
//! its body polled: nothing is recorded. A store that fails to record is logged by the future; the data goes
//! out all the same.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

type Record = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Answer {
    data: Option<Bytes>,
    record: Option<Record>,
}

impl Answer {
    pub fn new(data: Bytes) -> Answer {
        Answer {
            data: Some(data),
            record: None,
        }
    }

    /// Runs `record` to the end before the data goes to the client's connection.
    pub fn record_delivery(mut self, record: impl Future<Output = ()> + Send + 'static) -> Answer {
        self.record = Some(Box::pin(record));
        self
    }
}

impl From<Bytes> for Answer {
    fn from(data: Bytes) -> Answer {
        Answer::new(data)
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(record) = self.record.as_mut() {
            ready!(record.as_mut().poll(cx));
            self.record = None;
        }
        Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_data_waits_for_the_record_to_finish() {
        let recorded = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&recorded);
        let mut body = Answer::new(Bytes::from_static(b"{}")).record_delivery(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        });
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert!(
            recorded.load(Ordering::SeqCst),
            "recorded before the data left"
        );
        assert_eq!(frame.into_data().unwrap(), "{}");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_never_polled_records_nothing() {
        let recorded = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&recorded);
        drop(
            Answer::new(Bytes::from_static(b"x"))
                .record_delivery(async move { flag.store(true, Ordering::SeqCst) }),
        );
        assert!(!recorded.load(Ordering::SeqCst));
    }
}
