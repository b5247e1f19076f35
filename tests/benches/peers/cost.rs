//! What serving the load cost: CPU time of the processes under test (utime + stime from
//! `/proc/PID/stat`, dead threads included), the machine's busy time (`/proc/stat`, which also
//! charges softirq and XDP work that no process accounting sees), syscalls and context
//! switches (`perf stat` tracepoints, counts that hardly move with the machine's noise), and
//! resident memory sampled while the load runs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use xlb_testbed::Process;

/// `/proc` reports CPU times in clock ticks of `USER_HZ`, 100 on every Linux ABI.
const TICKS_PER_SECOND: f64 = 100.0;
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// What one measured load cost, per answered request.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    /// The proxy's own processes; `None` where there is no process (direct, XDP, kernel NAT).
    pub process_cpu_us_per_request: Option<f64>,
    /// The whole machine: load generator, backend, kernel, softirq and XDP included.
    pub machine_busy_us_per_request: f64,
    pub syscalls_per_request: Option<f64>,
    pub context_switches_per_request: Option<f64>,
    /// Peak RSS of the proxy's processes during the load.
    pub rss_under_load_kib: Option<u64>,
    /// TCP connections the proxy's namespace opened (`ActiveOpens`): upstream connections a
    /// proxy opened, beyond the ones it keeps alive.
    pub tcp_connects_per_request: Option<f64>,
    /// TCP segments the proxy's namespace sent (`OutSegs`), both sides: how many writes became
    /// packets, and the ACKs.
    pub tcp_segments_out_per_request: Option<f64>,
}

/// A measurement under way: started just before the load, finished just after it.
pub struct Meter {
    pids: Vec<u32>,
    process_ticks: u64,
    machine_ticks: u64,
    perf: Option<PerfStat>,
    rss: Option<RssSampler>,
    tcp: Option<TcpCounters>,
}

impl Meter {
    pub fn start(pids: &[u32], scratch: &Path) -> Result<Meter> {
        let perf = if pids.is_empty() {
            None
        } else {
            Some(PerfStat::start(pids, &scratch.join("perf-stat.csv"))?)
        };
        Ok(Meter {
            pids: pids.to_vec(),
            process_ticks: process_ticks(pids)?,
            machine_ticks: machine_busy_ticks()?,
            perf,
            rss: (!pids.is_empty()).then(|| RssSampler::start(pids)),
            tcp: pids
                .first()
                .map(|&pid| TcpCounters::read(pid))
                .transpose()?,
        })
    }

    pub fn finish(self, requests: u64) -> Result<Cost> {
        let process_ticks = process_ticks(&self.pids)? - self.process_ticks;
        let machine_ticks = machine_busy_ticks()? - self.machine_ticks;
        let per_request = |count: f64| count / requests.max(1) as f64;
        let ticks_to_us = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6;
        let counts = self.perf.map(PerfStat::finish).transpose()?;
        let tcp = match (self.tcp, self.pids.first()) {
            (Some(before), Some(&pid)) => Some(TcpCounters::read(pid)?.since(before)),
            _ => None,
        };
        Ok(Cost {
            process_cpu_us_per_request: (!self.pids.is_empty())
                .then(|| per_request(ticks_to_us(process_ticks))),
            machine_busy_us_per_request: per_request(ticks_to_us(machine_ticks)),
            syscalls_per_request: counts.map(|c| per_request(c.syscalls as f64)),
            context_switches_per_request: counts.map(|c| per_request(c.context_switches as f64)),
            rss_under_load_kib: self.rss.map(RssSampler::finish),
            tcp_connects_per_request: tcp.map(|tcp| per_request(tcp.active_opens as f64)),
            tcp_segments_out_per_request: tcp.map(|tcp| per_request(tcp.out_segments as f64)),
        })
    }
}

/// The TCP counters of a process's network namespace (`/proc/PID/net/snmp`).
#[derive(Debug, Clone, Copy)]
struct TcpCounters {
    active_opens: u64,
    out_segments: u64,
}

impl TcpCounters {
    fn read(pid: u32) -> Result<TcpCounters> {
        let path = format!("/proc/{pid}/net/snmp");
        let snmp = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Two `Tcp:` lines: the field names, then their values.
        let mut tcp = snmp.lines().filter_map(|line| line.strip_prefix("Tcp:"));
        let (names, values) = tcp.next().zip(tcp.next()).context("no Tcp lines")?;
        let field = |wanted: &str| -> Result<u64> {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == wanted)
                .and_then(|(_, value)| value.parse().ok())
                .with_context(|| format!("no Tcp {wanted} in {path}"))
        };
        Ok(TcpCounters {
            active_opens: field("ActiveOpens")?,
            out_segments: field("OutSegs")?,
        })
    }

    fn since(self, before: TcpCounters) -> TcpCounters {
        TcpCounters {
            active_opens: self.active_opens.saturating_sub(before.active_opens),
            out_segments: self.out_segments.saturating_sub(before.out_segments),
        }
    }
}

