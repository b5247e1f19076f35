//! Progress while the bench runs (indicatif): the step under way, and how long the run has
//! taken. Finished rows are printed above the spinner as they come in.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new() -> Progress {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("a valid progress template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// What the bench is doing now.
    pub fn step(&self, what: &str) {
        self.bar.set_message(what.to_owned());
        if self.bar.is_hidden() {
            // No terminal (CI, a pipe): the steps still show, one line each.
            eprintln!("bench: {what}");
        }
    }

    /// A finished result, printed above the spinner.
    pub fn done(&self, line: &str) {
        self.bar.println(line);
        if self.bar.is_hidden() {
            eprintln!("bench: {line}");
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
