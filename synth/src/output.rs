//! What each site directory holds besides the person-level tables: the
//! public tables (vocabulary, care site, providers, locations), `node.toml`,
//! and the network's `manifest.json`.

use std::fmt::Write as _;

use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::dates::parse_date;
use crate::model::MAX_CHARGE;
use crate::network::{CITY_LOCATION_ID, Network, Tier, mix};
use crate::region::{NodeDef, Tree};
use crate::schema::{
    CareSite, CareSiteBuf, Concept, ConceptAncestor, ConceptAncestorBuf, ConceptBuf, Location,
    LocationBuf, Provider, ProviderBuf, Text,
};
use crate::vocab;
use crate::write::PersonTable;
use crate::{Format, SiteSummary};

/// The placeholder coordinator key written when none is given: a valid
/// Ed25519 point whose discrete log nobody knows (the first SHA-256 of
/// `confer-synth placeholder coordinator key {n}` that decodes to a point,
/// n = 1), so a node started with it refuses every task.
pub const PLACEHOLDER_COORDINATOR_KEY: &str =
    "c3265eaebc30ff2a54fe44a7b11ae19ef1d05bc012cf9acf03a9615e7222d361";

/// The concepts a run writes: region mode adds its own after the rest.
fn concepts(region: bool) -> impl Iterator<Item = &'static vocab::ConceptDef> {
    let extra: &'static [vocab::ConceptDef] = if region { vocab::REGION_CONCEPTS } else { &[] };
    vocab::CONCEPTS.iter().chain(extra)
}

/// The vocabulary subset: every concept the generator uses.
pub(crate) fn concept_batch(region: bool) -> Result<RecordBatch, ArrowError> {
    let mut b = ConceptBuf::with_capacity(vocab::CONCEPTS.len() + vocab::REGION_CONCEPTS.len());
    for c in concepts(region) {
        b.push(Concept {
            concept_id: c.id,
            concept_name: Text::Borrowed(c.name),
            domain_id: Text::Borrowed(c.domain),
            vocabulary_id: Text::Borrowed(c.vocabulary),
            concept_class_id: Text::Borrowed(c.class),
            standard_concept: c.standard.then_some(Text::Borrowed("S")),
            concept_code: Text::Borrowed(c.code),
            valid_start_date: parse_date(c.valid_start).unwrap_or(0),
            valid_end_date: parse_date(c.valid_end).unwrap_or(0),
            invalid_reason: None,
        });
    }
    b.finish()
}

/// Level-0 self links for every standard concept, then the hierarchy; region
/// mode's self links come last.
pub(crate) fn concept_ancestor_batch(region: bool) -> Result<RecordBatch, ArrowError> {
    let mut b = ConceptAncestorBuf::with_capacity(vocab::CONCEPTS.len() + vocab::ANCESTRY.len());
    for c in vocab::CONCEPTS.iter().filter(|c| c.standard) {
        b.push(ConceptAncestor {
            ancestor_concept_id: c.id,
            descendant_concept_id: c.id,
            min_levels_of_separation: 0,
            max_levels_of_separation: 0,
        });
    }
    for &(a, d, lo, hi) in vocab::ANCESTRY {
        b.push(ConceptAncestor {
            ancestor_concept_id: a,
            descendant_concept_id: d,
            min_levels_of_separation: lo,
            max_levels_of_separation: hi,
        });
    }
    if region {
        for c in vocab::REGION_CONCEPTS.iter().filter(|c| c.standard) {
            b.push(ConceptAncestor {
                ancestor_concept_id: c.id,
                descendant_concept_id: c.id,
                min_levels_of_separation: 0,
                max_levels_of_separation: 0,
            });
        }
    }
    b.finish()
}

