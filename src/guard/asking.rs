//! PowerJob decides, in the engine: what a leader, a duplicate, an operator or the quarantine asks PowerJob
//! (`queryInstance`) about a call whose outcome runonce cannot know, and how the key is settled by the answer.
//! The pure parts (the lookup, the query, reading a page) are in [`super::resolve`]; store loss is found by
//! `store::epoch`.

use super::*;

impl Guard {
    /// What a resolver looks for on the server for this call, sent from `sent_from` (wall clock ms); `None`
    /// when it names no app and job as numbers (the server refuses it before any insert). Read again from the
    /// request, only when PowerJob is asked: a duplicate's payload is its leader's, so a duplicate can resolve
    /// a dead leader's key too.
    pub(super) fn lookup_of(call: &Call, sent_from: i64) -> Option<resolve::Lookup> {
        let text = |name: &str| call.parts.headers.get(name).and_then(|v| v.to_str().ok());
        let payload = key::payload(
            &call.route.name,
            text("content-type"),
            call.parts.uri.query(),
            &call.body,
            text(crate::powerjob::APP_ID),
            None,
        )
        .ok()?;
        let (app, job, params, delay) =
            resolve::Lookup::run_job(&payload.principal, &payload.fields)?;
        let path = call.parts.uri.path();
        Some(resolve::Lookup {
            app,
            job,
            params_sha256: resolve::params_digest(&params),
            prefix: path[..path.find("/openApi/").unwrap_or(0)].to_string(),
            delay,
            sent_from,
            sent_to: wall_ms(),
        })
    }

    /// Whether a duplicate that found `record` unknown asks PowerJob now: the route has a lookup, the record
    /// and it turned unknown `resolve_after` ago (the server can no longer create it).
    pub(super) fn due_for_resolving(&self, call: &Call, record: &Record) -> bool {
        let after = self.policy.load().resolve_after.as_millis() as u64;
        call.route.resolve && record.settled_ago_ms.is_some_and(|ago| ago >= after)
    }

