//! Synthetic OMOP CDM 5.4 data for a regional network of health institutions,
//! so that confer runs end to end without a single real record.
//!
//! [`generate`] simulates a region of `persons` residents over six years
//! (2019-01-01 to 2024-12-31, or the six years ending with
//! [`SynthOptions::window_end`]) and writes one OMOP directory per
//! institution, each with a `node.toml` a confer node can serve as it is
//! (or, in [region mode](#region-mode), one per node of a regional health
//! network):
//!
//! ```
//! use confer_synth::{Format, SynthOptions, generate};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let mut options = SynthOptions::new(dir.path().join("region"));
//! options.sites = 3;
//! options.persons = 300;
//! options.format = Format::Csv;
//! let summary = generate(&options, |p| {
//!     eprintln!("{}/{} residents, {} rows", p.persons_done, p.persons_total, p.rows_written)
//! })
//! .unwrap();
//! assert_eq!(summary.sites.len(), 3);
//! assert!(dir.path().join("region/county-1/node.toml").is_file());
//! ```
//!
//! # Output
//!
//! ```text
//! out/
//! ├── manifest.json            sites (name, tier, persons, rows per table), seed, window
//! ├── region.toml              region mode only: the organisation tree
//! ├── tertiary-1/              one directory per site, named <tier>-<k>
//! │   ├── node.toml            [node] + [tables.*]: privacy unit, domains, bounds
//! │   ├── person.parquet       person-level tables (privacy_unit = "person_id"):
//! │   ├── observation_period.parquet   visit_occurrence, condition_occurrence,
//! │   ├── ...                          drug_exposure, procedure_occurrence,
//! │   │                                measurement, death, cost
//! │   └── concept.parquet      public tables: concept, concept_ancestor,
//! │                            care_site, provider, location
//! ├── county-1/ ...
//! └── village-7/ ...
//! ```
//!
//! Columns, their order and their types are exactly those of
//! `confer_node::omop` (Int64, Float64, Date32, Timestamp(Microsecond, None),
//! Utf8); columns the CDM requires are never null. CSV files have a header
//! line with the lower-case column names. `node.toml` names the site, listens
//! on `127.0.0.1:0`, keeps state in `state/` next to it, and declares public
//! domains for group keys (sex, birth year, visit type, the concept sets the
//! generator uses) and bounds for numeric columns (costs, quantities, days of
//! supply, measurement values, birth year).
//!
//! # Data flow
//!
//! ```text
//!  residents 1..=N in chunks of 2,048
//!        │  worker threads (chunk i on worker i mod W), each resident from its
//!        │  own ChaCha8 stream seeded by (seed, person_id)
//!        ▼
//!  model::Life ── simulate six years ──▶ rows for every site visited
//!        │  per-chunk Arrow builders, one set per site
//!        ▼  bounded channels, read back in chunk order
//!  calling thread: per-site, per-table ArrowWriter (ZSTD, 256k-row groups)
//!                  or CSV writer ──▶ files; progress callback after each chunk
//! ```
//!
//! Memory is bounded by the chunk size, the channel depth and one open row
//! group per file, whatever `persons` is; the output is identical for the same
//! options whatever the number of threads. Rows go to the site's directory,
//! or in region mode to its node's.
//!
//! # The model
//!
//! **Network.** Site 1 is the regional tertiary hospital; about a fifth of
//! the sites are county hospitals; the rest are township health centres (a
//! third) and village clinics. Villages belong to townships and townships to
//! counties round-robin. Each site draws its own habits (catchment size,
//! antibiotic prescribing, how often blood pressure is recorded, prices,
//! insurer share, prescription length, how coarsely respiratory infections
//! are coded), so sites of the same tier differ too.
//!
//! **Residents.** One regional population with a shared resident id
//! (`person_id`, like a regional health card; `person_source_value`
//! `RHC0000000042`). A resident who visits several sites appears in each
//! site's `person` table with the same id, birth date, sex and race. The age
//! pyramid is rural: many children and old people, fewer working-age adults.
//! Homes: 12% in the city, 18% in county towns, 25% in township seats, 45% in
//! villages. Sex 51% male; race Asian (8515) with ethnic-group source values,
//! 2% not recorded (0).
//!
//! **Chronic disease** (hypertension, type 2 diabetes, COPD, coronary
//! arteriosclerosis, atrial fibrillation, heart failure, hyperlipidaemia,
//! CKD stage 3, asthma, osteoarthritis, low back pain, GERD): prevalence
//! rises logistically with age, with comorbidity clustering (diabetes with
//! hypertension, CKD with both); onset is spread over adult life, so some is
//! diagnosed during the window. Only part is known to the health system (55%
//! of hypertension, 60% of diabetes, ...); unknown disease is found at half of
//! hospital stays. Known disease brings follow-up visits (2.5 to 12 a year by
//! burden and adherence), mostly at the township centre or village clinic,
//! complex patients (insulin, heart failure, CKD) higher up, city residents at
//! the tertiary hospital. Follow-ups record the diagnoses, blood pressure
//! (hypertensives: higher, and higher still untreated), weight, glucose and
//! HbA1c for diabetics (labs not at village clinics), creatinine, cholesterol,
//! ECGs, and refills of a regimen drawn once per resident: amlodipine,
//! losartan, lisinopril, hydrochlorothiazide; metformin and/or insulin;
//! aspirin and simvastatin; warfarin (35% of AF); furosemide; inhalers.
//!
//! **Minor illness** follows age (highest under five and over eighty) and,
//! for respiratory infections, the season (peak in mid-January, trough in
//! July). It is seen locally: village clinic, township centre, county
//! hospital or, for city residents, the tertiary hospital. Antibiotics for
//! respiratory infections fall from 55% at village clinics to 20% at the
//! tertiary hospital (times the site's habit), with the rural intravenous
//! "drip"; village clinics code most respiratory infections as unspecified
//! acute URI. Some respiratory infections turn into pneumonia days later
//! (children, the old, COPD): a referral visit whose
//! `preceding_visit_occurrence_id` is the first visit.
//!
//! **Emergencies** (stroke, myocardial infarction, GI haemorrhage, heart
//! failure and COPD exacerbations, hip and forearm fractures, appendicitis)
//! have yearly hazards by age, sex and comorbidity (NSAID users and warfarin
//! users bleed more; AF and hypertension raise stroke). Rural residents often
//! stop at their local clinic first; then the county hospital (or the
//! tertiary, for city residents and a quarter of the rest), usually through
//! the ER (`admitted_from` 8870), sometimes transferred to the tertiary
//! hospital (`discharged_to`/`admitted_from` 8717): stroke gets a head CT and
//! sometimes alteplase, MI an ECG and at the tertiary hospital often PCI, GI
//! bleeding transfusions. Referral chains link each visit to the one before
//! it at the referring site; visit ids are unique across the network
//! (`person_id * 1,000,000 + n` for every row id), so those links resolve.
//!
//! **Deaths** come from case fatality of hospital events (at the hospital of
//! the last stay) and from Gompertz background mortality (recorded at the
//! site of the last encounter, cause the most serious chronic condition).
//! Nothing happens after death.
//!
//! **Observation periods**: one per resident per site, from their first to
//! their last visit there (or their death there).
//!
//! **Costs**: one `cost` row per visit (`cost_domain_id` 'Visit',
//! `cost_event_id` the visit), in US dollars (44818668): a base by tier and
//! visit type (a village consultation about $5, a tertiary admission about
//! $320 a day), a log-normal spread, the site's price level, plus drugs and
//! procedures; the insurer pays a share by tier and visit type (inpatient
//! most), the patient the rest.
//!
//! # Region mode
//!
//! [`SynthOptions::region`] (`confer synth --region`) lays the same network
//! out as a municipal health commission supervises it. Without it nothing
//! below happens and the output is byte for byte what it always was (a test
//! pins it).
//!
//! **Nodes.** A village clinic's records are held by its township health
//! centre's node: no directory for villages; their rows go to the township's
//! files with their own `care_site_id`. `person` and `observation_period`
//! hold one row per resident per node (a resident seen at the township and
//! one of its villages is there once; `person.care_site_id` is the first of
//! the node's institutions they used). The township's `care_site` and
//! `provider` list the centre and its villages. A village with no township
//! would stay its own node; hospitals and townships are nodes as before.
//!
//! **`region.toml`** in the output directory: levels city, county, township,
//! village; group sets `tier` (tertiary, county, township, village) and
//! `ownership` (public, private: about 30% of village clinics, drawn from the
//! seed); one `[[unit]]` per institution with Chinese-style codes (city
//! `3701` for the tertiary hospital, counties `3701CC`, townships
//! `3701CCTTT`, villages `3701CCTTTVVV`, nested as the network nests them),
//! Chinese and English names, `parent` and `groups`. Two-digit county codes
//! cap region mode at 99 county hospitals (497 sites).
//!
//! **`node.toml`** gains `[supervision] units = { "<code>" = [care_site_id],
//! ... }` for the institutions the node holds; `visit_occurrence_id = {
//! unique = true }` and `care_site_id = { domain = { from = 1, to = N } }`
//! (every institution of the region); the extra places of service in the
//! `admitted_from`/`discharged_to` domains; hip replacement in the procedure
//! domain; `cost.paid_ingredient_cost` bounds [0, 100,000]. `manifest.json`
//! names `region.toml` and lists under `sites` the nodes, each with its
//! `institutions` (name, tier, `care_site_id`, unit code).
//!
//! **Model additions**, so that the supervision indicators have plausible
//! values:
//!
//! * drug cost: drugs are priced at the tier's markup times a per-site habit,
//!   and `cost.paid_ingredient_cost` is the visit's drug cost: about 25% of
//!   charges at the tertiary hospital, 35% at county hospitals, 47% at
//!   township centres and village clinics;
//! * in-hospital deaths: a stay that ends in death is discharged to
//!   4216643 "Patient died" (not NULL);
//! * downward referrals: 45% of discharges home from county and tertiary
//!   hospitals after stroke, MI, heart failure, COPD or hip fracture of
//!   residents with a township or village clinic are discharged to 8940
//!   (office), then seen there 2 to 13 days later (`admitted_from` 8717,
//!   `preceding_visit_occurrence_id` the discharge); upward referrals from a
//!   village clinic or township centre to a higher tier arrive from 8940;
//! * 30-day readmissions: 20% of heart failure, 15% of COPD and 10% of
//!   pneumonia discharges are readmitted to the same hospital 3 to 29 days
//!   later (about 11% of all discharges end up readmitted within 30 days);
//! * registered hypertension and diabetes: at least four follow-ups a year
//!   (monthly for the most adherent fifth); at township centres and village
//!   clinics every such follow-up records blood pressure (hypertension) and
//!   fasting glucose (diabetes, mg/dL); about 60% of readings are controlled
//!   (SBP under 140, glucose under 126 mg/dL = 7.0 mmol/L);
//! * hip fractures kept at a county or the tertiary hospital get a hip
//!   replacement (65%); the rural drip often carries ceftriaxone (35%).
//!
//! Every event row (condition, drug, procedure, measurement) carries its
//! `visit_occurrence_id`, and `cost.cost_event_id` is the visit, in either
//! mode.
//!
//! # Concept ids
//!
//! Every id written is in each site's `concept` table, with the row as found
//! in the vocabulary it was checked against:
//!
//! * OHDSI Eunomia GiBleed (`eunomia_gibleed/csv/CONCEPT.csv`) and/or
//!   Synthea27Nj (`Synthea27Nj_5.4.zip`, `CONCEPT.csv`): all conditions
//!   except the four below, all 30 drugs and 17 ingredients (RxNorm), all 11
//!   measurements and 8 units (LOINC, UCUM), all 17 procedures (SNOMED),
//!   visits 9201/9202/9203, gender 8507/8532, ethnicity 38003564, and 0.
//! * Ids found in GiBleed's `CONCEPT_ANCESTOR.csv` as ancestors of the right
//!   concepts, with names and codes from SNOMED CT (not in either `CONCEPT`
//!   file): 255573 chronic obstructive lung disease, 257011 acute upper
//!   respiratory infection, 201820 diabetes mellitus, 320136 disorder of
//!   respiratory system, 4274025 disease, 441840 clinical finding.
//! * **Unverified** (in neither vocabulary; ids from OMOP conventions and
//!   public ETL code): 32817 EHR (every `*_type_concept_id`), places of
//!   service 8717 Inpatient Hospital, 8756 Outpatient Hospital, 8870
//!   Emergency Room - Hospital, 8536 Home, 8940 Office, race 8515 Asian (used
//!   by both datasets' `PERSON`, but without a concept row), currency
//!   44818668 US dollar, and 316866 hypertensive disorder. A yuan concept
//!   could not be checked at all, so charges are in dollars.
//! * Region mode only (the default `concept` tables lack them): 4203771
//!   total replacement of hip (Synthea27Nj), and, **unverified**, 4216643
//!   patient died (the id OMOP ETLs such as MIMIC-IV's write as
//!   `discharged_to_concept_id`; domain Observation, SNOMED code 397709008
//!   from memory).
//!
//! `concept_ancestor` holds a level-0 self link for every standard concept,
//! the 70 links among these concepts that GiBleed's `CONCEPT_ANCESTOR.csv`
//! has (ingredients of drugs, SNOMED parents of conditions), and four certain
//! but unverified links (type 2 diabetes under diabetes mellitus, essential
//! hypertension under hypertensive disorder, diclofenac and lisinopril
//! tablets under their ingredients).

