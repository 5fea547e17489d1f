//! Every command a confer user types: `confer node`, `confer coordinator`,
//! `confer query`, `confer study`, `confer nodes`, `confer pki`,
//! `confer audit`, `confer keygen`, `confer synth`, `confer catalog`,
//! `confer train`, `confer model`, `confer demo`, `confer doctor`.
//!
//! Servers print one line to standard output when they are ready,
//! `confer <role> <name> listening on <addr>`, which the demo and the
//! end-to-end tests wait for; logs go to standard error.

pub mod admin;
pub mod check;
pub mod children;
pub mod client;
pub mod commission;
pub mod demo;
pub mod gibleed;
pub mod governance;
pub mod heart;
pub mod onboard;
mod servers;
pub mod supervision;
pub mod synth;
pub mod train;

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
    /// Run a node beside an institution's records, or manage its studies.
    Node(NodeArgs),
    /// Run the coordinator that researchers connect to, or manage its users.
    Coordinator(CoordinatorArgs),
    /// Run a DP statement through a coordinator and print the result.
    Query(QueryArgs),
    /// Create, list or show studies (through a coordinator).
    Study(admin::StudyArgs),
    /// The nodes a coordinator knows, with their health.
    Nodes(ConnectArgs),
    /// A network certificate authority and certificates for mutual TLS.
    Pki(admin::PkiArgs),
    /// Check a node's audit log, or print or export it.
    Audit(governance::AuditArgs),
    /// Create an Ed25519 signing key for a coordinator.
    Keygen {
        /// Where to write the secret key (the public key goes to <out>.pub).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Write a synthetic OMOP CDM 5.4 network: one directory and node.toml per site.
    Synth(synth::SynthArgs),
    /// The network catalog as the nodes publish it: tables, columns, types, bounds, domains.
    Catalog(admin::CatalogArgs),
    /// The health commission's supervision statistics: indicators, periodic releases, reports.
    Supervision(supervision::SupervisionArgs),
    /// Train a model across the nodes (federated, secure aggregation, DP), or follow, list or cancel jobs.
    Train(train::TrainArgs),
    /// Export a trained model with its standardisation and privacy statement.
    Model(train::ModelArgs),
    /// Start a local federation over the GiBleed OMOP data and run example queries.
    Demo(DemoArgs),
    /// Check this installation: libtorch, CUDA, versions.
    Doctor,
}

/// Options shared by servers: config, transport.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOptions {
    /// Serve plaintext gRPC instead of TLS; allowed only on loopback addresses (demos, tests).
    #[arg(long)]
    pub insecure_loopback: bool,
    /// Stop when standard input closes (used by `confer demo` for its children).
    #[arg(long, hide = true)]
    pub stop_on_stdin_eof: bool,
}

/// Arguments of `confer node`: serve, or a steward action.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct NodeArgs {
    /// Steward action; without one, the node serves.
    #[command(subcommand)]
    pub action: Option<governance::NodeAction>,
    /// The node's config (node.toml).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// How to serve.
    #[command(flatten)]
    pub serve: ServeOptions,
}

/// Arguments of `confer coordinator`: serve, or manage users.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CoordinatorArgs {
    /// Administration; without it, the coordinator serves.
    #[command(subcommand)]
    pub action: Option<admin::CoordinatorAction>,
    /// The coordinator's config (coordinator.toml).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// How to serve.
    #[command(flatten)]
    pub serve: ServeOptions,
}

/// How to reach a coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The coordinator's URL: http://127.0.0.1:50050 (loopback) or https://host:port.
    #[arg(long, global = true, env = "CONFER_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Your bearer token (printed by `confer coordinator user add`).
    #[arg(long, global = true, env = "CONFER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The network CA certificate, for https URLs.
    #[arg(long, global = true, env = "CONFER_CA")]
    pub ca: Option<PathBuf>,
    /// Your client certificate (with --key), if you authenticate by certificate.
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Your client key.
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<PathBuf>,
}

