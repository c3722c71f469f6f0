//! Listeners: accepting connections, their limits, and shutdown.
//!
//! One accept loop per listener. Client connections are HTTP/1.1 only (HTTP/2 would lower-case header names,
//! and the 5.1.0 client looks one up by its exact case), served by hyper with `preserve_header_case` so that
//! names leave with the case they came with. Limits: at most `max_connections` at once (a semaphore taken
//! before `accept`, so excess clients wait in the listen backlog, `LISTEN_BACKLOG` deep), the request head's
//! size and header count, and the time to send it (`header_read_timeout`, the slowloris guard).
//!
//! Shutdown is one path with a bound: the `shutdown` future resolves (SIGTERM or SIGINT in the binary) →
//! `/readyz` answers 503 at once (the admin listener keeps answering until the end) and the proxy listener
//! closes → connections finish their in-flight request (hyper-util `GracefulShutdown`) and every guarded
//! request's task ends (leaders store their answer) → after `drain_timeout` leaders still waiting for their
//! upstream are cut off: they mark their key unknown (never re-sent) and answer 502, within [`CUT_OFF_GRACE`] +
//! the store's time-out, and whatever is left is dropped with a warning.
//!
//! Connections are served on [`crate::workers`] threads (thread-per-core); the accept loop, the admin listener
//! and shutdown run where [`run`] is called. Plain pass-through requests are forwarded by the fast lane
//! ([`crate::proxy::lane`]) until a connection sends one it does not take; hyper serves the rest.
//!
//! A SIGHUP (when the process was started from a configuration, see [`crate::reload`]) reloads it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};

use crate::admin::{self, Admin};
use crate::config::Settings;
use crate::proxy::delivery::{Delivery, Watched};
use crate::proxy::lane::{self, Exit, Rewind};
use crate::proxy::Proxy;
use crate::reload::{Reloader, Source};
use crate::store::AnyStore;
use crate::workers::Workers;

/// After a cut-off, time (besides `store_timeout`) the cut-off leaders get to record their keys unknown.
pub const CUT_OFF_GRACE: Duration = Duration::from_millis(500);

/// The bound sockets, so callers (and tests) can bind port 0 and learn the port before serving.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`). std's default is 128: a storm of
/// a few hundred duplicates, arriving while the proxy is briefly off the CPU, overflowed it, the kernel dropped
/// the excess SYNs, and those clients retried a second later, after the first answer had been delivered (so
/// their identical call counted as a new one).
const LISTEN_BACKLOG: u32 = 4096;

