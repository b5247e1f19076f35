//! xlb's own log: tracing events to stderr, filtered by `XLB_LOG` (default `info`), including
//! records of the `log` crate (aya-log's XDP records among them); and, once the config names an
//! `ErrorLogPath`, warnings and errors appended to that file as well, as nginx's `error_log` does.

use std::{
    fs::OpenOptions,
    io::IsTerminal as _,
    path::Path,
    sync::{Mutex, OnceLock},
};

use anyhow::Context as _;
use tracing::Level;
use tracing_subscriber::{
    fmt::writer::MakeWriterExt as _, layer::Layered, layer::SubscriberExt as _, reload,
    util::SubscriberInitExt as _, EnvFilter, Layer, Registry,
};

type Filtered = Layered<EnvFilter, Registry>;
type ErrorLog = Option<Box<dyn Layer<Filtered> + Send + Sync>>;

/// Where [`log_errors_to`] installs the `ErrorLogPath` writer.
static ERROR_LOG: OnceLock<reload::Handle<ErrorLog, Filtered>> = OnceLock::new();

/// Starts logging to stderr at `default_level` unless `XLB_LOG` says otherwise. Called once,
/// before anything else logs.
pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_env("XLB_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let (error_log, handle) = reload::Layer::new(ErrorLog::None);
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry()
        .with(filter)
        .with(error_log)
        .with(stderr)
        .init();
    let _ = ERROR_LOG.set(handle);
}

/// `ErrorLogPath`: appends warnings and errors to `path` too. `/dev/stderr` is where they go
/// anyway; `/dev/stdout` is xlb's standard output.
pub fn log_errors_to(path: &Path) -> anyhow::Result<()> {
    let layer: Box<dyn Layer<Filtered> + Send + Sync> = if path == Path::new("/dev/stderr") {
        return Ok(());
    } else if path == Path::new("/dev/stdout") {
        let writer = std::io::stdout.with_max_level(Level::WARN);
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(false)
            .boxed()
    } else {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the error log {} (ErrorLogPath)", path.display()))?;
        let writer = Mutex::new(file).with_max_level(Level::WARN);
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(false)
            .boxed()
    };
    let handle = ERROR_LOG
        .get()
        .context("logging is not initialised, so ErrorLogPath cannot apply")?;
    handle
        .reload(Some(layer))
        .context("installing the ErrorLogPath writer")
}
