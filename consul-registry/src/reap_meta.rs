//! The two Meta keys a registration opts in to the reaper sidecar (`consul-reaper`) with, and
//! [`opt_in`], which sets them. The registry itself needs them for one thing: each start of a
//! [`Registrar`](crate::Registrar) gives an opted-in registration a new [`START_KEY`] value.
//! The reaper (its rules, its state machine and its driver) lives in `consul-reaper`.

use std::time::Duration;

use consul_api::{AgentServiceRegistration, GoDuration};

/// The Meta key a service opts in with: how long its check may stay critical, a Go duration.
pub const META_KEY: &str = "reap-after";

/// The Meta key that tells one start of a service's process from another: a value of its own
/// to each start ([`opt_in`] sets it). A new one starts the reaper's clock over.
pub const START_KEY: &str = "reap-start";

/// Opt `registration` in: the reaper removes it once its check has been critical for `after`.
/// Also gives it a new [`START_KEY`] value: call it (or register through a
/// [`Registrar`](crate::Registrar), which does the same) once per start of the process.
pub fn opt_in(registration: &mut AgentServiceRegistration, after: Duration) {
    registration
        .meta
        .insert(META_KEY.to_owned(), GoDuration(after).to_string());
    restart(registration);
}

/// A new [`START_KEY`] value for a registration that opted in (with [`META_KEY`]); others are
/// left as they are.
pub(crate) fn restart(registration: &mut AgentServiceRegistration) {
    if registration.meta.contains_key(META_KEY) {
        let start = format!("{:016x}", rand::random::<u64>());
        registration.meta.insert(START_KEY.to_owned(), start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opt_in_sets_the_meta_key() {
        let mut registration = AgentServiceRegistration {
            name: "web".into(),
            ..Default::default()
        };
        opt_in(&mut registration, Duration::from_millis(1500));
        assert_eq!(
            registration.meta.get(META_KEY).map(String::as_str),
            Some("1.5s")
        );
        // A start value of its own to each start.
        let first = registration.meta.get(START_KEY).cloned();
        assert!(first.as_ref().is_some_and(|s| s.len() == 16), "{first:?}");
        restart(&mut registration);
        assert_ne!(registration.meta.get(START_KEY), first.as_ref());
        let mut plain = AgentServiceRegistration::default();
        restart(&mut plain);
        assert!(plain.meta.is_empty(), "not opted in: left alone");
    }
}
