//! Every command a confer user types: `confer node`, `confer coordinator`,
//! `confer query`, `confer demo`, `confer doctor`.
//!
//! Servers print one line to standard output when they are ready,
//! `confer <role> <name> listening on <addr>`, which the demo and the
//! end-to-end tests wait for; logs go to standard error.

pub mod children;
pub mod client;
pub mod demo;
pub mod gibleed;
mod servers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// confer: federated analytics with differential privacy across a health network.
#[derive(Debug, Parser)]
#[command(name = "confer", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); CONFER_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node beside an institution's records.
    Node(ServerArgs),
    /// Run the coordinator that researchers connect to.
    Coordinator(ServerArgs),
    /// Run a DP query through a coordinator and print the result.
    Query(QueryArgs),
    /// Start a local federation over the GiBleed OMOP data and run example queries.
    Demo(DemoArgs),
    /// Check this installation: libtorch, CUDA, versions.
    Doctor,
}

/// Arguments of `confer node` and `confer coordinator`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The config file (node.toml or coordinator.toml).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Serve plaintext gRPC; allowed only on loopback addresses (demos, tests).
    #[arg(long)]
    pub insecure_loopback: bool,
    /// Stop when standard input closes (used by `confer demo` for its children).
    #[arg(long, hide = true)]
    pub stop_on_stdin_eof: bool,
}

/// Arguments of `confer query`.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// The coordinator's URL, e.g. http://127.0.0.1:50050.
    #[arg(long, env = "CONFER_COORDINATOR")]
    pub coordinator: String,
    /// The study the query runs under (its budget pays).
    #[arg(long, env = "CONFER_STUDY", default_value = confer_protocol::task::DEFAULT_STUDY)]
    pub study: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = client::OutputFormat::Table)]
    pub format: client::OutputFormat,
    /// The statement, in the confer DP dialect.
    pub sql: String,
}

/// Arguments of `confer demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the federation running after the scripted queries, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// The GiBleed CSV directory (default: ../shared/data/eunomia_gibleed/csv).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Working directory for the split data, configs and ledgers (default: a fresh temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Number of sites to split the data into.
    #[arg(long, default_value_t = 3)]
    pub sites: usize,
    /// Port for the coordinator (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

/// Parses arguments, runs the command, and maps errors to exit codes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => servers::node(args).await,
        Command::Coordinator(args) => servers::coordinator(args).await,
        Command::Query(args) => client::query_command(args).await,
        Command::Demo(args) => demo::run(args, cli.verbose).await,
        Command::Doctor => doctor(),
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONFER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn doctor() -> anyhow::Result<()> {
    println!("confer {}", env!("CARGO_PKG_VERSION"));
    let rt =
        confer_models::runtime().map_err(|e| anyhow::anyhow!("libtorch does not work: {e}"))?;
    println!(
        "libtorch {} loaded; training device: {}",
        rt.libtorch_version, rt.device
    );
    println!(
        "CUDA: {} ({} device(s)), cuDNN: {}",
        if rt.cuda_available {
            "available"
        } else {
            "not available"
        },
        rt.cuda_devices,
        if rt.cudnn_available {
            "available"
        } else {
            "not available"
        }
    );
    Ok(())
}
