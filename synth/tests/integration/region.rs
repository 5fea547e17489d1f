use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use confer_synth::{Format, SynthOptions, SynthSummary, WindowEnd, generate};
use datafusion::arrow::array::RecordBatch;
use toml::Value;

use crate::common::*;

struct Region {
    _dir: tempfile::TempDir,
    out: PathBuf,
    summary: SynthSummary,
}

/// A 12-site (1 tertiary, 2 county, 3 township, 6 village) region-mode
/// network of 2,000 residents, seed 7, Parquet.
fn region() -> &'static Region {
    static FIXTURE: OnceLock<Region> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("region");
        let mut o = options(&out, 12, 2000, 7, Format::Parquet);
        o.region = true;
        let summary = generate(&o, |_| {}).expect("generate");
        Region {
            _dir: dir,
            out,
            summary,
        }
    })
}

fn parse(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

fn ids<'a>(v: &'a Value, key: &str) -> Vec<&'a str> {
    v.get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no array {key}"))
        .iter()
        .map(|x| str_of(x, "id"))
        .collect()
}

/// Every node's table, by node name.
fn all_nodes(table: &str) -> Vec<(String, RecordBatch)> {
    let r = region();
    r.summary
        .sites
        .iter()
        .map(|s| (s.name.clone(), read(&r.out.join(&s.name), table)))
        .collect()
}

/// The tier of each care site, from every node's care_site table.
fn tiers() -> HashMap<i64, String> {
    let mut out = HashMap::new();
    for (_, b) in all_nodes("care_site") {
        let ids = ints_req(&b, "care_site_id");
        let tier = b
            .column_by_name("place_of_service_source_value")
            .expect("column");
        let tier = datafusion::arrow::array::AsArray::as_string::<i32>(tier);
        for (i, id) in ids.into_iter().enumerate() {
            out.insert(id, tier.value(i).to_string());
        }
    }
    out
}

/// One visit: (node, person, care site, concept, start day, end day,
/// admitted from, discharged to, preceding).
#[derive(Debug, Clone)]
struct Visit {
    node: String,
    person: i64,
    care_site: i64,
    concept: i64,
    start: i32,
    end: i32,
    admitted_from: Option<i64>,
    discharged_to: Option<i64>,
    preceding: Option<i64>,
}

fn visits() -> HashMap<i64, Visit> {
    let mut out = HashMap::new();
    for (node, b) in all_nodes("visit_occurrence") {
        let id = ints_req(&b, "visit_occurrence_id");
        let person = ints_req(&b, "person_id");
        let site = ints_req(&b, "care_site_id");
        let concept = ints_req(&b, "visit_concept_id");
        let start = dates(&b, "visit_start_date");
        let end = dates(&b, "visit_end_date");
        let from = ints(&b, "admitted_from_concept_id");
        let to = ints(&b, "discharged_to_concept_id");
        let preceding = ints(&b, "preceding_visit_occurrence_id");
        for i in 0..b.num_rows() {
            let v = Visit {
                node: node.clone(),
                person: person[i],
                care_site: site[i],
                concept: concept[i],
                start: start[i].expect("start"),
                end: end[i].expect("end"),
                admitted_from: from[i],
                discharged_to: to[i],
                preceding: preceding[i],
            };
            assert!(out.insert(id[i], v).is_none(), "visit {} twice", id[i]);
        }
    }
    out
}

