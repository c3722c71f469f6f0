//! (in progress)
use std::time::Duration;

use super::{Claim, ClaimInfo, Key, Record, Store, StoreError, Stored};

#[derive(Clone)]
pub struct RedisStore;

impl RedisStore {
    pub async fn connect(_url: &str, _op_timeout: Duration) -> Result<RedisStore, StoreError> {
        Err(StoreError {
            op: "connect",
            cause: "not built yet".into(),
        })
    }
}

impl Store for RedisStore {
    async fn claim(&self, _: &Key, _: &ClaimInfo) -> Result<Claim, StoreError> {
        todo!()
    }
    async fn takeover(&self, _: &Key, _: &str, _: &ClaimInfo) -> Result<Claim, StoreError> {
        todo!()
    }
    async fn renew(&self, _: &Key, _: &str, _: Duration) -> Result<bool, StoreError> {
        todo!()
    }
    async fn complete(
        &self,
        _: &Key,
        _: &str,
        _: &Stored,
        _: Duration,
    ) -> Result<bool, StoreError> {
        todo!()
    }
    async fn release(&self, _: &Key, _: &str) -> Result<bool, StoreError> {
        todo!()
    }
    async fn mark_unknown(&self, _: &Key, _: &str, _: Duration) -> Result<bool, StoreError> {
        todo!()
    }
    async fn mark_delivered(&self, _: &Key, _: &str) -> Result<bool, StoreError> {
        todo!()
    }
    async fn get(&self, _: &Key) -> Result<Option<Record>, StoreError> {
        todo!()
    }
    async fn purge(&self, _: &Key) -> Result<bool, StoreError> {
        todo!()
    }
    async fn changed(&self, _: &Key, _: Duration) {
        todo!()
    }
}
