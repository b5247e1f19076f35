//! Running external tools (`ip`, `docker`, `curl`, ...) so that every failure
//! says which command line failed and what it printed on stderr.

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// The command line as a shell user would type it, for error messages.
pub fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| {
            let part = part.to_string_lossy();
            if part.is_empty() || part.contains(char::is_whitespace) {
                format!("'{part}'")
            } else {
                part.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs to completion; returns stdout, or an error naming the command line,
/// its exit status and its stderr.
pub fn run(command: &mut Command) -> Result<String> {
    let output = output_of(command)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Like [`run`], but hands back the raw output.
pub fn output_of(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot start `{}`", command_line(command)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            command_line(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Convenience for the common "program plus literal arguments" case.
pub fn run_program(program: &str, args: &[&str]) -> Result<String> {
    run(Command::new(program).args(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_command_and_its_stderr() {
        let error = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("sh -c 'echo oops >&2; exit 3'"),
            "{message}"
        );
        assert!(message.contains("oops"), "{message}");
    }

    #[test]
    fn missing_programs_are_reported() {
        let error = run_program("/nonexistent/xlb-tool", &["x"]).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/xlb-tool x"));
    }

    #[test]
    fn stdout_is_returned() {
        assert_eq!(run_program("echo", &["hi"]).unwrap(), "hi\n");
    }
}
