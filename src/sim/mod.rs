//! The simulator: not the product. A PowerJob-compatible server ([`mock`], `runonce mock-powerjob`) and the
//! 5.1.0 client's `runJob` ([`client`]), for the demo, the tests and the benchmark. Both speak HTTP/1.1
//! through [`crate::rawhttp`]; nothing on the proxy's request path uses them.

pub mod client;
pub mod mock;
