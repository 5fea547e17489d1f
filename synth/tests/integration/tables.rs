use std::collections::{HashMap, HashSet};

use confer_node::omop;
use datafusion::arrow::datatypes::DataType;

use crate::common::*;

#[test]
fn every_table_has_the_cdm_columns_and_required_values() {
    let net = network();
    let mut rows: HashMap<&str, usize> = HashMap::new();
    for site in &net.summary.sites {
        let dir = net.site_dir(&site.name);
        for table in PERSON_TABLES.iter().chain(PUBLIC_TABLES.iter()) {
            let batch = read(&dir, table);
            let spec = omop::table(table).expect("an OMOP table");
            let schema = batch.schema();
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            let want: Vec<&str> = spec.iter().map(|c| c.name).collect();
            assert_eq!(names, want, "{}/{table}: columns", site.name);
            for (field, col) in batch.schema().fields().iter().zip(&spec) {
                assert_eq!(
                    field.data_type(),
                    &col.column_type.arrow_type(),
                    "{}/{table}.{}",
                    site.name,
                    col.name
                );
                let array = batch.column_by_name(col.name).expect("column");
                if col.required {
                    assert_eq!(
                        array.null_count(),
                        0,
                        "{}/{table}.{} has nulls",
                        site.name,
                        col.name
                    );
                    assert!(!field.is_nullable(), "{}/{table}.{}", site.name, col.name);
                }
            }
            *rows.entry(table).or_default() += batch.num_rows();
            assert_eq!(
                site.rows.get(*table).copied(),
                Some(batch.num_rows() as u64),
                "{}/{table}: summary row count",
                site.name
            );
        }
    }
    for table in PERSON_TABLES.iter().chain(PUBLIC_TABLES.iter()) {
        assert!(rows[table] > 0, "no {table} rows anywhere");
    }
    // Not every resident uses care in six years, but most do.
    let tertiary = read(&net.site_dir("tertiary-1"), "person").num_rows();
    assert!(tertiary > 100, "tertiary sees {tertiary} residents");
}

#[test]
fn ids_are_unique_across_the_network() {
    for (table, id) in [
        ("observation_period", "observation_period_id"),
        ("visit_occurrence", "visit_occurrence_id"),
        ("condition_occurrence", "condition_occurrence_id"),
        ("drug_exposure", "drug_exposure_id"),
        ("procedure_occurrence", "procedure_occurrence_id"),
        ("measurement", "measurement_id"),
        ("cost", "cost_id"),
    ] {
        let mut seen = HashSet::new();
        for (site, b) in all(table) {
            for v in ints_req(&b, id) {
                assert!(
                    seen.insert(v),
                    "{site}/{table}: {id} {v} appears twice in the network"
                );
            }
        }
        assert!(!seen.is_empty(), "{table} is empty");
    }
    // person_id is unique within a site.
    for (site, b) in all("person") {
        let ids = ints_req(&b, "person_id");
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "{site}: a person twice");
    }
}

#[test]
fn references_resolve() {
    let visits = visits_by_id();
    // Events point at a visit of the same site and person.
    for table in [
        "condition_occurrence",
        "drug_exposure",
        "procedure_occurrence",
        "measurement",
    ] {
        for (site, b) in all(table) {
            let persons = ints_req(&b, "person_id");
            for (i, v) in ints(&b, "visit_occurrence_id").into_iter().enumerate() {
                let v = v.unwrap_or_else(|| panic!("{site}/{table}: row without a visit"));
                let (vsite, vperson, _) = &visits[&v];
                assert_eq!(
                    (vsite, *vperson),
                    (&site, persons[i]),
                    "{site}/{table} row {i}"
                );
            }
        }
    }
    for (site, b) in all("cost") {
        let persons = ints(&b, "person_id");
        let domains = b.column_by_name("cost_domain_id").expect("column");
        let domains = datafusion::arrow::array::AsArray::as_string::<i32>(domains);
        for (i, v) in ints_req(&b, "cost_event_id").into_iter().enumerate() {
            let (vsite, vperson, _) = &visits[&v];
            assert_eq!(
                (vsite, Some(*vperson)),
                (&site, persons[i]),
                "{site}/cost row {i}"
            );
            assert_eq!(domains.value(i), "Visit");
        }
        let charge = floats(&b, "total_charge");
        let payer = floats(&b, "paid_by_payer");
        let patient = floats(&b, "paid_by_patient");
        let paid = floats(&b, "total_paid");
        for i in 0..b.num_rows() {
            let (c, p, q, t) = (
                charge[i].unwrap(),
                payer[i].unwrap(),
                patient[i].unwrap(),
                paid[i].unwrap(),
            );
            assert!(c > 0.0 && c <= 100_000.0, "{site}: charge {c}");
            assert!(p >= 0.0 && q >= 0.0 && (p + q - t).abs() < 0.011 && (t - c).abs() < 0.011);
        }
    }
    // Referral chains: the earlier visit exists (possibly at another site),
    // belongs to the same person and started before.
    let mut links = 0;
    let mut across_sites = 0;
    for (site, b) in all("visit_occurrence") {
        let persons = ints_req(&b, "person_id");
        let starts = timestamps(&b, "visit_start_datetime");
        for (i, p) in ints(&b, "preceding_visit_occurrence_id")
            .into_iter()
            .enumerate()
        {
            let Some(p) = p else { continue };
            let (psite, pperson, pstart) = visits
                .get(&p)
                .unwrap_or_else(|| panic!("{site}: preceding visit {p} does not exist"));
            assert_eq!(
                *pperson, persons[i],
                "{site}: preceding visit of another person"
            );
            assert!(
                *pstart < starts[i].unwrap(),
                "{site}: preceding visit {p} is not earlier"
            );
            links += 1;
            across_sites += usize::from(psite != &site);
        }
    }
    assert!(links > 20, "only {links} referral links");
    assert!(across_sites > 5, "only {across_sites} links across sites");
}

