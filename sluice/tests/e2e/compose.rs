//! `compose.yaml` against the code: secure defaults, and every service's environment read
//! by the binary it runs.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// compose.yaml's secure defaults: only ingest and the subscription API listen on every
/// interface; the broker's, Redis's and the dashboards' ports are on loopback; no default
/// credentials (RabbitMQ's, MinIO's and Grafana's passwords are required variables).
#[test]
fn compose_publishes_operator_ports_on_loopback_only_and_defaults_no_credentials() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("compose.yaml")).unwrap();
    assert!(
        !text.contains("guest"),
        "compose.yaml uses RabbitMQ's guest user"
    );
    assert!(
        !text.contains(":-admin}"),
        "compose.yaml defaults a Grafana password"
    );
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut published = 0;
    for (name, svc) in doc["services"].as_mapping().expect("services") {
        let name = name.as_str().unwrap();
        for port in svc["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            published += 1;
            let public = matches!(name, "ingest" | "query-api" | "router");
            assert!(
                public || port.starts_with("127.0.0.1:"),
                "service {name} publishes {port} on every interface"
            );
        }
    }
    assert!(published >= 6, "{published} ports found");
    for var in [
        "RABBITMQ_DEFAULT_PASS: ${RABBITMQ_PASSWORD:?",
        "GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD:?",
        "MINIO_ROOT_PASSWORD: ${MINIO_PASSWORD:?",
    ] {
        assert!(text.contains(var), "{var} missing");
    }
}

/// Every compose service's environment variables are flags of the binary it runs, so
/// compose.yaml cannot drift from the code.
#[test]
fn compose_environment_matches_the_binaries_flags() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("compose.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    let mut checked = 0;
    for (name, svc) in services {
        let Some(cmd) = svc["command"].as_sequence() else {
            continue;
        };
        let argv: Vec<&str> = cmd.iter().filter_map(|v| v.as_str()).collect();
        let help = match argv.first().copied() {
            Some("sluice") => Command::new(sluice_bin())
                .args(&argv[1..])
                .arg("--help")
                .output()
                .unwrap(),
            Some("loadgen") => Command::new(loadgen_bin()).arg("--help").output().unwrap(),
            _ => continue,
        };
        let help = output_ok(&help, &format!("{name:?} --help"));
        // Anchors (<<: *amqp-env) are merged by serde_yaml only as a `<<` key; resolve it.
        let mut keys: Vec<String> = Vec::new();
        if let Some(env) = svc["environment"].as_mapping() {
            for (k, v) in env {
                match k.as_str() {
                    Some("<<") => {
                        // `<<: *a` or `<<: [*a, *b]`.
                        let merged: Vec<&serde_yaml::Value> = match v.as_sequence() {
                            Some(seq) => seq.iter().collect(),
                            None => vec![v],
                        };
                        for m in merged {
                            for (k2, _) in m.as_mapping().into_iter().flatten() {
                                keys.push(k2.as_str().unwrap().to_owned());
                            }
                        }
                    }
                    Some(k) => keys.push(k.to_owned()),
                    None => {}
                }
            }
        }
        assert!(!keys.is_empty(), "service {name:?} has no environment");
        for k in keys {
            assert!(
                // `env: K=value`, or `env: K]` where values are hidden (secrets).
                help.contains(&format!("env: {k}=")) || help.contains(&format!("env: {k}]")),
                "compose service {name:?} sets {k}, which `{}` does not read",
                argv.join(" ")
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 5,
        "expected ingest, processors, maintain, router and loadgen in compose.yaml"
    );
}

/// compose.cluster.yaml gives every service that talks to the broker in compose.yaml all
/// three nodes, the nodes the cluster config names, and no default Erlang cookie.
#[test]
fn the_cluster_overlay_lists_every_node_for_every_broker_client() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut base: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("compose.yaml")).unwrap()).unwrap();
    base.apply_merge().unwrap(); // resolve `<<: *amqp-env`
    let text = std::fs::read_to_string(root.join("compose.cluster.yaml")).unwrap();
    assert!(text.contains("RABBITMQ_ERLANG_COOKIE: ${RABBITMQ_ERLANG_COOKIE:?"));
    let overlay: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let conf = std::fs::read_to_string(root.join("deploy/rabbitmq/cluster.conf")).unwrap();
    let hosts = ["rabbitmq", "rabbitmq-2", "rabbitmq-3"];
    for host in hosts {
        assert!(
            conf.contains(&format!("= rabbit@{host}\n")),
            "cluster.conf lacks {host}"
        );
        assert!(
            host == "rabbitmq" || overlay["services"][host]["hostname"].as_str() == Some(host),
            "no node {host} in the overlay"
        );
    }
    let mut clients = 0;
    for (name, svc) in base["services"].as_mapping().unwrap() {
        if svc["environment"]["SLUICE_AMQP_URL"].is_null() {
            continue;
        }
        clients += 1;
        let url = overlay["services"][name]["environment"]["SLUICE_AMQP_URL"]
            .as_str()
            .unwrap_or_else(|| panic!("{name:?}: SLUICE_AMQP_URL not overridden"));
        let listed: Vec<&str> = url
            .split(',')
            .map(|u| u.rsplit('@').next().unwrap().split(':').next().unwrap())
            .collect();
        assert_eq!(listed, hosts, "{name:?}: {url}");
    }
    assert!(clients >= 3, "{clients} broker clients in compose.yaml");
}