mod dates;
mod model;
mod network;
mod output;
mod region;
mod schema;
mod vocab;
mod write;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc;

use serde::Serialize;

pub use network::{Site, Tier, plan_sites};
pub use output::PLACEHOLDER_COORDINATOR_KEY;

use crate::dates::days_from_civil;
use crate::model::{ID_STRIDE, Life, MAX_AGE, Settings};
use crate::network::Network;
use crate::region::{Layout, Tree};
use crate::write::{ChunkSink, PersonTable, SiteBatch, TableFile};

/// Residents simulated per chunk (one unit of work for a thread).
const CHUNK: u64 = 2048;

/// Output file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Apache Parquet (ZSTD, 256k-row groups).
    #[default]
    Parquet,
    /// Comma-separated values with a header line.
    Csv,
}

impl Format {
    /// File extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Csv => "csv",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

impl FromStr for Format {
    type Err = SynthError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "parquet" => Ok(Format::Parquet),
            "csv" => Ok(Format::Csv),
            other => Err(SynthError::InvalidOptions(format!(
                "format {other:?}: use parquet or csv"
            ))),
        }
    }
}

/// The last month of the simulated window; the window is the six years
/// ending with it (2019-01-01 to 2024-12-31 for the default, 2024-12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WindowEnd {
    year: i32,
    month: u32,
}