#[test]
fn region_toml_holds_the_tree() {
    let r = region();
    let tree = parse(&r.out.join("region.toml"));
    assert_eq!(
        ids(&tree, "level"),
        ["city", "county", "township", "village"]
    );
    for level in tree["level"].as_array().expect("levels") {
        assert!(!str_of(level, "name_zh").is_empty() && !str_of(level, "name_en").is_empty());
    }
    assert_eq!(ids(&tree, "group_set"), ["tier", "ownership"]);
    let sets = tree["group_set"].as_array().expect("group sets");
    assert_eq!(
        ids(&sets[0], "option"),
        ["tertiary", "county", "township", "village"]
    );
    assert_eq!(ids(&sets[1], "option"), ["public", "private"]);
    assert_eq!(str_of(&sets[0], "name_zh"), "机构类别");

    let units = tree["unit"].as_array().expect("units");
    assert_eq!(units.len(), 12, "one unit per institution");
    let by_code: BTreeMap<&str, &Value> = units.iter().map(|u| (str_of(u, "code"), u)).collect();
    assert_eq!(by_code.len(), 12, "codes are unique");
    let depth = |level: &str| {
        ["city", "county", "township", "village"]
            .iter()
            .position(|l| *l == level)
    };
    let digits = [4, 6, 9, 12];
    let mut roots = 0;
    for u in units {
        let code = str_of(u, "code");
        let level = str_of(u, "level");
        let d = depth(level).unwrap_or_else(|| panic!("{code}: level {level}"));
        assert_eq!(code.len(), digits[d], "{code}");
        assert!(code.starts_with("3701") && code.bytes().all(|b| b.is_ascii_digit()));
        assert!(!str_of(u, "name_zh").is_empty() && !str_of(u, "name_en").is_empty());
        let groups = u.get("groups").expect("groups");
        assert_eq!(
            str_of(groups, "tier"),
            ["tertiary", "county", "township", "village"][d]
        );
        let ownership = str_of(groups, "ownership");
        assert!(ownership == "public" || (ownership == "private" && level == "village"));
        match u.get("parent").and_then(Value::as_str) {
            None => {
                roots += 1;
                assert_eq!((code, level), ("3701", "city"));
            }
            Some(p) => {
                let parent = by_code
                    .get(p)
                    .unwrap_or_else(|| panic!("{code}: no parent {p}"));
                assert_eq!(depth(str_of(parent, "level")), Some(d - 1), "{code}");
                assert!(code.starts_with(p), "{code} under {p}");
            }
        }
    }
    assert_eq!(roots, 1);
}

