//! The leaders this process runs, by key: consulted before and after the store, whatever the store is.
//!
//! A duplicate that arrives while a leader of its key runs in this process joins that leader and shares its
//! outcome in memory, whatever the store says or forgets: a full memory store that evicted the record, a Redis
//! that was flushed or restarted, a Redis that hangs while its leader runs (`fail-open` would otherwise claim
//! anew on the in-process fallback), or a leader that claimed on the fallback while Redis was away. The store
//! stays the authority between processes; this registry only closes the gaps inside one.
//!
//! A leader registers right after its claim and publishes its outcome as soon as its call ends (before the
//! store write), so joiners are answered at once. Its entry goes when the store holds the outcome; when the
//! store could not take it (the record was gone, or the write failed), the entry lingers for the wait timeout,
//! so that duplicates already waiting still find the answer here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

use crate::proxy::error::ProxyError;
use crate::store::{ClaimInfo, Key, Stored};

/// What a leader's call ended with, as its duplicates receive it.
#[derive(Clone, Debug)]
pub enum Shared {
    /// The upstream's answer (stored, released or unknown, all the same to a duplicate that waited).
    Answer(Stored),
    /// runonce's own answer: the call failed (unreachable, timed out, broken).
    Error(ProxyError),
}

/// One leader's call in this process. One allocation: the claim's details are shared with the call.
pub struct Flight {
    /// The store's owner token of the leader.
    pub token: String,
    /// The leader's claim: its payload fingerprint and field digests (an `Idempotency-Key` reused with
    /// another payload is refused, as the store would), and its access token's digest (a joiner with another
    /// token is replayed only after the server accepted its token).
    pub info: Arc<ClaimInfo>,
    outcome: OnceLock<Shared>,
    /// The answer is a definite one, to be stored once its delivery is confirmed.
    done: std::sync::atomic::AtomicBool,
    /// Whether the store took the outcome.
    landed: OnceLock<bool>,
    /// Woken when `outcome` or `landed` is set.
    changed: Notify,
}

impl Flight {
    /// Publishes the leader's outcome to every joiner, now and later; `done` for a definite answer (stored
    /// once its delivery is confirmed).
    pub fn settle(&self, shared: Shared, done: bool) {
        self.done.store(done, std::sync::atomic::Ordering::Release);
        let _ = self.outcome.set(shared);
        self.changed.notify_waiters();
    }

    /// Whether the leader's definite answer is out, its delivery still being confirmed (or just stored).
    pub fn answered(&self) -> bool {
        self.outcome.get().is_some() && self.done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The leader's outcome, once it is known.
    pub async fn outcome(&self) -> Shared {
        self.until(|flight| flight.outcome.get().cloned()).await
    }

    /// Whether the store took the outcome, once it is known; `false` also when `deadline` passed first.
    pub async fn landed(&self, deadline: tokio::time::Instant) -> bool {
        let known = tokio::time::timeout_at(deadline, self.until(|f| f.landed.get().copied()));
        matches!(known.await, Ok(true))
    }

    /// Waits until `read` finds something.
    async fn until<T>(&self, read: impl Fn(&Flight) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the look: a change after it wakes us.
            notified.as_mut().enable();
            if let Some(found) = read(self) {
                return found;
            }
            notified.await;
        }
    }
}

/// Shards of the registry: every guarded request looks here, from every worker thread; one lock would make
/// them queue.
const SHARDS: usize = 16;

/// Every leader running in this process, by key.
#[derive(Default)]
pub struct Flights {
    /// Std mutexes: each use is one map operation, never held across an `.await`. A key's shard is picked by
    /// its first byte (keys are SHA-256 hex: evenly spread).
    shards: [Mutex<HashMap<Key, Arc<Flight>>>; SHARDS],
    /// Entries in all shards: a request that finds none skips the locks (replays of a stored answer, most of
    /// the time).
    count: std::sync::atomic::AtomicUsize,
}

