//! A duplicate's side: sharing the outcome of this process's leader of its key, waiting on the store for
//! another process's, the 409 when the call still runs at the deadline, and the token check before a stored
//! answer is replayed to it.

use super::*;

impl Guard {
    /// Shares the outcome of `flight`, this process's leader of the call's key, with a duplicate.
    pub(super) async fn join(
        &self,
        store: &AnyStore,
        call: &Call,
        flight: &Flight,
        deadline: tokio::time::Instant,
        seen: &mut Seen,
    ) -> Result<Response<Answer>, Failure> {
        if call.client_keyed && flight.info.fingerprint != call.info.fingerprint {
            metrics::get().key_mismatches.inc();
            let fields = key::differing_fields(&flight.info.fields, &call.info.fields);
            return Err(Failure::Refused(ProxyError::KeyReused { fields }));
        }
        seen.waited_since.get_or_insert_with(Instant::now);
        match tokio::time::timeout_at(deadline, flight.outcome()).await {
            Ok(Shared::Answer(answer)) => self
                .share(call, &flight.info.credential, answer, None)
                .await
                .map_err(Failure::Refused),
            Ok(Shared::Error(err)) => Err(Failure::Refused(err)),
            Err(_) => Err(self.still_running(store, call).await),
        }
    }

    /// 409 for a duplicate whose call still runs at its deadline; the record notes that it is owed the answer.
    pub(super) async fn still_running(&self, store: &AnyStore, call: &Call) -> Failure {
        if let Err(err) = store.mark_owed(&call.key).await {
            metrics::get().store_errors.inc();
            tracing::warn!(key = call.key.prefix(), %err, "could not note the 409'd duplicate as owed");
        }
        Failure::Refused(ProxyError::StillRunning {
            waited: self.policy.load().wait_timeout,
        })
    }

    /// A stored or shared answer for a duplicate, once its token is good for it ([`Self::check_token`]).
    pub(super) async fn share(
        &self,
        call: &Call,
        credential: &str,
        answer: Stored,
        mark: Option<(AnyStore, Key, String)>,
    ) -> Result<Response<Answer>, ProxyError> {
        if let Some(refusal) = self.check_token(call, credential, &answer).await? {
            return Ok(refusal);
        }
        Ok(replay(&self.heads, answer, mark).await)
    }

    /// `Some(the server's refusal)` when this duplicate's token is not the leader's and the server does not
    /// accept it; `None` when the stored answer may be replayed to it ([`auth`]).
    pub(super) async fn check_token(
        &self,
        call: &Call,
        leader: &str,
        stored: &Stored,
    ) -> Result<Option<Response<Answer>>, ProxyError> {
        if call.info.credential == leader {
            return Ok(None);
        }
        let (route, key) = (&call.route.name, call.key.prefix());
        match auth::verify(self.upstreams.as_ref(), &call.parts, stored).await {
            Ok(auth::Verdict::Accepted) => {
                tracing::debug!(%route, key, "another token, accepted by the server: replaying");
                Ok(None)
            }
            Ok(auth::Verdict::Refused(answer)) => {
                tracing::info!(%route, key, status = answer.status().as_u16(), client = %call.client, "another token, not accepted by the server: its answer, not the stored one");
                Ok(Some(answer))
            }
            Err(err) => Err(err),
        }
    }
}

/// What a waiter found.
// Lives for one turn of a waiter's loop (as `Claim` does).
#[allow(clippy::large_enum_variant)]
pub(super) enum Waited {
    /// The record left `InFlight`.
    Settled(Record),
    /// The leader runs in this process (it registered after the claim): share its outcome in memory.
    Here(Arc<Flight>),
    /// The record is gone, and no leader of it runs here: no evidence either way.
    Vanished,
    /// Still in flight at the deadline.
    TooLong,
}

/// Waits until the record settles, vanishes, or the deadline passes, consulting this process's leaders
/// after each look at the store.
pub(super) async fn wait(
    store: &AnyStore,
    flights: &Flights,
    key: &Key,
    deadline: tokio::time::Instant,
) -> Result<Waited, StoreError> {
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        store.changed(key, left.min(POLL)).await;
        let record = store.get(key).await?;
        if let Some(flight) = flights.find(key) {
            return Ok(Waited::Here(flight));
        }
        match record {
            Some(record) if record.state != State::InFlight => return Ok(Waited::Settled(record)),
            Some(_) if tokio::time::Instant::now() >= deadline => return Ok(Waited::TooLong),
            Some(_) => continue,
            None => return Ok(Waited::Vanished),
        }
    }
}
