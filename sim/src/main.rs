use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use gallocy_sim::{run, FaultMode, Mutant, RunParams};

#[derive(Parser)]
#[command(
    name = "gallocy-sim",
    about = "Deterministic simulation of a gallocy cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Shape {
    /// Number of nodes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=64))]
    nodes: u64,
    /// Application operations to issue.
    #[arg(long, default_value_t = 2000)]
    ops: u64,
    /// Faults to inject; `all` draws every kind with per-seed intensities.
    #[arg(long, value_enum, default_value_t = FaultMode::All)]
    faults: FaultMode,
    /// A planted bug to switch on (see `gallocy-sim mutants`).
    #[arg(long)]
    mutant: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one seed and print a summary ending with `trace-hash: <hex>`.
    Run {
        #[arg(long)]
        seed: u64,
        #[command(flatten)]
        shape: Shape,
    },
    /// Run a range of seeds (`A..B`, B excluded) in parallel.
    Sweep {
        #[arg(long)]
        seeds: String,
        #[command(flatten)]
        shape: Shape,
        /// Worker threads (default: available cores).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// List the planted bugs, one name first on each line.
    Mutants,
}

fn parse_mutant(name: &Option<String>) -> Result<Option<Mutant>, String> {
    match name {
        None => Ok(None),
        Some(name) => Mutant::from_name(name)
            .map(Some)
            .ok_or_else(|| format!("unknown mutant {name:?}; `gallocy-sim mutants` lists them")),
    }
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text
        .split_once("..")
        .ok_or_else(|| format!("seed range {text:?} is not A..B"))?;
    let a: u64 = a.trim().parse().map_err(|_| format!("bad seed {a:?}"))?;
    let b: u64 = b.trim().parse().map_err(|_| format!("bad seed {b:?}"))?;
    if b <= a {
        return Err(format!("empty seed range {text:?}"));
    }
    Ok((a, b))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Mutants => {
            for mutant in Mutant::ALL {
                println!("{}  {}", mutant.name(), mutant.description());
            }
            ExitCode::SUCCESS
        }
        Command::Run { seed, shape } => {
            let mutant = match parse_mutant(&shape.mutant) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let report = run(RunParams {
                seed,
                nodes: shape.nodes as usize,
                ops: shape.ops,
                faults: shape.faults,
                mutant,
            });
            print!("{}", report.summary());
            if report.violation.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Sweep { seeds, shape, jobs } => {
            let (first, end) = match parse_range(&seeds) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let mutant = match parse_mutant(&shape.mutant) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            sweep(first, end, &shape, mutant, jobs)
        }
    }
}

fn sweep(
    first: u64,
    end: u64,
    shape: &Shape,
    mutant: Option<Mutant>,
    jobs: Option<usize>,
) -> ExitCode {
    let total = end - first;
    let jobs = jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, 64);
    let started = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let template = RunParams {
        seed: first,
        nodes: shape.nodes as usize,
        ops: shape.ops,
        faults: shape.faults,
        mutant,
    };
    let outcome = gallocy_sim::sweep(first..end, &template, jobs, &|finished, failures, line| {
        if let Some(line) = line {
            eprintln!("{}{line}", if tty { "\r\x1b[K" } else { "" });
        }
        progress(finished, total, failures, started, tty);
    });
    if tty {
        eprintln!();
    }
    let wall = outcome.wall.as_secs_f64();
    println!(
        "sweep: {total} seeds ({first}..{end}), {} failed, {:.1} s wall, {:.0} messages/s",
        outcome.failures.len(),
        wall,
        outcome.frames_delivered as f64 / wall.max(1e-9)
    );
    if outcome.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        let seeds: Vec<u64> = outcome.failures.iter().map(|(s, _)| *s).collect();
        println!("failing seeds: {seeds:?}");
        ExitCode::from(1)
    }
}

fn progress(finished: u64, total: u64, failures: usize, started: Instant, tty: bool) {
    const WIDTH: u64 = 40;
    let filled = finished * WIDTH / total.max(1);
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    let line = format!(
        "[{bar}] {finished}/{total} seeds, {failures} failed, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut err = std::io::stderr().lock();
    if tty {
        let _ = write!(err, "\r\x1b[K{line}");
    } else if finished == total || finished.is_multiple_of((total / 10).max(1)) {
        let _ = writeln!(err, "{line}");
    }
    let _ = err.flush();
}