impl Listeners {
    pub async fn bind(settings: &Settings) -> io::Result<Listeners> {
        let proxy = bind(settings.listen).map_err(|err| {
            io::Error::new(err.kind(), format!("listen {}: {err}", settings.listen))
        })?;
        let admin = bind(settings.admin_listen).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("admin_listen {}: {err}", settings.admin_listen),
            )
        })?;
        Ok(Listeners { proxy, admin })
    }
}

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind` sets it).
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves the proxy and the admin listener until `shutdown` resolves, then drains within `drain_timeout`.
/// `source` is where the settings came from: given, SIGHUP and `POST /reload` re-read it.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    store: AnyStore,
    shutdown: impl Future<Output = ()>,
    source: Option<Source>,
) -> io::Result<()> {
    let proxy = Arc::new(Proxy::new(&settings, store));
    let reloader =
        source.map(|source| Arc::new(Reloader::new(source, settings.clone(), Arc::clone(&proxy))));
    #[cfg(unix)]
    let hangups = reloader
        .clone()
        .and_then(crate::reload::hangups)
        .map(tokio::spawn);
    let (stop, stopped) = watch::channel(false);
    let admin = Admin::new(&settings, Arc::clone(&proxy), stopped.clone(), reloader);
    let admin = tokio::spawn(admin::serve(listeners.admin, Arc::new(admin)));
    let serving = serve_proxy(listeners.proxy, proxy, &settings, stopped);
    tokio::pin!(serving);
    let result = tokio::select! {
        result = &mut serving => result,
        () = shutdown => {
            tracing::info!(drain_timeout = %settings.drain_timeout, "shutdown: not ready, no new connections; draining in-flight requests");
            let _ = stop.send(true);
            serving.await
        }
    };
    admin.abort();
    #[cfg(unix)]
    if let Some(hangups) = hangups {
        hangups.abort();
    }
    result
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: &Settings,
    mut stopped: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.preserve_header_case(true)
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout.0)
        // Backstops at twice the limits `Proxy::check_head` answers with a PowerJob-shaped 431; hyper answers
        // beyond them with a bare 431 (the connection's error is logged below).
        .max_header_size(2 * settings.max_header_bytes.as_u64() as usize)
        .max_buf_size((2 * settings.max_header_bytes.as_u64() as usize).max(8192) + 8192);
    if settings.max_headers.0 * 2 != 100 {
        // hyper keeps 100 header slots on the stack; another number costs a heap allocation per request.
        http.max_headers(settings.max_headers.0 * 2);
    }
    let tls = crate::tls::server_config(settings)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err.to_string()))?;
    let permits = Arc::new(Semaphore::new(settings.max_connections.0));
    let graceful = GracefulShutdown::new();
    // Connections are served on the worker threads; dropped at the end of this function, they end once the
    // connections were drained (or cut off).
    let mut workers = Workers::start(
        crate::workers::count(settings.workers.0),
        settings.batch_scheduling.0,
    )?;
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = stopped.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and the like: wait a moment instead of spinning; the listener stays up.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        // Out of this runtime's reactor, into the worker's: its readiness then wakes that thread only.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(%peer, %err, "closed a connection that could not be handed to a worker");
                continue;
            }
        };
        let proxy = Arc::clone(&proxy);
        let (http, tls, watcher) = (http.clone(), tls.clone(), graceful.watcher());
        let grace = settings.delivery_grace.0;
        let stopped = stopped.clone();
        workers.spawn(async move {
            let stream = match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!(%peer, %err, "closed a connection the worker could not take");
                    return;
                }
            };
            // Plain pass-through requests take the lane; hyper serves whatever comes from the first other one.
            // The watcher, held meanwhile, makes the drain wait for the lane's connections too.
            let (stream, read) = if proxy.lane() {
                match lane::serve(&proxy, stream, peer, stopped).await {
                    Exit::Done => return,
                    Exit::HandOff(stream, read) => (stream, read),
                }
            } else {
                (stream, BytesMut::new())
            };
            // Whether the client took each guarded answer: its next request, or a close without a reset.
            let delivery = Delivery::new();
            let watching = Arc::clone(&delivery);
            let service = service_fn(move |request| {
                let (proxy, delivery) = (Arc::clone(&proxy), Arc::clone(&watching));
                async move {
                    let answer = proxy.handle(request, peer, Some(&delivery)).await;
                    Ok::<_, std::convert::Infallible>(answer)
                }
            });
            // TLS, when configured, shakes hands inside the connection's first read (see `tls::ClientIo`).
            let io = Rewind::new(crate::tls::ClientIo::new(stream, peer, tls.as_ref()), read);
            let io = Watched::new(io, delivery, grace);
            let connection = watcher.watch(http.serve_connection(TokioIo::new(io), service));
            if let Err(err) = connection.await {
                log_connection_error(&err, peer);
            }
            drop(permit);
        });
    }
    drop(listener);
    let drain = settings.drain_timeout.0;
    let guard = proxy.guard();
    let connections = graceful.shutdown();
    tokio::pin!(connections);
    let drained = async { tokio::join!(&mut connections, guard.drained()) };
    if tokio::time::timeout(drain, drained).await.is_ok() {
        tracing::info!("shutdown: drained");
        return Ok(());
    }
    tracing::warn!(
        drain_timeout = %settings.drain_timeout,
        "drain_timeout ran out: cutting off leaders still waiting for their upstream (their keys turn unknown, never re-sent)"
    );
    guard.cut_off();
    // The cut-off leaders record their keys unknown and answer their clients (502); other connections still
    // busy then are dropped.
    let recording = settings.store_timeout.0 + CUT_OFF_GRACE;
    let answered = async {
        guard.drained().await;
        (&mut connections).await;
    };
    if tokio::time::timeout(recording, answered).await.is_err() {
        tracing::warn!("dropping the connections still open; a cut-off leader that did not record its outcome leaves its key to turn unknown when its lease runs out");
    }
    Ok(())
}

/// One line per connection that ended in an error hyper answered (or could not answer) itself.
fn log_connection_error(err: &hyper::Error, peer: SocketAddr) {
    if err.is_parse_too_large() {
        tracing::info!(%peer, %err, "refused a request head over the limit (431)");
    } else if err.is_parse() || err.is_parse_status() {
        tracing::info!(%peer, %err, "refused a malformed request (400)");
    } else if err.is_timeout() {
        tracing::info!(%peer, %err, "closed a connection that sent no complete request head in time");
    } else {
        tracing::debug!(%peer, %err, "client connection ended with an error");
    }
}
