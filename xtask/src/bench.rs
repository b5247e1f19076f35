//! `cargo xtask bench [l7|l4|control|micro|all]`: xlb measured side by side with nginx,
//! HAProxy, kernel NAT and direct, in one run, on namespaces it creates and removes.
//!
//! It installs what the run needs (Debian's nginx-light, haproxy, wrk, linux-perf and
//! valgrind; oha built once into the tools cache), builds xlb with its XDP program, runs
//! criterion's micro and control benches (`userspace/benches/`), then the side-by-side program
//! (`tests/benches/peers/`), which prints the tables and writes `report.md`, `report.json` and
//! SVG plots under `target/bench/<timestamp>/`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{
    build_ebpf,
    exec::{exec, workspace_root},
    toolchain,
};

/// Debian packages the bench runs besides the test packages: the peers and the load.
pub const BENCH_PACKAGES: &[&str] = &["nginx-light", "haproxy", "wrk", "linux-perf", "valgrind"];
/// The one open-loop rate of a `--quick` run (the peers program's choice, checked here).
pub const QUICK_RATE: u32 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    L7,
    L4,
    Control,
    Micro,
    All,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Section::L7 => "l7",
            Section::L4 => "l4",
            Section::Control => "control",
            Section::Micro => "micro",
            Section::All => "all",
        }
    }

    /// Whether criterion's benches run for this section (micro; control's snapshot bench).
    fn criterion_benches(self) -> &'static [&'static str] {
        match self {
            Section::Micro => &["micro"],
            Section::Control => &["control"],
            Section::All => &["micro", "control"],
            Section::L7 | Section::L4 => &[],
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Options {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    pub section: Section,
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Open-loop rates in requests per second (each measured for --duration).
    #[arg(long = "rate", num_args = 1..)]
    pub rates: Vec<u32>,
    /// About a second per row: checks that the bench works, its numbers mean little.
    #[arg(long)]
    pub quick: bool,
    /// Where the report goes (default: target/bench/<timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only these L7 programs (nginx, haproxy, xlb; repeatable), beside the direct row.
    #[arg(long)]
    pub only: Vec<String>,
    /// Rounds of the L4 table, its rows interleaved; each row reports its median round, and
    /// its cost over direct paired with the same round's direct row.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Record a perf profile of each proxy's closed loop into <out>/profiles/.
    #[arg(long)]
    pub profile: bool,
    /// Count each L7 program's userspace instructions per request under callgrind (after the
    /// L7 table; the counts hardly move with the machine's noise) into <out>/callgrind/.
    #[arg(long)]
    pub callgrind: bool,
}

/// Runs the bench; returns the directory holding its report.
pub fn run(options: &Options) -> anyhow::Result<PathBuf> {
    toolchain::require_root("`cargo xtask bench`")?;
    toolchain::ensure_packages(toolchain::RUNTIME_PACKAGES)?;
    toolchain::ensure_packages(BENCH_PACKAGES)?;
    let oha = toolchain::ensure_oha()?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let root = workspace_root();
    exec(cargo(&root).args(["build", "--release", "-p", "xlb", "--bins"]))?;

    let out = match &options.out {
        Some(out) => out.clone(),
        None => root.join("target/bench").join(timestamp()?),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let criterion_dir = out.join("criterion");
    for bench in options.section.criterion_benches() {
        let mut command = cargo(&root);
        command
            .args(["bench", "-p", "xlb", "--bench", bench])
            .env("CRITERION_HOME", &criterion_dir);
        if options.quick {
            command.args(["--", "--quick"]);
        }
        exec(&mut command)?;
    }

    let mut peers = cargo(&root);
    peers
        .args(["bench", "-p", "xlb-testbed", "--bench", "peers", "--"])
        .arg(options.section.name())
        .arg("--out")
        .arg(&out)
        .arg("--xlb")
        .arg(root.join("target/release/xlb"))
        .arg("--oha")
        .arg(&oha)
        .arg("--criterion-dir")
        .arg(&criterion_dir)
        .args(["--duration", &options.duration.to_string()])
        .args(["--rounds", &options.rounds.to_string()])
        .arg("--command")
        .arg(command_line(options));
    if !options.rates.is_empty() {
        peers.arg("--rate");
        peers.args(options.rates.iter().map(u32::to_string));
    }
    if options.quick {
        peers.arg("--quick");
    }
    for only in &options.only {
        peers.args(["--only", only]);
    }
    if options.profile {
        peers.arg("--profile");
    }
    if options.callgrind {
        peers.arg("--callgrind");
    }
    exec(&mut peers)?;
    Ok(out)
}

fn cargo(root: &Path) -> Command {
    let mut command = Command::new(env!("CARGO"));
    command.current_dir(root);
    command
}

/// The command as the user would type it, for the report.
fn command_line(options: &Options) -> String {
    let mut line = format!("cargo xtask bench {}", options.section.name());
    if options.quick {
        line.push_str(" --quick");
    } else {
        line.push_str(&format!(" --duration {}", options.duration));
    }
    for rate in &options.rates {
        line.push_str(&format!(" --rate {rate}"));
    }
    for only in &options.only {
        line.push_str(&format!(" --only {only}"));
    }
    if options.rounds != 1 {
        line.push_str(&format!(" --rounds {}", options.rounds));
    }
    if options.profile {
        line.push_str(" --profile");
    }
    if options.callgrind {
        line.push_str(" --callgrind");
    }
    line
}

fn timestamp() -> anyhow::Result<String> {
    let output = Command::new("date")
        .arg("-u")
        .arg("+%Y%m%d-%H%M%S")
        .output()
        .context("running date")?;
    if !output.status.success() {
        bail!("date failed: {}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The L7 programs a `--profile` run profiles, as its profile files are named.
const PROFILED_PROGRAMS: [&str; 3] = ["nginx", "haproxy", "xlb"];

/// What `cargo xtask test` checks of a `--profile` run: each L7 proxy has a non-empty flat
/// profile.
pub fn check_profiles(dir: &Path) -> anyhow::Result<()> {
    let profiles = dir.join("profiles");
    let texts: Vec<(String, u64)> = std::fs::read_dir(&profiles)
        .with_context(|| format!("reading {}", profiles.display()))?
        .filter_map(Result::ok)
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "txt"))
        .map(|entry| {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            (entry.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    for program in PROFILED_PROGRAMS {
        if !texts
            .iter()
            .any(|(name, size)| name.starts_with(program) && *size > 0)
        {
            bail!(
                "no profile of {program} in {} (found: {texts:?})",
                profiles.display()
            );
        }
    }
    Ok(())
}

/// What `cargo xtask test` checks of a `--callgrind` run: each L7 program, with its access log
/// off and on, has an instruction count.
pub fn check_instructions(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("report.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let counts = report["instructions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let counted = counts
        .iter()
        .filter(|count| count["per_request"].as_f64().is_some_and(|n| n > 0.0))
        .count();
    if counted != 2 * PROFILED_PROGRAMS.len() {
        bail!(
            "{counted} of {} L7 rows have an instruction count in {}: {counts:?}",
            2 * PROFILED_PROGRAMS.len(),
            path.display()
        );
    }
    Ok(())
}

/// What `cargo xtask test` checks of a `--quick` run: every row produced numbers and every
/// file exists. Nothing about speed.
pub fn check_report(dir: &Path, rates: &[u32], l4_rounds: usize) -> anyhow::Result<()> {
    let path = dir.join("report.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut problems = Vec::new();
    for (table, expected_rows) in [("l7", 7), ("l4", 14)] {
        let rows = report[table].as_array().cloned().unwrap_or_default();
        if rows.len() != expected_rows {
            problems.push(format!(
                "{table}: {} rows, expected {expected_rows}",
                rows.len()
            ));
        }
        for row in &rows {
            let name = format!("{table} {} ({})", row["name"], row["variant"]);
            if !row["error"].is_null() {
                problems.push(format!("{name}: {}", row["error"]));
            }
            if row["closed"]["requests"].as_u64().unwrap_or(0) == 0 {
                problems.push(format!("{name}: no closed-loop requests"));
            }
            if row["cost"]["machine_busy_us_per_request"]
                .as_f64()
                .is_none()
            {
                problems.push(format!("{name}: no cost"));
            }
            let paired = row["over_direct_us_rounds"].as_array().map_or(0, Vec::len);
            if table == "l4" && l4_rounds > 1 && paired != l4_rounds {
                problems.push(format!(
                    "{name}: {paired} rounds paired with direct, expected {l4_rounds}"
                ));
            }
            let keep_alive = row["connections"] == "keep-alive";
            let open = row["open"].as_array().map_or(0, Vec::len);
            if keep_alive && open != rates.len() {
                problems.push(format!(
                    "{name}: {open} open-loop results, expected {}",
                    rates.len()
                ));
            }
        }
    }
    let controls = report["control"].as_array().cloned().unwrap_or_default();
    if controls.len() != 2 {
        problems.push(format!(
            "control: {} series, expected 2 (xlb run, controller → proxy)",
            controls.len()
        ));
    }
    for control in &controls {
        let samples = |series: &str| control[series]["samples_ms"].as_array().map_or(0, Vec::len);
        if !control["error"].is_null()
            || samples("routable") == 0
            || samples("listed") != samples("routable")
        {
            problems.push(format!("control: {control}"));
        }
    }
    for bench in report["micro"].as_array().into_iter().flatten() {
        if bench["mean_ns"].as_f64().is_none() {
            problems.push(format!(
                "micro {}/{}: no result",
                bench["group"], bench["id"]
            ));
        }
    }
    let mut files = vec![
        "report.md".to_owned(),
        "l7-latency.svg".to_owned(),
        "l7-cpu.svg".to_owned(),
        "l4-latency-keep-alive.svg".to_owned(),
        "l4-latency-new-connection.svg".to_owned(),
        "l4-cpu-keep-alive.svg".to_owned(),
        "l4-cpu-new-connection.svg".to_owned(),
    ];
    files.extend(rates.iter().map(|rate| format!("l7-open-{rate}.svg")));
    for file in files {
        if !dir.join(&file).is_file() {
            problems.push(format!("{file} is missing"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "the bench report in {} is incomplete:\n- {}",
            dir.display(),
            problems.join("\n- ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of a --quick run as the peers program writes it, with every file beside it.
    fn complete_report(dir: &Path) -> serde_json::Value {
        let row = |name: &str, connections: &str| {
            serde_json::json!({
                "name": name,
                "variant": connections,
                "connections": connections,
                "closed": {"requests": 100},
                "open": if connections == "keep-alive" { vec![serde_json::json!({"rate": QUICK_RATE})] } else { vec![] },
                "cost": {"machine_busy_us_per_request": 10.0},
                "over_direct_us_rounds": [1.0, 2.0],
                "error": null,
            })
        };
        let report = serde_json::json!({
            "l7": (0..7).map(|index| row(&format!("l7-{index}"), "keep-alive")).collect::<Vec<_>>(),
            "l4": (0..14)
                .map(|index| row(&format!("l4-{index}"), if index % 2 == 0 { "keep-alive" } else { "new-per-request" }))
                .collect::<Vec<_>>(),
            "control": [
                {"path": "xlb run", "routable": {"samples_ms": [120.0, 80.0]},
                 "listed": {"samples_ms": [60.0, 50.0]}, "error": null},
                {"path": "xlb controller → xlb proxy", "routable": {"samples_ms": [90.0]},
                 "listed": {"samples_ms": [70.0]}, "error": null},
            ],
            "micro": [{"group": "maglev", "id": "build_ring_10_backends", "mean_ns": 2.0e6}],
        });
        for file in [
            "report.md",
            "l7-latency.svg",
            "l7-cpu.svg",
            "l4-latency-keep-alive.svg",
            "l4-latency-new-connection.svg",
            "l4-cpu-keep-alive.svg",
            "l4-cpu-new-connection.svg",
            &format!("l7-open-{QUICK_RATE}.svg"),
        ] {
            std::fs::write(dir.join(file), "x").unwrap();
        }
        report
    }

    fn check(report: &serde_json::Value, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("report.json"), report.to_string()).unwrap();
        check_report(dir, &[QUICK_RATE], 2)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_complete_report_passes_and_every_gap_is_named() {
        let dir = scratch("check");
        let report = complete_report(&dir);
        check(&report, &dir).unwrap();

        let mut failed_row = report.clone();
        failed_row["l7"][6]["error"] = "xlb did not start".into();
        failed_row["l7"][6]["closed"] = serde_json::Value::Null;
        let error = check(&failed_row, &dir).unwrap_err().to_string();
        assert!(error.contains("xlb did not start"), "{error}");
        assert!(error.contains("no closed-loop requests"), "{error}");

        let mut missing_bench = report.clone();
        missing_bench["micro"][0]["mean_ns"] = serde_json::Value::Null;
        let error = check(&missing_bench, &dir).unwrap_err().to_string();
        assert!(error.contains("build_ring_10_backends"), "{error}");

        let mut no_control = report.clone();
        no_control["control"][1]["routable"]["samples_ms"] = serde_json::json!([]);
        assert!(check(&no_control, &dir).is_err());

        let mut unlisted = report.clone();
        unlisted["control"][0]["listed"]["samples_ms"] = serde_json::json!([50.0]);
        assert!(check(&unlisted, &dir).is_err());

        let mut one_round = report.clone();
        one_round["l4"][3]["over_direct_us_rounds"] = serde_json::json!([1.0]);
        let error = check(&one_round, &dir).unwrap_err().to_string();
        assert!(
            error.contains("1 rounds paired with direct, expected 2"),
            "{error}"
        );

        std::fs::remove_file(dir.join("l7-cpu.svg")).unwrap();
        let error = check(&report, &dir).unwrap_err().to_string();
        assert!(error.contains("l7-cpu.svg is missing"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_proxy_needs_a_non_empty_profile() {
        let dir = scratch("profiles");
        let profiles = dir.join("profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        for program in PROFILED_PROGRAMS {
            std::fs::write(
                profiles.join(format!("{program}-access-log-off.txt")),
                "42% x",
            )
            .unwrap();
        }
        check_profiles(&dir).unwrap();

        std::fs::write(profiles.join("xlb-access-log-off.txt"), "").unwrap();
        let error = check_profiles(&dir).unwrap_err().to_string();
        assert!(error.contains("no profile of xlb"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
