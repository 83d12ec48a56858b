//! Live settings from a Consul KV key (`--config-key`): the frame limit, the idle timeout,
//! the connection cap, maintenance mode and the log level change without a restart.
//!
//! The key holds JSON; every field is optional, and a missing one (or a missing key) means
//! the value the server was started with:
//!
//! ```json
//! {"max_frame": 1024, "idle_timeout": "30s", "max_connections": 100,
//!  "maintenance": true, "log_level": "debug"}
//! ```
//!
//! * `max_frame` and `idle_timeout` apply to connections accepted from then on; open
//!   connections keep the values they started with.
//! * `max_connections` grows the cap at once; a smaller cap takes the free slots at once and
//!   the others as their connections close.
//! * `maintenance` puts the service in Consul's maintenance mode (or takes it out).
//! * `log_level` is a tracing filter (`info`, `echo_server=debug,info`); it can change only
//!   where the process's logging was built reloadable (the `echo-server` binary's is).
//!
//! What cannot change while the server runs (its ports, name, ID, address, check settings)
//! is rejected with a message that says so, as is an unknown field: consul-registry's
//! `config` keeps the settings in force and logs the rejection with the key and the index.
//! The index of the settings in force is logged with each change and is the second line of
//! `/check`'s body.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use consul_api::GoDuration;
use consul_registry::{
    Health, Registrar,
    config::{Live, Status},
};
use serde::Deserialize;
use tokio::sync::{Semaphore, watch};

use crate::config::Config;

/// Sets the process's log filter (tracing's `EnvFilter` syntax). Cheap to clone.
#[derive(Clone)]
pub struct LogLevel {
    set: Arc<SetLevel>,
    /// The filter the process started with: back in force when the key says nothing.
    initial: Arc<str>,
}

/// What a [`LogLevel`] calls.
type SetLevel = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl LogLevel {
    /// A setter that calls `set`, for a process whose filter is `initial` now.
    pub fn new(
        initial: impl Into<String>,
        set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        LogLevel {
            set: Arc::new(set),
            initial: Arc::from(initial.into()),
        }
    }

    /// Set the filter to `directives`; `Err` says why not.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        (self.set)(directives)
    }

    /// The filter the process started with.
    pub fn initial(&self) -> &str {
        &self.initial
    }
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogLevel")
    }
}

/// The settings that may change while the server runs, as the KV key holds them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LiveSettings {
    /// Largest frame, in bytes, for new connections.
    pub max_frame: Option<usize>,
    /// Idle timeout of new connections (`30s`, `5m`).
    pub idle_timeout: Option<GoDuration>,
    /// Connections served at once.
    pub max_connections: Option<usize>,
    /// Consul's maintenance mode for this service.
    pub maintenance: Option<bool>,
    /// The log filter (`info`, `echo_server=debug,info`).
    pub log_level: Option<String>,
    /// Every other field: refused (see [`validate`]).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Settings that only a restart changes, with the flag that sets them.
const RESTART_ONLY: &[(&str, &str)] = &[
    ("name", "--name"),
    ("id", "--id"),
    ("port", "--port"),
    ("check_port", "--check-port"),
    ("check_path", "--check-path"),
    ("address", "--address"),
    ("bind", "--bind"),
    ("tags", "--tag"),
    ("interval", "--interval"),
    ("timeout", "--timeout"),
    ("deregister_after", "--deregister-after"),
    ("reap_after", "--reap-after"),
    ("drain_timeout", "--drain-timeout"),
];

/// The check every change passes before it is applied: values that cannot work, settings
/// that cannot change live, unknown fields, a log level this process cannot set.
pub fn validate(
    settings: &LiveSettings,
    registered: bool,
    log_level: Option<&LogLevel>,
) -> Result<(), String> {
    if let Some((field, value)) = settings.other.iter().next() {
        return Err(match RESTART_ONLY.iter().find(|(name, _)| name == field) {
            Some((_, flag)) => format!(
                "{field} = {value} cannot change while the server runs: restart it with {flag}"
            ),
            None => format!(
                "unknown setting {field:?}: the live settings are max_frame, idle_timeout, \
                 max_connections, maintenance and log_level"
            ),
        });
    }
    if settings.max_frame == Some(0) {
        return Err("max_frame must be at least 1 byte".into());
    }
    if let Some(n) = settings.max_connections
        && (n == 0 || n > Semaphore::MAX_PERMITS)
    {
        return Err(format!(
            "max_connections must be between 1 and {}",
            Semaphore::MAX_PERMITS
        ));
    }
    if settings
        .idle_timeout
        .is_some_and(|d| d.as_duration().is_zero())
    {
        return Err("idle_timeout must be above 0".into());
    }
    if settings.maintenance == Some(true) && !registered {
        return Err("maintenance needs the service registered (--no-register is set)".into());
    }
    if let Some(level) = &settings.log_level {
        tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| format!("log_level {level:?} is not a log filter: {e}"))?;
        if log_level.is_none() {
            return Err(
                "log_level cannot change in this process: its logging is not reloadable".into(),
            );
        }
    }
    Ok(())
}

