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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What runs once the connection confirmed or refuted an answer, with whether the client took it: called
/// exactly once. Dropped uncalled (the connection went without a verdict: only when the process ends), it is
/// called with `false` (unknown, so not taken).
pub struct Confirmation(Option<Box<dyn FnOnce(bool) + Send>>);

impl Confirmation {
    pub fn new(settle: impl FnOnce(bool) + Send + 'static) -> Confirmation {
        Confirmation(Some(Box::new(settle)))
    }

    fn settle(mut self, taken: bool) {
        if let Some(settle) = self.0.take() {
            settle(taken);
        }
    }
}

impl Drop for Confirmation {
    fn drop(&mut self) {
        if let Some(settle) = self.0.take() {
            settle(false);
        }
    }
}

/// One client connection's delivery confirmations: at most one answer waits for one at a time (HTTP/1.1
/// answers go out in order; a later answer handed out confirms the earlier one, as the client asked again).
///
/// The answer waiting is kept here with what to run once it is confirmed, not in a task of its own: the
/// connection's next read, its end, or one grace timer per connection settles it. The timer is a task
/// spawned with the connection's first guarded answer; it sleeps until the waiting answer's grace ends, and a
/// later answer only moves that deadline later (an answer confirmed by the next request leaves the timer
/// due at the earlier deadline, where it finds the later one and sleeps again): no timer, channel or task per
/// answer.
#[derive(Default)]
pub struct Delivery {
    /// A std mutex: a few instructions, never held across an `.await` or while a confirmation runs.
    state: Mutex<State>,
    /// Whether `state` holds an answer waiting: every read of the connection looks, and most find none.
    armed: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The answer waiting for its confirmation, and when its grace ends.
    pending: Option<(Confirmation, Instant)>,
    /// The grace timer was spawned (once per connection).
    timer: bool,
    /// The timer's waker while it sleeps without a deadline (no answer waiting).
    idle_timer: Option<Waker>,
    /// The connection is done: what waits is decided by the socket's pending error after the grace
    /// ([`Watched`]'s `Drop`), not by the timer.
    closed: bool,
}

impl Delivery {
    pub fn new() -> Arc<Delivery> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An answer was handed to the connection: `confirmed` runs with whether the client took it, at the
    /// latest after `grace` (then it stayed open without a reset: taken). An answer still waiting is
    /// confirmed by this one (taken: the client asked again).
    pub fn handed_out(self: &Arc<Self>, grace: Duration, confirmed: Confirmation) {
        let due = Instant::now() + grace;
        let (earlier, wake, spawn) = {
            let mut state = self.lock();
            if state.closed {
                // Handed to a connection that is done already: nobody can take it.
                drop(state);
                confirmed.settle(false);
                return;
            }
            self.armed.store(true, Ordering::Release);
            let earlier = state.pending.replace((confirmed, due));
            let spawn = !std::mem::replace(&mut state.timer, true);
            (earlier, state.idle_timer.take(), spawn)
        };
        if let Some((earlier, _)) = earlier {
            earlier.settle(true);
        }
        if let Some(wake) = wake {
            wake.wake();
        }
        if spawn {
            if tokio::runtime::Handle::try_current().is_ok() {
                tokio::spawn(GraceTimer {
                    delivery: Arc::clone(self),
                    sleep: Box::pin(tokio::time::sleep_until(due)),
                });
            } else {
                self.lock().timer = false;
            }
        }
    }

    /// Settles the confirmation waited for, if any.
    fn settle(&self, taken: bool) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let pending = {
            let mut state = self.lock();
            self.armed.store(false, Ordering::Release);
            state.pending.take()
        };
        if let Some((pending, _)) = pending {
            pending.settle(taken);
        }
    }

    /// The connection is done: the timer stops; whether an answer waits (then the socket decides).
    fn close(&self) -> bool {
        let wake = {
            let mut state = self.lock();
            state.closed = true;
            state.idle_timer.take()
        };
        if let Some(wake) = wake {
            wake.wake();
        }
        self.armed.load(Ordering::Acquire)
    }
}

/// A connection's grace timer: confirms the answer waiting once its grace ended without a reset or a read.
struct GraceTimer {
    delivery: Arc<Delivery>,
    sleep: Pin<Box<Sleep>>,
}

impl Future for GraceTimer {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut state = self.delivery.lock();
            if state.closed {
                return Poll::Ready(());
            }
            let Some((_, due)) = state.pending else {
                state.idle_timer = Some(cx.waker().clone());
                return Poll::Pending;
            };
            if due <= Instant::now() {
                let pending = state.pending.take();
                self.delivery.armed.store(false, Ordering::Release);
                drop(state);
                if let Some((pending, _)) = pending {
                    pending.settle(true);
                }
                continue;
            }
            drop(state);
            if self.sleep.deadline() != due {
                self.sleep.as_mut().reset(due);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
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
        if !self.delivery.close() || tokio::runtime::Handle::try_current().is_err() {
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

    /// Hands an answer out on `delivery`: resolves to whether the client took it.
    fn handed_out(delivery: &Arc<Delivery>, grace: Duration) -> impl Future<Output = bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        delivery.handed_out(
            grace,
            Confirmation::new(move |taken| {
                let _ = tx.send(taken);
            }),
        );
        async move { rx.await.expect("every answer handed out is settled") }
    }

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

    /// A later answer confirms the one still waiting; the connection's one timer confirms each answer a grace
    /// after it was handed out, also after an earlier one was confirmed early; a closed connection stops it.
    #[tokio::test(start_paused = true)]
    async fn one_timer_confirms_each_answer_after_its_grace() {
        let delivery = Delivery::new();
        let first = handed_out(&delivery, GRACE);
        tokio::time::sleep(GRACE / 3).await;
        let second = handed_out(&delivery, GRACE);
        assert!(first.await, "the client asked again");
        let started = Instant::now();
        assert!(second.await);
        assert!(
            started.elapsed() >= GRACE * 2 / 3,
            "not before its own grace"
        );

        let third = handed_out(&delivery, GRACE);
        tokio::time::sleep(GRACE / 10).await;
        delivery.settle(false);
        assert!(!third.await, "settled early, by the connection");
        tokio::time::sleep(GRACE / 2).await;
        let fourth = handed_out(&delivery, GRACE);
        let started = Instant::now();
        assert!(fourth.await);
        assert!(started.elapsed() >= GRACE);

        let fifth = handed_out(&delivery, GRACE);
        assert!(delivery.close(), "an answer waits");
        tokio::time::sleep(GRACE * 3).await;
        delivery.settle(false);
        assert!(
            !fifth.await,
            "once closed, the socket decides, not the timer"
        );
    }

    #[tokio::test]
    async fn the_next_request_confirms_the_answer() {
        let (mut server, delivery, mut client) = pair().await;
        let taken = handed_out(&delivery, Duration::from_secs(30));
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
        let taken = handed_out(&delivery, Duration::from_secs(30));
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
        let taken = handed_out(&delivery, Duration::from_secs(30));
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
        let taken = handed_out(&delivery, Duration::from_secs(30));
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
        let taken = handed_out(&delivery, GRACE);
        server.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert!(taken.await);
        drop((server, client));
    }
}
