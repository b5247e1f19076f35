use clap::Parser;

fn main() -> std::process::ExitCode {
    match xlb::cli::Cli::parse().exec() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xlb: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