/// What a new connection is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunables {
    /// Largest frame, in bytes.
    pub max_frame: usize,
    /// Idle timeout.
    pub idle_timeout: Duration,
}

/// The connection cap: a semaphore whose size can change.
#[derive(Debug)]
pub(crate) struct Cap {
    semaphore: Arc<Semaphore>,
    size: Mutex<usize>,
}

impl Cap {
    pub(crate) fn new(size: usize) -> Self {
        Cap {
            semaphore: Arc::new(Semaphore::new(size)),
            size: Mutex::new(size),
        }
    }

    /// The semaphore a connection takes a slot of.
    pub(crate) fn semaphore(&self) -> &Arc<Semaphore> {
        &self.semaphore
    }

    /// The cap now.
    pub(crate) fn size(&self) -> usize {
        self.size.lock().map_or(0, |size| *size)
    }

    /// Connections open now (approximately, while a smaller cap waits for slots).
    pub(crate) fn open(&self) -> usize {
        self.size()
            .saturating_sub(self.semaphore.available_permits())
    }

    /// A new cap: more slots at once; fewer, the free ones at once and the rest as their
    /// connections close.
    pub(crate) fn resize(&self, new: usize) {
        let Ok(mut size) = self.size.lock() else {
            return;
        };
        if new > *size {
            self.semaphore.add_permits(new - *size);
        } else if new < *size {
            let fewer = *size - new;
            let rest = fewer - self.semaphore.forget_permits(fewer);
            if rest > 0 {
                let semaphore = self.semaphore.clone();
                let rest = u32::try_from(rest).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(taken) = semaphore.acquire_many_owned(rest).await {
                        taken.forget();
                    }
                });
            }
        }
        *size = new;
    }
}

/// Where live settings go.
pub(crate) struct Targets {
    pub(crate) key: String,
    pub(crate) startup: Config,
    pub(crate) tunables: watch::Sender<Tunables>,
    pub(crate) cap: Arc<Cap>,
    pub(crate) health: Health,
    pub(crate) registrar: Option<Registrar>,
    pub(crate) log_level: Option<LogLevel>,
}

/// Apply each configuration `settings` publishes until it closes: the tunables for new
/// connections, the cap, maintenance, the log level, and the index in `/check`'s body.
pub(crate) async fn apply(mut settings: watch::Receiver<Live<LiveSettings>>, targets: Targets) {
    let mut in_force = InForce {
        maintenance: false,
        log_level: targets.log_level.as_ref().map(|l| l.initial().to_owned()),
    };
    let mut applied: Option<Arc<LiveSettings>> = None;
    loop {
        let live = settings.borrow_and_update().clone();
        let status = match &live.status {
            Status::Rejected { index, reason, .. } => format!("rejected index {index}: {reason}"),
            other => other.to_string(),
        };
        if let Some(config) = &live.config
            && !applied.as_ref().is_some_and(|a| Arc::ptr_eq(a, config))
        {
            applied = Some(config.clone());
            apply_one(config, live.index, &mut in_force, &targets).await;
        }
        targets.health.set_note(Some(format!(
            "config: key {} index {} ({status})",
            targets.key, live.index
        )));
        if settings.changed().await.is_err() {
            return;
        }
    }
}

/// What the process runs with now, of what is not read again per connection.
struct InForce {
    maintenance: bool,
    /// The log filter (`None`: not reloadable).
    log_level: Option<String>,
}

