//! The store conformance suite: the same scenarios run against the memory store, the Redis store on a standalone
//! `redis-server`, and the Redis store on a 3-node Redis Cluster, each Redis started by the test on a free
//! loopback port. Then what only Redis has: the server stopped, restarted, paused, down at start; two stores
//! (two replicas of runonce) on one Redis; the record's layout in Redis; garbage in Redis.
//!
//! Every wait is bounded; timings are asserted with generous margins (the machine may be slow), but a waiter
//! woken by pub/sub must come well before its poll interval.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use runonce::store::memory::MemoryStore;
use runonce::store::redis::RedisStore;
use runonce::store::{
    new_token, AnyStore, Claim, ClaimInfo, Key, Record, State, Store, Stored, Turn,
};
use support::redis::{RedisCluster, RedisServer};

/// The operation time-out the Redis stores get in these tests.
const OP_TIMEOUT: Duration = Duration::from_millis(500);

/// A waiter woken by a change must see it within this (its poll interval is 5 s).
const WAKE: Duration = Duration::from_millis(1_500);

/// The digest of a leader's access token, as the engine stores it.
const CREDENTIAL: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

// ---- helpers ----------------------------------------------------------------------------------------------

/// A fresh random key.
fn key() -> Key {
    Key::parse(&format!("{}{}", new_token(), new_token())).expect("64 hex")
}

fn info(lease_ms: u64, window_ms: u64) -> ClaimInfo {
    ClaimInfo {
        fingerprint: "fp-1".into(),
        fields: r#"{"jobId":"d1","instanceParams":"e3b0"}"#.into(),
        credential: CREDENTIAL.into(),
        lease: Duration::from_millis(lease_ms),
        window: Duration::from_millis(window_ms),
        release_if_failed: true,
    }
}

/// An answer with bytes that are not UTF-8, NULs, CR/LF and header names in mixed case.
fn answer() -> Stored {
    Stored {
        status: 200,
        head: Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nX-POWERJOB-AUTH-PASSED: true\r\n\
              Content-Type: application/json\r\nX-Odd: \xe9t\xe9\r\n\r\n",
        ),
        body: Bytes::from_static(b"{\"success\":true,\"data\":\"12\"}\x00\xff\xfe\x80\r\n\r\n\x00"),
    }
}

fn memory() -> AnyStore {
    AnyStore::Memory(Arc::new(MemoryStore::new(10_000, Duration::from_secs(30))))
}

/// A Redis store whose listener is subscribed (so a test's first change already wakes waiters).
async fn redis_store(url: &str) -> RedisStore {
    let store = RedisStore::connect(url, OP_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    until(Duration::from_secs(10), "the listener subscribes", || {
        let store = store.clone();
        async move { store.listening() }
    })
    .await;
    store
}

/// Waits until `check` holds, at most `limit`; panics naming `what` otherwise.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn lead(store: &AnyStore, key: &Key, info: &ClaimInfo) -> String {
    match store.claim(key, info).await.expect("claim") {
        Claim::Leader(token) => token,
        Claim::Existing(record) => panic!("expected to lead, found {record:?}"),
    }
}

async fn existing(store: &AnyStore, key: &Key, info: &ClaimInfo) -> Record {
    match store.claim(key, info).await.expect("claim") {
        Claim::Existing(record) => record,
        Claim::Leader(token) => panic!("expected a record, led with {token}"),
    }
}

async fn record(store: &AnyStore, key: &Key) -> Record {
    store.get(key).await.expect("get").expect("a record")
}

/// Starts a waiter on `key` (poll 5 s) and returns how long it waited, once it returns.
fn waiter(store: &AnyStore, key: &Key) -> tokio::task::JoinHandle<Duration> {
    let (store, key) = (store.clone(), key.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        store.changed(&key, Duration::from_secs(5)).await;
        started.elapsed()
    })
}

// ---- the scenarios ----------------------------------------------------------------------------------------

