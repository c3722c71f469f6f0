//! A leader's verdict, written: the outcome recorded on its key, and the definite answer stored with its
//! delivery once the client's connection confirmed it (`proxy::delivery`).

use super::*;

impl Guard {
    /// Records a leader's verdict on its key. When the store fails, the answer goes to the client at once and
    /// the write is retried in the background (tracked, so shutdown waits for it) until it lands or the lease
    /// runs out: the store's scripts are fenced by the token and the lease, so a late retry can never
    /// overwrite another leader's record. Without the retry, a store blip at the end of a call would leave the
    /// key to turn unknown, and every duplicate in the window would get 409 instead of the answer.
    pub(super) async fn record(
        &self,
        store: &AnyStore,
        (key, window): (&Key, Duration),
        token: &str,
        verdict: Verdict,
    ) -> Result<bool, StoreError> {
        let first = verdict.write(store, key, token, window).await;
        if first.is_ok() {
            return first;
        }
        let deadline = Instant::now() + self.lease;
        let (store, key, token) = (store.clone(), key.clone(), token.to_string());
        let cut_off = self.cut_off.clone();
        self.tracker.spawn(async move {
            let mut pause = Duration::from_millis(100);
            while Instant::now() + pause < deadline {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = cut_off.cancelled() => return,
                }
                match verdict.write(&store, &key, &token, window).await {
                    Ok(recorded) => {
                        tracing::info!(key = key.prefix(), recorded, "outcome recorded on a retry");
                        return;
                    }
                    Err(err) => {
                        metrics::get().store_errors.inc();
                        tracing::debug!(key = key.prefix(), %err, "outcome retry failed");
                    }
                }
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            tracing::warn!(
                key = key.prefix(),
                "outcome not recorded before the lease ran out; the key turns unknown"
            );
        });
        first
    }
}

/// Logs a leader's record write that did not land (`Ok(false)`: its key was taken from it).
pub(super) fn note_change(key: &Key, change: Result<bool, StoreError>) {
    match change {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            key = key.prefix(),
            "the key was no longer this leader's: outcome not recorded"
        ),
        Err(err) => {
            metrics::get().store_errors.inc();
            tracing::warn!(key = key.prefix(), %err, "outcome not recorded yet; retrying while the lease lasts, else the key turns unknown");
        }
    }
}

/// A leader's definite answer, stored in one write with its delivery: once the client's connection confirmed
/// whether the client took the body ([`Completion::handed_out`], `proxy::delivery`), or as not delivered when
/// the body is dropped unread (the client went away). Until then the key stays in flight
/// (duplicates wait, and are woken by the write), and the task tracker counts the completion, so that shutdown
/// waits for it. A write that did not finish (the body dropped while it ran) is run again in a tracked task of
/// its own: the store's scripts are idempotent for their leader, so a second landing changes nothing.
pub(super) struct Completion {
    /// The write, until it finished.
    pub(super) write: Option<Write>,
    /// Taken as delivered when handed out (no connection to watch): a write still owed on drop stores it so.
    pub(super) delivered: bool,
    pub(super) _pending: TaskTrackerToken,
}

/// A leader's answer and where it goes.
pub(super) struct Write {
    pub(super) guard: Arc<Guard>,
    pub(super) store: AnyStore,
    pub(super) key: Key,
    pub(super) window: Duration,
    pub(super) stored: Stored,
    /// The instance id the answer carries, to be noted as this key's ([`Store::note_instance`]): only for
    /// a client-keyed call on a route with a lookup.
    pub(super) instance: Option<i64>,
    /// This process's registry entry of the leader (its owner token too): it goes once the store holds the
    /// answer.
    pub(super) flight: Arc<Flight>,
}

