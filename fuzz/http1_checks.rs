//! The differential check of runonce's HTTP/1 reading (`runonce::http1`) against hyper's client, shared by the
//! `http1_response` fuzz target and `tests/fuzz_corpus.rs`. One input is one upstream answer, as bytes a server
//! writes before it closes: runonce's codec (the head, the framing decision, the chunked decoder, as the lane and
//! `rawhttp` use them) and hyper's client (what hyper's path reads) must agree on its status and body, or both
//! refuse it.

use runonce::http1::chunked::Chunks;
use runonce::http1::framing::Framing;
use runonce::http1::head::{Head, Limits};

/// What a reader made of an answer: its final status and body, or a refusal.
pub type Read = Result<(u16, Vec<u8>), ()>;

/// Input layout: byte 0's low bit says whether the request was `HEAD`; the rest is the answer.
pub fn http1_response(data: &[u8]) {
    let [flags, answer @ ..] = data else {
        return;
    };
    let to_head = flags & 1 == 1;
    let ours = codec_read(answer, to_head);
    let theirs = hyper_read(answer, to_head);
    assert_eq!(
        ours,
        theirs,
        "runonce's codec and hyper differ on {:?} (HEAD: {to_head})",
        String::from_utf8_lossy(answer)
    );
}

/// The answer as runonce's codec reads it.
pub fn codec_read(answer: &[u8], to_head: bool) -> Read {
    let limits = Limits {
        bytes: 400 * 1024,
        fields: 100,
    };
    let mut at = 0;
    for _ in 0..8 {
        let head = Head::response(&answer[at..], limits)
            .map_err(drop)?
            .ok_or(())?;
        at += head.len();
        let status = head.status().ok_or(())?;
        if (100..200).contains(&status) {
            continue;
        }
        let rest = &answer[at..];
        let body = match head.framing(to_head).map_err(drop)? {
            Framing::Empty => Vec::new(),
            Framing::Length(length) => rest.get(..length as usize).ok_or(())?.to_vec(),
            Framing::Chunked => {
                let mut body = Vec::new();
                Chunks::default()
                    .decode(rest, &mut body)
                    .map_err(drop)?
                    .ok_or(())?;
                body
            }
            Framing::Close => rest.to_vec(),
        };
        return Ok((status, body));
    }
    Err(())
}

/// The answer as hyper's client reads it: a `GET` (or `HEAD`) on one connection whose server writes `answer`
/// and closes.
pub fn hyper_read(answer: &[u8], to_head: bool) -> Read {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let answer = answer.to_vec();
    runtime.block_on(async move {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let serve = tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let _ = server.read(&mut request).await;
            let _ = server.write_all(&answer).await;
            let _ = server.shutdown().await;
            // Held open for reading until the client is done: a close only of the write side.
            let _ = server.read(&mut request).await;
        });
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .map_err(drop)?;
        tokio::spawn(conn);
        let method = if to_head { "HEAD" } else { "GET" };
        let request = http::Request::builder()
            .method(method)
            .uri("/")
            .header("host", "pj")
            .body(Empty::<bytes::Bytes>::new())
            .expect("a request");
        let read = async {
            let response = sender.send_request(request).await.map_err(drop)?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map_err(drop)?;
            Ok((status, body.to_bytes().to_vec()))
        };
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .unwrap_or(Err(()));
        serve.abort();
        read
    })
}
