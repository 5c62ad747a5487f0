//! The decisions webhook_outbox makes, kept free of PostgreSQL and of I/O so that plain
//! `cargo test` covers them: how requests are signed, which input is acceptable, and when a
//! failed delivery is tried again.

pub mod ids;
pub mod outcome;
pub mod pace;
pub mod retry;
pub mod signing;
pub mod ssrf;
pub mod validate;
