//! `docker-demo`: a stand-in for `ehazlett/docker-demo`, the backend that the
//! xlb testbed puts behind the load balancer. It answers `GET /ping` with a
//! JSON document naming the instance that served it, so tests can see which
//! backend a request reached. Std-only and statically linkable, so it runs in
//! a `FROM scratch` image.

mod ping;
mod server;
mod shutdown;

use std::net::TcpListener;

fn main() {
    shutdown::exit_on_termination_signals();
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".to_string());
    let identity = ping::Identity::from_environment();
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("docker-demo: cannot listen on 0.0.0.0:{port}: {error}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "docker-demo: instance {} listening on 0.0.0.0:{port}",
        identity.instance
    );
    server::serve(listener, identity);
}