/// A free key is led; the next claim finds the leader's record, in flight, with what the claim stored.
async fn claim_then_existing(store: &AnyStore) {
    let key = key();
    let info = info(5_000, 60_000);
    let token = lead(store, &key, &info).await;
    assert_eq!(token.len(), 32);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let found = existing(store, &key, &info).await;
    assert_eq!(found.state, State::InFlight);
    assert_eq!(found.owner, token);
    assert_eq!(found.fingerprint, "fp-1");
    assert_eq!(found.fields, r#"{"jobId":"d1","instanceParams":"e3b0"}"#);
    assert_eq!(found.credential, CREDENTIAL, "the leader's token digest");
    assert!(
        (150..5_000).contains(&found.age_ms),
        "age {} ms",
        found.age_ms
    );
    assert_eq!(record(store, &key).await.owner, token);
    // Another key is untouched.
    assert_eq!(store.get(&self::key()).await.unwrap(), None);
}

/// A token that does not lead the record changes nothing: forged, or stale after a release and a new claim.
async fn fencing(store: &AnyStore) {
    let key = key();
    let info = info(5_000, 60_000);
    let window = Duration::from_secs(60);
    let first = lead(store, &key, &info).await;
    for forged in ["", "not-a-token", "0123456789abcdef0123456789abcdef"] {
        assert!(!store
            .complete(&key, forged, &answer(), window, false)
            .await
            .unwrap());
        assert!(!store.release(&key, forged, None).await.unwrap());
        assert!(!store
            .mark_unknown(&key, forged, window, None)
            .await
            .unwrap());
        assert!(!store.renew(&key, forged, info.lease).await.unwrap());
    }
    assert!(store.release(&key, &first, None).await.unwrap());
    let second = lead(store, &key, &info).await;
    assert_ne!(first, second);
    // The first leader is fenced out of the second one's record.
    assert!(!store
        .complete(&key, &first, &answer(), window, false)
        .await
        .unwrap());
    assert!(!store.release(&key, &first, None).await.unwrap());
    assert!(!store
        .mark_unknown(&key, &first, window, None)
        .await
        .unwrap());
    assert!(!store.renew(&key, &first, info.lease).await.unwrap());
    let now = record(store, &key).await;
    assert_eq!(
        (now.state, now.owner.as_str()),
        (State::InFlight, second.as_str())
    );
    // The leader completes once (a repeat, as after a lost reply, is acknowledged and changes nothing); a
    // settled record takes no other change.
    assert!(store
        .complete(&key, &second, &answer(), window, false)
        .await
        .unwrap());
    assert!(store
        .complete(&key, &second, &answer(), window, false)
        .await
        .unwrap());
    assert!(!store
        .complete(&key, &first, &answer(), window, false)
        .await
        .unwrap());
    assert!(!store.release(&key, &second, None).await.unwrap());
    assert!(!store.renew(&key, &second, info.lease).await.unwrap());
    assert!(matches!(
        record(store, &key).await.state,
        State::Done { .. }
    ));
}

/// A lease that runs out: reads as unknown, a claim settles it unknown, and the old leader is fenced.
async fn lease_runs_out(store: &AnyStore) {
    let key = key();
    let info = info(300, 60_000);
    let token = lead(store, &key, &info).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read = record(store, &key).await;
    assert_eq!(
        (read.state, read.owner.as_str()),
        (State::Unknown, token.as_str())
    );
    assert!(!store.renew(&key, &token, info.lease).await.unwrap());
    assert!(!store
        .complete(&key, &token, &answer(), info.window, false)
        .await
        .unwrap());
    let found = existing(store, &key, &info).await;
    assert_eq!(
        (found.state, found.owner.as_str()),
        (State::Unknown, token.as_str())
    );
    assert!(!store.release(&key, &token, None).await.unwrap());
    assert!(!store
        .mark_unknown(&key, &token, info.window, None)
        .await
        .unwrap());
    // Never re-run automatically: a later claim still finds it unknown.
    assert_eq!(existing(store, &key, &info).await.state, State::Unknown);
}

/// The stored answer comes back byte for byte, through get and through a claim.
async fn complete_is_byte_exact(store: &AnyStore) {
    let key = key();
    let info = info(5_000, 60_000);
    let token = lead(store, &key, &info).await;
    assert!(store
        .complete(&key, &token, &answer(), info.window, false)
        .await
        .unwrap());
    let expected = State::Done {
        response: answer(),
        delivered: false,
    };
    let read = record(store, &key).await;
    assert_eq!(read.state, expected);
    assert_eq!(read.owner, token);
    assert_eq!(read.fingerprint, "fp-1");
    assert_eq!(existing(store, &key, &info).await.state, expected);
    // An empty body and another status.
    let other = self::key();
    let token = lead(store, &other, &info).await;
    let empty = Stored {
        status: 504,
        head: Bytes::from_static(b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\n\r\n"),
        body: Bytes::new(),
    };
    assert!(store
        .complete(&other, &token, &empty, info.window, false)
        .await
        .unwrap());
    assert_eq!(
        record(store, &other).await.state,
        State::Done {
            response: empty,
            delivered: false
        }
    );
}

/// A completion can record the delivery in the same write; a repeated completion by the same leader may add
/// it (a retry after a lost reply), never take it back, and changes nothing else.
async fn complete_records_the_delivery(store: &AnyStore) {
    let info = info(5_000, 60_000);
    let done = |delivered| State::Done {
        response: answer(),
        delivered,
    };
    let key = key();
    let token = lead(store, &key, &info).await;
    assert!(store
        .complete(&key, &token, &answer(), info.window, true)
        .await
        .unwrap());
    assert_eq!(record(store, &key).await.state, done(true));
    assert!(store
        .complete(&key, &token, &answer(), info.window, false)
        .await
        .unwrap());
    assert_eq!(
        record(store, &key).await.state,
        done(true),
        "never taken back"
    );

    let key = self::key();
    let token = lead(store, &key, &info).await;
    assert!(store
        .complete(&key, &token, &answer(), info.window, false)
        .await
        .unwrap());
    assert_eq!(record(store, &key).await.state, done(false));
    assert!(!store
        .complete(&key, "another-token", &answer(), info.window, true)
        .await
        .unwrap());
    assert_eq!(
        record(store, &key).await.state,
        done(false),
        "only its leader's"
    );
    assert!(store
        .complete(&key, &token, &answer(), info.window, true)
        .await
        .unwrap());
    assert_eq!(record(store, &key).await.state, done(true));
}

/// A release frees the key: the next claim leads with a new token.
async fn release_then_claim_leads(store: &AnyStore) {
    let key = key();
    let info = info(5_000, 60_000);
    let first = lead(store, &key, &info).await;
    assert!(store.release(&key, &first, None).await.unwrap());
    // The record stays a little while, released, for the duplicates that waited; a claim takes it.
    let released = store
        .get(&key)
        .await
        .unwrap()
        .expect("kept for the waiters");
    assert_eq!((released.state, released.answer), (State::Released, None));
    let second = lead(store, &key, &info).await;
    assert_ne!(first, second);
    // Purge deletes whatever is there, once.
    assert!(store.purge(&key).await.unwrap());
    assert!(!store.purge(&key).await.unwrap());
    assert_eq!(store.get(&key).await.unwrap(), None);
}

/// Delivered by its owner, a done record can be taken over by a new call; the new leader owns it.
async fn delivered_then_takeover(store: &AnyStore) {
    let key = key();
    let info = info(5_000, 60_000);
    let first = lead(store, &key, &info).await;
    assert!(
        !store.mark_delivered(&key, &first).await.unwrap(),
        "in flight"
    );
    assert!(store
        .complete(&key, &first, &answer(), info.window, false)
        .await
        .unwrap());
    assert!(!store.mark_delivered(&key, "someone-else").await.unwrap());
    assert!(store.mark_delivered(&key, &first).await.unwrap());
    assert_eq!(
        record(store, &key).await.state,
        State::Done {
            response: answer(),
            delivered: true
        }
    );
    // Only with the owner's token.
    let refused = store.takeover(&key, "someone-else", &info).await.unwrap();
    assert!(
        matches!(refused, Claim::Existing(ref r) if r.owner == first),
        "{refused:?}"
    );
    let mut again = info.clone();
    again.fingerprint = "fp-2".into();
    again.credential = String::new();
    let Claim::Leader(second) = store.takeover(&key, &first, &again).await.unwrap() else {
        panic!("the takeover was refused")
    };
    assert_ne!(first, second);
    let now = record(store, &key).await;
    assert_eq!(
        (
            now.state,
            now.owner.as_str(),
            now.fingerprint.as_str(),
            now.credential.as_str()
        ),
        (State::InFlight, second.as_str(), "fp-2", ""),
        "the new leader's record carries its own (here: no) token digest"
    );
    // The old owner's token takes over nothing now.
    let Claim::Existing(now) = store.takeover(&key, &first, &info).await.unwrap() else {
        panic!("took over an in-flight record")
    };
    assert_eq!(now.owner, second);
    // A free key is simply claimed.
    assert!(matches!(
        store.takeover(&self::key(), &first, &info).await.unwrap(),
        Claim::Leader(_)
    ));
}

/// Not delivered, in flight or unknown: no takeover.
async fn takeover_refused_unless_delivered(store: &AnyStore) {
    let info = info(5_000, 60_000);
    let done = key();
    let token = lead(store, &done, &info).await;
    assert!(store
        .complete(&done, &token, &answer(), info.window, false)
        .await
        .unwrap());
    let Claim::Existing(found) = store.takeover(&done, &token, &info).await.unwrap() else {
        panic!("took over an answer nobody received")
    };
    assert_eq!(
        found.state,
        State::Done {
            response: answer(),
            delivered: false
        }
    );
    let in_flight = key();
    let token = lead(store, &in_flight, &info).await;
    let Claim::Existing(found) = store.takeover(&in_flight, &token, &info).await.unwrap() else {
        panic!("took over an in-flight record")
    };
    assert_eq!((found.state, found.owner), (State::InFlight, token.clone()));
    assert!(store
        .mark_unknown(&in_flight, &token, info.window, None)
        .await
        .unwrap());
    let Claim::Existing(found) = store.takeover(&in_flight, &token, &info).await.unwrap() else {
        panic!("took over an unknown record")
    };
    assert_eq!(found.state, State::Unknown);
}

/// Records live for their window: a done one, an unknown one, and a claim nobody completed.
async fn window_expiry(store: &AnyStore) {
    let info = info(200, 400);
    let short = Duration::from_millis(400);
    let done = key();
    let token = lead(store, &done, &info).await;
    assert!(store
        .complete(&done, &token, &answer(), short, false)
        .await
        .unwrap());
    let unknown = key();
    let token = lead(store, &unknown, &info).await;
    assert!(store
        .mark_unknown(&unknown, &token, short, None)
        .await
        .unwrap());
    let abandoned = key();
    lead(store, &abandoned, &info).await;
    let started = Instant::now();
    assert!(matches!(
        record(store, &done).await.state,
        State::Done { .. }
    ));
    assert_eq!(record(store, &unknown).await.state, State::Unknown);
    for key in [&done, &unknown, &abandoned] {
        until(Duration::from_secs(3), "the record expires", || async {
            store.get(key).await.unwrap().is_none()
        })
        .await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "expired early: {:?}",
        started.elapsed()
    );
    // Expired: a claim leads again.
    lead(store, &done, &info).await;
}

/// Renewed, an in-flight record outlives its window (and its first lease) and its leader still leads.
async fn in_flight_outlives_its_window_while_renewed(store: &AnyStore) {
    let key = key();
    let info = info(400, 200);
    let token = lead(store, &key, &info).await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(store.renew(&key, &token, info.lease).await.unwrap());
    }
    // 1.2 s in: six windows and three leases later.
    let found = existing(store, &key, &info).await;
    assert_eq!(
        (found.state, found.owner.as_str()),
        (State::InFlight, token.as_str())
    );
    assert!(store
        .complete(&key, &token, &answer(), Duration::from_secs(60), false)
        .await
        .unwrap());
}

/// `changed` wakes a waiter on complete, release and mark unknown well before its poll; returns at once for a
/// settled or absent record; and returns after `poll` when nothing happens.
async fn changed_wakes_waiters(store: &AnyStore) {
    let info = info(10_000, 60_000);
    let window = Duration::from_secs(60);
    // Nothing happens: back after the poll interval.
    let quiet = key();
    lead(store, &quiet, &info).await;
    let started = Instant::now();
    store.changed(&quiet, Duration::from_millis(300)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < WAKE,
        "poll 300 ms took {waited:?}"
    );
    // Absent: at once.
    let started = Instant::now();
    store.changed(&key(), Duration::from_secs(5)).await;
    assert!(started.elapsed() < WAKE, "{:?}", started.elapsed());
    for change in ["complete", "release", "mark_unknown"] {
        let key = key();
        let token = lead(store, &key, &info).await;
        let waiting = waiter(store, &key);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let changed = match change {
            "complete" => store.complete(&key, &token, &answer(), window, false).await,
            "release" => store.release(&key, &token, None).await,
            _ => store.mark_unknown(&key, &token, window, None).await,
        };
        assert!(changed.unwrap());
        let waited = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter returns within its poll")
            .unwrap();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_millis(300) + WAKE,
            "{change}: waiter returned after {waited:?}"
        );
        // Settled (or gone) now: at once.
        let started = Instant::now();
        store.changed(&key, Duration::from_secs(5)).await;
        assert!(started.elapsed() < WAKE, "{:?}", started.elapsed());
    }
}