/// Apply one configuration.
async fn apply_one(settings: &LiveSettings, index: u64, in_force: &mut InForce, targets: &Targets) {
    let startup = &targets.startup;
    let tunables = Tunables {
        max_frame: settings.max_frame.unwrap_or(startup.max_frame),
        idle_timeout: settings
            .idle_timeout
            .map_or(startup.idle_timeout, GoDuration::as_duration),
    };
    targets.tunables.send_replace(tunables);
    let cap = settings.max_connections.unwrap_or(startup.max_connections);
    targets.cap.resize(cap);
    if let Some(log) = &targets.log_level {
        // Nothing said: the filter the process started with.
        let wanted = settings.log_level.as_deref().unwrap_or(log.initial());
        if in_force.log_level.as_deref() != Some(wanted) {
            match log.set(wanted) {
                Ok(()) => in_force.log_level = Some(wanted.to_owned()),
                Err(e) => {
                    tracing::error!(index, log_level = wanted, "cannot set the log level: {e}")
                }
            }
        }
    }
    let wanted = settings.maintenance.unwrap_or(false);
    if wanted != in_force.maintenance
        && let Some(registrar) = &targets.registrar
    {
        let reason = format!("set by Consul KV key {}", targets.key);
        match registrar.maintenance(wanted, Some(&reason)).await {
            Ok(()) => in_force.maintenance = wanted,
            Err(e) => tracing::error!(index, maintenance = wanted, "{e}"),
        }
    }
    tracing::info!(
        key = %targets.key,
        index,
        max_frame = tunables.max_frame,
        idle_timeout = %GoDuration(tunables.idle_timeout),
        max_connections = cap,
        maintenance = in_force.maintenance,
        log_level = in_force.log_level.as_deref().unwrap_or("(fixed)"),
        "live settings in force"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> LiveSettings {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn live_settings_parse_and_what_cannot_change_is_refused() {
        let set = LogLevel::new("info", |_| Ok(()));
        let s = parse(
            r#"{"max_frame": 1024, "idle_timeout": "30s", "max_connections": 10,
                "maintenance": true, "log_level": "debug"}"#,
        );
        assert_eq!(s.max_frame, Some(1024));
        assert_eq!(
            s.idle_timeout.map(GoDuration::as_duration),
            Some(Duration::from_secs(30))
        );
        assert_eq!(validate(&s, true, Some(&set)), Ok(()));
        assert!(validate(&parse("{}"), false, None).is_ok());

        let err = validate(&parse(r#"{"port": 1234}"#), true, Some(&set)).unwrap_err();
        assert!(err.contains("restart it with --port"), "{err}");
        let err = validate(&parse(r#"{"max_frmae": 1}"#), true, Some(&set)).unwrap_err();
        assert!(err.contains("unknown setting"), "{err}");
        for (bad, says) in [
            (r#"{"max_frame": 0}"#, "max_frame"),
            (r#"{"max_connections": 0}"#, "max_connections"),
            (r#"{"idle_timeout": "0s"}"#, "idle_timeout"),
            (r#"{"log_level": "[[["}"#, "log filter"),
        ] {
            let err = validate(&parse(bad), true, Some(&set)).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let err = validate(&parse(r#"{"maintenance": true}"#), false, Some(&set)).unwrap_err();
        assert!(err.contains("--no-register"), "{err}");
        let err = validate(&parse(r#"{"log_level": "debug"}"#), true, None).unwrap_err();
        assert!(err.contains("not reloadable"), "{err}");
    }

    #[tokio::test]
    async fn the_cap_grows_at_once_and_shrinks_as_slots_free() {
        let cap = Cap::new(2);
        let a = cap.semaphore().clone().acquire_owned().await.unwrap();
        let b = cap.semaphore().clone().acquire_owned().await.unwrap();
        assert_eq!(cap.open(), 2);
        cap.resize(3);
        assert_eq!(cap.semaphore().available_permits(), 1);
        cap.resize(1);
        assert_eq!(
            cap.semaphore().available_permits(),
            0,
            "the free slot is gone"
        );
        tokio::task::yield_now().await; // the shrink waits for a slot
        drop(a);
        assert_eq!(
            cap.semaphore().available_permits(),
            0,
            "the freed slot goes too"
        );
        drop(b);
        assert_eq!(
            cap.semaphore().available_permits(),
            1,
            "one slot: the new cap"
        );
        assert_eq!(cap.size(), 1);
    }
}
