//! Where the services are: `AMQP_ADDR`, `REDIS_URL` and `SLUICE_PYTHON`, as
//! `scripts/test.sh` exports them. The first two default to the local services
//! `scripts/services.sh` starts; the Python interpreter has no default (it is the venv
//! holding the example's requirements).

/// `AMQP_ADDR` when unset: the local node.
pub const DEFAULT_AMQP_ADDR: &str = "amqp://127.0.0.1:5672/%2f";

/// `REDIS_URL` when unset: the local server.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The broker the tests use (`AMQP_ADDR`).
pub fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| DEFAULT_AMQP_ADDR.to_owned())
}

/// The Redis the tests use (`REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// The Python interpreter that runs `examples/python` (`SLUICE_PYTHON`); panics when unset,
/// naming the script that sets it.
pub fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        panic!("SLUICE_PYTHON is not set: run the tests through scripts/test.sh")
    })
}
