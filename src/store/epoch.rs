//! Has the store lost its records? (issue "PowerJob decides", item 4.)
//!
//! A store that forgets (Redis flushed, restarted without persistence or with the last second of its append
//! log lost, a replica promoted without the newest claims; a memory store that just started) turns the next
//! retry of a call it already sent into a second instance. runonce cannot get the records back, but it can
//! notice the loss, and for one window after it ask PowerJob before sending (the quarantine, `guard`).
//!
//! On Redis, a watcher compares each master, once a second, with what it saw before:
//! - an epoch marker (`runonce:epoch:{n}`, one per master, set if missing (`SET NX`), never expiring): gone or
//!   different means the keys went (FLUSHALL, a restart without persistence);
//! - the run id (`INFO server`): a restart, after which writes since the last fsync may be missing;
//! - the replication id (`INFO replication`): a replica took over, perhaps without the newest claims.
//!
//! A marker written by this process's first check counts as a loss too: a new or emptied Redis looks the same.
//! Nothing here is on the request path: the engine reads one atomic.

use std::sync::atomic::{AtomicI64, Ordering};

/// When the store was last found to have lost its records (wall clock ms), shared by the store and its watcher.
#[derive(Debug, Default)]
pub struct Losses {
    /// 0: never.
    last_ms: AtomicI64,
}

impl Losses {
    /// A loss found now: counted, logged, and the start of a quarantine.
    pub fn found(&self, why: &str) {
        let now = wall_ms();
        self.last_ms.store(now, Ordering::Release);
        crate::metrics::get().store_losses.inc();
        tracing::warn!(
            %why,
            "the store lost its records: for one window, a new runJob leader asks PowerJob before sending (quarantine)"
        );
    }

    /// When the last loss was found (wall clock ms), if ever.
    pub fn last(&self) -> Option<i64> {
        match self.last_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(ms),
        }
    }
}

/// What one Redis master showed at one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marks {
    /// The epoch marker's value.
    pub epoch: String,
    /// Whether this check wrote the marker (it was missing).
    pub written: bool,
    pub run_id: String,
    pub replication_id: String,
}

/// Why `now` shows that the master lost records since `before` (its previous check), if it does.
pub fn lost(before: Option<&Marks>, now: &Marks) -> Option<&'static str> {
    let Some(before) = before else {
        return now
            .written
            .then_some("no epoch marker on Redis: a new Redis, or one that lost its keys");
    };
    if now.written || now.epoch != before.epoch {
        Some("the epoch marker vanished: Redis was flushed or restarted without its data")
    } else if now.run_id != before.run_id {
        Some("Redis restarted (its run id changed): writes since its last fsync may be gone")
    } else if now.replication_id != before.replication_id {
        Some("another Redis took over (the replication id changed): it may lack the newest claims")
    } else {
        None
    }
}

/// The value of `field` in an `INFO` answer (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name == field).then(|| value.trim())
    })
}

/// A Redis Cluster master, as `CLUSTER NODES` shows it.
#[derive(Debug, PartialEq, Eq)]
pub struct Master {
    pub host: String,
    pub port: u16,
    /// The slot ranges it serves, inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// The Cluster's masters that are not failing, from a `CLUSTER NODES` answer.
pub fn masters(nodes: &str) -> Vec<Master> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let address = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            // Slots from the ninth field on: `0-5460` or `5461`; `[…]` are slots being migrated.
            let slots = fields
                .iter()
                .skip(8)
                .filter(|f| !f.starts_with('['))
                .filter_map(|range| match range.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => range.parse().ok().map(|s| (s, s)),
                })
                .collect();
            Some(Master {
                host: host.to_string(),
                port: port.parse().ok()?,
                slots,
            })
        })
        .collect()
}

/// The epoch marker's name on a master that serves `slots`: the first `runonce:epoch:{n}` hashed into one of
/// them (16,384 names cover every slot).
pub fn marker_for(slots: &[(u16, u16)]) -> Option<String> {
    (0..16_384 * 8).find_map(|n| {
        let tag = n.to_string();
        let slot = hash_slot(tag.as_bytes());
        slots
            .iter()
            .any(|&(a, b)| (a..=b).contains(&slot))
            .then(|| format!("runonce:epoch:{{{tag}}}"))
    })
}

/// The marker on a standalone Redis.
pub const MARKER: &str = "runonce:epoch:{0}";

/// Redis Cluster's hash slot of a hash tag: CRC16 (XMODEM) mod 16384.
fn hash_slot(tag: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in tag {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(epoch: &str, written: bool, run_id: &str, replication_id: &str) -> Marks {
        Marks {
            epoch: epoch.into(),
            written,
            run_id: run_id.into(),
            replication_id: replication_id.into(),
        }
    }

    #[test]
    fn a_first_check_is_a_loss_only_when_it_wrote_the_marker() {
        assert!(lost(None, &marks("e1", true, "r1", "p1")).is_some());
        assert!(lost(None, &marks("e1", false, "r1", "p1")).is_none());
    }

    #[test]
    fn each_mark_that_changed_is_a_loss() {
        let before = marks("e1", false, "r1", "p1");
        assert_eq!(lost(Some(&before), &before), None);
        let flushed = lost(Some(&before), &marks("e2", true, "r1", "p1"));
        assert!(flushed.unwrap().contains("flushed"));
        // Another replica rewrote the marker after a flush: a different value.
        assert!(lost(Some(&before), &marks("e2", false, "r1", "p1")).is_some());
        let restarted = lost(Some(&before), &marks("e1", false, "r2", "p1"));
        assert!(restarted.unwrap().contains("run id"));
        let promoted = lost(Some(&before), &marks("e1", false, "r1", "p2"));
        assert!(promoted.unwrap().contains("replication id"));
    }

    #[test]
    fn info_fields_are_read_by_name() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n# Replication\r\nrole:master\r\nmaster_replid:def456\r\nmaster_replid2:000\r\n";
        assert_eq!(info_field(info, "run_id"), Some("abc123"));
        assert_eq!(info_field(info, "master_replid"), Some("def456"));
        assert_eq!(info_field(info, "master_repl"), None);
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Known values (redis.io, "Cluster specification"; `CLUSTER KEYSLOT`).
        assert_eq!(hash_slot(b"123456789"), 0x31C3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"bar"), 5061);
    }

    #[test]
    fn every_master_gets_a_marker_in_its_own_slots() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001,host master - 0 0 2 connected 5461-10922 [5462->-a1]
c3 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16383
d4 127.0.0.1:7003@17003 slave a1 0 0 1 connected
e5 127.0.0.1:7004@17004 master,fail - 0 0 4 disconnected
";
        let masters = masters(nodes);
        assert_eq!(masters.len(), 3);
        assert_eq!(
            masters[1],
            Master {
                host: "127.0.0.1".into(),
                port: 7001,
                slots: vec![(5461, 10922)]
            }
        );
        for Master { slots, .. } in &masters {
            let marker = marker_for(slots).unwrap();
            let tag = marker
                .trim_start_matches("runonce:epoch:{")
                .trim_end_matches('}');
            let slot = hash_slot(tag.as_bytes());
            assert!(slots.iter().any(|&(a, b)| (a..=b).contains(&slot)));
        }
        assert_eq!(marker_for(&[]), None);
    }
}
