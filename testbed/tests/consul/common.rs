//! Helpers shared by the scenarios.

use testbed::procs::Launcher;

/// The testbed binary built for these tests, which embeds the echo CLIs.
#[allow(dead_code)]
pub fn launcher() -> Launcher {
    Launcher::testbed(env!("CARGO_BIN_EXE_testbed"))
}

/// Log to the test's output (shown on failure), once per process.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,testcontainers=warn,bollard=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Every line a process printed.
pub fn printed(process: &testbed::process::ChildProcess) -> String {
    process
        .output()
        .lines()
        .into_iter()
        .map(|l| l.text)
        .collect::<Vec<_>>()
        .join("\n")
}
