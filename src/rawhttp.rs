//! (being extracted from powerjob/client.rs)