/// The care sites of a node: its own, or in region mode also those of the
/// village clinics whose records it holds.
pub(crate) fn care_site_batch(net: &Network, sites: &[usize]) -> Result<RecordBatch, ArrowError> {
    let mut b = CareSiteBuf::with_capacity(sites.len());
    for &site in sites {
        let s = &net.sites[site];
        let k = s.name.rsplit('-').next().unwrap_or("1");
        b.push(CareSite {
            care_site_id: s.care_site_id,
            care_site_name: Some(Text::Owned(format!(
                "{} {k}",
                capitalise(s.tier.description())
            ))),
            place_of_service_concept_id: Some(net.place_of_service(site)),
            location_id: Some(s.care_site_id),
            care_site_source_value: Some(Text::Owned(s.name.clone())),
            place_of_service_source_value: Some(Text::Borrowed(s.tier.as_str())),
        });
    }
    b.finish()
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The doctors of a node's sites.
pub(crate) fn provider_batch(
    net: &Network,
    sites: &[usize],
    seed: u64,
) -> Result<RecordBatch, ArrowError> {
    let n: i64 = sites.iter().map(|&i| net.profiles[i].providers).sum();
    let mut b = ProviderBuf::with_capacity(n as usize);
    for &site in sites {
        push_providers(&mut b, net, site, seed);
    }
    b.finish()
}

/// Site `site`'s doctors, each from the site's own stream.
fn push_providers(b: &mut ProviderBuf, net: &Network, site: usize, seed: u64) {
    let s = &net.sites[site];
    let n = net.profiles[site].providers;
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0xD0C7, site as u64));
    let specialties: &[&'static str] = match s.tier {
        Tier::Village => &["village doctor"],
        Tier::Township => &[
            "general practice",
            "general practice",
            "internal medicine",
            "pediatrics",
            "public health",
        ],
        Tier::County => &[
            "internal medicine",
            "general surgery",
            "pediatrics",
            "emergency medicine",
            "cardiology",
            "neurology",
            "obstetrics",
            "orthopedics",
        ],
        Tier::Tertiary => &[
            "internal medicine",
            "general surgery",
            "pediatrics",
            "emergency medicine",
            "cardiology",
            "neurology",
            "respiratory medicine",
            "gastroenterology",
            "endocrinology",
            "nephrology",
            "intensive care",
            "orthopedics",
        ],
    };
    for k in 0..n {
        let male = rng.random_bool(0.55);
        b.push(Provider {
            provider_id: net.provider_id(site, k),
            provider_name: Some(Text::Owned(format!("{} doctor {}", s.name, k + 1))),
            specialty_source_value: Some(Text::Borrowed(
                specialties[rng.random_range(0..specialties.len())],
            )),
            care_site_id: Some(s.care_site_id),
            year_of_birth: Some(rng.random_range(1958..1998)),
            gender_concept_id: Some(if male { vocab::MALE } else { vocab::FEMALE }),
            gender_source_value: Some(Text::Borrowed(if male { "M" } else { "F" })),
            ..Default::default()
        });
    }
}

