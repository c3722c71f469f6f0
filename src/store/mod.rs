//! Where the state of every guarded key lives: one record per key, changed only by fenced operations.
//!
//! A record is created by the request that claims its key (the **leader**), and carries the leader's owner
//! token. Every later change (renew, complete, release, mark unknown, mark delivered) names that token and is
//! refused when the record belongs to someone else: a leader whose lease ran out, or whose record was purged
//! and claimed anew, can no longer write (fencing).
//!
//! States:
//! - `InFlight`: the leader's upstream call is running; its lease is renewed while it runs. A claim that finds
//!   the lease run out turns the record `Unknown` (the leader's proxy died mid-call: the server may have acted).
//! - `Done`: a definite answer is stored for the window, with whether a client received it in full.
//! - `Unknown`: the request may have had an effect but no answer is known; never re-run automatically.
//! - `Released`: the leader's answer proved that nothing was created. A claim takes the key at once; the record
//!   only stays a little while ([`RELEASED_KEEP`]) so that the duplicates that waited for the call can read
//!   the leader's answer (they share it: a waiter never sends the call itself).
//!
//! A record that vanishes (evicted, expired, a Redis that forgot) is never taken as a release: only the leader's
//! explicit release says that nothing was created.
//!
//! Implementations: [`memory`] (one process, bounded, TTL) and [`redis`] (shared by replicas; Lua scripts on
//! one hash per key in one hash slot). [`Store`] picks one by configuration; both have the same methods.

pub mod epoch;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

/// A guarded key: 64 lowercase hex characters (SHA-256), safe in Redis keys and URLs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Accepts exactly 64 lowercase hex characters.
    pub fn parse(text: &str) -> Option<Key> {
        (text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Key(text.to_string()))
    }

    pub(crate) fn from_digest(digest: &[u8]) -> Key {
        Key(hex(digest))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first characters, for logs.
    pub fn prefix(&self) -> &str {
        &self.0[..12]
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lowercase hex of `bytes`.
///
/// By table rather than `write!("{b:02x}")`: a guarded request hexes several digests, and the formatter made
/// this a tenth of a replay's instructions (callgrind).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// A stored answer, replayed as it came: the head's bytes keep the header names' case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub status: u16,
    /// The response head as the upstream sent it (after the auth-header repair), from the status line to the
    /// blank line that ends it.
    pub head: Bytes,
    pub body: Bytes,
}

/// The state of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    InFlight,
    Done { response: Stored, delivered: bool },
    Unknown,
    Released,
}

/// How long a released record stays readable for the duplicates that waited on it (they are woken at once;
/// polling waiters look at least every 250 ms).
pub const RELEASED_KEEP: Duration = Duration::from_secs(10);

impl State {
    /// The state's name, as the admin API and Redis spell it.
    pub fn name(&self) -> &'static str {
        match self {
            State::InFlight => "inflight",
            State::Done { .. } => "done",
            State::Unknown => "unknown",
            State::Released => "released",
        }
    }
}

/// Which records a listing returns (the admin API's `GET /keys?state=…`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    All,
    /// Records in this state (one of [`State::name`]).
    Only(&'static str),
}

impl Listing {
    /// `inflight`, `done`, `unknown` or nothing (all).
    pub fn parse(state: Option<&str>) -> Option<Listing> {
        match state {
            None | Some("") | Some("all") => Some(Listing::All),
            Some("inflight") => Some(Listing::Only("inflight")),
            Some("done") => Some(Listing::Only("done")),
            Some("unknown") => Some(Listing::Only("unknown")),
            Some("released") => Some(Listing::Only("released")),
            Some(_) => None,
        }
    }

    pub fn matches(self, state: &State) -> bool {
        match self {
            Listing::All => true,
            Listing::Only(name) => state.name() == name,
        }
    }
}

/// The answer to [`Store::ask_turn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// This request asks now.
    Yours,
    /// Another request asks (its turn's lease holds): wait for the record to change, then try again.
    Busy,
    /// Asked lately, and it stayed unknown.
    Asked,
    /// The record is no longer that unknown one (settled, purged, or claimed anew).
    Settled,
}