    /// Asks PowerJob, `resolve_after` from now, what the unknown call its leader ran in this process created,
    /// with the leader's credentials (kept in memory, never written to the store). An asking that could not
    /// tell (the query failed, or another request's did) is tried again, twice as late each time, while the
    /// key lives: an unknown key that nobody retries still resolves once the server answers.
    pub(super) fn resolve_later(
        self: &Arc<Self>,
        store: &AnyStore,
        call: &Call,
        owner: &str,
        sent_from: i64,
    ) {
        let Some(lookup) = Self::lookup_of(call, sent_from) else {
            return;
        };
        let after = self.policy.load().resolve_after;
        let lives_until = tokio::time::Instant::now() + call.info.window;
        let (this, store, key) = (Arc::clone(self), store.clone(), call.key.clone());
        let (owner, parts, cut_off) = (owner.to_string(), call.parts.clone(), self.cut_off.clone());
        tokio::spawn(async move {
            // Kept with the record, for an operator's `POST /keys/{key}/resolve`.
            if let Ok(json) = serde_json::to_string(&lookup) {
                if let Err(err) = store.keep_lookup(&key, &owner, &json).await {
                    metrics::get().store_errors.inc();
                    tracing::warn!(key = key.prefix(), %err, "the lookup of the unknown call was not kept; a duplicate can still resolve it");
                }
            }
            let mut pause = after;
            while tokio::time::Instant::now() + pause < lives_until {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = cut_off.cancelled() => return,
                }
                // A duplicate or an operator may have settled it meanwhile: then there is no turn to take.
                let gap = this.policy.load().resolve_after;
                let asked = this
                    .resolve(&store, &key, (&owner, &lookup), &parts, true, gap)
                    .await;
                let settled = match store.get(&key).await {
                    Ok(Some(record)) => record.state != State::Unknown || record.owner != owner,
                    Ok(None) => true,
                    Err(_) => false,
                };
                let for_good = matches!(
                    asked,
                    Asked::Found(_)
                        | Asked::Nothing
                        | Asked::Ambiguous(_)
                        | Asked::Unsupported(_)
                        | Asked::Refused(_)
                );
                if settled || for_good {
                    return;
                }
                pause *= 2;
            }
        });
    }

    /// An operator's `POST /keys/{key}/resolve`: asks PowerJob now about the unknown call on `key`, with the
    /// lookup its leader kept and the credentials of the operator's request (`X-POWERJOB-APP-ID` and
    /// `X-POWERJOB-ACCESS-TOKEN`, when the server checks them), and settles the key by the answer. Returns the
    /// admin's answer: its status and JSON body.
    pub async fn resolve_by_key(
        &self,
        key: &Key,
        operator: &http::HeaderMap,
    ) -> Result<(http::StatusCode, serde_json::Value), StoreError> {
        use http::StatusCode;
        use serde_json::json;
        let store = &self.store;
        let record = match store.get(key).await? {
            None => return Ok((StatusCode::NOT_FOUND, json!({"status": "no such key"}))),
            Some(record) if record.state != State::Unknown => {
                let status = format!(
                    "the key is {}, not unknown: nothing to resolve",
                    record.state.name()
                );
                return Ok((
                    StatusCode::CONFLICT,
                    json!({"status": status, "state": record.state.name()}),
                ));
            }
            Some(record) => record,
        };
        let kept = store.lookup(key).await?;
        let lookup = kept
            .filter(|(owner, _)| *owner == record.owner)
            .and_then(|(_, json)| serde_json::from_str::<resolve::Lookup>(&json).ok());
        let Some(lookup) = lookup else {
            let status = "no lookup is kept with this key (its leader's process ended before the outcome was \
                          recorded, or its route has none): a duplicate after resolve_after resolves it, or check \
                          the server and purge the key";
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, json!({"status": status})));
        };
        let mut parts = Request::new(()).into_parts().0;
        parts.uri = format!("{}{}/runJob", lookup.prefix, crate::powerjob::WEB_PATH)
            .parse()
            .unwrap_or_default();
        for name in [crate::powerjob::APP_ID, crate::powerjob::ACCESS_TOKEN] {
            for value in operator.get_all(name) {
                parts.headers.append(name, value.clone());
            }
        }
        // Before `resolve_after` the server may still create the instance: finding none then proves nothing.
        let after = self.policy.load().resolve_after.as_millis() as u64;
        let may_release = record.settled_ago_ms.is_some_and(|ago| ago >= after);
        let asked = self
            .resolve(
                store,
                key,
                (&record.owner, &lookup),
                &parts,
                may_release,
                Duration::ZERO,
            )
            .await;
        let state = match store.get(key).await {
            Ok(Some(record)) => record.state.name(),
            Ok(None) => "gone",
            Err(_) => "unread",
        };
        tracing::info!(key = key.prefix(), state, "admin: key resolution asked");
        Ok(match asked {
            Asked::Found(id) => (
                StatusCode::OK,
                json!({"result": "done", "instance": id, "state": state}),
            ),
            Asked::Nothing => (
                StatusCode::OK,
                json!({"result": "released", "state": state}),
            ),
            Asked::NothingYet => (
                StatusCode::OK,
                json!({"result": "nothing yet", "state": state}),
            ),
            Asked::Ambiguous(n) => (
                StatusCode::OK,
                json!({"result": "ambiguous", "matching": n, "state": state}),
            ),
            Asked::Unsupported(why) => (
                StatusCode::OK,
                json!({"result": "unsupported", "why": why, "state": state}),
            ),
            Asked::Refused((head, body)) => (
                StatusCode::FORBIDDEN,
                json!({"result": "refused", "server_status": head.status.as_u16(),
                       "server_body": String::from_utf8_lossy(&body), "state": state}),
            ),
            Asked::Failed(why) => (
                StatusCode::BAD_GATEWAY,
                json!({"result": "failed", "why": why, "state": state}),
            ),
            Asked::Elsewhere | Asked::Lately => (
                StatusCode::OK,
                json!({"result": "asked by another request", "state": state}),
            ),
        })
    }

    /// Asks PowerJob what the unknown call on `key` (its record created by `owner`) created, on behalf of the
    /// request whose head is `parts`, and settles the key by the answer: done with the one matching instance,
    /// released when there is none (only when `may_release`: the call turned unknown `resolve_after` ago, so
    /// the server can no longer create it), unknown otherwise. One request asks at a time, on every replica
    /// (the store's turn, [`Store::ask_turn`]); the others wait for its verdict up to `wait_timeout`. A turn
    /// that left the key unknown less than `gap` ago is not asked again.
    pub(super) async fn resolve(
        &self,
        store: &AnyStore,
        key: &Key,
        (owner, lookup): (&str, &resolve::Lookup),
        parts: &request::Parts,
        may_release: bool,
        gap: Duration,
    ) -> Asked {
        let deadline = tokio::time::Instant::now() + self.policy.load().wait_timeout;
        loop {
            match store.ask_turn(key, owner, resolve::ASK_LEASE, gap).await {
                Ok(Turn::Yours) => break,
                // Its verdict is on the key.
                Ok(Turn::Settled) => return Asked::Elsewhere,
                Ok(Turn::Asked) => return Asked::Lately,
                Ok(Turn::Busy) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Asked::Elsewhere;
                    }
                    store.changed(key, left.min(POLL)).await;
                }
                Err(err) => {
                    metrics::get().store_errors.inc();
                    return Asked::Failed(format!("cannot take the turn to ask: {err}"));
                }
            }
        }
        let asked = tokio::time::timeout(
            resolve::ASK_LEASE,
            self.ask_powerjob((store, key), parts, lookup, wall_ms(), &|_| false),
        )
        .await
        .unwrap_or_else(|_| Asked::Failed(format!("no verdict within {:?}", resolve::ASK_LEASE)));
        let asked = self.settle_by(store, key, owner, asked, may_release).await;
        if !matches!(asked, Asked::Found(_) | Asked::Nothing) {
            // Left unknown: the turn is free again, and the waiters read that.
            if let Err(err) = store.end_turn(key, owner).await {
                metrics::get().store_errors.inc();
                tracing::warn!(key = key.prefix(), %err, "the turn to ask was not given back; it ends with its lease");
            }
        }
        asked
    }

    /// Settles the unknown key by what PowerJob said (see [`Self::resolve`]); logs and counts it.
    async fn settle_by(
        &self,
        store: &AnyStore,
        key: &Key,
        owner: &str,
        asked: Asked,
        may_release: bool,
    ) -> Asked {
        let settle = |answer: Option<Stored>| async move {
            match store.resolve(key, owner, answer.as_ref()).await {
                Ok(settled) => settled,
                Err(err) => {
                    metrics::get().store_errors.inc();
                    tracing::warn!(key = key.prefix(), %err, "resolution not recorded; the key stays unknown");
                    false
                }
            }
        };
        let result = match &asked {
            Asked::Found(id) => {
                let (head, body) = resolve::resolved_answer(*id);
                let settled = settle(Some(Stored {
                    status: 200,
                    head,
                    body,
                }))
                .await;
                tracing::info!(
                    key = key.prefix(),
                    instance = id,
                    settled,
                    "PowerJob has the unknown call's instance: done"
                );
                metrics::Resolution::done
            }
            Asked::Nothing if !may_release => {
                tracing::info!(
                    key = key.prefix(),
                    "PowerJob has no instance of the unknown call yet; before resolve_after that proves nothing: it stays unknown"
                );
                return Asked::NothingYet;
            }
            Asked::Nothing => {
                let settled = settle(None).await;
                tracing::info!(
                    key = key.prefix(),
                    settled,
                    "PowerJob has no instance of the unknown call: released"
                );
                metrics::Resolution::released
            }
            Asked::Ambiguous(n) => {
                tracing::warn!(
                    key = key.prefix(),
                    matching = n,
                    "several instances match the unknown call: it stays unknown"
                );
                metrics::Resolution::ambiguous
            }
            Asked::Unsupported(why) => {
                tracing::info!(key = key.prefix(), %why, "the server cannot look up instances (queryInstance needs 5.1.1): the key stays unknown");
                metrics::Resolution::unsupported
            }
            Asked::Refused(_) => {
                tracing::info!(
                    key = key.prefix(),
                    "the server refused the asking request's token: nothing resolved"
                );
                metrics::Resolution::refused
            }
            Asked::Failed(why) => {
                tracing::warn!(key = key.prefix(), %why, "asking PowerJob failed: the key stays unknown");
                metrics::Resolution::failed
            }
            // Not asked here.
            Asked::Elsewhere | Asked::Lately | Asked::NothingYet => return asked,
        };
        metrics::get().resolution(result);
        asked
    }

    /// Pages through `queryInstance` for the instances that match `lookup`, created up to `until` (wall clock
    /// ms; widened by the clock skew), for the call on `key`. Left out: the ids `skip` names, and those the
    /// store noted as another key's answer ([`Store::note_instance`]).
    pub(super) async fn ask_powerjob(
        &self,
        (store, key): (&AnyStore, &Key),
        parts: &request::Parts,
        lookup: &resolve::Lookup,
        until: i64,
        skip: &(dyn Fn(i64) -> bool + Sync),
    ) -> Asked {
        let found = match self.matching_instances(parts, lookup, until, skip).await {
            Ok(found) => found,
            Err(asked) => return asked,
        };
        let mut ours = Vec::with_capacity(found.len());
        for id in found {
            match store.instance_key(id).await {
                Ok(Some(other)) if other != *key => {}
                Ok(_) => ours.push(id),
                Err(err) => {
                    metrics::get().store_errors.inc();
                    return Asked::Failed(format!("cannot tell whose instance {id} is: {err}"));
                }
            }
        }
        match ours[..] {
            [] => Asked::Nothing,
            [id] => Asked::Found(id),
            _ => Asked::Ambiguous(ours.len()),
        }
    }

    /// The ids of the instances that match `lookup` (see [`Self::ask_powerjob`]), or what ended the asking.
    async fn matching_instances(
        &self,
        parts: &request::Parts,
        lookup: &resolve::Lookup,
        until: i64,
        skip: &(dyn Fn(i64) -> bool + Sync),
    ) -> Result<Vec<i64>, Asked> {
        let now = until;
        let mut found = Vec::new();
        for index in 0..resolve::MAX_PAGES {
            let body = Bytes::from(lookup.query(now, index).to_string());
            let request = match auth::side_request(parts, "queryInstance", "application/json", body)
            {
                Ok(request) => request,
                Err(err) => return Err(Asked::Failed(format!("cannot build the query: {err}"))),
            };
            let bound = self.upstreams.response_timeout().min(auth::VERIFY_TIMEOUT);
            // No repair: the verdict on the token is the server's header as it came.
            let answer = tokio::time::timeout(
                bound,
                self.upstreams.exchange(request, Arm::default(), MAX_ANSWER),
            )
            .await
            .map(|answer| answer.map(|answer| (answer.parts, answer.body)));
            let (mut head, body) = match answer {
                Ok(Ok(answer)) => answer,
                Ok(Err(err)) => return Err(Asked::Failed(err.to_string())),
                Err(_) => return Err(Asked::Failed(format!("no answer within {bound:?}"))),
            };
            if head.status == http::StatusCode::OK && !auth::accepted(&head) {
                headers::remove_hop_by_hop(&mut head.headers);
                return Err(Asked::Refused((head, body)));
            }
            if head.status != http::StatusCode::OK {
                return Err(Asked::Failed(format!("HTTP {}", head.status.as_u16())));
            }
            match resolve::read_page(lookup, &body, index, now) {
                resolve::Page::Found { ids, more } => {
                    found.extend(ids.into_iter().filter(|id| !skip(*id)));
                    // Each candidate is checked against the store: a few at most are worth it.
                    if found.len() > MAX_CANDIDATES {
                        return Err(Asked::Ambiguous(found.len()));
                    }
                    if !more {
                        return Ok(found);
                    }
                }
                resolve::Page::Unsupported(why) => return Err(Asked::Unsupported(why)),
                // A 200 that is not a page: the server (or what answers in its place) has no such query.
                resolve::Page::Malformed => {
                    return Err(Asked::Unsupported(
                        "the answer is not a page of instances".into(),
                    ))
                }
            }
        }
        Err(Asked::Failed(format!(
            "more than {} pages of instances in the call's window",
            resolve::MAX_PAGES
        )))
    }

    /// [`Self::call_upstream`], also returning the answer's head as it came (for storing). The whole call
    /// (connecting, the answer's head, its body) is bounded by one `upstream_timeout`, so that a duplicate
    /// waiting `wait_timeout` (never shorter, see `config.rs`) sees its end.
    /// The leader's call, sent, unless the store lost its records lately and PowerJob holds the instance a
    /// forgotten copy of it created ([`Self::recall`]).
    pub(super) async fn send_unless_recalled(
        &self,
        store: &AnyStore,
        call: &Call,
        parts: request::Parts,
        body: Bytes,
    ) -> Result<(Led, Option<Bytes>), ProxyError> {
        match self.recall(store, call).await {
            Some(recalled) => recalled,
            None => self.call_upstream_capturing(parts, body, call.repair).await,
        }
    }

    /// When the store lost its records, while the quarantine lasts (the route's `window` from the loss) on
    /// a route with a lookup; `None` otherwise (the usual case: a bool, a field and the clock).
    ///
    /// The route's `window`, not the key's: PowerJob keeps no `Idempotency-Key`, so it cannot tell a retry
    /// from another key's call with the same parameters. Looking back a day for keyed calls would take a
    /// job's every run of the day for the forgotten one; a minute catches the retries that follow a loss.
    pub(super) fn quarantined_since(&self, store: &AnyStore, call: &Call) -> Option<i64> {
        if !self.quarantine || !call.route.resolve {
            return None;
        }
        let lost = store.lost_at()?;
        (wall_ms() - lost < call.route.window.as_millis() as i64).then_some(lost)
    }

    /// The quarantine (`store::epoch`): within the route's window after the store lost its records, a new
    /// leader on a route with a lookup asks PowerJob for an instance of this call created within that window
    /// before the loss (and not by this process's leaders since). One → the answer PowerJob gave the forgotten copy, rebuilt (`X-Runonce-Resolved`);
    /// several → not sent (the key turns unknown, as a resolution leaves it). `None`: send the call (nothing
    /// found, outside a quarantine, or PowerJob cannot tell).
    pub(super) async fn recall(
        &self,
        store: &AnyStore,
        call: &Call,
    ) -> Option<Result<(Led, Option<Bytes>), ProxyError>> {
        let lost = self.quarantined_since(store, call)?;
        let now = wall_ms();
        let window = call.route.window.as_millis() as i64;
        if self.cannot_look_up.load(Ordering::Relaxed) == lost {
            return None;
        }
        if !self.handed_out.complete(lost) {
            tracing::warn!("quarantine: too many instances created right after the loss to tell them apart; calls are sent unchecked");
            return None;
        }
        // A forgotten copy was sent within the window before this call, and before the loss.
        let lookup = Self::lookup_of(call, now - window)?;
        let key = call.key.prefix();
        // Instances this process's leaders created after the loss are their keys'.
        let theirs = |id: i64| self.handed_out.contains(lost, id);
        let asked = self
            .ask_powerjob(
                (store, &call.key),
                &call.parts,
                &lookup,
                lost.min(now),
                &theirs,
            )
            .await;
        let (result, recalled) = match asked {
            Asked::Found(id) => {
                tracing::info!(key, instance = id, "quarantine: PowerJob has this call's instance from before the store's loss; answering with it, not sending");
                let (head, body) = resolve::resolved_answer(id);
                let answer = match self.heads.replayed(&head).await {
                    Ok(parts) => Ok((
                        Led {
                            parts,
                            body,
                            completion: None,
                        },
                        Some(head),
                    )),
                    Err(err) => Err(ProxyError::Internal {
                        cause: format!("the resolved answer's head does not parse: {err}"),
                    }),
                };
                (QuarantineCheck::found, Some(answer))
            }
            Asked::Nothing => (QuarantineCheck::none, None),
            Asked::Ambiguous(n) => {
                tracing::warn!(key, matching = n, "quarantine: several instances match this call and the store forgot which was its: not sent, the key is unknown");
                let unknown = ProxyError::OutcomeUnknown {
                    retry_after: call.info.window,
                };
                (QuarantineCheck::ambiguous, Some(Err(unknown)))
            }
            Asked::Unsupported(why) => {
                tracing::warn!(%why, "quarantine: the server cannot look instances up (queryInstance needs 5.1.1); calls are sent unchecked until the next loss");
                self.cannot_look_up.store(lost, Ordering::Relaxed);
                (QuarantineCheck::unsupported, None)
            }
            Asked::Refused((parts, body)) => {
                let led = Led {
                    parts,
                    body,
                    completion: None,
                };
                (QuarantineCheck::refused, Some(Ok((led, None))))
            }
            Asked::Failed(why) => {
                tracing::warn!(key, %why, "quarantine: asking PowerJob failed; the call is sent");
                (QuarantineCheck::failed, None)
            }
            // Only a resolution shares its turn.
            Asked::Elsewhere | Asked::Lately | Asked::NothingYet => return None,
        };
        metrics::get().quarantine_check(result);
        recalled
    }
}

/// Most matching instances checked against the store's notes ([`Guard::ask_powerjob`]); more is ambiguous.
const MAX_CANDIDATES: usize = 16;

/// What asking PowerJob about an unknown call gave (see [`resolve`]).
pub(super) enum Asked {
    /// One matching instance: the call created it.
    Found(i64),
    /// None: nothing was created.
    Nothing,
    /// Several: cannot tell which is the call's.
    Ambiguous(usize),
    /// The server cannot answer the lookup (a 5.1.0 server cannot bind queryInstance's body).
    Unsupported(String),
    /// The server refused the asking request's credentials: its answer, for that caller.
    Refused((response::Parts, Bytes)),
    /// No usable answer.
    Failed(String),
    /// Another request asked meanwhile (on any replica), or still asks at the waiter's deadline; what it found
    /// is on the key.
    Elsewhere,
    /// The last request to ask left the key unknown a moment ago (less than `resolve_after`): not asked again.
    Lately,
    /// None, asked before `resolve_after`: the server may still create it, so the key stays unknown.
    NothingYet,
}
