//! `confer train` and `confer model export`: start a federated training
//! job at a coordinator, follow it round by round, keep its metrics, and
//! write the trained model with its privacy statement.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use confer_models::job::JobSpec;
use confer_models::{Device, Model, ModelSpec};
use confer_protocol::coordinator::actions as custom;
use confer_protocol::train::{
    JobRef, JobState, JobStatus, ModelExport, RoundRecord, TrainSubmit, decode_f32,
};
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use crate::ConnectArgs;
use crate::client::Client;

/// Arguments of `confer train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Where and who.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The job to start (job.toml).
    #[arg(long, short, required_unless_present_any = ["attach", "list", "cancel"])]
    pub config: Option<PathBuf>,
    /// The study the job runs under (its budget pays at every node).
    #[arg(long, env = "CONFER_STUDY")]
    pub study: Option<String>,
    /// Follow a job started earlier instead of starting one.
    #[arg(long, conflicts_with_all = ["config", "list", "cancel"])]
    pub attach: Option<Uuid>,
    /// List the jobs you may see.
    #[arg(long, conflicts_with_all = ["config", "cancel"])]
    pub list: bool,
    /// Stop a job after the step under way.
    #[arg(long, conflicts_with = "config")]
    pub cancel: Option<Uuid>,
    /// Directory for metrics.csv, metrics.json and the final model.
    #[arg(long, default_value = "train-out")]
    pub out: PathBuf,
    /// Start the job and return (follow it later with --attach).
    #[arg(long)]
    pub detach: bool,
}

/// Arguments of `confer model`.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ModelAction,
}

/// `confer model` actions.
#[derive(Debug, clap::Subcommand)]
pub enum ModelAction {
    /// Write a job's latest model: weights (safetensors), spec, standardisation and privacy statement.
    Export {
        /// Where and who.
        #[command(flatten)]
        connect: ConnectArgs,
        /// The training job.
        #[arg(long)]
        job: Uuid,
        /// The weights file to write (`.safetensors`); the spec, the
        /// standardisation and the privacy statement go beside it.
        #[arg(long, default_value = "model.safetensors")]
        out: PathBuf,
    },
}

/// `confer train`.
pub async fn train(args: TrainArgs) -> anyhow::Result<()> {
    let mut client = Client::connect_with(&args.connect).await?;
    if args.list {
        return list(&mut client).await;
    }
    if let Some(id) = args.cancel {
        let status = status_of(&mut client, custom::TRAIN_CANCEL, id).await?;
        println!(
            "job {id}: {} (it stops after the step under way)",
            status.state.name()
        );
        return Ok(());
    }
    let id = match (args.attach, &args.config) {
        (Some(id), _) => id,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let spec =
                JobSpec::from_toml_str(&text).with_context(|| format!("{}", path.display()))?;
            let study = args
                .study
                .clone()
                .ok_or_else(|| anyhow!("--study <name> (or CONFER_STUDY) is required: the job's budget is spent under it"))?;
            let submit = TrainSubmit {
                study,
                job: serde_json::to_value(&spec)?,
            };
            let status: JobStatus = serde_json::from_value(
                client
                    .action(custom::TRAIN_SUBMIT, serde_json::to_vec(&submit)?)
                    .await?,
            )?;
            println!(
                "job {} started: {} rounds at {}",
                status.job_id,
                status.rounds,
                status.sites.join(", ")
            );
            if let Some(summary) = status
                .privacy
                .as_ref()
                .and_then(|p| p.get("summary"))
                .and_then(|s| s.as_str())
            {
                println!("privacy: {summary}");
            }
            if args.detach {
                println!("follow it with: confer train --attach {}", status.job_id);
                return Ok(());
            }
            status.job_id
        }
        (None, None) => bail!("give --config <job.toml>, --attach <job>, --list or --cancel <job>"),
    };
    follow(&mut client, id, &args.out).await.map(|_| ())
}

async fn status_of(client: &mut Client, action: &str, id: Uuid) -> anyhow::Result<JobStatus> {
    let body = serde_json::to_vec(&JobRef { job_id: id })?;
    Ok(serde_json::from_value(client.action(action, body).await?)?)
}

async fn list(client: &mut Client) -> anyhow::Result<()> {
    let jobs: Vec<JobStatus> =
        serde_json::from_value(client.action(custom::TRAIN_LIST, Vec::new()).await?)?;
    if jobs.is_empty() {
        println!("no training jobs you may see");
        return Ok(());
    }
    println!(
        "{:<36}  {:<16}  {:<12}  {:<10}  {:>9}  owner",
        "job", "name", "study", "state", "round"
    );
    for j in jobs {
        println!(
            "{:<36}  {:<16}  {:<12}  {:<10}  {:>4}/{:<4}  {}",
            j.job_id,
            j.name,
            j.study,
            j.state.name(),
            j.round,
            j.rounds,
            j.owner
        );
    }
    Ok(())
}

