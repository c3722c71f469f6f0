//! (in progress)
pub mod error;
pub mod headers;
pub mod tap;
pub mod upstream;
