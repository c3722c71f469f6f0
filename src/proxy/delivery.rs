//! When an answer counts as delivered (DESIGN.md "Retry or deliberate repeat?").
//!
//! "Delivered" decides whether a later identical call is a retry (replayed) or a new call (sent). Handing the
//! answer to the socket proves nothing: a client whose call timeout fires while the answer is in transit (the
//! 5.1.x client gives a whole call 2 s) never reads it, and retries, often at its next address. So a leader's
//! answer counts as delivered only once the connection confirms it:
//! - the connection carries the client's next request (bytes read after the answer was handed out), or
//! - the connection closes, and no reset follows within the grace, or
//! - the connection stays open without a reset for the grace (`delivery_grace`).
//!
//! A client that closes its socket with unread data in it makes its system send a reset; one that closed
//! before the answer arrived resets when it arrives. Either shows as a read error on the connection, or, once
//! the connection is done, as the socket's pending error (`SO_ERROR`), which [`Watched`] checks a grace after
//! hyper let go of the connection.
//!
//! What this does not prove: that the client's application looked at the answer. A client that read the answer
//! into its socket library and then failed is indistinguishable from one that succeeded; its identical call is
//! a new call (use an `Idempotency-Key` to make it a retry).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// One client connection's delivery confirmations: at most one answer waits for one at a time (HTTP/1.1
/// answers go out in order; a later answer handed out confirms the earlier one, as the client asked again).
#[derive(Default)]
pub struct Delivery {
    /// The confirmation waited for, settled with whether the client took the answer. A std mutex: a few
    /// instructions, never held across an `.await`.
    pending: Mutex<Option<oneshot::Sender<bool>>>,
    /// Whether `pending` holds one: every read of the connection looks, and most find none.
    armed: AtomicBool,
}

impl Delivery {
    pub fn new() -> Arc<Delivery> {
        Arc::default()
    }

    /// An answer was handed to the connection: resolves to whether the client took it, at the latest after
    /// `grace` (then it stayed open without a reset: taken).
    pub fn handed_out(&self, grace: Duration) -> impl std::future::Future<Output = bool> + Send {
        let (tx, rx) = oneshot::channel();
        let earlier = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            self.armed.store(true, Ordering::Release);
            pending.replace(tx)
        };
        if let Some(earlier) = earlier {
            let _ = earlier.send(true);
        }
        async move {
            match tokio::time::timeout(grace, rx).await {
                Ok(Ok(taken)) => taken,
                // The connection went without a verdict (only when the process ends): unknown, so not taken.
                Ok(Err(_)) => false,
                Err(_) => true,
            }
        }
    }

    /// Settles the confirmation waited for, if any.
    fn settle(&self, taken: bool) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let pending = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            self.armed.store(false, Ordering::Release);
            pending.take()
        };
        if let Some(pending) = pending {
            let _ = pending.send(taken);
        }
    }

    fn waited_for(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }
}

/// A socket whose pending error (`SO_ERROR`: a reset that came) can be read after the connection is done.
pub trait SocketError {
    /// The socket's pending error, if any; `None` also when it cannot tell.
    fn socket_error(&self) -> Option<io::Error>;
}

impl SocketError for tokio::net::TcpStream {
    fn socket_error(&self) -> Option<io::Error> {
        self.take_error().unwrap_or(None)
    }
}

/// A client connection as hyper serves it, watched for what confirms or refutes a delivery.
pub struct Watched<T: AsyncRead + SocketError + Send + Unpin + 'static> {
    /// `None` only while dropping.
    io: Option<T>,
    delivery: Arc<Delivery>,
    grace: Duration,
}

impl<T: AsyncRead + SocketError + Send + Unpin + 'static> Watched<T> {
    pub fn new(io: T, delivery: Arc<Delivery>, grace: Duration) -> Watched<T> {
        Watched {
            io: Some(io),
            delivery,
            grace,
        }
    }

    fn io(&mut self) -> io::Result<&mut T> {
        self.io
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "connection closed"))
    }
}

impl<T: AsyncRead + SocketError + Send + Unpin + 'static> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = match self.io() {
            Ok(io) => Pin::new(io).poll_read(cx, buf),
            Err(err) => return Poll::Ready(Err(err)),
        };
        match &read {
            // The client's next request: it took the answer before.
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.delivery.settle(true),
            // A reset: the client gave up with the answer unread, or before it came.
            Poll::Ready(Err(_)) => self.delivery.settle(false),
            // End of stream: decided when the connection is done (a reset may still follow).
            _ => {}
        }
        read
    }
}

impl<T: AsyncRead + AsyncWrite + SocketError + Send + Unpin + 'static> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write(cx, data),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write_vectored(cx, data),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_flush(cx),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_shutdown(cx),
            Err(err) => Poll::Ready(Err(err)),
        }
    }
}

impl<T: AsyncRead + SocketError + Send + Unpin + 'static> Drop for Watched<T> {
    /// The connection is done while an answer waits for its confirmation: the socket is kept for the grace,
    /// then its pending error says whether a reset came (the client did not take the answer).
    fn drop(&mut self) {
        let Some(io) = self.io.take() else {
            return;
        };
        if !self.delivery.waited_for() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (delivery, grace) = (Arc::clone(&self.delivery), self.grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            delivery.settle(io.socket_error().is_none());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const GRACE: Duration = Duration::from_millis(300);

    /// A connected pair: the server side watched, the client side raw.
    async fn pair() -> (Watched<TcpStream>, Arc<Delivery>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let delivery = Delivery::new();
        (
            Watched::new(server, Arc::clone(&delivery), GRACE),
            delivery,
            client,
        )
    }

    #[tokio::test]
    async fn the_next_request_confirms_the_answer() {
        let (mut server, delivery, mut client) = pair().await;
        let taken = delivery.handed_out(Duration::from_secs(30));
        server.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        client.write_all(b"next").await.unwrap();
        let mut next = [0u8; 4];
        server.read_exact(&mut next).await.unwrap();
        assert!(taken.await);
    }

    #[tokio::test]
    async fn a_client_that_closes_with_the_answer_unread_refutes_it() {
        let (mut server, delivery, client) = pair().await;
        let taken = delivery.handed_out(Duration::from_secs(30));
        server.write_all(b"answer").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(client); // unread data: the client's system resets the connection
        let mut buf = [0u8; 16];
        assert!(server.read(&mut buf).await.is_err());
        assert!(!taken.await);
    }

    #[tokio::test]
    async fn a_client_that_closed_before_the_answer_came_refutes_it() {
        let (mut server, delivery, client) = pair().await;
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let taken = delivery.handed_out(Duration::from_secs(30));
        let _ = server.write_all(b"answer").await;
        // hyper reads the end of stream, shuts down and lets go of the connection; the reset comes after.
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        let _ = server.shutdown().await;
        drop(server);
        assert!(!taken.await);
    }

    #[tokio::test]
    async fn a_clean_close_after_reading_confirms_it() {
        let (mut server, delivery, mut client) = pair().await;
        let taken = delivery.handed_out(Duration::from_secs(30));
        server.write_all(b"answer").await.unwrap();
        let _ = server.shutdown().await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        drop(client);
        drop(server);
        assert!(taken.await);
    }

    #[tokio::test]
    async fn an_open_connection_without_a_reset_confirms_it_after_the_grace() {
        let (mut server, delivery, mut client) = pair().await;
        let taken = delivery.handed_out(GRACE);
        server.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert!(taken.await);
        drop((server, client));
    }
}
