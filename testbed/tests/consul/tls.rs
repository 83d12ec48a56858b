//! HTTPS and mutual TLS to a real agent (API on HTTPS only, HTTP port off, certificates made
//! at test time): echo-server and echo-client register, discover and deregister through it;
//! a missing client certificate, a wrong CA, a certificate for another host and plain HTTP
//! to the HTTPS port are refused with errors that name the setting to fix; the ACL token is
//! never printed on any of these paths.

use std::{sync::Arc, time::Duration};

use consul_api::{Client, Error, GoDuration, TlsConfig};
use testbed::{
    Consul, ConsulOptions,
    consul::{Issuer, TestPki},
    procs::{ClientProcess, ServerProcess, ServerSpec, client_args},
    signal::Signal,
    wait,
};

use crate::{
    client::failing_cli,
    common::{init_tracing, launcher, printed},
};

/// Deadlines that only prove "no hang".
const LIMIT: Duration = Duration::from_secs(30);

/// An agent with HTTPS only, `verify_incoming`, and ACLs on with `token` as management token.
async fn mtls_agent(token: &str) -> (Consul, Arc<TestPki>) {
    let pki = Arc::new(TestPki::new().unwrap());
    let options = ConsulOptions::from_env()
        .unwrap()
        .with_acl(token)
        .with_tls(pki.clone(), true);
    let consul = Consul::start_with(options).await.unwrap();
    assert!(consul.address().starts_with("https://"), "{consul:?}");
    (consul, pki)
}

/// The error a fresh client with `config` gets from the agent.
async fn refused(config: consul_api::Config) -> Error {
    let client = Client::new(config).unwrap();
    tokio::time::timeout(LIMIT, client.agent().agent_self())
        .await
        .unwrap()
        .unwrap_err()
}

#[tokio::test]
async fn over_https_with_client_certificates_servers_register_clients_discover_and_sigterm_deregisters()
 {
    init_tracing();
    let token = "tls-path-management-token";
    let (consul, _pki) = mtls_agent(token).await;
    let admin = consul.client();
    // The plain HTTP port is off: only HTTPS answers.
    let plain = consul
        .config()
        .with_address(format!("127.0.0.1:{}", consul.spec().ports.http));
    assert!(matches!(refused(plain).await, Error::Tls { .. }));

    let mut spec = ServerSpec::seed(consul.config()).unwrap();
    spec.args.interval = GoDuration(Duration::from_secs(1));
    spec.args.timeout = GoDuration(Duration::from_secs(1));
    let mut server = ServerProcess::spawn(&launcher(), spec.clone())
        .await
        .unwrap();
    // Passing: registered through HTTPS, and the agent's own check of http://.../check
    // stayed plain HTTP.
    let (entries, _) = wait::passing(&admin, &spec.args.name, LIMIT).await.unwrap();
    assert_eq!(entries[0].service.id, spec.args.id);
    let check = entries[0]
        .checks
        .iter()
        .find(|c| c.check_id == format!("service:{}", spec.args.id))
        .unwrap();
    assert!(
        check.output.contains("HTTP GET http://"),
        "{}",
        check.output
    );

    // The client gets its TLS settings as flags (the server got them as variables).
    let tls = consul.config().tls;
    let mut args = echo_client::cli::Args {
        service: spec.args.name.clone(),
        count: 3,
        interval: GoDuration(Duration::from_millis(100)),
        ..client_args().unwrap()
    };
    for (flag, file) in [
        (&mut args.consul.ca_file, &tls.ca_file),
        (&mut args.consul.client_cert, &tls.client_cert),
        (&mut args.consul.client_key, &tls.client_key),
    ] {
        *flag = Some(file.clone().unwrap());
    }
    let no_tls_env = consul.config().with_tls(TlsConfig::default());
    let mut client = ClientProcess::spawn(&launcher(), &no_tls_env, &args).unwrap();
    let status = client.process.wait_exit(LIMIT).await.unwrap();
    let client_out = printed(&client.process);
    assert!(status.success(), "{client_out}");
    assert!(
        client_out.contains("done mode=resilient sent=3 replies=3 lost=0"),
        "{client_out}"
    );
    assert!(
        client_out.contains(&format!("instance={}", spec.args.id)),
        "{client_out}"
    );

    server.process.signal(Signal::SIGTERM).unwrap();
    wait::deregistered(&admin, &spec.args.name, &spec.args.id, LIMIT)
        .await
        .unwrap();
    let status = server.process.wait_exit(LIMIT).await.unwrap();
    let server_out = printed(&server.process);
    assert_eq!(status.code(), Some(0), "{server_out}");
    for out in [&server_out, &client_out] {
        assert!(!out.contains(token), "the token is never printed: {out}");
    }
}