impl WindowEnd {
    /// The earliest end month accepted.
    pub const MIN: WindowEnd = WindowEnd {
        year: 2000,
        month: 1,
    };
    /// The latest end month accepted.
    pub const MAX: WindowEnd = WindowEnd {
        year: 2099,
        month: 12,
    };

    /// `year`-`month`, between [`WindowEnd::MIN`] and [`WindowEnd::MAX`].
    pub fn new(year: i32, month: u32) -> Result<Self> {
        let end = WindowEnd { year, month };
        if !(1..=12).contains(&month) || end < Self::MIN || end > Self::MAX {
            return Err(SynthError::InvalidOptions(format!(
                "window_end (--window-end) {year:04}-{month:02}: give a month from {} to {} as YYYY-MM (for example 2024-12)",
                Self::MIN,
                Self::MAX
            )));
        }
        Ok(end)
    }

    /// The year.
    pub fn year(self) -> i32 {
        self.year
    }

    /// The month, 1 to 12.
    pub fn month(self) -> u32 {
        self.month
    }

    /// The window's first and last days (day numbers): from the first day of
    /// the month after the same month six years earlier to the last day of
    /// this month.
    fn days(self) -> (i32, i32) {
        let (next_year, next_month) = if self.month == 12 {
            (self.year + 1, 1)
        } else {
            (self.year, self.month + 1)
        };
        let end = days_from_civil(next_year, next_month, 1) - 1;
        let start = days_from_civil(next_year - 6, next_month, 1);
        (start, end)
    }
}