/// Many concurrent claims of one key: exactly one leader, everyone else sees its record.
async fn concurrent_claims_have_one_leader(store: &AnyStore) {
    let key = key();
    let info = info(5_000, 60_000);
    let claims: Vec<_> = (0..48)
        .map(|_| {
            let (store, key, info) = (store.clone(), key.clone(), info.clone());
            tokio::spawn(async move { store.claim(&key, &info).await.expect("claim") })
        })
        .collect();
    let mut leaders = Vec::new();
    let mut owners = Vec::new();
    for claim in claims {
        match claim.await.unwrap() {
            Claim::Leader(token) => leaders.push(token),
            Claim::Existing(record) => {
                assert_eq!(record.state, State::InFlight);
                owners.push(record.owner);
            }
        }
    }
    assert_eq!(leaders.len(), 1, "leaders: {leaders:?}");
    assert_eq!(owners.len(), 47);
    assert!(owners.iter().all(|owner| *owner == leaders[0]));
}

// ---- one test per scenario and store ----------------------------------------------------------------------

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(&super::memory()).await;
                }
            )*
        }

        mod redis_standalone {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let server = RedisServer::start();
                    let store = AnyStore::Redis(redis_store(&server.url()).await);
                    super::$scenario(&store).await;
                }
            )*
        }

        mod redis_cluster {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let cluster = RedisCluster::start(3);
                    let store = AnyStore::Redis(redis_store(&cluster.url()).await);
                    super::$scenario(&store).await;
                }
            )*
        }
    };
}

