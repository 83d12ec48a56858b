//! echo-server: a TCP echo service that registers itself with the local Consul agent.
//!
//! * [`codec`] — the newline-delimited wire format, shared with echo-client.

pub mod codec;