#[test]
fn concepts_used_are_in_the_site_vocabulary() {
    let net = network();
    for site in &net.summary.sites {
        let dir = net.site_dir(&site.name);
        let concepts: HashSet<i64> = ints_req(&read(&dir, "concept"), "concept_id")
            .into_iter()
            .collect();
        for table in PERSON_TABLES
            .iter()
            .chain(["care_site", "provider", "concept_ancestor"].iter())
        {
            let b = read(&dir, table);
            for field in b.schema().fields() {
                let name = field.name();
                let is_concept = name.ends_with("_concept_id")
                    || name == "ancestor_concept_id"
                    || name == "descendant_concept_id";
                if !is_concept || field.data_type() != &DataType::Int64 {
                    continue;
                }
                for v in ints(&b, name).into_iter().flatten() {
                    assert!(
                        concepts.contains(&v),
                        "{}/{table}.{name} = {v} is not in concept",
                        site.name
                    );
                }
            }
        }
        // Every standard concept has its level-0 self link.
        let a = read(&dir, "concept_ancestor");
        let anc = ints_req(&a, "ancestor_concept_id");
        let desc = ints_req(&a, "descendant_concept_id");
        let level = ints_req(&a, "min_levels_of_separation");
        let selfs: HashSet<i64> = (0..a.num_rows())
            .filter(|&i| anc[i] == desc[i] && level[i] == 0)
            .map(|i| anc[i])
            .collect();
        assert!(selfs.contains(&192671) && selfs.contains(&9201));
        assert!((0..a.num_rows()).any(|i| anc[i] == 1332418 && desc[i] == 1332419));
    }
}

#[test]
fn observation_periods_cover_every_visit_and_nothing_follows_death() {
    let mut deaths: HashMap<i64, i32> = HashMap::new();
    for (site, b) in all("death") {
        let d = dates(&b, "death_date");
        for (i, p) in ints_req(&b, "person_id").into_iter().enumerate() {
            assert!(
                deaths.insert(p, d[i].unwrap()).is_none(),
                "{site}: person {p} dies twice"
            );
        }
    }
    assert!(!deaths.is_empty(), "nobody died");
    for ((site, periods), (_, visits)) in all("observation_period")
        .into_iter()
        .zip(all("visit_occurrence"))
    {
        let mut span: HashMap<i64, (i32, i32)> = HashMap::new();
        let starts = dates(&periods, "observation_period_start_date");
        let ends = dates(&periods, "observation_period_end_date");
        for (i, p) in ints_req(&periods, "person_id").into_iter().enumerate() {
            let (s, e) = (starts[i].unwrap(), ends[i].unwrap());
            assert!(s <= e);
            assert!(
                span.insert(p, (s, e)).is_none(),
                "{site}: two periods for {p}"
            );
        }
        let persons = read(&network().site_dir(&site), "person").num_rows();
        assert_eq!(span.len(), persons, "{site}: one period per person");
        let vs = dates(&visits, "visit_start_date");
        let ve = dates(&visits, "visit_end_date");
        for (i, p) in ints_req(&visits, "person_id").into_iter().enumerate() {
            let (s, e) = span[&p];
            let (a, b) = (vs[i].unwrap(), ve[i].unwrap());
            assert!(
                s <= a && b <= e && a <= b,
                "{site}: visit of {p} outside its period"
            );
            if let Some(&d) = deaths.get(&p) {
                assert!(a <= d, "{site}: visit of {p} after death");
            }
        }
    }
}