impl Write {
    /// Runs the write: at once when it finishes without waiting (the memory store's always does), else in a
    /// tracked task. `_pending` keeps shutdown waiting until then. Outside a runtime (only while the process
    /// ends) nothing can be written: the key turns unknown.
    fn finish(self, delivered: bool, _pending: TaskTrackerToken) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let tracker = self.guard.tracker.clone();
        let mut write = Box::pin(async move { self.run(delivered).await });
        // Polled once here with a waker that does nothing: a write that has to wait is polled again at
        // once by its task, which registers that task's waker instead.
        let mut now = Context::from_waker(noop_waker());
        if write.as_mut().poll(&mut now).is_pending() {
            tracker.spawn(write);
        }
    }

    async fn run(&self, delivered: bool) {
        let verdict = Verdict::Done {
            stored: self.stored.clone(),
            delivered,
        };
        let at = (&self.key, self.window);
        let change = self
            .guard
            .record(&self.store, at, &self.flight.token, verdict)
            .await;
        let linger = self.guard.policy.load().wait_timeout;
        let landed = matches!(change, Ok(true));
        self.guard
            .flights
            .finished(&self.key, &self.flight, landed, linger);
        note_change(&self.key, change);
        if let (true, Some(id)) = (landed, self.instance) {
            if let Err(err) = self.store.note_instance(id, &self.key, self.window).await {
                metrics::get().store_errors.inc();
                tracing::warn!(key = self.key.prefix(), instance = id, %err, "the instance was not noted as this key's: another key's resolution may count it");
            }
        }
    }
}

impl Completion {
    /// The body was handed to the client's connection. With a `delivery` watch, the answer is stored once the
    /// connection confirmed whether the client took it (see `proxy::delivery`): the data goes out now, and
    /// identical calls wait meanwhile (the key is still in flight). The write waits on the connection itself,
    /// counted by the task tracker, and runs where the confirmation comes (the next request's read, the grace
    /// timer, the close), in a tracked task only when it cannot finish at once. Without a watch, it is stored
    /// as delivered before the data goes out.
    pub(super) async fn handed_out(mut self, delivery: Option<Arc<Delivery>>, grace: Duration) {
        match delivery {
            Some(delivery) => {
                let Some(write) = self.write.take() else {
                    return;
                };
                let pending = write.guard.tracker.token();
                delivery.handed_out(
                    grace,
                    Confirmation::new(move |taken| {
                        if !taken {
                            metrics::get().answers_not_taken.inc();
                        }
                        write.finish(taken, pending);
                    }),
                );
            }
            None => {
                // Should the body be dropped while this runs, `Drop` runs the write again (as delivered).
                self.delivered = true;
                if let Some(write) = &self.write {
                    write.run(true).await;
                }
                self.write = None;
            }
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(write) = self.write.take() {
            let pending = write.guard.tracker.token();
            write.finish(self.delivered, pending);
        }
    }
}

/// A waker that does nothing (`Waker::noop` needs Rust 1.85).
pub(super) fn noop_waker() -> &'static Waker {
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    static NOOP: OnceLock<Waker> = OnceLock::new();
    NOOP.get_or_init(|| Waker::from(Arc::new(Noop)))
}

/// What a leader's call left on its key.
pub(super) enum Verdict {
    /// An answer to keep for the window; `delivered` when the client's connection takes it.
    Done { stored: Stored, delivered: bool },
    /// Nothing was created: the key is free again (the answer stays a little while for the waiters).
    Release { answer: Option<Stored> },
    /// The server may have acted: kept, never re-sent.
    Unknown { answer: Option<Stored> },
}

impl Verdict {
    async fn write(
        &self,
        store: &AnyStore,
        key: &Key,
        token: &str,
        window: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Verdict::Done { stored, delivered } => {
                store.complete(key, token, stored, window, *delivered).await
            }
            Verdict::Release { answer } => store.release(key, token, answer.as_ref()).await,
            Verdict::Unknown { answer } => {
                store
                    .mark_unknown(key, token, window, answer.as_ref())
                    .await
            }
        }
    }
}