#[test]
fn nodes_hold_disjoint_institutions_named_in_supervision() {
    let r = region();
    let tree = parse(&r.out.join("region.toml"));
    let codes: HashSet<&str> = tree["unit"]
        .as_array()
        .expect("units")
        .iter()
        .map(|u| str_of(u, "code"))
        .collect();
    let names: Vec<&str> = r.summary.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "tertiary-1",
            "county-1",
            "county-2",
            "township-1",
            "township-2",
            "township-3"
        ]
    );
    assert_eq!(r.summary.institutions, 12);
    for entry in std::fs::read_dir(&r.out).expect("list") {
        let name = entry.expect("entry").file_name();
        assert!(
            !name.to_string_lossy().starts_with("village-"),
            "{name:?} is a node"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.out.join("manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["region"], "region.toml");
    // `sites` lists the output directories: here the nodes.
    let nodes = manifest["sites"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 6);

    let mut seen: BTreeSet<i64> = BTreeSet::new();
    for (node, m) in r.summary.sites.iter().zip(nodes) {
        let dir = r.out.join(&node.name);
        let config = parse(&dir.join("node.toml"));
        assert_eq!(config["node"]["name"].as_str(), Some(node.name.as_str()));
        let units = config["supervision"]["units"]
            .as_table()
            .expect("[supervision] units");
        let mut held = BTreeSet::new();
        for (code, sites) in units {
            assert!(
                codes.contains(code.as_str()),
                "{}: unknown unit {code}",
                node.name
            );
            for id in sites.as_array().expect("care_site_ids") {
                let id = id.as_integer().expect("an integer");
                assert!(seen.insert(id), "care_site_id {id} held by two nodes");
                held.insert(id);
            }
        }
        let institutions: BTreeSet<i64> = m["institutions"]
            .as_array()
            .expect("institutions")
            .iter()
            .map(|i| i["care_site_id"].as_i64().expect("id"))
            .collect();
        assert_eq!(held, institutions, "{}", node.name);
        let care_sites: BTreeSet<i64> = ints_req(&read(&dir, "care_site"), "care_site_id")
            .into_iter()
            .collect();
        assert_eq!(
            held, care_sites,
            "{}: care_site lists its institutions",
            node.name
        );
        let providers = ints(&read(&dir, "provider"), "care_site_id");
        assert!(
            providers
                .iter()
                .all(|c| c.is_some_and(|c| held.contains(&c)))
        );
        let visit_sites = ints_req(&read(&dir, "visit_occurrence"), "care_site_id");
        assert!(
            visit_sites.iter().all(|c| held.contains(c)),
            "{}",
            node.name
        );
        if node.name.starts_with("township") {
            assert_eq!(held.len(), 3, "{}: the centre and two villages", node.name);
            let villages: BTreeSet<i64> = visit_sites.into_iter().filter(|c| *c >= 7).collect();
            assert_eq!(
                villages.len(),
                2,
                "{}: village visits keep their care site",
                node.name
            );
        }

        let columns = &config["tables"]["visit_occurrence"]["columns"];
        assert_eq!(
            columns["visit_occurrence_id"]["unique"].as_bool(),
            Some(true)
        );
        let domain = &columns["care_site_id"]["domain"];
        assert_eq!(
            (domain["from"].as_integer(), domain["to"].as_integer()),
            (Some(1), Some(12))
        );
        let discharged: Vec<i64> = columns["discharged_to_concept_id"]["domain"]
            .as_array()
            .expect("domain")
            .iter()
            .filter_map(Value::as_integer)
            .collect();
        assert!(discharged.contains(&8940) && discharged.contains(&4216643));
        let bounds = &config["tables"]["cost"]["columns"]["paid_ingredient_cost"]["bounds"];
        assert_eq!(bounds.as_array().map(Vec::len), Some(2));
        assert_eq!(bounds[1].as_integer(), Some(100_000));
    }
    assert_eq!(seen, (1..=12).collect(), "every institution is held once");
}

#[tokio::test]
async fn the_node_accepts_every_region_node() {
    let r = region();
    for node in &r.summary.sites {
        let path = r.out.join(&node.name).join("node.toml");
        let config = confer_node::NodeConfig::load(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let units = &config.supervision.as_ref().expect("[supervision]").units;
        assert_eq!(units.len(), node.institutions.len(), "{}", node.name);
        // The node checks at start that person has one row per person and
        // that visit_occurrence_id is unique.
        let ctx = datafusion::prelude::SessionContext::new();
        let catalog = confer_node::catalog::load(&config, &ctx)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(catalog.tables.len(), 14);
    }
}

#[test]
fn each_node_has_one_person_row_and_period_per_person() {
    for (node, person) in all_nodes("person") {
        let dir = region().out.join(&node);
        let ids = ints_req(&person, "person_id");
        let unique: HashSet<i64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{node}: a person twice in person");
        let periods = ints_req(&read(&dir, "observation_period"), "person_id");
        let with_period: HashSet<i64> = periods.iter().copied().collect();
        assert_eq!(
            periods.len(),
            with_period.len(),
            "{node}: two periods for a person"
        );
        assert_eq!(with_period, unique, "{node}");
        for table in [
            "visit_occurrence",
            "condition_occurrence",
            "measurement",
            "cost",
        ] {
            let b = read(&dir, table);
            for p in ints(&b, "person_id").into_iter().flatten() {
                assert!(
                    unique.contains(&p),
                    "{node}/{table}: person {p} has no person row"
                );
            }
        }
    }
    // Residents of a village seen at the village and at its township centre
    // are in the township's node once.
    let visits = visits();
    let tiers = tiers();
    let mut both = 0;
    let mut by_person: HashMap<(String, i64), HashSet<&str>> = HashMap::new();
    for v in visits.values() {
        by_person
            .entry((v.node.clone(), v.person))
            .or_default()
            .insert(tiers[&v.care_site].as_str());
    }
    for seen in by_person.values() {
        both += usize::from(seen.contains("township") && seen.contains("village"));
    }
    assert!(
        both > 20,
        "{both} residents seen at a township and its village"
    );
}

#[test]
fn events_belong_to_visits_of_their_node() {
    let visits = visits();
    for table in [
        "condition_occurrence",
        "drug_exposure",
        "procedure_occurrence",
        "measurement",
    ] {
        for (node, b) in all_nodes(table) {
            let persons = ints_req(&b, "person_id");
            for (i, v) in ints(&b, "visit_occurrence_id").into_iter().enumerate() {
                let v = v.unwrap_or_else(|| panic!("{node}/{table}: a row without a visit"));
                let visit = &visits[&v];
                assert_eq!(
                    (visit.node.as_str(), visit.person),
                    (node.as_str(), persons[i])
                );
            }
        }
    }
    for (node, b) in all_nodes("cost") {
        for v in ints_req(&b, "cost_event_id") {
            assert_eq!(visits[&v].node, node);
        }
    }
}

#[test]
fn supervision_indicators_have_plausible_values() {
    let visits = visits();
    let tiers = tiers();
    let tier = |v: &Visit| tiers[&v.care_site].as_str();
    let primary = |t: &str| t == "township" || t == "village";

    // In-hospital deaths: the death is recorded on the day the stay ends.
    let mut deaths: HashMap<i64, i32> = HashMap::new();
    for (_, b) in all_nodes("death") {
        let p = ints_req(&b, "person_id");
        let d = dates(&b, "death_date");
        for i in 0..b.num_rows() {
            deaths.insert(p[i], d[i].expect("death date"));
        }
    }
    let inpatient: Vec<&Visit> = visits.values().filter(|v| v.concept == 9201).collect();
    let died: Vec<&&Visit> = inpatient
        .iter()
        .filter(|v| v.discharged_to == Some(4216643))
        .collect();
    assert!(died.len() >= 5, "{} in-hospital deaths", died.len());
    for v in &died {
        assert_eq!(deaths.get(&v.person), Some(&v.end));
    }

    // Downward referrals: discharged to the office, then seen at primary care
    // within 14 days, admitted from the inpatient hospital.
    let down: Vec<&&Visit> = inpatient
        .iter()
        .filter(|v| v.discharged_to == Some(8940))
        .collect();
    assert!(
        down.len() >= 10,
        "{} discharges to primary care",
        down.len()
    );
    assert!(down.iter().all(|v| !primary(tier(v))));
    let mut followed = 0;
    for v in visits.values() {
        let Some(p) = v.preceding.and_then(|p| visits.get(&p)) else {
            continue;
        };
        if p.discharged_to == Some(8940) {
            assert!(primary(tier(v)), "a step-down visit at {}", tier(v));
            assert_eq!((v.concept, v.admitted_from), (9202, Some(8717)));
            assert!((0..=14).contains(&(v.start - p.end)), "{v:?} after {p:?}");
            followed += 1;
        }
        // Upward referrals from primary care arrive from the office.
        if primary(tier(p)) && !primary(tier(v)) {
            assert_eq!(v.admitted_from, Some(8940), "{v:?} after {p:?}");
        }
    }
    assert!(
        followed * 10 >= down.len() * 8,
        "{followed} of {} followed",
        down.len()
    );

    // 30-day readmissions to the same hospital.
    let mut stays: HashMap<i64, Vec<&Visit>> = HashMap::new();
    for v in &inpatient {
        stays.entry(v.person).or_default().push(v);
    }
    let (mut discharges, mut readmitted) = (0, 0);
    for list in stays.values_mut() {
        list.sort_by_key(|v| v.start);
        for (i, v) in list.iter().enumerate() {
            if matches!(v.discharged_to, Some(8717) | Some(4216643)) {
                continue;
            }
            discharges += 1;
            readmitted += usize::from(
                list[i + 1..]
                    .iter()
                    .any(|w| w.care_site == v.care_site && (0..=30).contains(&(w.start - v.end))),
            );
        }
    }
    let rate = readmitted as f64 / discharges as f64;
    assert!(
        readmitted >= 5 && (0.03..0.2).contains(&rate),
        "{readmitted} of {discharges} discharges readmitted"
    );

    // Drug share of charges by tier.
    let mut charge: HashMap<&str, (f64, f64)> = HashMap::new();
    for (_, b) in all_nodes("cost") {
        let event = ints_req(&b, "cost_event_id");
        let total = floats(&b, "total_charge");
        let drugs = floats(&b, "paid_ingredient_cost");
        for i in 0..b.num_rows() {
            let (t, d) = (total[i].expect("charge"), drugs[i].expect("drug cost"));
            assert!((0.0..=t).contains(&d), "drug cost {d} of {t}");
            let e = charge.entry(tier(&visits[&event[i]])).or_default();
            e.0 += t;
            e.1 += d;
        }
    }
    for (t, lo, hi) in [
        ("tertiary", 0.15, 0.35),
        ("county", 0.25, 0.45),
        ("township", 0.35, 0.6),
        ("village", 0.35, 0.6),
    ] {
        let (total, drugs) = charge[t];
        let share = drugs / total;
        assert!((lo..=hi).contains(&share), "{t}: drug share {share:.3}");
    }

    // Registered hypertensives' blood pressure and diabetics' fasting glucose
    // at primary-care follow-ups: controlled about 60% of the time.
    let mut diagnoses: HashMap<i64, HashSet<i64>> = HashMap::new();
    for (_, b) in all_nodes("condition_occurrence") {
        let visit = ints_req(&b, "visit_occurrence_id");
        let concept = ints_req(&b, "condition_concept_id");
        for i in 0..b.num_rows() {
            diagnoses.entry(visit[i]).or_default().insert(concept[i]);
        }
    }
    let (mut sbp, mut glucose) = (Vec::new(), Vec::new());
    for (_, b) in all_nodes("measurement") {
        let visit = ints_req(&b, "visit_occurrence_id");
        let concept = ints_req(&b, "measurement_concept_id");
        let value = floats(&b, "value_as_number");
        for i in 0..b.num_rows() {
            let v = &visits[&visit[i]];
            if v.concept != 9202 || !primary(tier(v)) {
                continue;
            }
            let dx = &diagnoses[&visit[i]];
            match concept[i] {
                3004249 if dx.contains(&320128) => sbp.push(value[i].expect("value")),
                3004501 if dx.contains(&201826) => glucose.push(value[i].expect("value")),
                _ => {}
            }
        }
    }
    for (name, values, limit) in [("SBP", &sbp, 140.0), ("glucose", &glucose, 126.0)] {
        let share = values.iter().filter(|&&x| x < limit).count() as f64 / values.len() as f64;
        assert!(
            values.len() > 200 && (0.45..0.75).contains(&share),
            "{name}: {} readings, {share:.3} controlled",
            values.len()
        );
    }
}

#[test]
fn the_window_ends_where_asked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("late");
    let mut o = options(&out, 3, 300, 2, Format::Parquet);
    o.window_end = "2026-01".parse().expect("a month");
    let summary = generate(&o, |_| {}).expect("generate");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["window"]["start"], "2020-02-01");
    assert_eq!(manifest["window"]["end"], "2026-01-31");
    let (start, end) = (days("2020-02-01"), days("2026-01-31"));
    let mut latest = i32::MIN;
    for site in &summary.sites {
        let b = read(&out.join(&site.name), "visit_occurrence");
        for d in dates(&b, "visit_start_date").into_iter().flatten() {
            assert!(
                (start..=end).contains(&d),
                "{}: a visit on day {d}",
                site.name
            );
            latest = latest.max(d);
        }
        let config = parse(&out.join(&site.name).join("node.toml"));
        let bounds = &config["tables"]["person"]["columns"]["year_of_birth"]["bounds"];
        assert_eq!(
            (bounds[0].as_integer(), bounds[1].as_integer()),
            (Some(1926), Some(2026))
        );
    }
    assert!(
        latest > days("2025-12-01"),
        "visits run to the window's end"
    );

    for bad in [
        "2024-13", "24-12", "2024/12", "2024-1", "1999-12", "2100-01", "",
    ] {
        let err = bad.parse::<WindowEnd>().expect_err(bad).to_string();
        assert!(
            err.contains("--window-end") && err.contains("YYYY-MM"),
            "{bad}: {err}"
        );
    }
    assert_eq!(WindowEnd::default().to_string(), "2024-12");
    assert_eq!(SynthOptions::new("x").window_end, WindowEnd::default());
}

/// Day number of a `YYYY-MM-DD` date.
fn days(iso: &str) -> i32 {
    let d: Vec<i64> = iso.split('-').map(|p| p.parse().expect("digits")).collect();
    // Howard Hinnant's days_from_civil.
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1])
    } else {
        (d[0], d[1])
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) as i32
}

/// FNV-1a over the default output's files (paths and bytes, in path order;
/// `manifest.json` left out, since it names the crate's version).
fn digest(dir: &Path) -> u64 {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != "manifest.json") {
                let rel = p.strip_prefix(dir).expect("prefix").display().to_string();
                files.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in files {
        for b in name.bytes().chain([0]).chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The default output (no region mode), pinned: region mode must not change
/// a byte of it. CSV, so that the Parquet writer's version string does not
/// enter the digest.
const DEFAULT_DIGEST: u64 = 0xf5d0_fdce_ce08_df43;

#[test]
fn the_default_output_is_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("default");
    generate(&options(&out, 5, 400, 42, Format::Csv), |_| {}).expect("generate");
    assert!(!out.join("region.toml").exists());
    let got = digest(&out);
    assert_eq!(
        got, DEFAULT_DIGEST,
        "the default output changed: if the model or the files changed on purpose (or arrow's CSV writer did), set DEFAULT_DIGEST to {got}"
    );
}
