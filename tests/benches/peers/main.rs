//! `peers`: the benchmark behind `cargo xtask bench`. xlb side by side with the programs it
//! replaces, in one run, on one topology, against one Swarm backend, with the same load
//! generators: nginx and HAProxy at L7, kernel NAT (iptables) and HAProxy `mode tcp` at L4,
//! and `direct` (no proxy) as the floor. It prints markdown tables and writes JSON and SVG
//! plots into `--out`.
//!
//! The machine is small and noisy, so the figures that count are ratios measured in the same
//! run, and per-request counts (CPU time, syscalls, context switches) that barely move with
//! the noise. Speed is reported, never asserted.
//!
//! - [`bed`]: the namespaces, the private Swarm and its backend service, the peer XDP program.
//! - [`proxies`]: nginx, HAProxy, kernel NAT and xlb, each configured from that Swarm.
//! - [`load`]: wrk (closed loop) and oha (open loop), and what they report.
//! - [`cost`]: CPU time, syscalls, context switches and RSS of the processes under test.
//! - [`idle`]: many idle keep-alive client connections, for RSS per connection.
//! - [`row`]: the steps of one row, the same for every program; [`l7`], [`l4`]: the rows.
//! - [`control`]: a Swarm task running → routable on the proxy.
//! - [`callgrind`]: `--callgrind`, userspace instructions per request of each L7 program.
//! - [`micro`]: criterion's results for the hot pieces, read from its output directory.
//! - [`report`]: the tables and JSON; [`plots`]: the SVG charts.

mod bed;
mod callgrind;
mod control;
mod cost;
mod idle;
mod l4;
mod l7;
mod load;
mod micro;
mod plots;
mod progress;
mod proxies;
mod report;
mod row;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

use crate::{bed::Bed, progress::Progress, report::Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    L7,
    L4,
    Control,
    Micro,
    All,
}

#[derive(Debug, Parser)]
#[command(
    name = "peers",
    about = "xlb against nginx, HAProxy, kernel NAT and direct"
)]
pub struct Options {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    pub section: Section,
    /// Seconds of load per closed-loop and open-loop measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Rounds of the L4 table (see [`l4`]).
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Open-loop rates (requests per second), each measured for `--duration`.
    #[arg(long = "rate", num_args = 1.., default_values_t = [10_000])]
    pub rates: Vec<u32>,
    /// About a second per row, a few scale events, few idle connections: checks the bench
    /// itself, its numbers mean little.
    #[arg(long)]
    pub quick: bool,
    /// Where the report, JSON and plots go.
    #[arg(long)]
    pub out: PathBuf,
    /// The xlb binary under test.
    #[arg(long)]
    pub xlb: PathBuf,
    /// The oha binary (open-loop load).
    #[arg(long)]
    pub oha: PathBuf,
    /// criterion's output directory (`target/criterion`), for the micro section.
    #[arg(long)]
    pub criterion_dir: PathBuf,
    /// Scale events for the control section.
    #[arg(long, default_value_t = 20)]
    pub scale_events: usize,
    /// Idle keep-alive client connections held open to measure RSS per connection.
    #[arg(long, default_value_t = 10_000)]
    pub idle_connections: usize,
    /// L7 programs to measure (nginx, haproxy, xlb; repeatable); all of them by default. The
    /// direct row always runs: it is the floor the others are read against.
    #[arg(long = "only")]
    pub only: Vec<String>,
    /// Record a `perf record` profile of every proxy during its closed loop, into
    /// `<out>/profiles/` (the `.data` and a flat `perf report` as text). Sampling costs the
    /// proxy a little CPU, so a profiled run's cost figures read slightly high.
    #[arg(long)]
    pub profile: bool,
    /// Count each L7 program's userspace instructions per request under callgrind, after the
    /// L7 table (see [`callgrind`]); the counts go to `<out>/callgrind/`.
    #[arg(long)]
    pub callgrind: bool,
    /// The command line to print in the report (the one the user typed).
    #[arg(long, default_value = "cargo xtask bench")]
    pub command: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// The measurement plan that follows from the options.
#[derive(Debug, Clone)]
pub struct Plan {
    pub duration: Duration,
    pub warmup: Duration,
    pub rates: Vec<u32>,
    pub scale_events: usize,
    pub idle_connections: usize,
    /// Rounds of the L4 table.
    pub l4_rounds: u32,
    /// Where `--profile` puts its profiles.
    pub profile_dir: Option<PathBuf>,
    /// Keep-alive GETs per program under `--callgrind`.
    pub callgrind_requests: u64,
}

impl Options {
    fn plan(&self) -> Plan {
        if self.quick {
            Plan {
                duration: Duration::from_secs(1),
                warmup: Duration::from_millis(300),
                rates: vec![1_000],
                scale_events: 2,
                idle_connections: 200,
                l4_rounds: self.rounds.max(1),
                profile_dir: self.profile_dir(),
                callgrind_requests: 2_000,
            }
        } else {
            Plan {
                duration: Duration::from_secs(self.duration),
                warmup: Duration::from_secs(2),
                rates: self.rates.clone(),
                scale_events: self.scale_events,
                idle_connections: self.idle_connections,
                l4_rounds: self.rounds.max(1),
                profile_dir: self.profile_dir(),
                callgrind_requests: callgrind::REQUESTS,
            }
        }
    }

