//! The report: everything measured in one run, as markdown tables (stdout and `report.md`)
//! and JSON (`report.json`). Ratios are computed between rows of the same run only.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    callgrind::Instructions,
    control::Control,
    load::{Connections, LoadResult, CONNECTIONS, LOAD_CPU},
    micro::Micro,
    proxies::{MAX_CONNECTIONS, PROXY_CPU},
    row::Row,
    Options, Plan,
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub quick: bool,
    pub duration_s: f64,
    pub rates: Vec<u32>,
    pub pinning: String,
    pub notes: Vec<String>,
    pub l7: Option<Vec<Row>>,
    /// `--callgrind`'s counts.
    pub instructions: Option<Vec<Instructions>>,
    pub l4: Option<Vec<Row>>,
    /// One series per path the routes take (see [`crate::control`]).
    pub control: Vec<Control>,
    pub micro: Option<Vec<Micro>>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu: cpuinfo
                .lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|value| value.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_else(|| "unknown".to_owned()),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|release| release.trim().to_owned())
                .unwrap_or_default(),
            memory_gib: memory_kib / 1024.0 / 1024.0,
        }
    }
}

impl Report {
    pub fn new(options: &Options, plan: &Plan, open_files: u64) -> Report {
        Report {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            command: options.command.clone(),
            machine: Machine::read(),
            quick: options.quick,
            duration_s: plan.duration.as_secs_f64(),
            rates: plan.rates.clone(),
            pinning: format!(
                "load generators (wrk, oha) pinned to CPU {LOAD_CPU}, the proxy under test to CPU \
                 {PROXY_CPU} (taskset; xlb runs the seed's WorkerProcesses = 1, one worker thread, \
                 as nginx runs one worker and HAProxy one thread); the backend and the kernel's \
                 softirq work float"
            ),
            notes: vec![format!(
                "Every proxy may hold {MAX_CONNECTIONS} client connections (the seed's \
                 MaxConnections is 2048), so the idle-connection measurement fits in all of them; \
                 each runs with {open_files} open files at most; \"access log off\" is \
                 `access_log off` for nginx, no `log` for HAProxy, `AccessLogPath = \"off\"` \
                 for xlb."
            )],
            l7: None,
            instructions: None,
            l4: None,
            control: Vec::new(),
            micro: None,
        }
    }

    /// At L7, `direct` must be at least twice as fast as any proxy, or the rows measure the
    /// backend. (L4 rows forward packets in the kernel and are expected near `direct`: there
    /// the backend bounds every row alike, and the machine's time per request is the figure.)
    pub fn check_backend_headroom(&mut self) {
        let Some(rows) = &self.l7 else { return };
        let rps = |row: &Row| row.closed.as_ref().map(|closed| closed.rps);
        let Some(direct) = rows.iter().find(|row| row.name == "direct").and_then(rps) else {
            return;
        };
        let fastest_proxy = rows
            .iter()
            .filter(|row| row.name != "direct")
            .filter_map(rps)
            .fold(0.0, f64::max);
        if fastest_proxy > 0.0 && direct < 2.0 * fastest_proxy {
            self.notes.push(format!(
                "L7: direct ({direct:.0} rps) is less than twice the fastest proxy \
                 ({fastest_proxy:.0} rps): these rows partly measure the backend."
            ));
        }
    }

    pub fn write(&self, dir: &Path, markdown: &str) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("serialising the report")?;
        for (name, text) in [("report.json", json.as_str()), ("report.md", markdown)] {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let machine = &self.machine;
        let _ = writeln!(out, "# xlb bench, {}\n", self.date);
        let _ = writeln!(
            out,
            "`{}` on {} × {}, {:.0} GiB, Linux {}{}. {} s per measurement.\n",
            self.command,
            machine.cpus,
            machine.cpu,
            machine.memory_gib,
            machine.kernel,
            if self.quick {
                " (--quick: the numbers check the bench, they mean little)"
            } else {
                ""
            },
            self.duration_s
        );
        let _ = writeln!(out, "- Pinning: {}.", self.pinning);
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        if let Some(rows) = &self.l7 {
            l7_tables(&mut out, rows, &self.rates);
        }
        if let Some(counts) = &self.instructions {
            instructions_table(&mut out, counts);
        }
        if let Some(rows) = &self.l4 {
            l4_tables(&mut out, rows, &self.rates);
        }
        if !self.control.is_empty() || self.micro.is_some() {
            control_table(&mut out, &self.control, self.micro.as_deref());
        }
        if let Some(micro) = &self.micro {
            micro_table(&mut out, micro);
        }
        out
    }
}

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn optional(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |value| format!("{value:.digits$}"))
}