impl Default for WindowEnd {
    fn default() -> Self {
        WindowEnd {
            year: 2024,
            month: 12,
        }
    }
}

impl fmt::Display for WindowEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for WindowEnd {
    type Err = SynthError;

    fn from_str(s: &str) -> Result<Self> {
        let parsed = s.split_once('-').and_then(|(y, m)| {
            let digits = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_digit());
            if !digits(y, 4) || !digits(m, 2) {
                return None;
            }
            Some((y.parse().ok()?, m.parse().ok()?))
        });
        match parsed {
            Some((year, month)) => WindowEnd::new(year, month),
            None => Err(SynthError::InvalidOptions(format!(
                "window_end (--window-end) {s:?}: write it as YYYY-MM, a month from {} to {} (for example 2024-12)",
                Self::MIN,
                Self::MAX
            ))),
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Number of institutions (at least 1); see [`plan_sites`].
    pub sites: usize,
    /// Number of regional residents simulated. Residents who never use care
    /// in the window appear nowhere.
    pub persons: u64,
    /// Seed: the same options give identical rows.
    pub seed: u64,
    /// Output directory; created if missing, refused if not empty unless
    /// `force`.
    pub out: PathBuf,
    /// File format of the tables.
    pub format: Format,
    /// Replace the site directories, `manifest.json` and `region.toml` of a
    /// previous run in `out` (other files there are left alone).
    pub force: bool,
    /// The coordinator's Ed25519 public key (hex) for every `node.toml`;
    /// `None` writes [`PLACEHOLDER_COORDINATOR_KEY`], which no coordinator
    /// can sign for, with a comment saying to replace it.
    pub coordinator_key: Option<String>,
    /// Region mode: one node per township (holding its village clinics'
    /// records) and per hospital, `region.toml` with the organisation tree,
    /// `[supervision]` in each `node.toml`, and the model's supervision
    /// additions (see the crate docs). Off, the output is what it always was.
    pub region: bool,
    /// The last month simulated (default 2024-12).
    pub window_end: WindowEnd,
}

impl SynthOptions {
    /// Defaults: 5 sites, 10,000 residents, seed 42, Parquet, no force, the
    /// placeholder coordinator key, no region mode, the window ending 2024-12.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            sites: 5,
            persons: 10_000,
            seed: 42,
            out: out.into(),
            format: Format::Parquet,
            force: false,
            coordinator_key: None,
            region: false,
            window_end: WindowEnd::default(),
        }
    }
}