    fn profile_dir(&self) -> Option<PathBuf> {
        self.profile.then(|| self.out.join("profiles"))
    }

    /// Whether `--only` leaves this L7 program in.
    pub fn wants_program(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|only| only.eq_ignore_ascii_case(name))
    }

    fn wants(&self, section: Section) -> bool {
        self.section == section || self.section == Section::All
    }
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let plan = options.plan();
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let open_files = raise_open_file_limit()?;
    let mut report = Report::new(&options, &plan, open_files);
    let progress = Progress::new();

    if options.wants(Section::Micro) || options.wants(Section::Control) {
        let mut benches = micro::read(&options.criterion_dir);
        // `bench control` runs criterion's control group alone: the rest would read as missing.
        benches.retain(|bench| options.wants(Section::Micro) || bench.group == "control");
        report.micro = Some(benches);
    }
    let needs_bed = [Section::L7, Section::L4, Section::Control]
        .into_iter()
        .any(|section| options.wants(section));
    if needs_bed {
        progress.step("setting up: namespaces, a private dockerd and Swarm, the backend service");
        let bed = Bed::create().context("setting up the bench bed")?;
        report.notes.push(bed.describe());
        if options.wants(Section::L7) {
            report.l7 = Some(l7::measure(&bed, &options, &plan, &progress)?);
            if options.callgrind {
                let root = options.out.join("callgrind");
                let counts = l7::count_instructions(&bed, &options, &plan, &root, &progress)?;
                report.instructions = Some(counts);
            }
        }
        if options.wants(Section::L4) {
            report.l4 = Some(l4::measure(&bed, &options, &plan, &progress)?);
        }
        if options.wants(Section::Control) {
            report.control = control::measure(&bed, &options, &plan, &progress)?;
        }
        progress.step("cleaning up: the service, the engine, the namespaces");
    }
    progress.finish();

    report.check_backend_headroom();
    let markdown = report.markdown();
    println!("{markdown}");
    report.write(&options.out, &markdown)?;
    plots::draw(&report, &options.out)?;
    println!("Written to {}", options.out.display());
    Ok(())
}

/// Thousands of sockets are held at once: by the idle-connection holder in this process, and
/// by the proxies, which inherit the limit. Raises the soft limit to the hard one (and the hard
/// one to `nr_open` where that is allowed); returns the limit the proxies get.
fn raise_open_file_limit() -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1 << 20);
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    let wanted = hard.max(nr_open.min(1 << 20));
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return Ok(wanted);
    }
    // Without CAP_SYS_RESOURCE (in a container) the hard limit is as far as it goes.
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    Ok(hard)
}
