//! A gRPC service run the way the framework expects any service to run, and its client.
//!
//! * [`hello`] — the `hello.Greeter/SayHello` RPC: messages derived with prost and the
//!   server and client halves written by hand (no protoc, no build script);
//! * [`service`] — [`service::run`]: serve `hello.Greeter` next to the standard
//!   `grpc.health.v1.Health` service (tonic-health), register in Consul with a gRPC check
//!   that asks for `hello.Greeter`'s status, and on shutdown go `NOT_SERVING`, deregister,
//!   linger while clients' views catch up, stop accepting and drain;
//! * [`client`] — [`client::Greeter`]: a tonic client balancing over the service's passing
//!   instances through the registry's tower stack (discovery → pool → passive ejection →
//!   one tonic `Channel` per address), resending a failed call on another pick until a
//!   deadline.

pub mod client;
pub mod hello;
pub mod service;