/// Polls the job until it ends: a progress bar, a line per round, the
/// metrics files, and the model at the end. Returns the final status.
pub async fn follow(client: &mut Client, id: Uuid, out: &Path) -> anyhow::Result<JobStatus> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut status = status_of(client, custom::TRAIN_STATUS, id).await?;
    let bar = ProgressBar::new(u64::from(status.rounds));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} {msg}",
        )
        .map_err(|e| anyhow!("progress bar: {e}"))?
        .progress_chars("=> "),
    );
    let mut shown = 0;
    loop {
        for entry in &status.history[shown..] {
            // A hidden bar (output not a terminal) prints nothing itself.
            if bar.is_hidden() {
                println!("{}", describe(entry));
            } else {
                bar.println(describe(entry));
            }
        }
        if status.history.len() > shown {
            shown = status.history.len();
            write_metrics(&status, out)?;
        }
        bar.set_position(u64::from(status.round));
        bar.set_message(status.state.name().to_string());
        if status.state.is_final() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        status = status_of(client, custom::TRAIN_STATUS, id).await?;
    }
    bar.finish_and_clear();
    write_metrics(&status, out)?;
    for note in &status.notes {
        println!("note: {note}");
    }
    match status.state {
        JobState::Finished => {
            let weights = out.join("model.safetensors");
            export_to(client, id, &weights).await?;
            println!(
                "job {id} finished after {} rounds; metrics in {}, model in {}",
                status.round,
                out.join("metrics.csv").display(),
                weights.display()
            );
            Ok(status)
        }
        JobState::Cancelled => {
            println!("job {id} was cancelled after {} rounds", status.round);
            Ok(status)
        }
        JobState::Failed => Err(anyhow!(
            "job {id} failed: {}",
            status.error.unwrap_or_else(|| "no reason recorded".into())
        )),
        JobState::Preparing | JobState::Running => unreachable!("the loop ends on a final state"),
    }
}

/// One line per round.
fn describe(r: &RoundRecord) -> String {
    let mut line = format!("round {:>3}: ", r.round);
    if r.contributors.is_empty() {
        line.push_str("failed");
    } else {
        line.push_str(&format!(
            "{} nodes, update norm {:.4}, local {:.2}s, secagg {:.2}s, server {:.3}s",
            r.contributors.len(),
            r.update_norm,
            r.local_secs,
            r.secagg_secs,
            r.server_secs
        ));
    }
    if let Some(c) = r.clipped.filter(|&c| c > 0.0) {
        line.push_str(&format!(", {c:.0} updates clipped"));
    }
    if !r.dropped.is_empty() {
        let names: Vec<&str> = r.dropped.iter().map(|(n, _)| n.as_str()).collect();
        line.push_str(&format!(", dropped: {}", names.join(", ")));
    }
    if let Some(overall) = r.evaluation.iter().find(|m| m.site == "overall") {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        line.push_str(&format!(
            " | accuracy {}, AUC {}, loss {}",
            f(overall.accuracy),
            f(overall.auc),
            f(overall.loss)
        ));
    }
    line
}

fn write_metrics(status: &JobStatus, out: &Path) -> anyhow::Result<()> {
    let json = out.join("metrics.json");
    std::fs::write(&json, serde_json::to_vec_pretty(status)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let csv = out.join("metrics.csv");
    let mut file =
        std::fs::File::create(&csv).with_context(|| format!("cannot write {}", csv.display()))?;
    writeln!(
        file,
        "round,site,examples,loss,accuracy,auc,noise_stddev,contributors,dropped,clipped,update_norm,local_secs,secagg_secs,server_secs"
    )?;
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in &status.history {
        let common = format!(
            "{},{},{},{},{},{},{}",
            r.contributors.len(),
            r.dropped.len(),
            opt(r.clipped),
            r.update_norm,
            r.local_secs,
            r.secagg_secs,
            r.server_secs
        );
        if r.evaluation.is_empty() {
            writeln!(file, "{},,,,,,,{common}", r.round)?;
        }
        for m in &r.evaluation {
            writeln!(
                file,
                "{},{},{},{},{},{},{},{common}",
                r.round,
                m.site,
                m.examples,
                opt(m.loss),
                opt(m.accuracy),
                opt(m.auc),
                m.noise_stddev
            )?;
        }
    }
    Ok(())
}

/// `confer model export`.
pub async fn model(args: ModelArgs) -> anyhow::Result<()> {
    match args.action {
        ModelAction::Export { connect, job, out } => {
            let mut client = Client::connect_with(&connect).await?;
            export_to(&mut client, job, &out).await?;
            println!("model of job {job} written to {}", out.display());
            Ok(())
        }
    }
}

/// Writes the model at `weights` (safetensors and its spec sidecar) and
/// `<weights>.job.json` with the features, standardisation and privacy
/// statement.
async fn export_to(client: &mut Client, job: Uuid, weights: &Path) -> anyhow::Result<()> {
    let export: ModelExport = serde_json::from_value(
        client
            .action(
                custom::MODEL_EXPORT,
                serde_json::to_vec(&JobRef { job_id: job })?,
            )
            .await?,
    )?;
    let spec: ModelSpec = serde_json::from_value(export.spec.clone())?;
    let mut model = Model::with_device(&spec, 0, Device::Cpu)?;
    model.set_parameters(&decode_f32(&export.weights)?)?;
    if let Some(dir) = weights.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    model.save(weights)?;
    let meta = weights.with_extension("job.json");
    let body = serde_json::json!({
        "job_id": export.job_id,
        "round": export.round,
        "features": export.features,
        "standardisation": export.standardisation,
        "privacy": export.privacy,
    });
    std::fs::write(&meta, serde_json::to_vec_pretty(&body)?)
        .with_context(|| format!("cannot write {}", meta.display()))?;
    Ok(())
}
