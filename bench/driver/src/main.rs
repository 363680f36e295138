//! `hotswap-bench`: the benchmark suite behind `bench/run.sh`.
//!
//! It starts, on 127.0.0.1 only, hotswap serving the example handler as a plugin, the static
//! baseline (the same handler compiled into the same hyper setup) and the Node cluster anchor,
//! drives them with wrk and with its own clients, and writes the results into BENCHMARKS.md.
//! Every section is bounded in time and count; rounds alternate between servers so that drift
//! on a noisy machine hits all of them, and the report gives medians and ratios.
//!
//! `hotswap-bench soak` is the soak run behind `bench/soak.sh` (see [`soak`]);
//! `hotswap-bench generations` measures repeated loading for `bench/generations.sh`.

mod anchor;
mod callgrind;
mod conn;
mod generations;
mod proc;
mod report;
mod sections;
mod soak;
mod swap;
mod wrk;
mod ws;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::{Parser, Subcommand};

/// Benchmarks hotswap against a static hyper server and the Node cluster anchor
/// (`hotswap-bench soak --help` for the soak run).
#[derive(Debug, Parser)]
#[command(name = "hotswap-bench", args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    suite: Option<Args>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The soak run behind bench/soak.sh.
    Soak(soak::Args),
    /// What repeated loading costs per generation, behind bench/generations.sh.
    Generations(generations::Args),
}

/// The benchmark suite's options.
#[derive(Debug, clap::Args)]
struct Args {
    /// Seconds instead of minutes: one short round of everything, to check that the suite runs
    /// (its figures mean nothing).
    #[arg(long)]
    smoke: bool,
    /// The hotswap binary.
    #[arg(long)]
    hotswap: PathBuf,
    /// The static baseline binary.
    #[arg(long)]
    static_server: PathBuf,
    /// The axum example's plugin build (section i, with --static-axum).
    #[arg(long, requires = "static_axum")]
    axum_plugin: Option<PathBuf>,
    /// The static server with the axum example's Router compiled in.
    #[arg(long, requires = "axum_plugin")]
    static_axum: Option<PathBuf>,
    /// Two builds of the example handler that answer with different versions.
    #[arg(long, num_args = 2, required = true)]
    plugins: Vec<PathBuf>,
    /// The versions those two builds answer with, in the same order.
    #[arg(long, num_args = 2, required = true)]
    versions: Vec<String>,
    /// A writable copy of the Node cluster anchor (../shared/anchors/node-cluster); without it,
    /// or without node, the anchor is left out.
    #[arg(long)]
    anchor: Option<PathBuf>,
    /// Also run the anchor's own reload benchmark (bench.sh) for its reload figures.
    #[arg(long)]
    anchor_reloads: bool,
    /// Scratch directory (plugin directory, logs).
    #[arg(long)]
    work: PathBuf,
    /// The report to write (its part between the result markers is replaced).
    #[arg(long)]
    out: PathBuf,
    /// The command that ran the suite, for the report.
    #[arg(long, default_value = "bench/run.sh")]
    entry: String,
}

/// How long and how much each section runs.
#[derive(Debug, Clone)]
pub struct Params {
    pub hello_rounds: usize,
    pub hello_time: Duration,
    pub connections: u32,
    pub download_rounds: usize,
    pub download_time: Duration,
    pub download_size: u64,
    pub download_connections: u32,
    pub latency_swaps: usize,
    pub load_rounds: usize,
    pub load_time: Duration,
    pub swap_every: Duration,
    pub slow_size: u64,
    pub slow_rate: u64,
    pub slow_swaps: usize,
    pub slow_first: Duration,
    pub slow_spacing: Duration,
    pub memory_points: [u64; 3],
    pub ws_rounds: usize,
    pub ws_time: Duration,
    pub ws_sessions: usize,
    /// Host upgrades timed on an idle host (section j).
    pub upgrades: usize,
    /// How often the host is upgraded under load (as the anchor reloads, every 2 s).
    pub upgrade_every: Duration,
    /// The short and the long run of each server under callgrind; none in a smoke run (a
    /// minute of valgrind for figures that would mean nothing).
    pub callgrind_times: Option<(Duration, Duration)>,
}

impl Params {
    fn full() -> Params {
        Params {
            hello_rounds: 5,
            hello_time: Duration::from_secs(10),
            connections: 32,
            download_rounds: 5,
            download_time: Duration::from_secs(5),
            download_size: 64 << 20,
            download_connections: 4,
            latency_swaps: 100,
            load_rounds: 2,
            load_time: Duration::from_secs(10),
            swap_every: Duration::from_millis(100),
            slow_size: 20_000_000,
            slow_rate: 1_000_000,
            slow_swaps: 5,
            slow_first: Duration::from_secs(2),
            slow_spacing: Duration::from_secs(3),
            memory_points: [10, 100, 1000],
            ws_rounds: 5,
            ws_time: Duration::from_secs(5),
            ws_sessions: 32,
            upgrades: 10,
            upgrade_every: Duration::from_secs(2),
            callgrind_times: Some((Duration::from_secs(3), Duration::from_secs(9))),
        }
    }

    fn smoke() -> Params {
        Params {
            hello_rounds: 1,
            hello_time: Duration::from_secs(1),
            download_rounds: 1,
            download_time: Duration::from_secs(1),
            download_size: 8 << 20,
            latency_swaps: 5,
            load_rounds: 1,
            load_time: Duration::from_secs(1),
            slow_size: 1_000_000,
            slow_rate: 1_000_000,
            slow_swaps: 2,
            slow_first: Duration::from_millis(300),
            slow_spacing: Duration::from_millis(300),
            memory_points: [2, 5, 10],
            ws_rounds: 1,
            ws_time: Duration::from_secs(1),
            upgrades: 2,
            upgrade_every: Duration::from_millis(300),
            callgrind_times: None,
            ..Params::full()
        }
    }
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli { command: Some(Command::Soak(args)), .. } => soak::main(args),
        Cli { command: Some(Command::Generations(args)), .. } => generations::main(args),
        Cli { suite: Some(args), .. } => suite(args),
        Cli { command: None, suite: None } => unreachable!("clap requires the suite's options without a subcommand"),
    }
}

fn suite(args: Args) -> Result<()> {
    ensure!(args.plugins.len() == 2 && args.versions.len() == 2, "give two plugins and two versions");
    ensure!(args.versions[0] != args.versions[1], "the two builds must answer with different versions");
    let params = if args.smoke { Params::smoke() } else { Params::full() };
    std::fs::create_dir_all(&args.work)?;
    let builds = [0, 1].map(|i| swap::Build { file: args.plugins[i].clone(), version: args.versions[i].clone() });
    let setup = sections::Setup {
        hotswap: args.hotswap,
        static_server: args.static_server,
        axum: args.axum_plugin.zip(args.static_axum),
        builds,
        anchor: args.anchor.filter(|_| anchor::node_available()),
        work: args.work,
    };
    let results = sections::run_all(&setup, &params, args.anchor_reloads && !args.smoke)?;
    let text = report::render(&results, &params, args.smoke, &args.entry);
    report::write(&args.out, &text)?;
    eprintln!("== results written to {}", args.out.display());
    Ok(())
}
