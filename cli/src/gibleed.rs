//! Splitting the OHDSI GiBleed OMOP CSVs into sites, by person.
//!
//! Every table with a `PERSON_ID` column is split so that each person's
//! rows land wholly at one site (site = person_id mod n); the union of the
//! sites is the original dataset. Public vocabulary tables are not copied:
//! nodes read them in place.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};

/// The person-level GiBleed tables a demo node serves.
pub const PERSON_TABLES: &[&str] = &[
    "PERSON",
    "OBSERVATION_PERIOD",
    "VISIT_OCCURRENCE",
    "CONDITION_OCCURRENCE",
    "DRUG_EXPOSURE",
    "PROCEDURE_OCCURRENCE",
    "MEASUREMENT",
    "OBSERVATION",
    "DEATH",
];

/// The public vocabulary tables a demo node serves from the source directory.
pub const PUBLIC_TABLES: &[&str] = &["CONCEPT", "CONCEPT_ANCESTOR"];

/// Default location of the GiBleed CSVs: `../shared/data/eunomia_gibleed/csv`
/// from the current directory, else from the source tree.
pub fn default_data_dir() -> Option<PathBuf> {
    let rel = Path::new("shared/data/eunomia_gibleed/csv");
    let candidates = [
        Path::new("..").join(rel),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("PERSON.csv").is_file())
}

/// Splits `tables` of `src` into `out/site-<i>/<TABLE>.csv` for `sites` sites.
/// Returns the site directories.
pub fn split(
    src: &Path,
    out: &Path,
    sites: usize,
    tables: &[&str],
) -> anyhow::Result<Vec<PathBuf>> {
    if sites == 0 {
        bail!("--sites must be at least 1");
    }
    let dirs: Vec<PathBuf> = (0..sites)
        .map(|i| out.join(format!("site-{}", site_letter(i))))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    for table in tables {
        split_file(
            &src.join(format!("{table}.csv")),
            &dirs,
            &format!("{table}.csv"),
            "person_id",
        )?;
    }
    Ok(dirs)
}

/// Splits one CSV file into `dirs` (as `name`), each row going to the site
/// `unit mod dirs.len()`, where `unit` is the whole-number column
/// `unit_column` (case-insensitive). The header is copied to every site.
pub fn split_file(
    path: &Path,
    dirs: &[PathBuf],
    name: &str,
    unit_column: &str,
) -> anyhow::Result<()> {
    let mut reader = csv::Reader::from_path(path).with_context(|| {
        format!(
            "cannot read {} (is --data the GiBleed csv directory?)",
            path.display()
        )
    })?;
    let headers = reader.headers()?.clone();
    let unit = headers
        .iter()
        .position(|h| h.eq_ignore_ascii_case(unit_column))
        .ok_or_else(|| anyhow!("{} has no {unit_column} column", path.display()))?;
    let mut writers = dirs
        .iter()
        .map(|d| {
            let p = d.join(name);
            Ok(csv::Writer::from_writer(File::create(&p).with_context(
                || format!("cannot write {}", p.display()),
            )?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for w in &mut writers {
        w.write_record(&headers)?;
    }
    for (line, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} line {}", path.display(), line + 2))?;
        let id: u64 = record
            .get(unit)
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                anyhow!(
                    "{} line {}: {unit_column} is not a whole number",
                    path.display(),
                    line + 2
                )
            })?;
        writers[(id % dirs.len() as u64) as usize].write_record(&record)?;
    }
    for mut w in writers {
        w.flush()?;
    }
    Ok(())
}

/// Site names: site-a, site-b, ...; past z, site-27 and so on.
pub fn site_letter(i: usize) -> String {
    if i < 26 {
        ((b'a' + i as u8) as char).to_string()
    } else {
        (i + 1).to_string()
    }
}

/// Public domains the demo declares (column -> TOML value).
pub fn demo_columns() -> BTreeMap<&'static str, Vec<(&'static str, &'static str)>> {
    BTreeMap::from([
        (
            "person",
            vec![
                ("gender_concept_id", "{ domain = [8507, 8532] }"),
                ("race_concept_id", "{ domain = [0, 8515, 8516, 8527] }"),
                (
                    "year_of_birth",
                    "{ bounds = [1900, 2025], domain = { from = 1900, to = 1999 } }",
                ),
            ],
        ),
        (
            "visit_occurrence",
            vec![("visit_concept_id", "{ domain = [9201, 9202, 9203] }")],
        ),
        (
            "condition_occurrence",
            // A public concept set: GI bleeding and the most frequent conditions.
            vec![(
                "condition_concept_id",
                "{ domain = [192671, 40481087, 4112343, 260139, 372328, 80180, 28060, 81151, 378001, 4283893] }",
            )],
        ),
        (
            "drug_exposure",
            vec![(
                "drug_concept_id",
                "{ domain = [1118084, 1124300, 1127433, 19059056, 1713671] }",
            )],
        ),
    ])
}

/// What a demo node is told besides its data.
pub struct NodeSetup<'a> {
    /// Site name.
    pub name: &'a str,
    /// Where its ledger lives.
    pub state_dir: &'a Path,
    /// The coordinator's public key (hex).
    pub coordinator_key: &'a str,
    /// The `[policy]` section, as TOML.
    pub policy: &'a str,
}

/// Writes a node.toml for one site.
pub fn write_node_config(
    path: &Path,
    setup: &NodeSetup<'_>,
    site_dir: &Path,
    src: &Path,
) -> anyhow::Result<()> {
    let columns = demo_columns();
    let mut text = format!(
        "# Written by `confer demo`: one GiBleed site.\n[node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n\
         state_dir = {state:?}\ncoordinator_key = \"{key}\"\n\n{policy}\n",
        name = setup.name,
        state = setup.state_dir.display().to_string(),
        key = setup.coordinator_key,
        policy = setup.policy.trim_end(),
    );
    for table in PERSON_TABLES {
        let lower = table.to_ascii_lowercase();
        text.push_str(&format!(
            "\n[tables.{lower}]\npath = {:?}\nprivacy_unit = \"person_id\"\n",
            site_dir.join(format!("{table}.csv")).display().to_string()
        ));
        if let Some(cols) = columns.get(lower.as_str()) {
            text.push_str(&format!("[tables.{lower}.columns]\n"));
            for (c, v) in cols {
                text.push_str(&format!("{c} = {v}\n"));
            }
        }
    }
    for table in PUBLIC_TABLES {
        text.push_str(&format!(
            "\n[tables.{}]\npath = {:?}\n",
            table.to_ascii_lowercase(),
            src.join(format!("{table}.csv")).display().to_string()
        ));
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_row_and_each_person_at_one_site() {
        let src = tempfile::tempdir().expect("tmp");
        std::fs::write(
            src.path().join("PERSON.csv"),
            "PERSON_ID,NAME\n1,\"a, b\"\n2,c\n3,d\n4,e\n",
        )
        .expect("write");
        let out = tempfile::tempdir().expect("tmp");
        let dirs = split(src.path(), out.path(), 3, &["PERSON"]).expect("split");
        let mut total = 0;
        for (i, d) in dirs.iter().enumerate() {
            let mut r = csv::Reader::from_path(d.join("PERSON.csv")).expect("read");
            for rec in r.records() {
                let rec = rec.expect("record");
                let id: u64 = rec[0].parse().expect("id");
                assert_eq!(id % 3, i as u64);
                total += 1;
            }
        }
        assert_eq!(total, 4);
        let first = std::fs::read_to_string(dirs[1].join("PERSON.csv")).expect("read");
        assert!(first.contains("\"a, b\""), "{first}");
    }
}
