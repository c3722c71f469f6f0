//! runonce's HTTP/1 codec against hyper's client, on generated upstream answers (issue "One HTTP/1 codec"): the
//! lane and `rawhttp` read with the codec, hyper's path with hyper, and both paths must read every answer the
//! same: its status and body, or both refuse it. The check is `fuzz/http1_checks.rs`, which the `http1_response`
//! fuzz target runs on arbitrary bytes; here it runs on answers built from a grammar of the framing cases that
//! matter (lengths, lists, codings, interim heads, 204/304, HEAD, chunk extensions and trailers, cut-off and
//! malformed bodies), from a fixed seed so a failure repeats.

#[path = "../fuzz/http1_checks.rs"]
mod http1_checks;

/// A small, seeded generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// One answer: an optional interim head, a final head with framing fields drawn from the grammar, and a body
/// framed as they say, or not quite.
fn answer(rng: &mut Rng) -> Vec<u8> {
    let body: Vec<u8> = (0..rng.below(24)).map(|i| b'a' + (i % 26) as u8).collect();
    let mut out = Vec::new();
    if rng.below(6) == 0 {
        out.extend_from_slice(
            rng.pick(&[
                "HTTP/1.1 100 Continue\r\n\r\n",
                "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            ])
            .as_bytes(),
        );
    }
    let status = rng.pick(&[
        "200 OK",
        "201 Created",
        "204 No Content",
        "304 Not Modified",
        "404 Not Found",
        "500 Oops",
    ]);
    let version = rng.pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]);
    out.extend_from_slice(format!("{version} {status}\r\n").as_bytes());
    let n = body.len();
    let lengths = [
        format!("Content-Length: {n}"),
        format!("content-length: {n}"),
        format!("Content-Length: {n}, {n}"),
        format!("Content-Length: {n}\r\nContent-Length: {n}"),
        format!("Content-Length: {}", n + 3),
        format!("Content-Length: {}", n.saturating_sub(2)),
        format!("Content-Length: {n}, {}", n + 1),
        format!("Content-Length: +{n}"),
        "Content-Length: ".to_string(),
        "Content-Length: x".to_string(),
    ];
    let codings = [
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: Chunked",
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: gzip",
        "Transfer-Encoding: chunked, gzip",
    ];
    let length = (rng.below(3) > 0).then(|| lengths[rng.below(lengths.len())].clone());
    let coding = (rng.below(3) == 0).then(|| codings[rng.below(codings.len())]);
    if let Some(length) = &length {
        out.extend_from_slice(format!("{length}\r\n").as_bytes());
    }
    if let Some(coding) = coding {
        out.extend_from_slice(format!("{coding}\r\n").as_bytes());
    }
    if rng.below(4) == 0 {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"X-Other: v\r\n\r\n");
    let chunked = coding.is_some_and(|c| c.to_ascii_lowercase().trim_end().ends_with("chunked"));
    if chunked {
        let (first, second) = body.split_at(body.len() / 2);
        for part in [first, second] {
            if part.is_empty() {
                continue;
            }
            let size = match rng.below(8) {
                0 => format!("{:X};ext=1", part.len()),
                1 => format!("{:x}", part.len() + 1),
                _ => format!("{:x}", part.len()),
            };
            out.extend_from_slice(format!("{size}\r\n").as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(
            rng.pick(&[
                "0\r\n\r\n",
                "0\r\n\r\n",
                "0\r\nX-Trailer: t\r\n\r\n",
                "0\r\n",
            ])
            .as_bytes(),
        );
    } else {
        out.extend_from_slice(&body);
    }
    // Sometimes cut off before the end.
    if rng.below(8) == 0 && !out.is_empty() {
        out.truncate(rng.below(out.len()));
    }
    out
}

#[test]
fn runonces_codec_reads_every_generated_answer_as_hyper_does() {
    let mut rng = Rng(0x005e_ed0f_c0de_c0de);
    let mut refused = 0;
    for case in 0..1500 {
        let mut data = vec![u8::from(rng.below(5) == 0)];
        data.extend_from_slice(&answer(&mut rng));
        let outcome = std::panic::catch_unwind(|| http1_checks::http1_response(&data));
        assert!(outcome.is_ok(), "case {case} differs (see above)");
        refused += usize::from(http1_checks::codec_read(&data[1..], data[0] == 1).is_err());
    }
    // The grammar reaches both sides of the rules.
    assert!((100..1400).contains(&refused), "{refused} of 1500 refused");
}