#[tokio::test]
async fn refusals_name_the_missing_client_certificate_the_ca_and_the_server_name() {
    init_tracing();
    let token = "tls-refusal-management-token";
    let (consul, pki) = mtls_agent(token).await;
    let args = echo_client::cli::Args {
        count: 1,
        timeout: GoDuration::from_secs(300),
        ..client_args().unwrap()
    };

    // No client certificate for an agent with verify_incoming: the client says which
    // settings are missing, at once (not after --timeout), without the token.
    let no_cert = consul.config().with_tls(pki.client_tls(false));
    let err = refused(no_cert.clone()).await;
    assert!(matches!(err, Error::Tls { .. }), "{err}");
    let started = std::time::Instant::now();
    let mut cli = ClientProcess::spawn(&launcher(), &no_cert, &args).unwrap();
    let status = cli.process.wait_exit(LIMIT).await.unwrap();
    let took = started.elapsed();
    let out = printed(&cli.process);
    let error = out.lines().last().unwrap_or_default();
    eprintln!("MEASURED no client certificate, echo-client {status} after {took:?}: {error}");
    assert!(!status.success(), "{out}");
    assert!(error.starts_with("error: "), "{out}");
    assert!(error.contains("failed permanently"), "{error}");
    assert!(
        error.contains("set CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"),
        "{error}"
    );
    assert!(!out.contains(token), "the token is never printed: {out}");

    // A CA that did not sign the agent's certificate: the server exits with an error that
    // names the CA file and the server name it checked.
    let wrong_ca = consul.config().with_tls(TlsConfig {
        ca_file: Some(pki.other_ca_file()),
        ..pki.client_tls(true)
    });
    let ca = format!("CONSUL_CACERT {}", pki.other_ca_file().display());
    let err = refused(wrong_ca.clone()).await.to_string();
    assert!(err.contains(&ca) && err.contains("\"127.0.0.1\""), "{err}");
    let mut spec = ServerSpec::seed(wrong_ca).unwrap();
    spec.args.interval = GoDuration(Duration::from_secs(1));
    let mut server = ServerProcess::start(&launcher(), spec).unwrap();
    let status = server.process.wait_exit(LIMIT).await.unwrap();
    let out = printed(&server.process);
    assert!(!status.success(), "{out}");
    let last = out.lines().last().unwrap_or_default();
    eprintln!("MEASURED wrong CA, echo-server: {status}: {last}");
    assert!(last.starts_with("error: "), "{out}");
    assert!(last.contains(&ca), "{last}");
    assert!(last.contains("server name \"127.0.0.1\""), "{last}");
    assert!(!out.contains(token), "the token is never printed: {out}");
    assert!(
        !out.contains("retrying"),
        "a TLS refusal is not retried: {out}"
    );

    // CONSUL_HTTP_SSL_VERIFY=false: the wrong CA no longer matters (a warning is logged).
    let unverified = consul.config().with_tls(TlsConfig {
        ca_file: Some(pki.other_ca_file()),
        insecure_skip_verify: true,
        ..pki.client_tls(true)
    });
    Client::new(unverified)
        .unwrap()
        .agent()
        .agent_self()
        .await
        .unwrap();

    // Plain HTTP to the HTTPS port: told to use https.
    let plain = consul
        .config()
        .with_address(format!("http://127.0.0.1:{}", consul.spec().ports.http))
        .with_tls(TlsConfig::default());
    let err = refused(plain).await.to_string();
    assert!(err.contains("CONSUL_HTTP_SSL=true"), "{err}");
    assert!(!err.contains(token), "{err}");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused_unless_tls_server_name_says_it() {
    init_tracing();
    let token = "tls-host-management-token";
    let (consul, pki) = mtls_agent(token).await;
    // The agent now presents a certificate for consul.example only.
    consul
        .rotate_certificate(&["consul.example"], Issuer::SameCa)
        .await
        .unwrap();

    let err = refused(consul.config()).await.to_string();
    assert!(
        err.contains("not valid for server name \"127.0.0.1\""),
        "{err}"
    );
    assert!(err.contains("consul.example"), "{err}");
    assert!(err.contains("CONSUL_TLS_SERVER_NAME"), "{err}");
    let args = echo_client::cli::Args {
        count: 1,
        timeout: GoDuration::from_secs(300),
        ..client_args().unwrap()
    };
    let (error, took) = failing_cli(&consul.config(), &args, LIMIT).await;
    eprintln!("MEASURED certificate for another host, echo-client after {took:?}: {error}");
    assert!(error.contains("not valid for server name"), "{error}");
    assert!(!error.contains(token), "{error}");

    // CONSUL_TLS_SERVER_NAME names what the certificate holds: accepted.
    let named = consul.config().with_tls(TlsConfig {
        server_name: Some("consul.example".into()),
        ..pki.client_tls(true)
    });
    Client::new(named)
        .unwrap()
        .agent()
        .agent_self()
        .await
        .unwrap();
}
