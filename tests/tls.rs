//! TLS toward clients: a certificate made by the test (rcgen, self-signed), the real `runonce` binary with
//! `--tls-cert`/`--tls-key`, and a tokio-rustls client that trusts only that certificate. ALPN must give
//! `http/1.1` and never `h2` (h2 lower-cases the auth header the 5.1.0 client looks up by its exact case).

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use support::*;

/// A self-signed certificate for `localhost` and its key, as PEM files in a directory of their own.
struct Cert {
    dir: PathBuf,
    der: CertificateDer<'static>,
}

impl Cert {
    fn new() -> Cert {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "runonce-tls-{}-{}",
            std::process::id(),
            runonce::store::new_token()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).unwrap();
        Cert {
            der: made.cert.der().clone(),
            dir,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Connects trusting only `cert`, offering `alpn`.
async fn connect(
    addr: std::net::SocketAddr,
    cert: &Cert,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        STEP,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake"))?
}

/// Writes `request` (which says `Connection: close`) and reads everything until the server closes.
async fn exchange(stream: &mut TlsStream<TcpStream>, request: &[u8]) -> String {
    stream.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(STEP, read)
        .await
        .expect("an answer in time");
    String::from_utf8_lossy(&bytes).into_owned()
}

fn tls_proxy(upstream: String, cert: &Cert) -> Process {
    proxy(
        &[upstream],
        &[
            "--tls-cert",
            &cert.path("cert.pem"),
            "--tls-key",
            &cert.path("key.pem"),
        ],
    )
}

#[tokio::test]
async fn run_job_over_tls_gets_http11_and_the_exact_case_auth_header() {
    let cert = Cert::new();
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = tls_proxy(url(mock.addr("mock")), &cert);
    // As OkHttp over TLS: h2 preferred, http/1.1 accepted.
    let mut stream = connect(proxy.addr("proxy"), &cert, &[b"h2", b"http/1.1"])
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let answer = exchange(
        &mut stream,
        &form_post("/openApi/runJob", "jobId=5&delay=0&appId=1", ""),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(
        head.split("\r\n")
            .any(|line| line == "X-POWERJOB-AUTH-PASSED: true"),
        "{head}"
    );
    assert!(body.contains(r#""success":true"#), "{body}");
    assert_eq!(mock_stats(mock.addr("mock")).await["instances"], 1);
    // The upstream learnt that the client spoke TLS.
    let requests = mock_requests(mock.addr("mock")).await;
    assert_eq!(
        requests.json().unwrap()[0]["headers"]["x-forwarded-proto"],
        "https"
    );
}

#[tokio::test]
async fn a_client_offering_only_h2_gets_no_h2_and_plain_http_gets_nothing() {
    let cert = Cert::new();
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = tls_proxy(url(mock.addr("mock")), &cert);
    let addr = proxy.addr("proxy");
    match connect(addr, &cert, &[b"h2"]).await {
        // rustls refuses a client whose protocols it does not share (no_application_protocol).
        Err(err) => assert!(
            err.to_string().to_lowercase().contains("application"),
            "{err}"
        ),
        Ok(stream) => assert_ne!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..])),
    }
    // No ALPN at all: HTTP/1.1 as usual.
    let mut stream = connect(addr, &cert, &[]).await.expect("handshake");
    let answer = exchange(
        &mut stream,
        &form_post("/openApi/runJob", "jobId=5&delay=0&appId=1", ""),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    // Plain HTTP on the TLS port is not served.
    let plain = raw(addr, &form_post("/openApi/runJob", "jobId=5&appId=1", "")).await;
    assert!(plain.is_err(), "{:?}", plain.map(|r| r.head));
    assert_eq!(mock_stats(mock.addr("mock")).await["instances"], 1);
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_by_the_header_read_timeout() {
    let cert = Cert::new();
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(
        &[url(mock.addr("mock"))],
        &[
            "--tls-cert",
            &cert.path("cert.pem"),
            "--tls-key",
            &cert.path("key.pem"),
            "--header-read-timeout",
            "500ms",
        ],
    );
    let mut silent = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the silent client was not disconnected: {closed:?}"
    );
    // Others are served meanwhile.
    let mut stream = connect(proxy.addr("proxy"), &cert, &[b"http/1.1"])
        .await
        .expect("handshake");
    let answer = exchange(
        &mut stream,
        &form_post("/openApi/fetchInstanceStatus", "instanceId=1", ""),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

#[test]
fn bad_certificate_or_key_files_exit_64_naming_the_key() {
    let cert = Cert::new();
    let other = Cert::new();
    std::fs::write(cert.path("garbage.pem"), "not a pem file\n").unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:1",
        ];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_runonce"))
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (cert_pem, key_pem) = (cert.path("cert.pem"), cert.path("key.pem"));
    let missing = cert.path("missing.pem");
    let garbage = cert.path("garbage.pem");
    let other_key = other.path("key.pem");
    let cases: [(&[&str], &str); 6] = [
        (&["--tls-cert", &missing, "--tls-key", &key_pem], "tls_cert"),
        (&["--tls-cert", &garbage, "--tls-key", &key_pem], "tls_cert"),
        (&["--tls-cert", &cert_pem, "--tls-key", &garbage], "tls_key"),
        (
            &["--tls-cert", &cert_pem, "--tls-key", &other_key],
            "tls_key",
        ),
        (&["--tls-cert", &cert_pem], "tls_key"),
        (&["--tls-key", &key_pem], "tls_cert"),
    ];
    for (args, key) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid setting {key} ")),
            "{args:?}: {stderr}"
        );
    }
}