/// Progress, reported after each chunk of residents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Residents simulated and written.
    pub persons_done: u64,
    /// Residents to simulate.
    pub persons_total: u64,
    /// Rows written so far, all tables and sites.
    pub rows_written: u64,
}

/// One output directory: a site, or in region mode a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteSummary {
    /// Directory and node name.
    pub name: String,
    /// Tier (of the institution the node is named after).
    pub tier: Tier,
    /// Its `care_site_id`.
    pub care_site_id: i64,
    /// Rows of its `person` table.
    pub persons: u64,
    /// Rows per table, by table name.
    pub rows: BTreeMap<String, u64>,
    /// Region mode: every institution whose records the node holds, itself
    /// first; empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub institutions: Vec<Institution>,
}

/// An institution whose records a region-mode node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Institution {
    /// Its site name (`village-3`).
    pub name: String,
    /// Tier.
    pub tier: Tier,
    /// Its `care_site_id`.
    pub care_site_id: i64,
    /// Its org unit's code in `region.toml`.
    pub code: String,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// The output directory.
    pub out: PathBuf,
    /// The output directories in network order: one per site, or in region
    /// mode one per node.
    pub sites: Vec<SiteSummary>,
    /// Institutions simulated (`options.sites`).
    pub institutions: usize,
    /// Residents simulated.
    pub residents: u64,
    /// Rows written, all tables and sites.
    pub rows_written: u64,
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// An option is out of range; the message says which and what to change.
    #[error("{0}")]
    InvalidOptions(String),
    /// The output directory has files in it and `force` was not given.
    #[error(
        "{} is not empty: choose a new or empty directory, or pass force (--force) to replace the site directories, manifest.json and region.toml a previous run wrote there",
        path.display()
    )]
    OutputNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// The output path exists and is not a directory.
    #[error("{} exists and is not a directory: choose another output path", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("cannot write {}: {source}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: datafusion::parquet::errors::ParquetError,
    },
    /// The Arrow (CSV) writer failed.
    #[error("cannot write {}: {source}", path.display())]
    Arrow {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: datafusion::arrow::error::ArrowError,
    },
    /// A broken invariant: a bug in confer-synth.
    #[error("internal error (a bug in confer-synth): {0}")]
    Internal(String),
}

