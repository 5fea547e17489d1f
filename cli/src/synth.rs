//! `confer synth`: a synthetic OMOP CDM 5.4 network, one directory per site
//! (or, with `--region`, per node of a regional health network), each with a
//! `node.toml` a node serves as it is.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use confer_synth::{Format, SynthOptions, WindowEnd, generate};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `confer synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Number of institutions: site 1 is the tertiary hospital, about a fifth
    /// are county hospitals, the rest township health centres and village clinics.
    #[arg(long, default_value_t = 5)]
    pub sites: usize,
    /// Regional residents to simulate (residents who never use care appear nowhere).
    #[arg(long, default_value_t = 10_000)]
    pub persons: u64,
    /// Seed: the same options give identical files.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// File format of the tables.
    #[arg(long, value_enum, default_value_t = FormatArg::Parquet)]
    pub format: FormatArg,
    /// Replace the site directories, manifest.json and region.toml of an earlier run in --out.
    #[arg(long)]
    pub force: bool,
    /// A regional health network for supervision statistics: village clinics'
    /// records held by their township centre's node, region.toml with the
    /// organisation tree, [supervision] in each node.toml, and the model's
    /// supervision additions (drug costs, in-hospital deaths, referrals down,
    /// readmissions, registered hypertension and diabetes follow-up).
    #[arg(long)]
    pub region: bool,
    /// The last month simulated, YYYY-MM: the window is the six years ending
    /// with it.
    #[arg(long, default_value = "2024-12")]
    pub window_end: String,
    /// The coordinator's Ed25519 public key file (`confer keygen` writes
    /// `<key>.pub`), written into every node.toml. Without it the configs
    /// hold a placeholder key to replace before the nodes serve.
    #[arg(long)]
    pub coordinator_key_file: Option<PathBuf>,
    /// No progress bar (it is also off when standard error is not a terminal).
    #[arg(long)]
    pub quiet: bool,
}

/// File formats on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// Apache Parquet (ZSTD).
    Parquet,
    /// CSV with a lower-case header line.
    Csv,
}

/// Runs `confer synth`.
pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let coordinator_key = match &args.coordinator_key_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--coordinator-key-file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let window_end: WindowEnd = args.window_end.parse()?;
    let options = SynthOptions {
        sites: args.sites,
        persons: args.persons,
        seed: args.seed,
        out: args.out.clone(),
        format: match args.format {
            FormatArg::Parquet => Format::Parquet,
            FormatArg::Csv => Format::Csv,
        },
        force: args.force,
        coordinator_key,
        region: args.region,
        window_end,
    };
    let bar = if args.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(args.persons);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} residents, {msg} (eta {eta})",
            )
            .expect("a valid progress template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    };
    let started = Instant::now();
    let summary = generate(&options, |p| {
        bar.set_position(p.persons_done);
        bar.set_message(format!("{} rows", p.rows_written));
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let outputs = if args.region {
        format!(
            "{} nodes ({} institutions)",
            summary.sites.len(),
            summary.institutions
        )
    } else {
        format!("{} sites", summary.sites.len())
    };
    println!(
        "{} residents, {outputs}, {} rows in {secs:.1} s ({:.0} rows/s) into {}",
        summary.residents,
        summary.rows_written,
        summary.rows_written as f64 / secs.max(1e-9),
        summary.out.display()
    );
    println!(
        "{:<14} {:<10} {:>10} {:>12} {:>14} {:>12}",
        if args.region { "node" } else { "site" },
        "tier",
        "persons",
        "visits",
        "conditions",
        "measurements"
    );
    for site in &summary.sites {
        let rows = |t: &str| site.rows.get(t).copied().unwrap_or(0);
        println!(
            "{:<14} {:<10} {:>10} {:>12} {:>14} {:>12}",
            site.name,
            site.tier.to_string(),
            site.persons,
            rows("visit_occurrence"),
            rows("condition_occurrence"),
            rows("measurement"),
        );
    }
    if args.region {
        println!(
            "the organisation tree is in {}; each node.toml's [supervision] names the units it holds",
            summary.out.join(confer_synth::REGION_FILE).display()
        );
    }
    if args.coordinator_key_file.is_none() {
        println!(
            "each site's node.toml holds a placeholder coordinator_key: pass --coordinator-key-file, or edit it before `confer node --config <site>/node.toml`"
        );
    }
    Ok(())
}
