//! echo-client: finds healthy echo servers through Consul and fails over without losing a
//! message.
