//! TLS toward clients (optional): `tls_cert` / `tls_key` (PEM files) on the proxy listener, rustls with the
//! ring provider.
//!
//! ALPN offers exactly `http/1.1`. HTTP/2 would lower-case every header name, and the 5.1.0 client looks up
//! `X-POWERJOB-AUTH-PASSED` by its exact case, so OkHttp (which prefers h2 over TLS) must never get h2. A client
//! that offers only h2 finds no common protocol and the handshake ends with rustls's `no_application_protocol`
//! alert; a client that offers no ALPN at all speaks HTTP/1.1 as usual.
//!
//! The handshake runs inside the connection's first read ([`ClientIo`]), so the accept loop never waits on a
//! client, and hyper's `header_read_timeout` (the slowloris guard) bounds a stalled handshake as it bounds a
//! stalled request head. A failed handshake is one log line.
//!
//! The files are read once, when the settings are validated and again when the listener starts serving; a
//! certificate change needs a restart.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, Settings};

/// The only application protocol offered.
pub const ALPN: &[u8] = b"http/1.1";

/// The TLS server configuration the settings ask for; `None` when `tls_cert` and `tls_key` are both empty.
/// An error names the key whose file will not do.
pub fn server_config(settings: &Settings) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
    let (cert, key) = (settings.tls_cert.trim(), settings.tls_key.trim());
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => return Ok(None),
        (false, true) => {
            return Err(ConfigError::new(
                "tls_key",
                "",
                "tls_cert is set, so its private key file is required",
            ))
        }
        (true, false) => {
            return Err(ConfigError::new(
                "tls_cert",
                "",
                "tls_key is set, so its certificate file is required",
            ))
        }
        (false, false) => {}
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| ConfigError::new("tls_cert", cert, format!("cannot read: {err}")))?;
    if chain.is_empty() {
        return Err(ConfigError::new(
            "tls_cert",
            cert,
            "holds no PEM CERTIFICATE block",
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|err| {
        ConfigError::new(
            "tls_key",
            key,
            format!("cannot read a PEM private key: {err}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| ConfigError::new("tls_cert", cert, err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|err| {
            ConfigError::new(
                "tls_key",
                key,
                format!("does not fit the certificate in tls_cert: {err}"),
            )
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Some(Arc::new(config)))
}

/// A client connection: plain TCP, or TLS whose handshake completes on the first read or write.
pub struct ClientIo {
    state: State,
    peer: SocketAddr,
}

enum State {
    Plain(TcpStream),
    /// Boxed, as the TLS states are large next to a plain stream.
    Handshaking(Box<tokio_rustls::Accept<TcpStream>>),
    Tls(Box<TlsStream<TcpStream>>),
    /// The handshake failed; every later read or write fails too.
    Failed,
}

impl ClientIo {
    /// Wraps an accepted stream: TLS when `tls` is given.
    pub fn new(stream: TcpStream, peer: SocketAddr, tls: Option<&Arc<ServerConfig>>) -> ClientIo {
        let state = match tls {
            Some(config) => State::Handshaking(Box::new(
                TlsAcceptor::from(Arc::clone(config)).accept(stream),
            )),
            None => State::Plain(stream),
        };
        ClientIo { state, peer }
    }

    /// Drives the handshake, if one is under way, to its end.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let State::Handshaking(accept) = &mut self.state {
            match ready!(Pin::new(accept.as_mut()).poll(cx)) {
                Ok(stream) => self.state = State::Tls(Box::new(stream)),
                Err(err) => {
                    tracing::info!(peer = %self.peer, %err, "TLS handshake failed");
                    self.state = State::Failed;
                    return Poll::Ready(Err(err));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl crate::proxy::delivery::SocketError for ClientIo {
    fn socket_error(&self) -> Option<io::Error> {
        match &self.state {
            State::Plain(stream) => stream.socket_error(),
            State::Tls(stream) => stream.get_ref().0.socket_error(),
            State::Handshaking(_) | State::Failed => None,
        }
    }
}

fn failed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake failed")
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        match &mut this.state {
            State::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            State::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            State::Handshaking(_) | State::Failed => Poll::Ready(Err(failed())),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        match &mut this.state {
            State::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            State::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            State::Handshaking(_) | State::Failed => Poll::Ready(Err(failed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Plain(stream) => Pin::new(stream).poll_flush(cx),
            State::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            // Nothing of ours is buffered before the handshake ends.
            State::Handshaking(_) | State::Failed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            // Dropping the connection closes the socket.
            State::Handshaking(_) | State::Failed => Poll::Ready(Ok(())),
        }
    }
}
