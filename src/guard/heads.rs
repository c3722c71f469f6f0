//! The heads of replayed answers, parsed once per distinct stored head rather than once per replay.
//!
//! A stored answer keeps its head as bytes, so that header names leave in the server's case. Turning them back
//! into `Parts` that keep that case takes a pass through hyper's own parser
//! ([`headers::parse_response_head`], over an in-memory pipe): a sixth of a replay's instructions (callgrind).
//! Replays of one answer share its head, and answers stored by one server within the same second usually have
//! byte-identical heads (only `Date` moves), so a small map from head bytes to parsed `Parts` makes the parse
//! rare. When full it is emptied: a head costs one parse to come back.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::response;

use super::REPLAYED;
use crate::proxy::headers;

/// Most heads kept; a few hundred bytes each.
const MAX_HEADS: usize = 256;

#[derive(Default)]
pub struct Heads {
    /// Stored head → the replayed head's parts. A std `Mutex`: held for a lookup or an insert, never across
    /// the parse's `.await`.
    parsed: Mutex<HashMap<Bytes, response::Parts>>,
}

impl Heads {
    /// The head of a replayed answer: the stored head plus `Idempotent-Replayed: true`, hop-by-hop headers
    /// removed. An error when the stored head does not parse.
    pub async fn replayed(&self, head: &Bytes) -> Result<response::Parts, String> {
        if let Some(parts) = self.lock().get(head) {
            return Ok(parts.clone());
        }
        let parts = parse(head).await?;
        let mut parsed = self.lock();
        if parsed.len() >= MAX_HEADS {
            parsed.clear();
        }
        parsed.insert(head.clone(), parts.clone());
        Ok(parts)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Bytes, response::Parts>> {
        // The map holds finished values only: a panic elsewhere cannot leave it half-changed.
        self.parsed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn parse(head: &[u8]) -> Result<response::Parts, String> {
    // The head without its blank line (CRLF or a bare LF, as the server wrote it), plus our header.
    let end = head.len()
        - head
            .iter()
            .rev()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
    let mut with_flag = Vec::with_capacity(end + 32);
    with_flag.extend_from_slice(&head[..end]);
    with_flag.extend_from_slice(format!("\r\n{REPLAYED}: true\r\n\r\n").as_bytes());
    let mut parts = tokio::time::timeout(
        Duration::from_secs(1),
        headers::parse_response_head(&with_flag),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    headers::remove_hop_by_hop(&mut parts.headers);
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n\r\n";

    #[tokio::test]
    async fn a_head_is_parsed_once_and_replayed_with_the_flag() {
        let heads = Heads::default();
        let head = Bytes::from_static(HEAD);
        let first = heads.replayed(&head).await.unwrap();
        assert_eq!(first.status, 200);
        assert_eq!(first.headers["content-type"], "application/json");
        assert_eq!(first.headers[REPLAYED], "true");
        assert!(
            first.headers.get("connection").is_none(),
            "hop-by-hop removed"
        );
        assert_eq!(heads.lock().len(), 1);
        // The same bytes from another record: served from the map, identical.
        let again = heads.replayed(&Bytes::copy_from_slice(HEAD)).await.unwrap();
        assert_eq!(again.headers, first.headers);
        assert_eq!(heads.lock().len(), 1);
    }

    #[tokio::test]
    async fn the_map_stays_bounded_and_bad_heads_are_errors() {
        let heads = Heads::default();
        for n in 0..MAX_HEADS + 10 {
            let head = format!("HTTP/1.1 200 OK\r\nX-N: {n}\r\n\r\n");
            heads.replayed(&Bytes::from(head)).await.unwrap();
        }
        assert!(heads.lock().len() <= MAX_HEADS);
        assert!(heads
            .replayed(&Bytes::from_static(b"not http\r\n\r\n"))
            .await
            .is_err());
    }
}