/// A record as read from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub state: State,
    /// The owner token of the leader that created the record.
    pub owner: String,
    /// Fingerprint of the request's payload (for `Idempotency-Key` records: to detect a different payload).
    pub fingerprint: String,
    /// The payload's fields as `{"name":"digest",…}` JSON, to name the fields that differ on a mismatch.
    pub fields: String,
    /// Milliseconds since the record was created.
    pub age_ms: u64,
    /// The SHA-256 digest of the leader's access token ([`ClaimInfo::credential`]); empty when it sent none.
    pub credential: String,
    /// The answer that came with a `Released` or `Unknown` outcome, when there was one: the duplicates that
    /// waited for the call get it too.
    pub answer: Option<Stored>,
    /// A duplicate was told to retry (409, still in flight): it is owed the answer, so an identical call
    /// within the window is replayed even after a client received the answer.
    pub owed: bool,
    /// Milliseconds since the record left `InFlight` (an `Unknown` one: since the call turned unknown).
    pub settled_ago_ms: Option<u64>,
}

/// What a claim needs besides the key.
#[derive(Clone, Debug)]
pub struct ClaimInfo {
    pub fingerprint: String,
    pub fields: String,
    /// The SHA-256 digest of the leader's access token (`X-POWERJOB-ACCESS-TOKEN`; empty when it sent none),
    /// never the token itself: a duplicate with another token is replayed only after the server accepted its
    /// token (see `guard::auth`).
    pub credential: String,
    /// How long the leader may hold the key without renewing.
    pub lease: Duration,
    /// How long the record lives (the route's window); kept for this long from the claim, and again from completion.
    pub window: Duration,
    /// A claim that fails forwards nothing (the route is `fail-closed`): should it still have run on the
    /// store, its record is released. `false` (`fail-open`: the call goes ahead on the in-process fallback):
    /// a record that ran stays, and turns unknown when its lease runs out, so no other replica sends it.
    pub release_if_failed: bool,
}

/// The answer to a claim.
// A claim's answer lives for one decision on the stack; boxing the record would cost every duplicate an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key was free: the caller is the leader and holds this owner token.
    Leader(String),
    /// The key was taken; here is its record (an `InFlight` record whose lease ran out comes back `Unknown`).
    Existing(Record),
}

/// A store operation failed: the store could not be reached or answered something unexpected.
#[derive(Debug, thiserror::Error)]
#[error("store {op}: {cause}")]
pub struct StoreError {
    pub op: &'static str,
    pub cause: String,
}

