//! A leader's side: the call sent upstream (unless the quarantine recalls it) with its lease renewed, its
//! outcome classified and recorded, and the whole upstream call bounded by one `upstream_timeout`.

use super::*;

impl Guard {
    /// Runs the call as the leader. It already runs in the guarded request's own task (see [`Self::handle`]),
    /// so the call finishes and its outcome is recorded whatever happens to the client.
    pub(super) async fn lead(
        self: &Arc<Self>,
        store: &AnyStore,
        call: &Call,
        token: String,
        seen: &mut Seen,
    ) -> Result<Response<Answer>, ProxyError> {
        seen.led = true;
        let metrics = metrics::get();
        metrics.inflight_keys.inc();
        // Registered before the call: a duplicate in this process joins it from now on.
        let flight = self.flights.lead(&call.key, &token, &call.info);
        let (outcome, led) = self.lead_call(store, call, &token, &flight, seen).await;
        metrics.inflight_keys.dec();
        seen.outcome = Some(outcome);
        let led = led?;
        let body = Answer::new(led.body);
        let body = match led.completion {
            Some(completion) => body
                .record_delivery(completion.handed_out(call.delivery.clone(), self.delivery_grace)),
            None => body,
        };
        Ok(Response::from_parts(led.parts, body))
    }

    /// The upstream call with its lease renewed, then the outcome recorded; returns the outcome too.
    pub(super) async fn lead_call(
        self: &Arc<Self>,
        store: &AnyStore,
        call: &Call,
        token: &str,
        flight: &Arc<Flight>,
        seen: &mut Seen,
    ) -> ((metrics::Outcome, Reason), Result<Led, ProxyError>) {
        let metrics = metrics::get();
        let key = &call.key;
        // `Parts` clones with its extensions: hyper's record of the client's header-name case goes upstream too.
        let (parts, body) = (call.parts.clone(), call.body.clone());
        let renew = async {
            // The first tick one period from now: `interval`'s immediate first tick would register a timer
            // due at once, and tokio wakes its own driver (an eventfd write) for every timer due before the
            // one it sleeps until, on each guarded call.
            let period = self.lease / 3;
            let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                every.tick().await;
                match store.renew(key, token, self.lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            key = key.prefix(),
                            "lease lost while the call runs; its outcome will not be stored"
                        );
                        break;
                    }
                    Err(err) => {
                        metrics.store_errors.inc();
                        tracing::warn!(key = key.prefix(), %err, "lease renewal failed");
                    }
                }
            }
            std::future::pending::<()>().await;
        };
        let started = Instant::now();
        let sent_from = wall_ms();
        let led = tokio::select! {
            led = self.send_unless_recalled(store, call, parts, body) => led,
            () = renew => unreachable!("renewal never ends"),
            // The request may have reached the server: the key turns unknown below, never re-sent.
            () = self.cut_off.cancelled() => Err(ProxyError::ShuttingDown),
        };
        let took = started.elapsed();
        seen.upstream = Some(took);
        metrics.upstream_guarded(&call.route.name, took);
        let keep_business_errors = self.policy.load().keep_business_errors;
        // Where a verdict is recorded: the key, kept for the call's window.
        let at = (key, call.info.window);
        let (outcome, answer, shared) = match &led {
            Ok((led, head)) => {
                let outcome = outcome::classify(
                    led.parts.status.as_u16(),
                    &led.parts.headers,
                    &led.body,
                    keep_business_errors,
                );
                let answer = Stored {
                    status: led.parts.status.as_u16(),
                    head: head.clone().unwrap_or_else(|| render_head(&led.parts)),
                    body: led.body.clone(),
                };
                (outcome, Some(answer.clone()), Shared::Answer(answer))
            }
            // Never sent: nothing was created (`ProxyError::sent`, the one rule).
            Err(err) if !err.sent() => (
                Outcome::Release(Reason::not_sent),
                None,
                Shared::Error(err.clone()),
            ),
            // It may have reached the server.
            Err(err) => (
                Outcome::Unknown(Reason::no_answer),
                None,
                Shared::Error(err.clone()),
            ),
        };
        // The duplicates in this process have their answer now, before the store write.
        flight.settle(shared, matches!(outcome, Outcome::Done(_)));
        let reason = outcome.reason();
        let linger = self.policy.load().wait_timeout;
        let (counted, change) = match outcome {
            Outcome::Done(_) => {
                if let (Some(lost), Some(stored)) = (self.quarantined_since(store, call), &answer) {
                    self.handed_out.note(lost, wall_ms(), &stored.body);
                }
                // Stored with its delivery in one write, when the client's connection takes the answer
                // (see `Completion`): the usual call then costs the store two operations, not three.
                let mut led = led;
                if let (Ok((led, _)), Some(stored)) = (&mut led, answer) {
                    // Two keys can name the same payload only when a client keys it: such a call's instance
                    // is noted as its key's, so that the other key's resolution leaves it out.
                    let instance = (call.client_keyed && call.route.resolve)
                        .then(|| resolve::instance_id(&stored.body))
                        .flatten();
                    led.completion = Some(Completion {
                        write: Some(Write {
                            guard: Arc::clone(self),
                            store: store.clone(),
                            key: key.clone(),
                            window: call.info.window,
                            stored,
                            instance,
                            flight: Arc::clone(flight),
                        }),
                        delivered: false,
                        _pending: self.tracker.token(),
                    });
                }
                return ((metrics::Outcome::done, reason), led.map(|(led, _)| led));
            }
            Outcome::Release(why) => {
                tracing::debug!(key = key.prefix(), why = why.as_str(), "released");
                let verdict = Verdict::Release {
                    answer: answer.clone(),
                };
                (
                    metrics::Outcome::released,
                    self.record(store, at, token, verdict).await,
                )
            }
            Outcome::Unknown(why) => {
                if let Err(err) = &led {
                    tracing::warn!(key = key.prefix(), %err, why = why.as_str(), "outcome unknown: the key is kept and never re-sent");
                } else {
                    tracing::warn!(
                        key = key.prefix(),
                        why = why.as_str(),
                        "outcome unknown: the key is kept and never re-sent"
                    );
                }
                let verdict = Verdict::Unknown {
                    answer: answer.clone(),
                };
                (
                    metrics::Outcome::unknown,
                    self.record(store, at, token, verdict).await,
                )
            }
        };
        let landed = matches!(change, Ok(true));
        self.flights.finished(key, flight, landed, linger);
        if landed && counted == metrics::Outcome::unknown && call.route.resolve {
            self.resolve_later(store, call, token, sent_from);
        }
        note_change(key, change);
        ((counted, reason), led.map(|(led, _)| led))
    }

    /// Sends a buffered request upstream and reads the whole answer.
    pub(super) async fn call_upstream(
        &self,
        parts: request::Parts,
        body: Bytes,
        repair: bool,
    ) -> Result<Led, ProxyError> {
        self.call_upstream_capturing(parts, body, repair)
            .await
            .map(|(led, _)| led)
    }

    /// The server requests go to first (the one that answered last): named in the errors of a call that
    /// reached it. Read only on a failure.
    pub(super) fn current_upstream(&self) -> String {
        self.upstreams.current()
    }

    pub(super) async fn call_upstream_capturing(
        &self,
        parts: request::Parts,
        body: Bytes,
        repair: bool,
    ) -> Result<(Led, Option<Bytes>), ProxyError> {
        let timeout = self.upstreams.response_timeout();
        tokio::time::timeout(timeout, self.call_upstream_unbounded(parts, body, repair))
            .await
            .unwrap_or_else(|_| {
                Err(ProxyError::Timeout {
                    upstream: self.current_upstream(),
                    timeout,
                })
            })
    }

    pub(super) async fn call_upstream_unbounded(
        &self,
        parts: request::Parts,
        body: Bytes,
        repair: bool,
    ) -> Result<(Led, Option<Bytes>), ProxyError> {
        let arm = Arm {
            repair,
            capture: true,
        };
        let request = Request::from_parts(parts, body);
        let Exchanged {
            mut parts,
            body,
            head,
        } = self.upstreams.exchange(request, arm, MAX_ANSWER).await?;
        headers::remove_hop_by_hop(&mut parts.headers);
        Ok((
            Led {
                parts,
                body,
                completion: None,
            },
            head,
        ))
    }
}
