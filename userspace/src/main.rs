use clap::Parser;

/// mimalloc instead of glibc's malloc: a proxied request makes a few dozen short-lived
/// allocations, and glibc spent about 7% of the proxy's CPU on them (free-list consolidation
/// included); mimalloc's per-thread free lists suit one worker thread per core.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match xlb::cli::Cli::parse().exec() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xlb: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