fn failed_line(out: &mut String, row: &Row, columns: usize) {
    let error = table_cell(row.error.as_deref().unwrap_or("no numbers"));
    let _ = writeln!(
        out,
        "| {} | {} | FAILED: {error} |{}",
        row.name,
        row.variant,
        " |".repeat(columns.saturating_sub(3))
    );
}

fn latency_cells(result: &LoadResult) -> String {
    let latency = &result.latency;
    format!(
        "{} | {} | {} | {} | {}",
        ms(latency.p50_ms),
        ms(latency.p90_ms),
        ms(latency.p99_ms),
        ms(latency.p999_ms),
        ms(latency.max_ms)
    )
}

fn open_loop_table(out: &mut String, title: &str, rows: &[&Row], rate: u32) {
    let _ = writeln!(
        out,
        "\n### {title}: open loop at {rate} rps (oha, {CONNECTIONS} connections, latency \
         corrected for coordinated omission)\n"
    );
    let _ = writeln!(
        out,
        "| row | variant | achieved rps | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        match row.open.iter().find(|open| open.rate == rate) {
            Some(open) => {
                let result = &open.result;
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {} | {} |",
                    row.name,
                    row.variant,
                    result.rps,
                    latency_cells(result),
                    result.errors
                );
            }
            None => failed_line(out, row, 9),
        }
    }
}

fn l7_tables(out: &mut String, rows: &[Row], rates: &[u32]) {
    let _ = writeln!(
        out,
        "\n## L7: keep-alive GET through the proxy\n\n### Closed loop (wrk, 1 thread, \
         {CONNECTIONS} connections)\n"
    );
    let _ = writeln!(
        out,
        "| row | variant | rps | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        match &row.closed {
            Some(closed) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {} | {} |",
                    row.name,
                    row.variant,
                    closed.rps,
                    latency_cells(closed),
                    closed.errors
                );
            }
            None => failed_line(out, row, 9),
        }
    }

    let _ = writeln!(out, "\n### Cost per request (the proxy's own processes)\n");
    let _ = writeln!(
        out,
        "| row | variant | CPU µs/request | × nginx | syscalls/request | context switches/request \
         | TCP segments out/request | TCP connects/request \
         | RSS idle MiB | RSS under load MiB | RSS per idle connection |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    let cpu = |row: &Row| {
        row.cost
            .as_ref()
            .and_then(|cost| cost.process_cpu_us_per_request)
    };
    for row in rows.iter().filter(|row| row.name != "direct") {
        let Some(cost) = &row.cost else {
            failed_line(out, row, 11);
            continue;
        };
        let nginx = rows
            .iter()
            .find(|other| other.name == "nginx" && other.variant == row.variant)
            .and_then(cpu);
        let ratio = cpu(row).zip(nginx).map(|(own, nginx)| own / nginx);
        let memory = match &row.memory {
            Some(memory) => format!(
                "{:.1} MiB | {} | {:.1} KiB ({} held)",
                memory.idle_kib as f64 / 1024.0,
                optional(cost.rss_under_load_kib.map(|kib| kib as f64 / 1024.0), 1),
                memory.per_idle_connection_bytes / 1024.0,
                memory.idle_connections
            ),
            None => format!(
                "– | {} | –",
                optional(cost.rss_under_load_kib.map(|kib| kib as f64 / 1024.0), 1)
            ),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {memory} |",
            row.name,
            row.variant,
            optional(cpu(row), 1),
            optional(ratio, 2),
            optional(cost.syscalls_per_request, 2),
            optional(cost.context_switches_per_request, 2),
            optional(cost.tcp_segments_out_per_request, 2),
            optional(cost.tcp_connects_per_request, 3),
        );
    }

    let l7_rows: Vec<&Row> = rows.iter().collect();
    for &rate in rates {
        open_loop_table(out, "L7", &l7_rows, rate);
    }
}

fn instructions_table(out: &mut String, counts: &[Instructions]) {
    let requests = counts.first().map_or(0, |count| count.requests);
    let _ = writeln!(
        out,
        "\n### Userspace instructions per request (callgrind: {requests} keep-alive GETs from \
         `h2load --h1`, every process and thread of the program, over the load alone)\n"
    );
    let _ = writeln!(out, "| row | variant | instructions/request | × nginx |");
    let _ = writeln!(out, "|---|---|---|---|");
    for count in counts {
        let nginx = counts
            .iter()
            .find(|other| other.name == "nginx" && other.variant == count.variant)
            .and_then(|nginx| nginx.per_request);
        let ratio = count.per_request.zip(nginx).map(|(own, nginx)| own / nginx);
        match count.per_request {
            Some(per_request) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {per_request:.0} | {} |",
                    count.name,
                    count.variant,
                    optional(ratio, 2)
                );
            }
            None => {
                let error = count.error.as_deref().unwrap_or("no count");
                let _ = writeln!(
                    out,
                    "| {} | {} | failed: {} | – |",
                    count.name,
                    count.variant,
                    table_cell(error)
                );
            }
        }
    }
}