/// utime + stime of `pids`, all their threads, in ticks.
fn process_ticks(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&pid| one_process_ticks(pid)).sum()
}

fn one_process_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: fields count from its end.
    let after_name = &stat[stat.rfind(')').context("no ')' in /proc/PID/stat")? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the name.
    let field = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("field {} of {path}", index + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// Ticks every CPU spent not idle, since boot.
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let cpu = stat
        .lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|value| value.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok(total - idle)
}

/// The resident set of `pids`, summed, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}

struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl RssSampler {
    fn start(pids: &[u32]) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = pids.to_vec();
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut peak = rss_kib(&pids);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(RSS_SAMPLE_INTERVAL);
                    peak = peak.max(rss_kib(&pids));
                }
                peak
            }
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// `perf -p`'s list of the processes to attach to.
fn perf_pid_list(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts perf attached to processes; it attaches to every thread before it starts counting,
/// so it is given that moment.
fn spawn_perf(command: Command) -> Result<Process> {
    let process = Process::spawn(command)?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(process)
}

/// perf writes what it has and exits on SIGINT.
fn interrupt_perf(process: &mut Process, what: &str) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(process.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .with_context(|| format!("interrupting perf for {what}"))?;
    xlb_testbed::wait_until(what, Duration::from_secs(30), || {
        Ok(process.exit_status()?.map(|_| ()))
    })
}

/// `perf record` of the processes under test for the length of the load (`--profile`): the
/// samples in `<name>.data`, and where the CPU went, flat by symbol, in `<name>.txt`.
pub struct Profile {
    process: Process,
    data: PathBuf,
}

/// Samples per second: enough for a flat profile of a 10 s load, little enough not to weigh.
const PROFILE_FREQUENCY: &str = "999";

impl Profile {
    pub fn start(pids: &[u32], dir: &Path, name: &str) -> Result<Profile> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file_name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let data = dir.join(format!("{file_name}.data"));
        let pids = perf_pid_list(pids);
        let mut command = Command::new("perf");
        command
            // Call chains by frame pointer: whole for the kernel, as deep as they go for the
            // proxies (whose builds may omit frame pointers).
            .args([
                "record",
                "-q",
                "-g",
                "-F",
                PROFILE_FREQUENCY,
                "-p",
                &pids,
                "-o",
            ])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = spawn_perf(command)?;
        Ok(Profile { process, data })
    }

    pub fn finish(mut self) -> Result<()> {
        interrupt_perf(&mut self.process, "perf record to write its samples")?;
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "0.3",
            ])
            .args(["--sort", "dso,symbol", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("running perf report")?;
        anyhow::ensure!(
            report.status.success(),
            "perf report -i {} failed: {}",
            self.data.display(),
            report.status
        );
        let text = self.data.with_extension("txt");
        std::fs::write(&text, &report.stdout).with_context(|| format!("writing {}", text.display()))
    }
}

/// `perf stat` attached to the processes (all their threads) for the length of the load.
struct PerfStat {
    process: Process,
    output: PathBuf,
}

#[derive(Debug, Clone, Copy)]
struct PerfCounts {
    syscalls: u64,
    context_switches: u64,
}

const SYSCALL_EVENT: &str = "raw_syscalls:sys_enter";
const CONTEXT_SWITCH_EVENT: &str = "context-switches";

impl PerfStat {
    fn start(pids: &[u32], output: &Path) -> Result<PerfStat> {
        let pids = perf_pid_list(pids);
        let mut command = Command::new("perf");
        command
            .args(["stat", "-x", ",", "-e"])
            .arg(format!("{SYSCALL_EVENT},{CONTEXT_SWITCH_EVENT}"))
            .args(["-p", &pids, "-o"])
            .arg(output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = spawn_perf(command)?;
        Ok(PerfStat {
            process,
            output: output.to_path_buf(),
        })
    }

    /// perf prints its counts when interrupted.
    fn finish(mut self) -> Result<PerfCounts> {
        interrupt_perf(&mut self.process, "perf stat to print its counts")?;
        let text = std::fs::read_to_string(&self.output)
            .with_context(|| format!("reading {}", self.output.display()))?;
        let count = |event: &str| -> Result<u64> {
            text.lines()
                .map(|line| line.split(',').collect::<Vec<_>>())
                .find(|fields| fields.get(2).is_some_and(|name| name.starts_with(event)))
                .and_then(|fields| fields[0].parse().ok())
                .with_context(|| format!("no count for {event} in perf's output:\n{text}"))
        };
        Ok(PerfCounts {
            syscalls: count(SYSCALL_EVENT)?,
            context_switches: count(CONTEXT_SWITCH_EVENT)?,
        })
    }
}