impl Flights {
    fn lock(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, Arc<Flight>>> {
        let shard = usize::from(key.as_str().as_bytes()[0]) % SHARDS;
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the leader that holds `token` on `key` (replacing a lingering entry of an earlier leader).
    pub fn lead(&self, key: &Key, token: &str, info: &Arc<ClaimInfo>) -> Arc<Flight> {
        let flight = Arc::new(Flight {
            token: token.to_string(),
            info: Arc::clone(info),
            outcome: OnceLock::new(),
            done: std::sync::atomic::AtomicBool::new(false),
            landed: OnceLock::new(),
            changed: Notify::new(),
        });
        if self
            .lock(key)
            .insert(key.clone(), Arc::clone(&flight))
            .is_none()
        {
            self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        flight
    }

    /// The leader of `key` in this process, running or lingering.
    pub fn find(&self, key: &Key) -> Option<Arc<Flight>> {
        if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return None;
        }
        self.lock(key).get(key).cloned()
    }

    /// The leader's outcome is in the store (`landed`): its entry goes. Otherwise it stays for `linger`, for
    /// the duplicates that wait and find no record.
    pub fn finished(
        self: &Arc<Self>,
        key: &Key,
        flight: &Arc<Flight>,
        landed: bool,
        linger: Duration,
    ) {
        let _ = flight.landed.set(landed);
        flight.changed.notify_waiters();
        if landed {
            self.forget(key, flight);
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.forget(key, flight);
            return;
        }
        let (this, key, flight) = (Arc::clone(self), key.clone(), Arc::clone(flight));
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            this.forget(&key, &flight);
        });
    }

    /// Removes `flight`'s entry, unless another leader has taken the key since.
    fn forget(&self, key: &Key, flight: &Arc<Flight>) {
        let mut by_key = self.lock(key);
        // One look-up: removed, and put back in the rare case it is another leader's.
        match by_key.remove_entry(key) {
            Some((_, f)) if Arc::ptr_eq(&f, flight) => {
                self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
            Some((key, other)) => {
                by_key.insert(key, other);
            }
            None => {}
        }
    }

    /// Leaders registered now (running or lingering).
    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn key(n: u8) -> Key {
        Key::from_digest(&[n; 32])
    }

    fn info() -> Arc<ClaimInfo> {
        Arc::new(ClaimInfo {
            fingerprint: "fp".into(),
            fields: "{}".into(),
            credential: String::new(),
            lease: Duration::from_secs(10),
            window: Duration::from_secs(60),
            release_if_failed: true,
        })
    }

    fn answer() -> Stored {
        Stored {
            status: 200,
            head: Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn joiners_get_the_outcome_published_before_or_after_they_join() {
        let flights = Arc::new(Flights::default());
        let flight = flights.lead(&key(1), "t", &info());
        let joined = flights.find(&key(1)).unwrap();
        let early = tokio::spawn(async move { joined.outcome().await });
        tokio::task::yield_now().await;
        flight.settle(Shared::Answer(answer()), true);
        assert!(matches!(early.await.unwrap(), Shared::Answer(a) if a == answer()));
        let late = flights.find(&key(1)).unwrap();
        assert!(matches!(late.outcome().await, Shared::Answer(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_the_store_did_not_take_lingers_for_the_wait_timeout() {
        let flights = Arc::new(Flights::default());
        let landed = flights.lead(&key(1), "a", &info());
        flights.finished(&key(1), &landed, true, Duration::from_secs(30));
        assert!(
            flights.find(&key(1)).is_none(),
            "in the store: gone at once"
        );

        let lost = flights.lead(&key(2), "b", &info());
        lost.settle(Shared::Answer(answer()), true);
        flights.finished(&key(2), &lost, false, Duration::from_secs(30));
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(flights.find(&key(2)).is_some(), "lingers");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(flights.find(&key(2)).is_none(), "then goes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_entry_never_removes_a_newer_leader() {
        let flights = Arc::new(Flights::default());
        let old = flights.lead(&key(1), "a", &info());
        flights.finished(&key(1), &old, false, Duration::from_secs(1));
        let new = flights.lead(&key(1), "b", &info());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(flights.find(&key(1)).unwrap().token, new.token);
    }
}
