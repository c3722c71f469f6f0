//! Listeners: accepting connections, their limits, and shutdown.
//!
//! One accept loop per listener. Client connections are HTTP/1.1 only (HTTP/2 would lower-case header names,
//! and the 5.1.0 client looks one up by its exact case), served by hyper with `preserve_header_case` so that
//! names leave with the case they came with. Limits: at most `max_connections` at once (a semaphore taken
//! before `accept`, so excess clients wait in the listen backlog, `LISTEN_BACKLOG` deep), the request head's
//! size and header count, and the time to send it (`header_read_timeout`, the slowloris guard).
//!
//! Shutdown is one path with a bound: the `shutdown` future resolves (SIGTERM or SIGINT in the binary) →
//! listeners close → connections finish their in-flight request (hyper-util `GracefulShutdown`) → after
//! `shutdown_grace` whatever is left is dropped with a warning.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};

use crate::admin;
use crate::config::Settings;
use crate::proxy::Proxy;
use crate::store::AnyStore;

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

/// Serves the proxy and the admin listener until `shutdown` resolves, then drains within `shutdown_grace`.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    store: AnyStore,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let proxy = Arc::new(Proxy::new(&settings, store));
    let (stop, stopped) = watch::channel(false);
    let admin = tokio::spawn(admin::serve(
        listeners.admin,
        Arc::clone(&proxy),
        stopped.clone(),
    ));
    let serving = serve_proxy(listeners.proxy, proxy, &settings, stopped);
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result,
        () = shutdown => {
            tracing::info!("shutdown: no new connections; draining in-flight requests");
            let _ = stop.send(true);
        }
    }
    let result = serving.await;
    let _ = admin.await;
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
    let permits = Arc::new(Semaphore::new(settings.max_connections.0));
    let graceful = GracefulShutdown::new();
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
        let proxy = Arc::clone(&proxy);
        let service = service_fn(move |request| {
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(request, peer).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                log_connection_error(&err, peer);
            }
            drop(permit);
        });
    }
    drop(listener);
    let grace = settings.shutdown_grace.0;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "shutdown grace ran out; dropping the connections still open"
        );
    } else {
        tracing::info!("shutdown: drained");
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