/// What every store does. Each change names the leader's owner token and is refused (`Ok(false)`) when the
/// record is no longer that leader's: the fencing that keeps a leader whose lease ran out from writing.
///
/// Two implementations, [`memory::MemoryStore`] and [`redis::RedisStore`]; [`AnyStore`] holds the configured one.
pub trait Store: Send + Sync {
    /// Claims `key`: `Leader(token)` when free (or expired), else the record that holds it.
    fn claim(
        &self,
        key: &Key,
        info: &ClaimInfo,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Replaces a `Done` record created by `previous_owner` whose answer was delivered with a new claim (a new
    /// call with the same payload). Anything else: `Existing` with the record as it is now.
    fn takeover(
        &self,
        key: &Key,
        previous_owner: &str,
        info: &ClaimInfo,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Extends the leader's lease.
    fn renew(
        &self,
        key: &Key,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Stores the definite answer for `window` from now, `delivered` when it goes to the client's connection
    /// right after (so the usual call needs no [`Store::mark_delivered`]). `true` also when this leader already
    /// did (a retry after a lost reply), changing nothing but `delivered`, which it may set.
    fn complete(
        &self,
        key: &Key,
        token: &str,
        response: &Stored,
        window: Duration,
        delivered: bool,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Nothing was created: the record turns `Released` with the leader's `answer` for [`RELEASED_KEEP`]
    /// (for the duplicates that waited), and the next claim leads.
    fn release(
        &self,
        key: &Key,
        token: &str,
        answer: Option<&Stored>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The outcome cannot be known: kept as `Unknown` for `window` from now, with the answer that came, if any.
    fn mark_unknown(
        &self,
        key: &Key,
        token: &str,
        window: Duration,
        answer: Option<&Stored>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The server said what the `Unknown` record created by `owner` created: `Some(answer)`, the instance
    /// (done, kept for the rest of its window, not delivered), or `None`, nothing (released). `false` when
    /// the record is no longer that unknown one.
    fn resolve(
        &self,
        key: &Key,
        owner: &str,
        answer: Option<&Stored>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Keeps `lookup` (what a resolver looks for, as JSON: see `guard::resolve`) with the `Unknown` record
    /// created by `owner`, for an operator to have it resolved by key. `false` when the record is no longer
    /// that unknown one.
    fn keep_lookup(
        &self,
        key: &Key,
        owner: &str,
        lookup: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Takes the turn to ask PowerJob about the `Unknown` record created by `owner`, for `lease` (on every
    /// replica one request asks at a time; the others wait for its verdict). [`Turn::Asked`] when the last
    /// turn ended less than `gap` ago with the record still unknown: asking again so soon would tell nothing new.
    fn ask_turn(
        &self,
        key: &Key,
        owner: &str,
        lease: Duration,
        gap: Duration,
    ) -> impl Future<Output = Result<Turn, StoreError>> + Send;

    /// Ends the turn of [`Store::ask_turn`] on a record its asker left unknown, noting when (and waking the
    /// waiters). A verdict that settles the record ([`Store::resolve`]) ends the turn by itself. `false` when
    /// the record is no longer that unknown one.
    fn end_turn(
        &self,
        key: &Key,
        owner: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The lookup kept with the record of `key`, and the record's owner.
    fn lookup(
        &self,
        key: &Key,
    ) -> impl Future<Output = Result<Option<(String, String)>, StoreError>> + Send;

    /// A duplicate was told to retry while the call ran: whoever answers it later must replay (see
    /// [`Record::owed`]). `false` when there is no record.
    fn mark_owed(&self, key: &Key) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A client received the answer of the `Done` record created by `owner` in full.
    fn mark_delivered(
        &self,
        key: &Key,
        owner: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Notes that `client` called `/authApp` now, remembered for `within`: the 5.1.0 client's refresh before
    /// its re-send, which may reach another replica than the re-send does.
    fn note_auth(
        &self,
        client: &str,
        within: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Milliseconds since `client` last called `/authApp`, while that is remembered.
    fn auth_since(
        &self,
        client: &str,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Notes that PowerJob's instance `id` is the answer of the call on `key`, for `within`: a resolution
    /// of another key that finds this instance in its window leaves it out (see `guard::resolve`).
    fn note_instance(
        &self,
        id: i64,
        key: &Key,
        within: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The key whose call was answered with instance `id`, while that is remembered.
    fn instance_key(&self, id: i64)
        -> impl Future<Output = Result<Option<Key>, StoreError>> + Send;

    /// Deletes the record whatever its state (operators: to release an `Unknown`).
    fn purge(&self, key: &Key) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// At most `limit` records that match `filter`, with their keys, in no particular order (operators: the admin
    /// API). Walks the whole store (in Redis with `SCAN`, on every Cluster master): not for the request path.
    fn list(
        &self,
        filter: Listing,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Key, Record)>, StoreError>> + Send;

    /// Resolves when the record of `key` may have changed, or after `poll` at the latest (the fallback when a
    /// wake-up is lost). Callers re-read the record after it.
    fn changed(&self, key: &Key, poll: Duration) -> impl Future<Output = ()> + Send;
}

/// The configured store. An enum rather than a trait object (async trait methods are not object safe); a
/// match costs nothing.
#[derive(Clone)]
pub enum AnyStore {
    Memory(std::sync::Arc<memory::MemoryStore>),
    Redis(redis::RedisStore),
}

macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Memory($s) => $call,
            AnyStore::Redis($s) => $call,
        }
    };
}

impl Store for AnyStore {
    async fn claim(&self, key: &Key, info: &ClaimInfo) -> Result<Claim, StoreError> {
        each!(self, s => s.claim(key, info).await)
    }

    async fn takeover(
        &self,
        key: &Key,
        previous_owner: &str,
        info: &ClaimInfo,
    ) -> Result<Claim, StoreError> {
        each!(self, s => s.takeover(key, previous_owner, info).await)
    }

    async fn renew(&self, key: &Key, token: &str, lease: Duration) -> Result<bool, StoreError> {
        each!(self, s => s.renew(key, token, lease).await)
    }

    async fn complete(
        &self,
        key: &Key,
        token: &str,
        response: &Stored,
        window: Duration,
        delivered: bool,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.complete(key, token, response, window, delivered).await)
    }

    async fn release(
        &self,
        key: &Key,
        token: &str,
        answer: Option<&Stored>,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.release(key, token, answer).await)
    }

    async fn mark_unknown(
        &self,
        key: &Key,
        token: &str,
        window: Duration,
        answer: Option<&Stored>,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.mark_unknown(key, token, window, answer).await)
    }

    async fn resolve(
        &self,
        key: &Key,
        owner: &str,
        answer: Option<&Stored>,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.resolve(key, owner, answer).await)
    }

    async fn keep_lookup(&self, key: &Key, owner: &str, lookup: &str) -> Result<bool, StoreError> {
        each!(self, s => s.keep_lookup(key, owner, lookup).await)
    }

    async fn lookup(&self, key: &Key) -> Result<Option<(String, String)>, StoreError> {
        each!(self, s => s.lookup(key).await)
    }

    async fn ask_turn(
        &self,
        key: &Key,
        owner: &str,
        lease: Duration,
        gap: Duration,
    ) -> Result<Turn, StoreError> {
        each!(self, s => s.ask_turn(key, owner, lease, gap).await)
    }

    async fn end_turn(&self, key: &Key, owner: &str) -> Result<bool, StoreError> {
        each!(self, s => s.end_turn(key, owner).await)
    }

    async fn mark_owed(&self, key: &Key) -> Result<bool, StoreError> {
        each!(self, s => s.mark_owed(key).await)
    }

    async fn mark_delivered(&self, key: &Key, owner: &str) -> Result<bool, StoreError> {
        each!(self, s => s.mark_delivered(key, owner).await)
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        each!(self, s => s.get(key).await)
    }

    async fn note_auth(&self, client: &str, within: Duration) -> Result<(), StoreError> {
        each!(self, s => s.note_auth(client, within).await)
    }

    async fn auth_since(&self, client: &str) -> Result<Option<u64>, StoreError> {
        each!(self, s => s.auth_since(client).await)
    }

    async fn note_instance(&self, id: i64, key: &Key, within: Duration) -> Result<(), StoreError> {
        each!(self, s => s.note_instance(id, key, within).await)
    }

    async fn instance_key(&self, id: i64) -> Result<Option<Key>, StoreError> {
        each!(self, s => s.instance_key(id).await)
    }

    async fn purge(&self, key: &Key) -> Result<bool, StoreError> {
        each!(self, s => s.purge(key).await)
    }

    async fn list(&self, filter: Listing, limit: usize) -> Result<Vec<(Key, Record)>, StoreError> {
        each!(self, s => s.list(filter, limit).await)
    }

    async fn changed(&self, key: &Key, poll: Duration) {
        each!(self, s => s.changed(key, poll).await)
    }
}

impl AnyStore {
    /// When the store was last found to have lost its records (wall clock ms; see [`epoch`]). A memory store
    /// lost them when it started: whatever a predecessor of this process held is gone.
    pub fn lost_at(&self) -> Option<i64> {
        match self {
            AnyStore::Memory(s) => Some(s.started_ms()),
            AnyStore::Redis(s) => s.losses().last(),
        }
    }
}

/// The store `settings.store` names. Redis being down is not an error here: the store reconnects by itself.
pub async fn open(settings: &crate::config::Settings) -> Result<AnyStore, StoreError> {
    use crate::config::StoreUrl;
    match &settings.store {
        StoreUrl::Memory => {
            crate::metrics::get().store_losses.inc();
            tracing::info!("the memory store starts empty: for one window, a new runJob leader asks PowerJob before sending (quarantine)");
            Ok(AnyStore::Memory(std::sync::Arc::new(
                memory::MemoryStore::new(settings.memory_max_keys.0, settings.wait_timeout.0),
            )))
        }
        StoreUrl::Redis(url) => Ok(AnyStore::Redis(
            redis::RedisStore::connect(url, settings.store_timeout.0).await?,
        )),
    }
}

/// A fresh owner token: unique across processes (random per process, then a counter).
pub fn new_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    format!(
        "{seed:016x}{:016x}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_64_lowercase_hex() {
        let key = Key::from_digest(&[0xab; 32]);
        assert_eq!(key.as_str().len(), 64);
        assert_eq!(Key::parse(key.as_str()), Some(key.clone()));
        assert_eq!(Key::parse(&key.as_str().to_uppercase()), None);
        assert_eq!(Key::parse("abc"), None);
        assert_eq!(key.prefix(), "abababababab");
    }

    #[test]
    fn hex_is_two_lowercase_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xf0, 0xff]), "000fa5f0ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn tokens_are_unique() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }
}