/// Every location of the region (homes are at these places), so that
/// `person.location_id` resolves at every site.
pub(crate) fn location_batch(net: &Network, seed: u64) -> Result<RecordBatch, ArrowError> {
    let mut b = LocationBuf::with_capacity(net.len() + 1);
    let coords = |key: u64| -> (f64, f64) {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0x10CA, key));
        (
            round4(28.2 + rng.random_range(-0.9..0.9)),
            round4(112.9 + rng.random_range(-1.2..1.2)),
        )
    };
    let (lat, lon) = coords(u64::MAX);
    b.push(Location {
        location_id: CITY_LOCATION_ID,
        city: Some(Text::Borrowed("regional city")),
        state: Some(Text::Borrowed("synthetic region")),
        location_source_value: Some(Text::Borrowed("city")),
        latitude: Some(lat),
        longitude: Some(lon),
        ..Default::default()
    });
    for (i, s) in net.sites.iter().enumerate() {
        let (lat, lon) = coords(i as u64);
        let city = match s.tier {
            Tier::Tertiary => "regional city".to_string(),
            Tier::County => format!("{} town", s.name),
            Tier::Township => format!("{} seat", s.name),
            Tier::Village => s.name.clone(),
        };
        b.push(Location {
            location_id: s.care_site_id,
            city: Some(Text::Owned(city)),
            county: net.county_name_of(i).map(Text::Owned),
            state: Some(Text::Borrowed("synthetic region")),
            location_source_value: Some(Text::Owned(s.name.clone())),
            latitude: Some(lat),
            longitude: Some(lon),
            ..Default::default()
        });
    }
    b.finish()
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn list(ids: impl IntoIterator<Item = i64>) -> String {
    let mut v: Vec<i64> = ids.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let items: Vec<String> = v.iter().map(i64::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// What every `node.toml` of a run shares.
pub(crate) struct NodeTomlOptions<'a> {
    pub(crate) format: Format,
    pub(crate) seed: u64,
    pub(crate) persons: u64,
    pub(crate) coordinator_key: Option<&'a str>,
    /// Bounds and domain of `year_of_birth`.
    pub(crate) birth_years: (i64, i64),
    /// Region mode: the organisation tree, for `[supervision]`.
    pub(crate) tree: Option<&'a Tree>,
}

/// `node.toml` for node `node`: paths relative to the file, person-level
/// tables keyed by `person_id`, public domains for group keys, bounds for
/// numeric columns; in region mode also the region's care sites as a
/// domain, unique visit ids, drug costs' bounds and `[supervision]`.
pub(crate) fn node_toml(net: &Network, node: &NodeDef, o: &NodeTomlOptions<'_>) -> String {
    let NodeTomlOptions {
        format,
        seed,
        persons,
        coordinator_key,
        birth_years: (min_birth_year, max_birth_year),
        tree,
    } = *o;
    let region = tree.is_some();
    let s = &net.sites[node.head];
    let ext = format.extension();
    let mut t = String::new();
    let held: Vec<&str> = node.sites[1..]
        .iter()
        .map(|&i| net.sites[i].name.as_str())
        .collect();
    let mut what = format!("{} ({})", s.name, s.tier.description());
    if !held.is_empty() {
        let _ = write!(
            what,
            " and the\n# village clinics whose records it holds ({})",
            held.join(", ")
        );
    }
    let _ = writeln!(
        t,
        "# Synthetic OMOP CDM 5.4 data for {what}, written by confer-synth\n\
         # (seed {seed}, {persons} regional residents). No real person is in it.\n\
         # Start a node on it with: confer node --config <this file> --insecure-loopback\n\
         # Relative paths are resolved against this file's directory.\n"
    );
    let _ = writeln!(
        t,
        "[node]\nname = \"{}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"",
        s.name
    );
    match coordinator_key {
        Some(key) => {
            let _ = writeln!(t, "coordinator_key = \"{key}\"");
        }
        None => {
            let _ = writeln!(
                t,
                "# Placeholder: nobody holds its private key, so this node accepts no task\n\
                 # until you put your coordinator's public key here (`confer keygen` prints it).\n\
                 coordinator_key = \"{PLACEHOLDER_COORDINATOR_KEY}\""
            );
        }
    }
    let conditions = list(vocab::CONDITIONS.iter().map(|c| c.id));
    let drugs = list(vocab::DRUGS.iter().map(|d| d.id));
    let measurements = list(vocab::MEASUREMENTS.iter().map(|m| m.id));
    let region_procedures: &[vocab::Proc] = if region {
        vocab::REGION_PROCEDURES
    } else {
        &[]
    };
    let procedures = list(
        vocab::PROCEDURES
            .iter()
            .chain(region_procedures)
            .map(|p| p.id),
    );
    let units = list(vocab::UNITS.iter().copied());
    // Region mode: referrals up from primary care arrive from the office;
    // stays end in death or a referral down to it.
    let region_places: &[i64] = if region { &[vocab::POS_OFFICE] } else { &[] };
    let places = list(
        [
            vocab::POS_HOME,
            vocab::POS_INPATIENT_HOSPITAL,
            vocab::POS_OUTPATIENT_HOSPITAL,
            vocab::POS_EMERGENCY_ROOM,
        ]
        .into_iter()
        .chain(region_places.iter().copied()),
    );
    let region_discharges: &[i64] = if region {
        &[vocab::POS_OFFICE, vocab::PATIENT_DIED]
    } else {
        &[]
    };
    let discharges = list(
        [vocab::POS_HOME, vocab::POS_INPATIENT_HOSPITAL]
            .into_iter()
            .chain(region_discharges.iter().copied()),
    );
    let ehr = list([vocab::EHR]);
    let max = MAX_CHARGE;
    let table = |t: &mut String, name: &str, person: bool, columns: &[(&str, String)]| {
        let _ = writeln!(t, "\n[tables.{name}]\npath = \"{name}.{ext}\"");
        if person {
            let _ = writeln!(t, "privacy_unit = \"person_id\"");
        }
        if !columns.is_empty() {
            let _ = writeln!(t, "[tables.{name}.columns]");
            for (c, decl) in columns {
                let _ = writeln!(t, "{c} = {{ {decl} }}");
            }
        }
    };
    let dom = |v: &str| format!("domain = {v}");
    for table_kind in PersonTable::ALL {
        let name = table_kind.name();
        let columns: Vec<(&str, String)> = match table_kind {
            PersonTable::Person => vec![
                (
                    "gender_concept_id",
                    dom(&list([vocab::MALE, vocab::FEMALE])),
                ),
                (
                    "year_of_birth",
                    format!(
                        "bounds = [{min_birth_year}, {max_birth_year}], domain = {{ from = {min_birth_year}, to = {max_birth_year} }}"
                    ),
                ),
                (
                    "month_of_birth",
                    "bounds = [1, 12], domain = { from = 1, to = 12 }".into(),
                ),
                (
                    "race_concept_id",
                    dom(&list([vocab::NO_MATCHING_CONCEPT, vocab::RACE_ASIAN])),
                ),
                ("ethnicity_concept_id", dom(&list([vocab::NOT_HISPANIC]))),
            ],
            PersonTable::ObservationPeriod => vec![("period_type_concept_id", dom(&ehr))],
            PersonTable::VisitOccurrence => {
                let mut columns = vec![
                    (
                        "visit_concept_id",
                        dom(&list([
                            vocab::INPATIENT_VISIT,
                            vocab::OUTPATIENT_VISIT,
                            vocab::EMERGENCY_VISIT,
                        ])),
                    ),
                    ("visit_type_concept_id", dom(&ehr)),
                    ("admitted_from_concept_id", dom(&places)),
                    ("discharged_to_concept_id", dom(&discharges)),
                ];
                if region {
                    // Every institution of the region, so that statistics
                    // group by institution across nodes.
                    columns.insert(0, ("visit_occurrence_id", "unique = true".into()));
                    columns.push((
                        "care_site_id",
                        format!("domain = {{ from = 1, to = {} }}", net.len()),
                    ));
                }
                columns
            }
            PersonTable::ConditionOccurrence => vec![
                ("condition_concept_id", dom(&conditions)),
                ("condition_type_concept_id", dom(&ehr)),
            ],
            PersonTable::DrugExposure => vec![
                ("drug_concept_id", dom(&drugs)),
                ("drug_type_concept_id", dom(&ehr)),
                ("quantity", "bounds = [0, 600]".into()),
                ("days_supply", "bounds = [1, 90]".into()),
                ("refills", "bounds = [0, 5]".into()),
            ],
            PersonTable::ProcedureOccurrence => vec![
                ("procedure_concept_id", dom(&procedures)),
                ("procedure_type_concept_id", dom(&ehr)),
                ("quantity", "bounds = [1, 10]".into()),
            ],
            PersonTable::Measurement => vec![
                ("measurement_concept_id", dom(&measurements)),
                ("measurement_type_concept_id", dom(&ehr)),
                ("unit_concept_id", dom(&units)),
                // One bound for every measurement: wide enough for glucose
                // in mg/dL, the largest value recorded.
                ("value_as_number", "bounds = [0, 600]".into()),
                ("range_low", "bounds = [0, 600]".into()),
                ("range_high", "bounds = [0, 600]".into()),
            ],
            PersonTable::Death => vec![
                ("cause_concept_id", dom(&conditions)),
                ("death_type_concept_id", dom(&ehr)),
            ],
            PersonTable::Cost => vec![
                ("cost_domain_id", "domain = [\"Visit\"]".into()),
                ("cost_type_concept_id", dom(&ehr)),
                ("currency_concept_id", dom(&list([vocab::USD]))),
                ("total_charge", format!("bounds = [0, {max}]")),
                ("total_paid", format!("bounds = [0, {max}]")),
                ("paid_by_payer", format!("bounds = [0, {max}]")),
                ("paid_by_patient", format!("bounds = [0, {max}]")),
            ]
            .into_iter()
            .chain(region.then(|| ("paid_ingredient_cost", format!("bounds = [0, {max}]"))))
            .collect(),
        };
        table(&mut t, name, true, &columns);
    }
    let _ = writeln!(t, "\n# Public tables: no privacy unit, never need DP.");
    for name in crate::write::PUBLIC_TABLES {
        table(&mut t, name, false, &[]);
    }
    if let Some(tree) = tree {
        let units: Vec<String> = node
            .sites
            .iter()
            .map(|&i| {
                format!(
                    "\"{}\" = [{}]",
                    tree.units[i].code, net.sites[i].care_site_id
                )
            })
            .collect();
        let _ = writeln!(
            t,
            "\n# The org units of the region's tree (region.toml) whose records this node holds, each with its OMOP care_site_ids.\n\
             [supervision]\nunits = {{ {} }}",
            units.join(", ")
        );
    }
    t
}

/// `manifest.json`.
#[derive(Debug, Serialize)]
pub(crate) struct Manifest<'a> {
    pub(crate) generator: &'static str,
    pub(crate) version: &'static str,
    pub(crate) cdm_version: &'static str,
    pub(crate) seed: u64,
    pub(crate) residents: u64,
    pub(crate) format: &'static str,
    pub(crate) window: Window,
    /// Region mode: the organisation tree's file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) region: Option<&'static str>,
    /// One per output directory: per site, or in region mode per node (with
    /// the institutions it holds).
    pub(crate) sites: &'a [SiteSummary],
    pub(crate) rows_total: u64,
}

/// The simulated period.
#[derive(Debug, Serialize)]
pub(crate) struct Window {
    pub(crate) start: String,
    pub(crate) end: String,
}

/// `YYYY-MM-DD` of a day number.
pub(crate) fn iso_date(day: i32) -> String {
    let (y, m, d) = crate::dates::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}
