//! The command lines as operators see them: `--help` of every command.

use std::process::Command;

use crate::support::*;

#[test]
fn help_never_shows_secrets_from_the_environment() {
    for cmd in [
        "ingest",
        "process",
        "router",
        "embedded",
        "query-api",
        "maintain",
    ] {
        let out = Command::new(sluice_bin())
            .args([cmd, "--help"])
            .env("SLUICE_AMQP_URL", "amqp://user:s3cret@rabbit:5672/%2f")
            .env("SLUICE_REDIS_URL", "redis://:s3cret@redis:6379")
            .env("SLUICE_STORE_OPTIONS", "aws_secret_access_key=s3cret")
            .output()
            .unwrap();
        let help = output_ok(&out, &format!("sluice {cmd} --help"));
        assert!(
            !help.contains("s3cret"),
            "sluice {cmd} --help shows a secret:\n{help}"
        );
    }
    let out = Command::new(loadgen_bin())
        .arg("--help")
        .env("LOADGEN_AMQP_URL", "amqp://user:s3cret@rabbit:5672/%2f")
        .env("LOADGEN_API_KEY", "s3cret")
        .output()
        .unwrap();
    let help = output_ok(&out, "loadgen --help");
    assert!(
        !help.contains("s3cret"),
        "loadgen --help shows a secret:\n{help}"
    );
}
