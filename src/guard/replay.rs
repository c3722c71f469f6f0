//! A stored answer as a duplicate receives it: its head as the server sent it, plus `Idempotent-Replayed`.

use super::*;

/// A stored answer as the client receives it: its head as the server sent it, plus `Idempotent-Replayed`.
/// `mark` records the delivery when this answer was never delivered before.
pub(super) async fn replay(
    heads: &Heads,
    stored: Stored,
    mark: Option<(AnyStore, Key, String)>,
) -> Response<Answer> {
    let parts = match heads.replayed(&stored.head).await {
        Ok(parts) => parts,
        // Stored heads were parsed by hyper once already; this is a safety net, not a path.
        Err(err) => {
            tracing::warn!(%err, "stored head does not parse; replaying with a minimal head");
            let mut response = Response::new(());
            *response.status_mut() =
                http::StatusCode::from_u16(stored.status).unwrap_or(http::StatusCode::OK);
            response
                .headers_mut()
                .insert(REPLAYED, HeaderValue::from_static("true"));
            response.into_parts().0
        }
    };
    Response::from_parts(parts, delivered_body(stored.body, mark))
}

/// The body; when `mark` is given, the store records the delivery before the data goes out.
fn delivered_body(body: Bytes, mark: Option<(AnyStore, Key, String)>) -> Answer {
    let answer = Answer::new(body);
    match mark {
        None => answer,
        Some((store, key, owner)) => answer.record_delivery(async move {
            if let Err(err) = store.mark_delivered(&key, &owner).await {
                metrics::get().store_errors.inc();
                tracing::warn!(key = key.prefix(), %err, "delivery not recorded");
            }
        }),
    }
}

/// A head rendered from parsed parts: the fallback when the tap could not keep the original bytes. Names come
/// out lower-case but for the auth header, which keeps the case the 5.1.0 client looks for.
pub(super) fn render_head(parts: &response::Parts) -> Bytes {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        let name = if name
            .as_str()
            .eq_ignore_ascii_case(crate::powerjob::AUTH_PASSED)
        {
            crate::powerjob::AUTH_PASSED
        } else {
            name.as_str()
        };
        head.push_str(name);
        head.push_str(": ");
        head.push_str(&String::from_utf8_lossy(value.as_bytes()));
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Bytes::from(head)
}