/// An unknown record says how long ago it turned unknown; a resolver with the owner's
/// token settles it as done (its instance, not delivered) or released, once; anyone else changes nothing.
async fn unknown_records_are_resolved_once_by_their_owner(store: &AnyStore) {
    let info = info(5_000, 60_000);
    let found = Key::parse(&"51".repeat(32)).unwrap();
    let token = lead(store, &found, &info).await;
    assert!(store
        .mark_unknown(&found, &token, info.window, None)
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let unknown = store.get(&found).await.unwrap().unwrap();
    assert_eq!(unknown.state, State::Unknown);
    assert!(
        unknown.settled_ago_ms.is_some_and(|ms| ms >= 40),
        "{unknown:?}"
    );
    assert!(!store
        .resolve(&found, "someone-else", Some(&answer()))
        .await
        .unwrap());
    assert!(store
        .resolve(&found, &token, Some(&answer()))
        .await
        .unwrap());
    assert!(!store.resolve(&found, &token, None).await.unwrap(), "once");
    let done = store.get(&found).await.unwrap().unwrap();
    assert_eq!(
        done.state,
        State::Done {
            response: answer(),
            delivered: false
        }
    );

    let nothing = Key::parse(&"52".repeat(32)).unwrap();
    let token = lead(store, &nothing, &info).await;
    assert!(store
        .mark_unknown(&nothing, &token, info.window, None)
        .await
        .unwrap());
    assert!(store.resolve(&nothing, &token, None).await.unwrap());
    assert_eq!(
        store.get(&nothing).await.unwrap().unwrap().state,
        State::Released
    );
    let next = lead(store, &nothing, &info).await;
    assert_ne!(next, token, "a released key is claimed anew");
    // An in-flight record is its live leader's, not a resolver's.
    assert!(!store.resolve(&nothing, &next, None).await.unwrap());
}

/// An unknown record keeps its owner's lookup for operators; nobody else's, and a new claim drops it.
async fn unknown_records_keep_their_owners_lookup(store: &AnyStore) {
    let info = info(5_000, 60_000);
    let key = Key::parse(&"53".repeat(32)).unwrap();
    let token = lead(store, &key, &info).await;
    assert!(
        !store.keep_lookup(&key, &token, "{}").await.unwrap(),
        "in flight: not unknown yet"
    );
    assert!(store
        .mark_unknown(&key, &token, info.window, None)
        .await
        .unwrap());
    assert!(!store.keep_lookup(&key, "someone-else", "{}").await.unwrap());
    assert_eq!(store.lookup(&key).await.unwrap(), None);
    let lookup = r#"{"app":1,"job":5}"#;
    assert!(store.keep_lookup(&key, &token, lookup).await.unwrap());
    assert_eq!(
        store.lookup(&key).await.unwrap(),
        Some((token.clone(), lookup.to_string()))
    );
    assert!(store.resolve(&key, &token, None).await.unwrap());
    let next = lead(store, &key, &info).await;
    assert_ne!(next, token);
    assert_eq!(
        store.lookup(&key).await.unwrap(),
        None,
        "a new claim, a new record"
    );
}

/// An instance id noted as a key's answer names that key, until its time is up; other ids name none.
async fn instances_are_noted_by_key_for_a_while(store: &AnyStore) {
    let key = Key::parse(&"54".repeat(32)).unwrap();
    let id = 1_009_267_231_168_659_456;
    assert_eq!(store.instance_key(id).await.unwrap(), None);
    store
        .note_instance(id, &key, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(store.instance_key(id).await.unwrap(), Some(key));
    assert_eq!(store.instance_key(id + 1).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.instance_key(id).await.unwrap(), None, "forgotten");
}

/// One request at a time has the turn to ask about an unknown record: the others are told it is busy until
/// the turn ends or its lease runs out; a turn that left it unknown is not taken again within the gap; a
/// settled record has no turn.
async fn one_turn_at_a_time_to_ask_about_an_unknown_record(store: &AnyStore) {
    let info = info(5_000, 60_000);
    let key = Key::parse(&"55".repeat(32)).unwrap();
    let (lease, gap) = (Duration::from_millis(300), Duration::from_millis(400));
    let token = lead(store, &key, &info).await;
    assert_eq!(
        store.ask_turn(&key, &token, lease, gap).await.unwrap(),
        Turn::Settled,
        "in flight: not unknown"
    );
    assert!(store
        .mark_unknown(&key, &token, info.window, None)
        .await
        .unwrap());
    let turn = |owner: &str| {
        let (store, key, owner) = (store.clone(), key.clone(), owner.to_string());
        async move { store.ask_turn(&key, &owner, lease, gap).await.unwrap() }
    };
    assert_eq!(turn("someone-else").await, Turn::Settled, "not its record");
    assert_eq!(turn(&token).await, Turn::Yours);
    assert_eq!(turn(&token).await, Turn::Busy);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(turn(&token).await, Turn::Yours, "the lease ran out");
    assert!(store.end_turn(&key, &token).await.unwrap());
    assert_eq!(turn(&token).await, Turn::Asked, "asked lately");
    assert_eq!(
        store
            .ask_turn(&key, &token, lease, Duration::ZERO)
            .await
            .unwrap(),
        Turn::Yours,
        "no gap: asked again"
    );
    assert!(store.resolve(&key, &token, None).await.unwrap());
    assert_eq!(turn(&token).await, Turn::Settled);
    assert!(!store.end_turn(&key, &token).await.unwrap());
}

conformance!(
    one_turn_at_a_time_to_ask_about_an_unknown_record,
    instances_are_noted_by_key_for_a_while,
    unknown_records_keep_their_owners_lookup,
    unknown_records_are_resolved_once_by_their_owner,
    claim_then_existing,
    fencing,
    lease_runs_out,
    complete_is_byte_exact,
    complete_records_the_delivery,
    release_then_claim_leads,
    delivered_then_takeover,
    takeover_refused_unless_delivered,
    window_expiry,
    in_flight_outlives_its_window_while_renewed,
    changed_wakes_waiters,
    concurrent_claims_have_one_leader,
);

// ---- Redis only -------------------------------------------------------------------------------------------

/// The Redis record `runonce:{<key>}` of a key.
fn hash_name(key: &Key) -> String {
    format!("runonce:{{{key}}}")
}

/// A plain connection to the test's server, to look at what the store wrote.
async fn inspect(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test's redis-server")
}

async fn assert_fails_fast<T: std::fmt::Debug>(
    op: &str,
    call: impl std::future::Future<Output = Result<T, runonce::store::StoreError>>,
) -> runonce::store::StoreError {
    let started = Instant::now();
    let err = call.await.expect_err("the store is down: an error");
    let took = started.elapsed();
    assert_eq!(err.op, op, "{err}");
    assert!(
        took < OP_TIMEOUT + Duration::from_millis(700),
        "{op} took {took:?} to fail"
    );
    err
}

/// A waiter on `a` is woken by a change made through `b` (both may be the same store).
async fn assert_wakes(a: &AnyStore, b: &AnyStore) {
    let key = key();
    let info = info(10_000, 60_000);
    let token = lead(b, &key, &info).await;
    let waiting = waiter(a, &key);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b
        .complete(&key, &token, &answer(), info.window, false)
        .await
        .unwrap());
    let waited = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter returns")
        .unwrap();
    assert!(
        waited < Duration::from_millis(300) + WAKE,
        "woken after {waited:?} (poll 5 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_fails_fast_and_the_same_store_works_after_a_restart() {
    let mut server = RedisServer::start();
    let redis = redis_store(&server.url()).await;
    let store = AnyStore::Redis(redis.clone());
    let info = info(5_000, 60_000);
    let before = key();
    let token = lead(&store, &before, &info).await;
    server.stop();
    for _ in 0..3 {
        assert_fails_fast("claim", store.claim(&key(), &info)).await;
    }
    assert_fails_fast("get", store.get(&before)).await;
    assert_fails_fast(
        "complete",
        store.complete(&before, &token, &answer(), info.window, false),
    )
    .await;
    assert_fails_fast("renew", store.renew(&before, &token, info.lease)).await;
    // A waiter is bounded by its poll interval.
    let started = Instant::now();
    store.changed(&before, Duration::from_millis(300)).await;
    assert!(started.elapsed() < WAKE, "{:?}", started.elapsed());

    server.restart();
    let took = until(Duration::from_secs(15), "the store works again", || async {
        store.get(&before).await.is_ok()
    })
    .await;
    eprintln!("redis store answered again {took:?} after the restart");
    // No persistence: the record went with the server; the key leads again.
    assert_eq!(store.get(&before).await.unwrap(), None);
    lead(&store, &before, &info).await;
    // Pub/sub is back too.
    until(
        Duration::from_secs(10),
        "the listener subscribes again",
        || {
            let redis = redis.clone();
            async move { redis.listening() }
        },
    )
    .await;
    assert_wakes(&store, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_is_not_an_error_and_the_store_connects_later() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let started = Instant::now();
    let redis = RedisStore::connect(&url, OP_TIMEOUT)
        .await
        .expect("an unreachable Redis is not a configuration error");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(!redis.listening());
    let store = AnyStore::Redis(redis.clone());
    let info = info(5_000, 60_000);
    for _ in 0..3 {
        assert_fails_fast("claim", store.claim(&key(), &info)).await;
    }
    server.restart();
    let key = key();
    let took = until(Duration::from_secs(15), "the store connects", || async {
        store.claim(&key, &info).await.is_ok()
    })
    .await;
    eprintln!("redis store connected {took:?} after the server started");
    assert!(matches!(
        store.get(&key).await.unwrap().map(|r| r.state),
        Some(State::InFlight)
    ));
    until(Duration::from_secs(10), "the listener subscribes", || {
        let redis = redis.clone();
        async move { redis.listening() }
    })
    .await;
    assert_wakes(&store, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_times_out_then_works_after_resume() {
    let server = RedisServer::start();
    let store = AnyStore::Redis(redis_store(&server.url()).await);
    let info = info(60_000, 60_000);
    let before = key();
    let token = lead(&store, &before, &info).await;
    server.pause();
    // More than RECONNECT_AFTER_TIMEOUTS in a row: the connection is replaced on the way.
    for _ in 0..5 {
        let started = Instant::now();
        let err = assert_fails_fast("get", store.get(&before)).await;
        assert!(err.cause.contains("no answer"), "{err}");
        assert!(started.elapsed() >= OP_TIMEOUT - Duration::from_millis(50));
    }
    assert_fails_fast("claim", store.claim(&key(), &info)).await;
    server.resume();
    let took = until(
        Duration::from_secs(15),
        "the store answers again",
        || async { store.get(&before).await.is_ok() },
    )
    .await;
    eprintln!("redis store answered again {took:?} after the resume");
    // The process kept its data: the leader still leads.
    let found = record(&store, &before).await;
    assert_eq!(
        (found.state, found.owner.as_str()),
        (State::InFlight, token.as_str())
    );
    assert!(store.renew(&before, &token, info.lease).await.unwrap());
    assert!(store
        .complete(&before, &token, &answer(), info.window, false)
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redis_stores_on_one_redis_share_records_and_wake_each_other() {
    let server = RedisServer::start();
    let a = AnyStore::Redis(redis_store(&server.url()).await);
    let b = AnyStore::Redis(redis_store(&server.url()).await);
    let info = info(10_000, 60_000);
    let key = key();
    let token = lead(&a, &key, &info).await;
    let found = existing(&b, &key, &info).await;
    assert_eq!(
        (found.state, found.owner.as_str()),
        (State::InFlight, token.as_str())
    );
    // A waiter on B, the leader's answer through A.
    let waiting = waiter(&b, &key);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a
        .complete(&key, &token, &answer(), info.window, false)
        .await
        .unwrap());
    let waited = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(waited < Duration::from_millis(300) + WAKE, "{waited:?}");
    assert_eq!(
        record(&b, &key).await.state,
        State::Done {
            response: answer(),
            delivered: false
        }
    );
    // Delivered as B saw it, known to A; only A's token takes it over, through either store.
    assert!(b.mark_delivered(&key, &token).await.unwrap());
    assert!(matches!(
        record(&a, &key).await.state,
        State::Done {
            delivered: true,
            ..
        }
    ));
    assert!(matches!(
        b.takeover(&key, &token, &info).await.unwrap(),
        Claim::Leader(_)
    ));
    // And the other way round.
    assert_wakes(&a, &b).await;
}

/// Reads from `from` into `heard` until it holds `needle`, at most 5 s.
async fn read_until(from: &mut tokio::net::TcpStream, heard: &mut Vec<u8>, needle: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        while !String::from_utf8_lossy(heard).contains(needle) {
            let n = from.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed");
            heard.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "not heard: {needle}; heard {:?}",
        String::from_utf8_lossy(heard)
    );
}

/// Settling a record publishes only when a waiter counted itself in: a call without duplicates costs Redis
/// no `PUBLISH`, and the replicas' listeners no message. A raw subscriber on the store's pattern hears the
/// waited-on key's change and nothing before it (one connection delivers messages in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publishes_a_settled_record_only_when_someone_waits() {
    use tokio::io::AsyncWriteExt;
    let server = RedisServer::start();
    let store = AnyStore::Redis(redis_store(&server.url()).await);
    let mut subscriber = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let pattern = "runonce:{*}:changed";
    let command = format!(
        "*2\r\n$10\r\nPSUBSCRIBE\r\n${}\r\n{pattern}\r\n",
        pattern.len()
    );
    subscriber.write_all(command.as_bytes()).await.unwrap();
    let mut heard = Vec::new();
    read_until(&mut subscriber, &mut heard, "psubscribe").await;
    let info = info(10_000, 60_000);
    // Nobody waits: complete, release and mark unknown publish nothing.
    let quiet = [key(), key(), key()];
    for (i, key) in quiet.iter().enumerate() {
        let token = lead(&store, key, &info).await;
        let settled = match i {
            0 => {
                store
                    .complete(key, &token, &answer(), info.window, false)
                    .await
            }
            1 => store.release(key, &token, None).await,
            _ => store.mark_unknown(key, &token, info.window, None).await,
        };
        assert!(settled.unwrap());
    }
    // A waiter counts itself in; the leader's answer is then published, and wakes it.
    let waited = key();
    let token = lead(&store, &waited, &info).await;
    let waiting = waiter(&store, &waited);
    until(
        Duration::from_secs(5),
        "the waiter counts itself in",
        || {
            let count = server.query(&["HGET", &hash_name(&waited), "waiters"]);
            // A RESP bulk string: `$1\r\n1\r\n`.
            async move { count.is_some_and(|reply| reply.starts_with("$1\r\n1\r\n")) }
        },
    )
    .await;
    assert!(store
        .complete(&waited, &token, &answer(), info.window, false)
        .await
        .unwrap());
    let took = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter returns")
        .unwrap();
    assert!(took < WAKE, "woken after {took:?} (poll 5 s)");
    read_until(
        &mut subscriber,
        &mut heard,
        &format!("runonce:{{{waited}}}:changed"),
    )
    .await;
    let heard = String::from_utf8_lossy(&heard).into_owned();
    assert!(heard.ends_with("done\r\n"), "{heard:?}");
    for key in &quiet {
        assert!(
            !heard.contains(key.as_str()),
            "published unwaited {key}: {heard:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_record_layout_ttls_and_the_clock() {
    use redis::AsyncCommands;
    let server = RedisServer::start();
    let store = AnyStore::Redis(redis_store(&server.url()).await);
    let mut conn = inspect(&server).await;

    // A claim: one hash, kept for lease + window (a dead leader's key reads unknown for a whole window).
    let key = key();
    let token = lead(&store, &key, &info(300, 20_000)).await;
    let name = hash_name(&key);
    let fields: std::collections::HashMap<String, Vec<u8>> = conn.hgetall(&name).await.unwrap();
    let field = |f: &str| String::from_utf8(fields[f].clone()).unwrap();
    assert_eq!(field("state"), "inflight");
    assert_eq!(field("owner"), token);
    assert_eq!(field("fp"), "fp-1");
    assert_eq!(field("cred"), CREDENTIAL);
    assert_eq!(field("delivered"), "0");
    let created: u64 = field("created").parse().unwrap();
    let lease_until: u64 = field("lease_until").parse().unwrap();
    assert_eq!(lease_until - created, 300);
    let ttl: i64 = conn.pttl(&name).await.unwrap();
    assert!((19_300..=20_300).contains(&ttl), "pttl {ttl}");
    // Lease run out: get says unknown and changes nothing; a claim settles it unknown for its window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(record(&store, &key).await.state, State::Unknown);
    let state: String = conn.hget(&name, "state").await.unwrap();
    assert_eq!(state, "inflight");
    assert_eq!(
        existing(&store, &key, &info(300, 5_000)).await.state,
        State::Unknown
    );
    let state: String = conn.hget(&name, "state").await.unwrap();
    assert_eq!(state, "unknown");
    let ttl: i64 = conn.pttl(&name).await.unwrap();
    assert!((4_000..=5_000).contains(&ttl), "pttl {ttl}");

    // A renew raises the time to live to lease + window from now.
    let key = self::key();
    let token = lead(&store, &key, &info(30_000, 1_000)).await;
    let ttl: i64 = conn.pttl(hash_name(&key)).await.unwrap();
    assert!((30_000..=31_000).contains(&ttl), "pttl {ttl}");
    let short = self::key();
    let short_token = lead(&store, &short, &info(1_000, 2_000)).await;
    assert!(store
        .renew(&short, &short_token, Duration::from_secs(9))
        .await
        .unwrap());
    let ttl: i64 = conn.pttl(hash_name(&short)).await.unwrap();
    assert!((10_000..=11_000).contains(&ttl), "pttl {ttl}");

    // Complete: the bytes as they came, the window from now.
    assert!(store
        .complete(&key, &token, &answer(), Duration::from_secs(7), false)
        .await
        .unwrap());
    let name = hash_name(&key);
    let body: Vec<u8> = conn.hget(&name, "body").await.unwrap();
    let head: Vec<u8> = conn.hget(&name, "head").await.unwrap();
    let status: String = conn.hget(&name, "status").await.unwrap();
    assert_eq!(
        (body.as_slice(), head.as_slice()),
        (&answer().body[..], &answer().head[..])
    );
    assert_eq!(status, "200");
    let ttl: i64 = conn.pttl(&name).await.unwrap();
    assert!((6_000..=7_000).contains(&ttl), "pttl {ttl}");

    // The listener holds one pattern subscription.
    let numpat: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(numpat, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_garbage_in_a_record_is_a_store_error_not_a_panic() {
    let server = RedisServer::start();
    let store = AnyStore::Redis(redis_store(&server.url()).await);
    let mut conn = inspect(&server).await;
    let info = info(5_000, 60_000);
    let set = |args: &[&str]| {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd
    };
    // Not a hash at all.
    let string = key();
    let _: () = set(&["SET", &hash_name(&string), "x"])
        .query_async(&mut conn)
        .await
        .unwrap();
    // A hash with a state nobody knows, and a done record whose status is not a number.
    let weird = key();
    let _: () = set(&["HSET", &hash_name(&weird), "state", "weird", "owner", "x"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let bad_status = key();
    let _: () = set(&[
        "HSET",
        &hash_name(&bad_status),
        "state",
        "done",
        "owner",
        "x",
        "status",
        "two hundred",
        "head",
        "",
        "body",
        "",
        "delivered",
        "0",
    ])
    .query_async(&mut conn)
    .await
    .unwrap();
    for key in [&string, &weird, &bad_status] {
        assert_eq!(store.get(key).await.unwrap_err().op, "get");
        assert_eq!(store.claim(key, &info).await.unwrap_err().op, "claim");
    }
    assert!(store
        .complete(&string, "x", &answer(), info.window, false)
        .await
        .is_err());
    // The store still works.
    lead(&store, &key(), &info).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_waiter_registry_empties_when_waiters_leave() {
    let server = RedisServer::start();
    let redis = redis_store(&server.url()).await;
    let store = AnyStore::Redis(redis.clone());
    let info = info(10_000, 60_000);
    let mut keys = Vec::new();
    let mut waiters = Vec::new();
    for _ in 0..20 {
        let key = key();
        let token = lead(&store, &key, &info).await;
        waiters.push(waiter(&store, &key));
        waiters.push(waiter(&store, &key));
        keys.push((key, token));
    }
    until(Duration::from_secs(5), "every waiter registers", || {
        let redis = redis.clone();
        async move { redis.waited_keys() == 20 }
    })
    .await;
    for (key, token) in &keys {
        assert!(store.release(key, token, None).await.unwrap());
    }
    for waiting in waiters {
        let waited = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(waited < Duration::from_secs(4), "{waited:?}");
    }
    assert_eq!(redis.waited_keys(), 0);
    // A waiter that is dropped mid-wait, or whose poll runs out, leaves no entry either.
    let (key, _) = &keys[0];
    lead(&store, key, &info).await;
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        store.changed(key, Duration::from_secs(5)),
    )
    .await;
    store.changed(key, Duration::from_millis(100)).await;
    assert_eq!(redis.waited_keys(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_against_a_plain_server_is_a_store_error_not_a_panic() {
    let server = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}/0", server.port());
    let store = AnyStore::Redis(RedisStore::connect(&url, OP_TIMEOUT).await.unwrap());
    assert_fails_fast("claim", store.claim(&key(), &info(5_000, 60_000))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_listener_skips_a_dead_seed_and_hears_every_node() {
    let cluster = RedisCluster::start(3);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = cluster
        .url()
        .replace("redis+cluster://", &format!("redis+cluster://{dead},"));
    let store = AnyStore::Redis(redis_store(&url).await);
    // One key per node (the node that does not answer MOVED owns it): a change on any node reaches the
    // listener, which sits on one of them.
    let mut owned: Vec<Option<Key>> = vec![None; cluster.nodes.len()];
    for _ in 0..1_000 {
        if owned.iter().all(Option::is_some) {
            break;
        }
        let key = key();
        for (n, node) in cluster.nodes.iter().enumerate() {
            let reply = node
                .query(&["EXISTS", &hash_name(&key)])
                .unwrap_or_default();
            if reply.starts_with(':') && owned[n].is_none() {
                owned[n] = Some(key.clone());
            }
        }
    }
    for key in owned {
        let key = key.expect("a key on every node");
        let info = info(10_000, 60_000);
        let token = lead(&store, &key, &info).await;
        let waiting = waiter(&store, &key);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(store
            .complete(&key, &token, &answer(), info.window, false)
            .await
            .unwrap());
        let waited = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(waited < Duration::from_millis(300) + WAKE, "{waited:?}");
    }
}

/// A TCP relay in front of a Redis server that can make its current connections go silent: they stay open but
/// nothing passes any more (a peer that vanished without a reset: host down, network cut), while connections
/// made afterwards are relayed as usual.
struct Relay {
    addr: std::net::SocketAddr,
    generation: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = Arc::new(AtomicU64::new(0));
        let current = Arc::clone(&generation);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let mine = current.load(Ordering::SeqCst);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                    let current = Arc::clone(&current);
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let (mut from, mut to) = (from, to);
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if current.load(Ordering::SeqCst) != mine {
                                // Silent from now on; this task keeps both sockets open.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Relay {
            addr,
            generation,
            task,
        }
    }

    /// Every connection made so far goes silent.
    fn silence_current(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connection_gone_silent_is_replaced_after_repeated_timeouts() {
    let server = RedisServer::start();
    let relay = Relay::start(server.addr()).await;
    let redis = redis_store(&format!("redis://{}/0", relay.addr)).await;
    let store = AnyStore::Redis(redis.clone());
    let info = info(60_000, 60_000);
    let before = key();
    let token = lead(&store, &before, &info).await;
    relay.silence_current();
    let silenced = Instant::now();
    // The old connection never answers again and never fails by itself; the store gives it up after
    // RECONNECT_AFTER_TIMEOUTS time-outs in a row and makes a new one.
    let failures = std::cell::Cell::new(0);
    let took = until(
        Duration::from_secs(10),
        "the store answers again",
        || async {
            match store.get(&before).await {
                Ok(found) => {
                    assert_eq!(found.map(|r| r.owner), Some(token.clone()));
                    true
                }
                Err(err) => {
                    assert!(err.cause.contains("no answer"), "{err}");
                    failures.set(failures.get() + 1);
                    false
                }
            }
        },
    )
    .await;
    let failures = failures.get();
    eprintln!("answered again {took:?} after the silence, {failures} time-outs");
    assert!(
        failures >= runonce::store::redis::RECONNECT_AFTER_TIMEOUTS as usize,
        "{failures}"
    );
    assert!(store.renew(&before, &token, info.lease).await.unwrap());
    // The listener notices its silent connection by its ping, and subscribes anew.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(silenced.elapsed())).await;
    assert!(redis.listening());
    assert_wakes(&store, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_down_at_start_then_up_then_restarted() {
    let mut cluster = RedisCluster::start(3);
    cluster.stop();
    let redis = RedisStore::connect(&cluster.url(), OP_TIMEOUT)
        .await
        .expect("an unreachable cluster is not a configuration error");
    let store = AnyStore::Redis(redis.clone());
    let info = info(5_000, 60_000);
    assert_fails_fast("claim", store.claim(&key(), &info)).await;
    assert_fails_fast("get", store.get(&key())).await;
    cluster.restart();
    let first = key();
    let took = until(
        Duration::from_secs(20),
        "the store reaches the cluster",
        || async { store.claim(&first, &info).await.is_ok() },
    )
    .await;
    eprintln!("cluster store connected {took:?} after the cluster was up");
    // Every node serves: keys on all slots work.
    for _ in 0..10 {
        lead(&store, &key(), &info).await;
    }
    until(Duration::from_secs(10), "the listener subscribes", || {
        let redis = redis.clone();
        async move { redis.listening() }
    })
    .await;
    assert_wakes(&store, &store).await;

    // The whole cluster restarts mid-run: the same store works again.
    cluster.stop();
    assert_fails_fast("get", store.get(&first)).await;
    cluster.restart();
    let took = until(Duration::from_secs(20), "the store works again", || async {
        let mut all = true;
        for _ in 0..6 {
            all &= store.claim(&key(), &info).await.is_ok();
        }
        all
    })
    .await;
    eprintln!("cluster store answered again {took:?} after the cluster restart");
    tokio::time::sleep(Duration::from_secs(1)).await;
    until(
        Duration::from_secs(10),
        "the listener subscribes again",
        || {
            let redis = redis.clone();
            async move { redis.listening() }
        },
    )
    .await;
    assert_wakes(&store, &store).await;
}