impl SynthError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        SynthError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn parquet(path: &Path, source: datafusion::parquet::errors::ParquetError) -> Self {
        SynthError::Parquet {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn arrow(path: &Path, source: datafusion::arrow::error::ArrowError) -> Self {
        SynthError::Arrow {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Convenience alias.
pub type Result<T, E = SynthError> = std::result::Result<T, E>;

/// Generates the network described by `options`, calling `progress` after
/// each chunk of residents (on the calling thread).
pub fn generate(
    options: &SynthOptions,
    mut progress: impl FnMut(Progress),
) -> Result<SynthSummary> {
    validate(options)?;
    let net = Network::new(options.sites, options.seed);
    let (tree, layout) = if options.region {
        let tree = Tree::new(&net, options.seed).map_err(SynthError::InvalidOptions)?;
        (Some(tree), Layout::region(&net))
    } else {
        (None, Layout::per_site(&net))
    };
    prepare_out(options)?;
    let (start, end) = options.window_end.days();
    let settings = Settings {
        start,
        end,
        region: options.region,
        dest: layout.node_of.clone(),
    };
    let end_year = i64::from(options.window_end.year());
    let toml_options = output::NodeTomlOptions {
        format: options.format,
        seed: options.seed,
        persons: options.persons,
        coordinator_key: options.coordinator_key.as_deref(),
        birth_years: (end_year - MAX_AGE, end_year),
        tree: tree.as_ref(),
    };

    // Node directories, public tables and node.toml first; then one open file
    // per person-level table and node.
    let mut files: Vec<Vec<TableFile>> = Vec::with_capacity(layout.nodes.len());
    let mut public_rows: Vec<BTreeMap<String, u64>> = Vec::with_capacity(layout.nodes.len());
    let concept = output::concept_batch(options.region).map_err(internal)?;
    let ancestor = output::concept_ancestor_batch(options.region).map_err(internal)?;
    let location = output::location_batch(&net, options.seed).map_err(internal)?;
    for node in &layout.nodes {
        let dir = options.out.join(&net.sites[node.head].name);
        std::fs::create_dir_all(&dir).map_err(|e| SynthError::io(&dir, e))?;
        let mut counts = BTreeMap::new();
        let care_site = output::care_site_batch(&net, &node.sites).map_err(internal)?;
        let provider = output::provider_batch(&net, &node.sites, options.seed).map_err(internal)?;
        for (name, batch) in [
            ("concept", &concept),
            ("concept_ancestor", &ancestor),
            ("care_site", &care_site),
            ("provider", &provider),
            ("location", &location),
        ] {
            let rows = write::write_table(&dir, name, batch, options.format)?;
            counts.insert(name.to_string(), rows);
        }
        let toml = output::node_toml(&net, node, &toml_options);
        write::write_text(&dir.join("node.toml"), &toml)?;
        let node_files = PersonTable::ALL
            .iter()
            .map(|t| TableFile::create(&dir, t.name(), t.schema(), options.format))
            .collect::<Result<Vec<_>>>()?;
        files.push(node_files);
        public_rows.push(counts);
    }
    if let Some(tree) = &tree {
        write::write_text(
            &options.out.join(REGION_FILE),
            &tree.to_toml(&net, options.seed),
        )?;
    }

    let persons = options.persons;
    progress(Progress {
        persons_done: 0,
        persons_total: persons,
        rows_written: 0,
    });
    let rows_written = run_pipeline(
        &net,
        &settings,
        options.seed,
        persons,
        &mut files,
        &mut progress,
    )?;

    let mut sites = Vec::with_capacity(layout.nodes.len());
    for ((node, node_files), mut counts) in layout.nodes.iter().zip(files).zip(public_rows) {
        let mut persons_here = 0;
        for (table, file) in PersonTable::ALL.iter().zip(node_files) {
            let rows = file.close()?;
            if *table == PersonTable::Person {
                persons_here = rows;
            }
            counts.insert(table.name().to_string(), rows);
        }
        let site = &net.sites[node.head];
        let institutions = match &tree {
            Some(tree) => node
                .sites
                .iter()
                .map(|&i| Institution {
                    name: net.sites[i].name.clone(),
                    tier: net.sites[i].tier,
                    care_site_id: net.sites[i].care_site_id,
                    code: tree.units[i].code.clone(),
                })
                .collect(),
            None => Vec::new(),
        };
        sites.push(SiteSummary {
            name: site.name.clone(),
            tier: site.tier,
            care_site_id: site.care_site_id,
            persons: persons_here,
            rows: counts,
            institutions,
        });
    }
    let rows_total = sites.iter().flat_map(|s| s.rows.values()).sum();
    let manifest = output::Manifest {
        generator: "confer-synth",
        version: env!("CARGO_PKG_VERSION"),
        cdm_version: "5.4",
        seed: options.seed,
        residents: persons,
        format: options.format.extension(),
        window: output::Window {
            start: output::iso_date(start),
            end: output::iso_date(end),
        },
        region: options.region.then_some(REGION_FILE),
        sites: &sites,
        rows_total,
    };
    let path = options.out.join("manifest.json");
    let mut json = serde_json::to_string_pretty(&manifest).map_err(internal)?;
    json.push('\n');
    write::write_text(&path, &json)?;
    Ok(SynthSummary {
        out: options.out.clone(),
        sites,
        institutions: net.len(),
        residents: persons,
        rows_written,
    })
}

/// The organisation tree's file name in region mode.
pub const REGION_FILE: &str = "region.toml";

fn internal(e: impl fmt::Display) -> SynthError {
    SynthError::Internal(e.to_string())
}

fn validate(options: &SynthOptions) -> Result<()> {
    if options.sites == 0 {
        return Err(SynthError::InvalidOptions(
            "sites = 0: a network needs at least one site (the tertiary hospital)".into(),
        ));
    }
    if options.sites >= network::CITY_LOCATION_ID as usize {
        return Err(SynthError::InvalidOptions(format!(
            "sites = {}: at most {} sites are supported",
            options.sites,
            network::CITY_LOCATION_ID - 1
        )));
    }
    let max_persons = (i64::MAX / ID_STRIDE - 1) as u64;
    if options.persons == 0 || options.persons > max_persons {
        return Err(SynthError::InvalidOptions(format!(
            "persons = {}: use between 1 and {max_persons}",
            options.persons
        )));
    }
    if let Some(key) = &options.coordinator_key
        && (key.len() != 64 || !key.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(SynthError::InvalidOptions(format!(
            "coordinator_key {key:?} is not 64 hex digits: pass the coordinator's Ed25519 public key as `confer keygen` prints it"
        )));
    }
    Ok(())
}

/// Whether a directory name is one this crate writes (`tier-k`).
fn is_site_dir(name: &str) -> bool {
    let Some((tier, k)) = name.split_once('-') else {
        return false;
    };
    matches!(tier, "tertiary" | "county" | "township" | "village")
        && !k.is_empty()
        && k.bytes().all(|b| b.is_ascii_digit())
}

fn prepare_out(options: &SynthOptions) -> Result<()> {
    let out = &options.out;
    match std::fs::metadata(out) {
        Ok(meta) if !meta.is_dir() => Err(SynthError::NotADirectory { path: out.clone() }),
        Ok(_) => {
            let entries = std::fs::read_dir(out)
                .and_then(|it| it.collect::<std::io::Result<Vec<_>>>())
                .map_err(|e| SynthError::io(out, e))?;
            if entries.is_empty() {
                return Ok(());
            }
            if !options.force {
                return Err(SynthError::OutputNotEmpty { path: out.clone() });
            }
            for entry in entries {
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let is_dir = entry
                    .file_type()
                    .map_err(|e| SynthError::io(&path, e))?
                    .is_dir();
                if is_dir && is_site_dir(&name) {
                    std::fs::remove_dir_all(&path).map_err(|e| SynthError::io(&path, e))?;
                } else if !is_dir && (name == "manifest.json" || name == REGION_FILE) {
                    std::fs::remove_file(&path).map_err(|e| SynthError::io(&path, e))?;
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(|e| SynthError::io(out, e))
        }
        Err(e) => Err(SynthError::io(out, e)),
    }
}

type ChunkResult = std::result::Result<Vec<SiteBatch>, datafusion::arrow::error::ArrowError>;

/// Simulates residents on worker threads and writes their rows here, chunk by
/// chunk in order. Returns the rows written.
fn run_pipeline(
    net: &Network,
    settings: &Settings,
    seed: u64,
    persons: u64,
    files: &mut [Vec<TableFile>],
    progress: &mut impl FnMut(Progress),
) -> Result<u64> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let chunks = persons.div_ceil(CHUNK);
    let workers = workers.min(chunks as usize).max(1);
    let files_len = files.len();
    std::thread::scope(|scope| {
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = mpsc::sync_channel::<ChunkResult>(2);
            receivers.push(rx);
            handles.push(scope.spawn(move || {
                let mut life = Life::new(net, seed, settings);
                let mut chunk = w as u64;
                while chunk < chunks {
                    let lo = chunk * CHUNK;
                    let hi = (lo + CHUNK).min(persons);
                    let mut sink = ChunkSink::new(files_len);
                    for pid in lo + 1..=hi {
                        life.run(pid as i64, &mut sink);
                    }
                    if tx.send(sink.finish()).is_err() {
                        break;
                    }
                    chunk += workers as u64;
                }
            }));
        }
        let outcome = (|| -> Result<u64> {
            let mut rows = 0u64;
            for chunk in 0..chunks {
                let batches = receivers[(chunk % workers as u64) as usize]
                    .recv()
                    .map_err(|_| internal("a generator thread stopped early"))?
                    .map_err(internal)?;
                for b in batches {
                    let file = &mut files[b.site][b.table as usize];
                    file.write(&b.batch)?;
                    rows += b.batch.num_rows() as u64;
                }
                progress(Progress {
                    persons_done: ((chunk + 1) * CHUNK).min(persons),
                    persons_total: persons,
                    rows_written: rows,
                });
            }
            Ok(rows)
        })();
        drop(receivers);
        let mut panicked = false;
        for h in handles {
            panicked |= h.join().is_err();
        }
        match outcome {
            Ok(_) if panicked => Err(internal("a generator thread panicked")),
            other => other,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_directory_names() {
        assert!(is_site_dir("county-12"));
        assert!(is_site_dir("tertiary-1"));
        assert!(!is_site_dir("county-"));
        assert!(!is_site_dir("county-x"));
        assert!(!is_site_dir("state"));
        assert!(!is_site_dir("hospital-1"));
    }

    #[test]
    fn options_are_validated() {
        let mut o = SynthOptions::new("/nonexistent/x");
        o.sites = 0;
        assert!(validate(&o).unwrap_err().to_string().contains("sites = 0"));
        o.sites = 3;
        o.persons = 0;
        assert!(
            validate(&o)
                .unwrap_err()
                .to_string()
                .contains("persons = 0")
        );
        o.persons = 10;
        o.coordinator_key = Some("abc".into());
        assert!(
            validate(&o)
                .unwrap_err()
                .to_string()
                .contains("coordinator_key")
        );
        assert_eq!("CSV".parse::<Format>().unwrap(), Format::Csv);
        assert!("xlsx".parse::<Format>().is_err());
    }

    #[test]
    fn the_window_is_the_six_years_ending_with_its_last_month() {
        let days = |s: &str| s.parse::<WindowEnd>().unwrap().days();
        let iso = |(a, b): (i32, i32)| (output::iso_date(a), output::iso_date(b));
        assert_eq!(
            iso(WindowEnd::default().days()),
            ("2019-01-01".into(), "2024-12-31".into())
        );
        assert_eq!(
            iso(days("2026-01")),
            ("2020-02-01".into(), "2026-01-31".into())
        );
        assert_eq!(
            iso(days("2024-02")),
            ("2018-03-01".into(), "2024-02-29".into())
        );
        assert_eq!("2099-12".parse::<WindowEnd>().unwrap(), WindowEnd::MAX);
        assert!(WindowEnd::new(2024, 0).is_err());
        assert!("2024-12-01".parse::<WindowEnd>().is_err());
        assert!(" 2024-12".parse::<WindowEnd>().is_err());
    }

    #[test]
    fn region_mode_refuses_networks_its_codes_cannot_hold() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = SynthOptions::new(dir.path().join("big"));
        o.region = true;
        o.sites = 600;
        o.persons = 10;
        let err = generate(&o, |_| {}).unwrap_err().to_string();
        assert!(err.contains("at most 99 county hospitals"), "{err}");
        assert!(!o.out.exists(), "nothing was written");
    }
}
