//! The HTTP/1.1 contract, in one place (issue "One HTTP/1 codec"). Both of runonce's own HTTP/1.1 readers, the
//! fast lane (`proxy::lane`) and the simulator's client ([`crate::rawhttp`]), take their framing decisions
//! from here; hyper's path makes the same ones inside hyper, and the tests hold the paths to the same bytes.
//!
//! [`head`], a head as it came (one buffer, names as sent, ranges); [`framing`], how a message's body is
//! delimited (RFC 9112 §6.3); [`chunked`], the one chunked decoder; and [`write`], the head lines for the next
//! hop, with the framing fields written from the framing decision, never copied. Every head runonce reads
//! itself goes through [`head`]: the lane's requests and answers, the tap's answers, [`crate::rawhttp`]'s.
//! `tests/http1_differential.rs` (and the `http1_response` fuzz target) hold the codec to hyper's reading.

pub mod chunked;
pub mod framing;
pub mod head;
pub mod write;