fn l4_tables(out: &mut String, rows: &[Row], rates: &[u32]) {
    let _ = writeln!(
        out,
        "\n## L4: GET to lb-00's L4 port\n\n### Closed loop (wrk, 1 thread, {CONNECTIONS} \
         connections); cost is the machine's busy time (/proc/stat: softirq and XDP included)\n"
    );
    let _ = writeln!(
        out,
        "| row | connections | rps | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | \
         machine µs/request | over direct | process CPU µs/request |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let machine = |row: &Row| {
        row.cost
            .as_ref()
            .map(|cost| cost.machine_busy_us_per_request)
    };
    for row in rows {
        let (Some(closed), Some(cost)) = (&row.closed, &row.cost) else {
            failed_line(out, row, 12);
            continue;
        };
        let direct = rows
            .iter()
            .find(|other| other.name == "direct" && other.connections == row.connections)
            .and_then(machine);
        let over_direct = if row.over_direct_us_rounds.len() > 1 {
            paired_over_direct(&row.over_direct_us_rounds)
        } else {
            let marginal = direct.map(|direct| cost.machine_busy_us_per_request - direct);
            optional(marginal, 1)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {:.1} | {} | {} |",
            row.name,
            row.variant,
            closed.rps,
            latency_cells(closed),
            closed.errors,
            cost.machine_busy_us_per_request,
            if row.name == "direct" {
                "–".to_owned()
            } else {
                over_direct
            },
            optional(cost.process_cpu_us_per_request, 1),
        );
    }
    let keep_alive: Vec<&Row> = rows
        .iter()
        .filter(|row| row.connections == Connections::KeepAlive)
        .collect();
    for &rate in rates {
        open_loop_table(out, "L4 keep-alive", &keep_alive, rate);
    }
}

/// The median of a row's per-round costs over direct, with their range.
fn paired_over_direct(rounds: &[f64]) -> String {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[(sorted.len() - 1) / 2];
    format!(
        "{median:.1} ({:.1} to {:.1}, {} rounds)",
        sorted[0],
        sorted[sorted.len() - 1],
        sorted.len()
    )
}

fn control_table(out: &mut String, controls: &[Control], micro: Option<&[Micro]>) {
    let _ = writeln!(out, "\n## Control plane\n");
    let _ = writeln!(out, "| measure | p50 | p99 | max | samples |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for control in controls {
        let rows = [
            ("Swarm task running → routable", &control.routable),
            (
                "of which Swarm's: task running → listed running by the manager's API",
                &control.listed,
            ),
            (
                "of which xlb's: listed running by the manager's API → routable",
                &control.routable_after_listed,
            ),
            (
                "scaled away: no longer listed running by the manager's API → not routed",
                &control.unrouted_after_unlisted,
            ),
        ];
        for (what, latencies) in rows {
            let _ = writeln!(
                out,
                "| {what}, {} (PollInterval {}) | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
                control.path,
                control.poll_interval,
                latencies.p50_ms,
                latencies.p99_ms,
                latencies.max_ms,
                latencies.samples_ms.len()
            );
        }
        if let Some(error) = &control.error {
            let _ = writeln!(out, "| FAILED: {} | | | | |", table_cell(error));
        }
    }
    for bench in micro
        .into_iter()
        .flatten()
        .filter(|bench| bench.group == "control")
    {
        let _ = writeln!(
            out,
            "| {} (criterion mean) | {} | | | |",
            bench.what,
            bench.mean_ns.map_or_else(|| "missing".to_owned(), duration)
        );
    }
}

fn micro_table(out: &mut String, micro: &[Micro]) {
    let _ = writeln!(out, "\n## Micro (criterion, mean per operation)\n");
    let _ = writeln!(out, "| bench | criterion id | mean |");
    let _ = writeln!(out, "|---|---|---|");
    for bench in micro.iter().filter(|bench| bench.group != "control") {
        let _ = writeln!(
            out,
            "| {} | `{}/{}` | {} |",
            bench.what,
            bench.group,
            bench.id,
            bench.mean_ns.map_or_else(|| "missing".to_owned(), duration)
        );
    }
}

/// Text that fits one markdown table cell: one line, no column separator, the error's tail
/// (where the cause is) when it is long. The whole text is in report.json.
fn table_cell(text: &str) -> String {
    const MAX: usize = 300;
    let line = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "/");
    match line.char_indices().rev().nth(MAX) {
        Some((cut, _)) => format!("…{}", &line[cut..]),
        None => line,
    }
}

/// Nanoseconds in the unit that reads best.
fn duration(ns: f64) -> String {
    match ns {
        ns if ns >= 1e9 => format!("{:.2} s", ns / 1e9),
        ns if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.2} µs", ns / 1e3),
        ns => format!("{ns:.0} ns"),
    }
}