/// Arguments of `confer query`.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// Where and who.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The study the statement runs under (its budget pays).
    #[arg(long, env = "CONFER_STUDY")]
    pub study: Option<String>,
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
    /// Skip the federated training step (four UCI heart-disease nodes).
    #[arg(long)]
    pub no_training: bool,
    /// Skip the supervision statistics step (a synthetic region's nodes).
    #[arg(long)]
    pub no_supervision: bool,
    /// With --serve: months before last month to release as well, so the
    /// web console's trend lines have points (each takes a run).
    #[arg(long, default_value_t = 2)]
    pub trend_months: u32,
}

/// Stack of each runtime thread (see [`main`]).
const WORKER_STACK_BYTES: usize = 64 << 20;

/// Parses arguments, runs the command, and maps errors to exit codes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // Planning and running a query recurse over its expressions (DataFusion's
    // planner, optimizer and evaluators); the parser admits at most
    // `confer_query::parse::MAX_OPERATORS` operators, and this stack holds
    // their recursion with a wide margin (tokio's default of 2 MiB did not
    // hold 400 terms in a debug build). Pages are committed only as used.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(WORKER_STACK_BYTES)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Work a server cancelled (a task past its time limit, a caller gone)
    // stops at its next yield; a long computation may not yield for a
    // while, and must not hold up the process's exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<check::Outcome>() {
            // A preflight check's summary, with its own exit code.
            Some(outcome) => {
                eprintln!("{outcome}");
                ExitCode::from(outcome.code)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let required = |config: Option<PathBuf>, what: &str| {
        config.ok_or_else(|| anyhow::anyhow!("--config <{what}> is required"))
    };
    match cli.command {
        Command::Node(NodeArgs {
            action: Some(governance::NodeAction::Check { insecure_loopback }),
            config,
            ..
        }) => check::node(&required(config, "node.toml")?, insecure_loopback).await,
        Command::Node(NodeArgs {
            action:
                Some(governance::NodeAction::Init {
                    data,
                    site,
                    out,
                    listen,
                    hosts,
                    state_dir,
                    force,
                }),
            ..
        }) => {
            onboard::init(onboard::InitArgs {
                data,
                site,
                out,
                listen,
                hosts,
                state_dir,
                force,
            })
            .await
        }
        Command::Node(NodeArgs {
            action:
                Some(governance::NodeAction::Enrol {
                    bundle,
                    replace_trust,
                }),
            config,
            ..
        }) => onboard::node_enrol(&required(config, "node.toml")?, &bundle, replace_trust),
        Command::Node(NodeArgs {
            action: Some(action),
            config,
            ..
        }) => governance::node_action(config.as_deref(), action),
        Command::Node(NodeArgs {
            action: None,
            config,
            serve,
        }) => servers::node(required(config, "node.toml")?, serve).await,
        Command::Coordinator(CoordinatorArgs {
            action: Some(admin::CoordinatorAction::Check { insecure_loopback }),
            config,
            ..
        }) => check::coordinator(&required(config, "coordinator.toml")?, insecure_loopback).await,
        Command::Coordinator(CoordinatorArgs {
            action: Some(action),
            config,
            ..
        }) => admin::coordinator_action(&required(config, "coordinator.toml")?, action),
        Command::Coordinator(CoordinatorArgs {
            action: None,
            config,
            serve,
        }) => servers::coordinator(required(config, "coordinator.toml")?, serve).await,
        Command::Query(args) => client::query_command(args).await,
        Command::Study(args) => admin::study(args).await,
        Command::Nodes(connect) => admin::nodes(connect).await,
        Command::Pki(args) => admin::pki(args),
        Command::Audit(args) => governance::audit(args),
        Command::Keygen { out, force } => governance::keygen(&out, force),
        Command::Synth(args) => tokio::task::spawn_blocking(move || synth::run(args)).await?,
        Command::Catalog(args) => admin::catalog(args).await,
        Command::Supervision(args) => supervision::supervision(args).await,
        Command::Train(args) => train::train(args).await,
        Command::Model(args) => train::model(args).await,
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
